//! Deployment on real processes: workers that run as `nobody` under a root primary, the hostile
//! worker's attacks refused by the kernel, a failed drop that never runs application code, CPU
//! pinning, process names and `RLIMIT_NOFILE`.
//!
//! Runs under the fork-per-test runner of `tests/util` (`harness = false`). Tests that need root
//! (changing uid) or the `nobody` user print why and pass without checking when the machine
//! lacks them. Each worker reports what the kernel says about it (`/proc/self/status`, `comm`,
//! `getrlimit`, the result of each attack) in one message of `key=value` lines.

mod util;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use forkcluster::{
    Affinity, Cluster, Error, Event, Groups, Next, Primary, Worker, EXIT_PRIVSEP_FAILED,
};

fn main() {
    util::run(tests![
        workers_run_as_nobody_with_its_groups,
        no_supplementary_groups_and_no_new_privs,
        group_alone_changes_only_the_groups,
        hostile_worker_as_nobody_is_refused_by_the_kernel,
        without_a_user_the_same_worker_reaches_the_primary,
        dumpable_workers_can_reach_their_siblings,
        dropped_workers_die_with_the_primary,
        failed_drop_exits_before_the_worker_function,
        start_refuses_what_cannot_work,
        cpu_affinity_auto_names_and_nofile,
        cpu_affinity_list_and_worker_name,
        nofile_limit_is_never_lowered,
    ])
}

// ---------------------------------------------------------------------------------------------
// Helpers.

/// Events, owned.
#[derive(Debug)]
enum E {
    Fork { id: u32, pid: u32 },
    Online(#[allow(dead_code)] u32),
    Msg { id: u32, text: String },
    Exit { id: u32, code: Option<i32> },
    Other(#[allow(dead_code)] String),
    Idle,
    Done,
}

fn own(e: Event<'_>) -> E {
    match e {
        Event::Fork { id, pid } => E::Fork { id, pid },
        Event::Online { id } => E::Online(id),
        Event::Message { id, payload, .. } => E::Msg {
            id,
            text: String::from_utf8_lossy(payload).into_owned(),
        },
        Event::Exit { id, status, .. } => E::Exit {
            id,
            code: status.code(),
        },
        Event::Idle => E::Idle,
        other => E::Other(other.to_string()),
    }
}

fn ev(p: &mut Primary) -> E {
    match p.next_event_timeout(Duration::from_millis(20)) {
        Ok(Some(e)) => own(e),
        Ok(None) => E::Done,
        Err(e) => panic!("next_event failed: {e}"),
    }
}

/// Pumps events into `f` until it returns true; panics after `limit`.
fn pump(p: &mut Primary, limit: Duration, mut f: impl FnMut(&mut Primary, E) -> bool) {
    let end = Instant::now() + limit;
    loop {
        assert!(Instant::now() < end, "timed out after {limit:?}");
        let e = ev(p);
        let done = matches!(e, E::Done);
        if f(p, e) {
            return;
        }
        assert!(!done, "the cluster ended while events were awaited");
    }
}

/// One report per worker id, until `n` arrived: (pid of each id, its report).
type Reports = BTreeMap<u32, (u32, BTreeMap<String, String>)>;

fn reports(p: &mut Primary, n: usize, log: &mut Vec<E>) -> Reports {
    let mut pids = BTreeMap::new();
    let mut out = Reports::new();
    pump(p, Duration::from_secs(10), |_, e| {
        match &e {
            E::Fork { id, pid } => {
                pids.insert(*id, *pid);
            }
            E::Msg { id, text } => {
                out.insert(*id, (pids.get(id).copied().unwrap_or(0), parse(text)));
            }
            // (A worker the test killed has no code.)
            E::Exit { id, code: Some(c) } => {
                panic!("worker {id} exited with {c} before it reported")
            }
            _ => {}
        }
        if !matches!(e, E::Idle) {
            log.push(e);
        }
        out.len() >= n
    });
    out
}

fn parse(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Pumps for `d`, returning every event but `Idle`.
fn settle(p: &mut Primary, d: Duration) -> Vec<E> {
    let end = Instant::now() + d;
    let mut log = Vec::new();
    while Instant::now() < end {
        match ev(p) {
            E::Idle => {}
            E::Done => {
                log.push(E::Done);
                break;
            }
            e => log.push(e),
        }
    }
    log
}

fn me() -> i32 {
    std::process::id() as i32
}

/// Drops the primary and checks that every worker it had was killed and reaped.
fn finish(p: Primary) {
    drop(p);
    let left = util::children_of(me());
    assert!(left.is_empty(), "children left behind: {left:?}");
}

/// A line of `/proc/self/status` (`Uid`, `Groups`, ...), its value with tabs as spaces.
fn status(field: &str) -> String {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `nobody`'s uid and gid, or `None` (with the reason printed) when the test cannot run here.
fn nobody() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("    skipped: not root (changing the workers' user needs root)");
        return None;
    }
    let name = CString::new("nobody").unwrap();
    // SAFETY: the test process is single-threaded; the entry is copied out at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        println!("    skipped: this machine has no user `nobody`");
        return None;
    }
    // SAFETY: non-null result of getpwnam, read before any other lookup.
    Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// `id -G nobody`: nobody's groups as an independent tool sees them, sorted.
fn groups_of_nobody() -> Vec<u32> {
    let out = std::process::Command::new("id")
        .args(["-G", "nobody"])
        .output()
        .expect("run id");
    assert!(out.status.success());
    let mut g: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|s| s.parse().expect("gid"))
        .collect();
    g.sort();
    g.dedup();
    g
}

fn sorted_numbers(s: &str) -> Vec<u32> {
    let mut v: Vec<u32> = s.split_whitespace().map(|x| x.parse().unwrap()).collect();
    v.sort();
    v
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `OK` for a call that succeeded, else the errno's name.
fn outcome(ok: bool) -> String {
    if ok {
        return "OK".into();
    }
    match errno() {
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        libc::ESRCH => "ESRCH".into(),
        libc::EFAULT => "EFAULT".into(),
        libc::ENOENT => "ENOENT".into(),
        libc::ENOSYS => "ENOSYS".into(),
        n => format!("errno {n}"),
    }
}

fn try_open(path: &str, write: bool) -> String {
    let r = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path);
    match r {
        Ok(_) => "OK".into(),
        Err(e) => {
            let code = e.raw_os_error().unwrap_or(0);
            match code {
                libc::EPERM => "EPERM".into(),
                libc::EACCES => "EACCES".into(),
                n => format!("errno {n}"),
            }
        }
    }
}

/// What the kernel says about this worker, as `key=value` lines.
fn identity(w: &Worker) -> String {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    // SAFETY: PR_GET_DUMPABLE takes no pointer.
    let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE) };
    let mut pdeath: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one int through the pointer.
    unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut pdeath as *mut libc::c_int) };
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap_or_default();
    let mut out = format!(
        "id={}\nuid={}\ngid={}\ngroups={}\ncapeff={}\ncapprm={}\ncapamb={}\nnnp={}\ncpus={}\ncomm={}\nnofile={}\ndumpable={dumpable}\npdeathsig={pdeath}\n",
        w.id(),
        status("Uid"),
        status("Gid"),
        status("Groups"),
        status("CapEff"),
        status("CapPrm"),
        status("CapAmb"),
        status("NoNewPrivs"),
        status("Cpus_allowed_list"),
        comm.trim_end(),
        rl.rlim_cur,
    );
    // SAFETY: plain integers. Last, after everything above was read: in a worker
    // that kept root, setgid(0) changes its gid.
    let setuid0 = outcome(unsafe { libc::setuid(0) } == 0);
    // SAFETY: as above.
    let setgid0 = outcome(unsafe { libc::setgid(0) } == 0);
    out.push_str(&format!("setuid0={setuid0}\nsetgid0={setgid0}\n"));
    out
}

/// Waits for the disconnect request, then exits 0.
fn idle(mut w: Worker) -> i32 {
    while let Ok(Some(n)) = w.next() {
        if let Next::Disconnect = n {
            break;
        }
    }
    0
}

/// Reports [`identity`], then idles.
fn report(mut w: Worker) -> i32 {
    let r = identity(&w);
    if w.send(r.as_bytes()).is_err() {
        return 3;
    }
    idle(w)
}

// ---------------------------------------------------------------------------------------------
// 1. Privilege separation: who the workers are.

fn workers_run_as_nobody_with_its_groups() {
    let Some((uid, gid)) = nobody() else { return };
    let groups = groups_of_nobody();
    let mut p = Cluster::builder()
        .workers(2)
        .user("nobody")
        .start(report)
        .unwrap();
    let mut log = Vec::new();
    let mut r = reports(&mut p, 2, &mut log);
    // A respawned worker drops too: kill worker 1 and read its replacement's report.
    let (pid1, _) = r[&1];
    // SAFETY: kill has no memory preconditions; the pid is this test's worker.
    assert_eq!(unsafe { libc::kill(pid1 as i32, libc::SIGKILL) }, 0);
    let more = reports(&mut p, 1, &mut log);
    r.extend(more);
    assert_eq!(r.len(), 3, "{log:?}");
    for (id, (pid, rep)) in &r {
        assert_eq!(
            rep["uid"],
            format!("{uid} {uid} {uid} {uid}"),
            "worker {id}"
        );
        assert_eq!(
            rep["gid"],
            format!("{gid} {gid} {gid} {gid}"),
            "worker {id}"
        );
        assert_eq!(sorted_numbers(&rep["groups"]), groups, "worker {id}");
        // No capability left: effective, permitted and ambient sets are empty.
        assert_eq!(rep["capeff"], "0000000000000000", "worker {id}");
        assert_eq!(rep["capprm"], "0000000000000000", "worker {id}");
        assert_eq!(rep["capamb"], "0000000000000000", "worker {id}");
        // Root cannot be had back, from application code either.
        assert_eq!(rep["setuid0"], "EPERM", "worker {id}");
        assert_eq!(rep["setgid0"], "EPERM", "worker {id}");
        // Not dumpable (the default once the ids change), and still dies with the primary.
        assert_eq!(rep["dumpable"], "0", "worker {id}");
        assert_eq!(rep["pdeathsig"], libc::SIGKILL.to_string(), "worker {id}");
        assert_eq!(rep["id"], id.to_string());
        // What the primary reads from outside agrees.
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        assert!(st.contains(&format!("\nUid:\t{uid}\t")) || *id == 1, "{st}");
    }
    // The primary kept its privileges.
    assert_eq!(status("Uid"), "0 0 0 0");
    assert_ne!(status("CapEff"), "0000000000000000");
    finish(p);
}

fn no_supplementary_groups_and_no_new_privs() {
    let Some((uid, gid)) = nobody() else { return };
    let mut p = Cluster::builder()
        .workers(1)
        .user(uid) // by number this time
        .group(gid)
        .supplementary_groups(Groups::None)
        .no_new_privs(true)
        .start(report)
        .unwrap();
    let r = reports(&mut p, 1, &mut Vec::new());
    let rep = &r[&1].1;
    assert_eq!(rep["uid"], format!("{uid} {uid} {uid} {uid}"));
    assert_eq!(rep["gid"], format!("{gid} {gid} {gid} {gid}"));
    assert_eq!(
        rep["groups"], "",
        "no supplementary group, root's 0 gone too"
    );
    assert_eq!(rep["nnp"], "1");
    assert_eq!(status("NoNewPrivs"), "0", "the primary is unchanged");
    finish(p);
}

/// `group` without `user`: the workers keep uid 0 and change their gid, and root's groups are
/// replaced by that group alone.
fn group_alone_changes_only_the_groups() {
    let Some((_, gid)) = nobody() else { return };
    let mut p = Cluster::builder()
        .workers(1)
        .group(gid)
        .start(report)
        .unwrap();
    let r = reports(&mut p, 1, &mut Vec::new());
    let rep = &r[&1].1;
    assert_eq!(rep["uid"], "0 0 0 0", "{rep:?}");
    assert_eq!(rep["gid"], format!("{gid} {gid} {gid} {gid}"));
    assert_eq!(rep["groups"], gid.to_string());
    finish(p);
}

// ---------------------------------------------------------------------------------------------
// The hostile worker: every attack on the primary and on a sibling, from a worker.

/// Attacks process `target` (the primary, or a sibling when `sibling`), one `key=outcome` line
/// per attack.
fn attacks(target: i32, sibling: bool) -> String {
    let t = if sibling { "sibling" } else { "primary" };
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{t}_{k}={v}\n"));
    if !sibling {
        for (name, sig) in [
            ("kill_term", libc::SIGTERM),
            ("kill_int", libc::SIGINT),
            ("kill_hup", libc::SIGHUP),
            ("kill_ttin", libc::SIGTTIN),
            ("kill_kill", libc::SIGKILL),
            ("kill_cont", libc::SIGCONT),
        ] {
            // SAFETY: kill has no memory preconditions.
            line(name, outcome(unsafe { libc::kill(target, sig) } == 0));
        }
    } else {
        // SAFETY: signal 0 only checks permission.
        line("kill_0", outcome(unsafe { libc::kill(target, 0) } == 0));
    }
    // SAFETY: PTRACE_ATTACH takes no pointers (the null addr and data are ignored).
    let attached = unsafe {
        libc::ptrace(
            libc::PTRACE_ATTACH,
            target,
            core::ptr::null_mut::<libc::c_void>(),
            core::ptr::null_mut::<libc::c_void>(),
        )
    } == 0;
    line("ptrace_attach", outcome(attached));
    line("mem_read", try_open(&format!("/proc/{target}/mem"), false));
    line("mem_write", try_open(&format!("/proc/{target}/mem"), true));
    line(
        "environ",
        try_open(&format!("/proc/{target}/environ"), false),
    );
    line(
        "fd_dir",
        match std::fs::read_dir(format!("/proc/{target}/fd")) {
            Ok(_) => "OK".into(),
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => "EACCES".into(),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => "EPERM".into(),
            Err(e) => format!("{e}"),
        },
    );
    // process_vm_readv checks permission before it looks at the addresses: EPERM is refused,
    // EFAULT would mean allowed (the address is made up).
    let mut buf = [0u8; 8];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: 0x10000 as *mut libc::c_void,
        iov_len: 8,
    };
    // SAFETY: `local` points to `buf`, valid for 8 bytes of writes; `remote` is only an
    // address in the other process.
    let n = unsafe { libc::process_vm_readv(target, &local, 1, &remote, 1, 0) };
    line("vm_read", outcome(n >= 0));
    out
}

/// Worker 1 gets the primary's and its sibling's pid in a message, attacks both and reports;
/// the others idle.
fn attacker(mut w: Worker) -> i32 {
    if w.id() != 1 {
        return idle(w);
    }
    let sibling: i32 = loop {
        match w.next() {
            Ok(Some(Next::Message(m))) => {
                break String::from_utf8_lossy(m.payload).parse().unwrap_or(0)
            }
            Ok(Some(_)) => {}
            _ => return 4,
        }
    };
    // SAFETY: getppid has no preconditions.
    let primary = unsafe { libc::getppid() };
    let mut r = identity(&w);
    r.push_str(&attacks(primary, false));
    r.push_str(&attacks(sibling, true));
    if w.send(r.as_bytes()).is_err() {
        return 3;
    }
    idle(w)
}

/// Runs the attacker against a cluster built by `b`; returns the report and the events after.
fn run_attacker(b: forkcluster::Builder) -> (BTreeMap<String, String>, Primary, Vec<E>) {
    let mut p = b.workers(2).start(attacker).unwrap();
    let mut pids = BTreeMap::new();
    let mut online = 0;
    pump(&mut p, Duration::from_secs(10), |_, e| {
        match e {
            E::Fork { id, pid } => {
                pids.insert(id, pid);
            }
            E::Online(_) => online += 1,
            E::Exit { id, code } => panic!("worker {id} exited ({code:?})"),
            _ => {}
        }
        online == 2
    });
    p.send(1, pids[&2].to_string().as_bytes()).unwrap();
    let mut rep = None;
    let mut log = Vec::new();
    pump(&mut p, Duration::from_secs(10), |_, e| {
        if let E::Msg { id: 1, text } = &e {
            rep = Some(parse(text));
            return true;
        }
        if !matches!(e, E::Idle) {
            log.push(e);
        }
        false
    });
    // Whatever the signals did shows within a few ticks.
    log.extend(settle(&mut p, Duration::from_millis(300)));
    (rep.unwrap(), p, log)
}

/// `want` for attack `key`, except the two attacks qemu-user cannot make: it implements neither
/// `ptrace` nor `process_vm_readv` and answers ENOSYS itself, so the kernel's verdict on them
/// shows only on a real kernel (which CI runs too).
fn kernel_says(key: &str, want: &'static str) -> &'static str {
    if (key.ends_with("_ptrace_attach") || key.ends_with("_vm_read")) && util::under_qemu() {
        println!(
            "    under qemu-user: {key} not made (qemu answers ENOSYS), checked on real kernels"
        );
        "ENOSYS"
    } else {
        want
    }
}

fn hostile_worker_as_nobody_is_refused_by_the_kernel() {
    let Some((uid, _)) = nobody() else { return };
    let (rep, p, log) = run_attacker(Cluster::builder().user("nobody"));
    assert_eq!(rep["uid"], format!("{uid} {uid} {uid} {uid}"));
    let want = [
        // Signals to the primary: refused (a different real and saved uid).
        ("primary_kill_term", "EPERM"),
        ("primary_kill_int", "EPERM"),
        ("primary_kill_hup", "EPERM"),
        ("primary_kill_ttin", "EPERM"),
        ("primary_kill_kill", "EPERM"),
        // The kernel's one exception: SIGCONT within a session. It continues a process that is
        // not stopped: nothing.
        ("primary_kill_cont", "OK"),
        // The primary's memory, environment and fds: refused.
        ("primary_ptrace_attach", "EPERM"),
        ("primary_mem_read", "EACCES"),
        ("primary_mem_write", "EACCES"),
        ("primary_environ", "EACCES"),
        ("primary_fd_dir", "EACCES"),
        ("primary_vm_read", "EPERM"),
        // A sibling runs as the same user, so it can be signalled (a documented limit: the
        // primary sees a crash and respawns), but it is not dumpable: its memory (its heartbeat
        // page included), environment and fds are out of reach.
        ("sibling_kill_0", "OK"),
        ("sibling_ptrace_attach", "EPERM"),
        ("sibling_mem_read", "EACCES"),
        ("sibling_mem_write", "EACCES"),
        ("sibling_environ", "EACCES"),
        ("sibling_fd_dir", "EACCES"),
        ("sibling_vm_read", "EPERM"),
    ];
    for (k, v) in want {
        let v = kernel_says(k, v);
        assert_eq!(rep.get(k).map(String::as_str), Some(v), "{k} in {rep:?}");
    }
    // No signal got through: no stop, no extra worker, nobody exited.
    assert!(
        log.iter().all(|e| matches!(e, E::Idle)),
        "events after the attacks: {log:?}"
    );
    assert_eq!(p.stats().forks, 2);
    assert_eq!(p.workers().count(), 2);
    finish(p);
}

/// The control: the same attacks (but the signals) from a worker that keeps root succeed, so
/// the refusals above come from the drop.
fn without_a_user_the_same_worker_reaches_the_primary() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("    skipped: not root");
        return;
    }
    let mut p = Cluster::builder()
        .workers(1)
        .start(|w: Worker| {
            // SAFETY: getppid has no preconditions.
            let primary = unsafe { libc::getppid() };
            let mut r = String::new();
            r.push_str(&format!(
                "mem_read={}\n",
                try_open(&format!("/proc/{primary}/mem"), false)
            ));
            r.push_str(&format!(
                "environ={}\n",
                try_open(&format!("/proc/{primary}/environ"), false)
            ));
            // SAFETY: signal 0 only checks permission.
            r.push_str(&format!(
                "kill_0={}\n",
                outcome(unsafe { libc::kill(primary, 0) } == 0)
            ));
            let mut w = w;
            let _ = w.send(r.as_bytes());
            idle(w)
        })
        .unwrap();
    let r = reports(&mut p, 1, &mut Vec::new());
    let rep = &r[&1].1;
    assert_eq!(rep["mem_read"], "OK", "{rep:?}");
    assert_eq!(rep["environ"], "OK", "{rep:?}");
    assert_eq!(rep["kill_0"], "OK", "{rep:?}");
    finish(p);
}

/// `dumpable(true)` gives back core dumps, and with them the siblings' memory: the default
/// (off) is what keeps a worker out of its sibling's pages.
fn dumpable_workers_can_reach_their_siblings() {
    let Some(_) = nobody() else { return };
    let yama = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "0".into());
    let (rep, p, _) = run_attacker(Cluster::builder().user("nobody").dumpable(true));
    assert_eq!(rep["dumpable"], "1");
    // The primary stays out of reach either way.
    assert_eq!(rep["primary_mem_read"], "EACCES");
    assert_eq!(rep["primary_kill_term"], "EPERM");
    if yama == "0" {
        assert_eq!(rep["sibling_mem_read"], "OK", "{rep:?}");
        assert_eq!(
            rep["sibling_vm_read"],
            kernel_says("sibling_vm_read", "EFAULT"),
            "allowed, at a made-up address"
        );
    } else {
        println!("    (yama ptrace_scope {yama}: siblings are refused anyway)");
        assert_eq!(rep["sibling_mem_read"], "EACCES");
    }
    finish(p);
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: a valid two-int array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 returned two new fds that nothing else owns.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A change of credentials clears the parent-death signal; the crate sets it again after the
/// drop, so workers running as nobody still die with their primary.
fn dropped_workers_die_with_the_primary() {
    let Some((uid, _)) = nobody() else { return };
    let (r, w) = pipe();
    let primary = util::fork_child(move || {
        let mut p = Cluster::builder()
            .workers(2)
            .user("nobody")
            // Workers that never read their channel: only the parent-death signal can end
            // them when the primary dies.
            .start(|_w: Worker| -> i32 {
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
            .unwrap();
        let mut pids = Vec::new();
        let mut online = 0;
        pump(&mut p, Duration::from_secs(10), |_, e| {
            match e {
                E::Fork { pid, .. } => pids.push(pid),
                E::Online(_) => online += 1,
                _ => {}
            }
            online == 2
        });
        let mut out = Vec::new();
        for pid in pids {
            out.extend_from_slice(&pid.to_le_bytes());
        }
        File::from(w).write_all(&out).unwrap();
        loop {
            let _ = ev(&mut p);
        }
    });
    let guard = util::KillOnDrop(primary);
    let mut buf = [0u8; 8];
    let mut pipe = File::from(r);
    let end = Instant::now() + Duration::from_secs(10);
    let mut got = 0;
    while got < buf.len() {
        let mut pfd = [libc::pollfd {
            fd: pipe.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(pfd.as_mut_ptr(), 1, 100) };
        if pfd[0].revents != 0 {
            let n = pipe.read(&mut buf[got..]).unwrap();
            assert!(n > 0, "the primary closed the pipe early");
            got += n;
        }
        assert!(Instant::now() < end, "no pids from the primary");
    }
    let pids: Vec<i32> = buf
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i32)
        .collect();
    for &pid in &pids {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(st.contains(&format!("\nUid:\t{uid}\t{uid}\t")), "{st}");
    }
    drop(guard); // SIGKILL and reap the primary
    let gone = util::wait_until(Duration::from_secs(2), || {
        pids.iter().all(|&pid| !util::alive(pid))
    });
    assert!(
        gone,
        "workers running as nobody outlived the primary: {pids:?}"
    );
}

/// The primary keeps uid 0 but loses `CAP_SETUID` (so the check at start passes and the
/// worker's `setresuid` fails): the worker exits with [`EXIT_PRIVSEP_FAILED`] and the worker
/// function never runs (no `Online`, no message), never a worker running as root.
fn failed_drop_exits_before_the_worker_function() {
    let Some(_) = nobody() else { return };
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const V3: u32 = 0x2008_0522;
    const CAP_SETUID: u32 = 7;
    let mut h = Header {
        version: V3,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: capget fills a v3 header's two data structs.
    assert_eq!(
        unsafe { libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr()) },
        0
    );
    d[0].effective &= !(1 << CAP_SETUID);
    d[0].permitted &= !(1 << CAP_SETUID);
    d[0].inheritable &= !(1 << CAP_SETUID);
    // SAFETY: capset reads the header and two data structs. This test is its own process
    // (the runner forked it), so only it and its workers lose the capability.
    assert_eq!(
        unsafe { libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()) },
        0,
        "capset"
    );
    let mut p = Cluster::builder()
        .workers(1)
        .respawn(false)
        .user("nobody")
        .start(|mut w: Worker| {
            let _ = w.send(b"the worker function ran");
            3
        })
        .unwrap();
    let mut log = Vec::new();
    pump(&mut p, Duration::from_secs(10), |_, e| {
        let done = matches!(e, E::Exit { .. });
        if !matches!(e, E::Idle) {
            log.push(e);
        }
        done
    });
    assert!(
        log.iter()
            .any(|e| matches!(e, E::Exit { id: 1, code: Some(c) } if *c == EXIT_PRIVSEP_FAILED)),
        "{log:?}"
    );
    assert!(
        !log.iter()
            .any(|e| matches!(e, E::Online(_) | E::Msg { .. })),
        "application code ran: {log:?}"
    );
    finish(p);
}

// ---------------------------------------------------------------------------------------------
// What start() refuses up front.

fn invalid(b: forkcluster::Builder) -> bool {
    matches!(b.workers(1).start(idle), Err(Error::Invalid(_)))
}

fn start_refuses_what_cannot_work() {
    assert!(invalid(Cluster::builder().user("no-such-user-forkcluster")));
    assert!(invalid(
        Cluster::builder().group("no-such-group-forkcluster")
    ));
    assert!(invalid(Cluster::builder().user("nul\0byte")));
    // A uid without a database entry needs its group.
    assert!(invalid(Cluster::builder().user(4_000_000_000u32)));
    assert!(invalid(
        Cluster::builder().cpu_affinity(Affinity::List(vec![]))
    ));
    assert!(invalid(
        Cluster::builder().cpu_affinity(Affinity::List(vec![100_000]))
    ));
    let set = rustix::thread::sched_getaffinity(None).unwrap();
    if let Some(out) = (0..rustix::thread::CpuSet::MAX_CPU).find(|&c| !set.is_set(c)) {
        assert!(invalid(
            Cluster::builder().cpu_affinity(Affinity::List(vec![out]))
        ));
    }
    assert!(invalid(Cluster::builder().worker_name("a\0b")));
    assert_eq!(util::children_of(me()), Vec::<i32>::new(), "nothing forked");

    // Not root: asking for another user is refused before anything forks; asking for one's
    // own user changes nothing and works.
    let Some((uid, gid)) = nobody() else { return };
    let child = util::fork_child(move || {
        // SAFETY: plain integers; this is a forked test child.
        if unsafe { libc::setgroups(0, core::ptr::null()) } != 0
            || unsafe { libc::setresgid(gid, gid, gid) } != 0
            || unsafe { libc::setresuid(uid, uid, uid) } != 0
        {
            return 10;
        }
        match Cluster::builder().workers(1).user("root").start(idle) {
            Err(Error::Invalid(why)) if why.contains("root") => {}
            other => {
                eprintln!("as nobody, user(\"root\"): {other:?}");
                return 11;
            }
        }
        if util::children_of(me()) != Vec::<i32>::new() {
            return 12;
        }
        let mut p = match Cluster::builder().workers(1).user("nobody").start(report) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("as nobody, user(\"nobody\"): {e}");
                return 13;
            }
        };
        let r = reports(&mut p, 1, &mut Vec::new());
        if r[&1].1["uid"] != format!("{uid} {uid} {uid} {uid}") {
            return 14;
        }
        drop(p);
        0
    });
    let st = util::wait_child(child, Duration::from_secs(15));
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "child status {st:#x}"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Placement and limits.

fn allowed_cpus() -> Vec<usize> {
    let set = rustix::thread::sched_getaffinity(None).unwrap();
    (0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&c| set.is_set(c))
        .collect()
}

// rlim_t is u64 on 64-bit targets but u32 on 32-bit glibc ones (i686, armv7, powerpc).
#[allow(clippy::unnecessary_cast)]
fn hard_nofile() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    rl.rlim_max as u64
}

fn cpu_affinity_auto_names_and_nofile() {
    let cpus = allowed_cpus();
    let hard = hard_nofile();
    let n = 2 * cpus.len().min(4);
    let mut p = Cluster::builder()
        .workers(n)
        .cpu_affinity(Affinity::Auto)
        .nofile_limit(u64::MAX)
        .primary_name("fc-primary")
        .start(report)
        .unwrap();
    assert_eq!(p.nofile_limit(), Some(hard), "raised up to the hard limit");
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    assert_eq!(comm.trim_end(), "fc-primary");
    let mut log = Vec::new();
    let mut r = reports(&mut p, n, &mut log);
    // Initial workers 1..=n have slots 0..n: worker id k on allowed CPU (k-1) mod len.
    for (id, (_, rep)) in &r {
        let want = cpus[(*id as usize - 1) % cpus.len()];
        assert_eq!(rep["cpus"], want.to_string(), "worker {id}: {rep:?}");
        assert_eq!(rep["comm"], format!("fc-worker-{id}"));
        assert_eq!(rep["nofile"], hard.to_string());
    }
    // The replacement of worker 1 takes its slot, so its CPU.
    let (pid1, _) = r[&1];
    // SAFETY: kill has no memory preconditions; the pid is this test's worker.
    assert_eq!(unsafe { libc::kill(pid1 as i32, libc::SIGKILL) }, 0);
    r = reports(&mut p, 1, &mut log);
    let (id, (_, rep)) = r.iter().next().unwrap();
    assert_eq!(*id as usize, n + 1, "{log:?}");
    assert_eq!(rep["cpus"], cpus[0].to_string());
    assert_eq!(rep["comm"], format!("fc-worker-{id}"));
    finish(p);
}

fn cpu_affinity_list_and_worker_name() {
    let mut cpus = allowed_cpus();
    cpus.reverse();
    let mut p = Cluster::builder()
        .workers(cpus.len().min(4))
        .cpu_affinity(Affinity::List(cpus.clone()))
        .worker_name("web")
        .start(report)
        .unwrap();
    let r = reports(&mut p, cpus.len().min(4), &mut Vec::new());
    for (id, (pid, rep)) in &r {
        assert_eq!(rep["cpus"], cpus[*id as usize - 1].to_string(), "{rep:?}");
        assert_eq!(rep["comm"], format!("web-{id}"));
        // What ps shows.
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
        assert_eq!(comm.trim_end(), format!("web-{id}"));
    }
    finish(p);
    // An empty prefix keeps the program's name.
    let mine = std::fs::read_to_string("/proc/self/comm").unwrap();
    let mut p = Cluster::builder()
        .workers(1)
        .worker_name("")
        .start(report)
        .unwrap();
    let r = reports(&mut p, 1, &mut Vec::new());
    assert_eq!(r[&1].1["comm"], mine.trim_end());
    finish(p);
}

fn nofile_limit_is_never_lowered() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    let mut p = Cluster::builder()
        .workers(1)
        .nofile_limit(16)
        .start(report)
        .unwrap();
    #[allow(clippy::unnecessary_cast)] // rlim_t is u32 on 32-bit glibc targets
    let cur = rl.rlim_cur as u64;
    assert_eq!(p.nofile_limit(), Some(cur));
    let r = reports(&mut p, 1, &mut Vec::new());
    assert_eq!(r[&1].1["nofile"], rl.rlim_cur.to_string());
    finish(p);
}
