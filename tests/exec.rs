//! Exec'd workers (`Builder::exec`, `Worker::from_env`): the primary forks and each child execs
//! `examples/exec_worker`, a program of its own, which speaks the same frames as a forked worker.
//!
//! `main` first builds the two exec examples (`cargo build --example ...` for this binary's
//! profile, target directory and `--target`, as `tests/examples.rs` does); the tests then run a
//! primary in their own process (the fork-per-test runner of `tests/util`) that execs
//! `exec_worker` found next to this binary. Under a foreign target's emulator (qemu-user) the
//! worker binary could not be exec'd by the kernel, so the tests that exec it are skipped there.

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forkcluster::{Cluster, Error, Event, ListenAddr, Primary, Schedule, Worker};

fn main() {
    if !std::env::args().any(|a| a == "--list") {
        util::Examples::locate().build(&["exec_worker", "exec_primary"]);
    }
    util::run(tests![
        events_messages_and_connections_round_robin => 30,
        shared_schedule_serves_and_fds_are_exactly_the_workers => 30,
        reuseport_exec_workers_get_their_seats_sockets => 30,
        crash_and_respawn => 30,
        missing_program_exits_127_with_backoff => 30,
        args_cwd_and_env_reach_the_program => 30,
        restart_picks_up_a_new_worker_binary => 30,
        from_env_outside_a_cluster_is_a_clear_error,
        start_refuses_what_cannot_work,
        exec_primary_example => 30,
        exec_as_nobody_drops_before_exec => 30,
    ])
}

// ----- helpers ---------------------------------------------------------------------------------

fn worker_path() -> PathBuf {
    util::Examples::locate().path("exec_worker")
}

/// True (and a note on stderr) when the worker binary cannot be exec'd here.
fn skip() -> bool {
    if util::under_qemu() {
        eprintln!("skipped: under qemu-user the kernel cannot exec the target's binaries");
        return true;
    }
    false
}

#[derive(Debug)]
enum E {
    Fork {
        id: u32,
        pid: u32,
    },
    Online(u32),
    Listening(u32, usize),
    Message(u32, String),
    Disconnect(#[allow(dead_code)] u32),
    Exit {
        id: u32,
        code: Option<i32>,
        signal: Option<i32>,
        after: bool,
    },
    Other(#[allow(dead_code)] String),
    Idle,
    Done,
}

fn own(e: Event<'_>) -> E {
    match e {
        Event::Fork { id, pid } => E::Fork { id, pid },
        Event::Online { id } => E::Online(id),
        Event::Listening { id, listener, .. } => E::Listening(id, listener),
        Event::Message { id, payload, .. } => {
            E::Message(id, String::from_utf8_lossy(payload).into_owned())
        }
        Event::Disconnect { id } => E::Disconnect(id),
        Event::Exit {
            id,
            status,
            exited_after_disconnect,
            ..
        } => E::Exit {
            id,
            code: status.code(),
            signal: status.signal(),
            after: exited_after_disconnect,
        },
        Event::Idle => E::Idle,
        other => E::Other(other.to_string()),
    }
}

fn ev(p: &mut Primary, d: Duration) -> E {
    match p.next_event_timeout(d) {
        Ok(Some(e)) => own(e),
        Ok(None) => E::Done,
        Err(e) => panic!("next_event failed: {e}"),
    }
}

/// Pumps events until `f` returns true; panics after `limit`.
fn pump(p: &mut Primary, limit: Duration, mut f: impl FnMut(&mut Primary, E) -> bool) {
    let end = Instant::now() + limit;
    loop {
        assert!(Instant::now() < end, "timed out after {limit:?}");
        let e = ev(p, Duration::from_millis(20));
        let done = matches!(e, E::Done);
        if f(p, e) {
            return;
        }
        assert!(!done, "the cluster ended while events were awaited");
    }
}

/// Pumps until `n` workers are listening on every listener (online without listeners); returns
/// `(id, pid)` of each worker forked meanwhile and the events seen.
fn wait_ready(p: &mut Primary, n: usize) -> (Vec<(u32, u32)>, Vec<E>) {
    let listeners = p.listen_addrs().count();
    let mut forks = Vec::new();
    let mut ready = std::collections::BTreeMap::<u32, usize>::new();
    let mut log = Vec::new();
    pump(p, Duration::from_secs(15), |_, e| {
        match &e {
            E::Fork { id, pid } => forks.push((*id, *pid)),
            E::Online(id) if listeners == 0 => *ready.entry(*id).or_default() += 1,
            E::Listening(id, _) => *ready.entry(*id).or_default() += 1,
            E::Exit { .. } => panic!("a worker exited during start-up: {e:?}"),
            _ => {}
        }
        if !matches!(e, E::Idle) {
            log.push(e);
        }
        ready.values().filter(|&&k| k == listeners.max(1)).count() >= n
    });
    (forks, log)
}

/// Sends `msg` to worker `id` and returns its answer.
fn ask(p: &mut Primary, id: u32, msg: &str) -> String {
    p.send(id, msg.as_bytes()).expect("send");
    let mut got = None;
    pump(p, Duration::from_secs(10), |_, e| match e {
        E::Message(from, text) if from == id => {
            got = Some(text);
            true
        }
        E::Exit { .. } => panic!("a worker exited while worker {id} was asked {msg:?}: {e:?}"),
        _ => false,
    });
    got.unwrap()
}

fn lo0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn tcp_addr(p: &Primary) -> SocketAddr {
    match p.listen_addrs().next() {
        Some(ListenAddr::Tcp(a)) => *a,
        other => panic!("not a TCP listener: {other:?}"),
    }
}

/// `n` HTTP requests to the first listener from a forked client while the primary pumps its loop; returns
/// each response body.
fn get_n(p: &mut Primary, n: usize) -> Vec<String> {
    let addr = tcp_addr(p);
    let (mut rx, tx) = std::os::unix::net::UnixStream::pair().unwrap();
    let child = util::fork_child(move || {
        let mut tx = tx;
        for _ in 0..n {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
            let mut resp = Vec::new();
            s.read_to_end(&mut resp).expect("read the response");
            let text = String::from_utf8_lossy(&resp).into_owned();
            let body = match text.split_once("\r\n\r\n") {
                Some((head, body)) if head.starts_with("HTTP/1.1 200 ") => body.trim().to_string(),
                _ => format!("bad response: {text:?}"),
            };
            writeln!(tx, "{body}").unwrap();
        }
        0
    });
    let end = Instant::now() + Duration::from_secs(20);
    let mut st = 0;
    loop {
        let _ = ev(p, Duration::from_millis(10));
        // SAFETY (test code): waiting for the child this test forked.
        let r = unsafe { libc::waitpid(child, &mut st, libc::WNOHANG) };
        if r == child {
            break;
        }
        assert!(Instant::now() < end, "the client did not finish");
    }
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "client failed: {st}"
    );
    let mut out = String::new();
    // The client's end is closed (it exited): read to the end.
    rx.read_to_string(&mut out).unwrap();
    out.lines().map(str::to_string).collect()
}

/// Stops the cluster gracefully and checks that every worker exits 0 after its disconnect.
fn stop_cleanly(mut p: Primary, ids: &[u32]) {
    p.stop(true);
    let mut exited = Vec::new();
    pump(&mut p, Duration::from_secs(15), |_, e| {
        match e {
            E::Exit {
                id, code, after, ..
            } => {
                assert_eq!((code, after), (Some(0), true), "worker {id} exit");
                exited.push(id);
            }
            E::Done => return true,
            _ => {}
        }
        false
    });
    exited.sort();
    assert_eq!(exited, ids);
    drop(p);
    // SAFETY: getpid has no preconditions.
    let left = util::children_of(unsafe { libc::getpid() });
    assert!(left.is_empty(), "children left: {left:?}");
}

fn exe_of(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default()
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fc-exec-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

// ----- tests -----------------------------------------------------------------------------------

fn events_messages_and_connections_round_robin() {
    if skip() {
        return;
    }
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(2)
        .exec(worker_path())
        .start_exec()
        .expect("start_exec");
    let (forks, log) = wait_ready(&mut p, 2);
    assert_eq!(forks.iter().map(|f| f.0).collect::<Vec<_>>(), [1, 2]);
    for &(id, pid) in &forks {
        // Each event of a worker in order: fork, online, listening.
        let kinds: Vec<&str> = log
            .iter()
            .filter_map(|e| match e {
                E::Fork { id: i, .. } if *i == id => Some("fork"),
                E::Online(i) if *i == id => Some("online"),
                E::Listening(i, 0) if *i == id => Some("listening"),
                _ => None,
            })
            .collect();
        assert_eq!(
            kinds,
            ["fork", "online", "listening"],
            "worker {id}: {log:?}"
        );
        // The worker is the exec'd program, not a fork of this test.
        let exe = exe_of(pid);
        assert_eq!(
            exe.file_name().unwrap(),
            "exec_worker",
            "worker {id} runs {exe:?}"
        );
    }
    // Messages both ways.
    assert_eq!(ask(&mut p, 1, "ping"), "pong 1");
    assert_eq!(ask(&mut p, 2, "ping"), "pong 2");
    assert_eq!(ask(&mut p, 2, "hello there"), "echo hello there");
    // Connections, round-robin over both workers.
    let bodies = get_n(&mut p, 6);
    assert_eq!(bodies.len(), 6);
    for b in &bodies {
        assert!(
            b == "hello from exec'd worker 1" || b == "hello from exec'd worker 2",
            "{b:?}"
        );
    }
    assert!(bodies.iter().any(|b| b.ends_with('1')) && bodies.iter().any(|b| b.ends_with('2')));
    assert_eq!(p.stats().forks, 2);
    stop_cleanly(p, &[1, 2]);
}

fn shared_schedule_serves_and_fds_are_exactly_the_workers() {
    accepting_schedule_serves(Schedule::Shared);
}

/// Under reuseport each exec'd worker gets its own seat's sockets at fds 4 and 5: the two
/// workers' listeners are different sockets.
fn reuseport_exec_workers_get_their_seats_sockets() {
    accepting_schedule_serves(Schedule::ReusePort);
}

fn accepting_schedule_serves(schedule: Schedule) {
    if skip() {
        return;
    }
    // A descriptor the application leaked without close-on-exec must not reach the workers.
    // SAFETY (test code): dup of stdin into a new fd this test owns.
    let leaked = unsafe { OwnedFd::from_raw_fd(libc::dup(0)) };
    assert!(!util::is_cloexec(&leaked));
    let mut p = Cluster::builder()
        .listen(lo0())
        .listen(lo0())
        .workers(2)
        .schedule(schedule)
        .exec(worker_path())
        .start_exec()
        .expect("start_exec");
    let (forks, _) = wait_ready(&mut p, 2);
    let bodies = get_n(&mut p, 4);
    assert_eq!(bodies.len(), 4);
    assert!(
        bodies
            .iter()
            .all(|b| b.starts_with("hello from exec'd worker ")),
        "{bodies:?}"
    );
    let mut listeners = Vec::new();
    for &(id, pid) in &forks {
        let fds = util::fds_of(pid as i32);
        listeners.push(
            fds.iter()
                .filter(|f| f.0 == 4 || f.0 == 5)
                .map(|f| f.1.clone())
                .collect::<Vec<_>>(),
        );
        let mut above: Vec<(i32, String)> = fds.iter().filter(|f| f.0 > 2).cloned().collect();
        // Inherited: the channel at 3 and the two listeners at 4 and 5.
        let inherited: Vec<i32> = above
            .iter()
            .filter(|f| f.1.starts_with("socket:"))
            .map(|f| f.0)
            .collect();
        assert_eq!(inherited, [3, 4, 5], "worker {id}: {fds:?}");
        // The rest are what `Worker` makes itself: its epoll set, pause timer and spare fd.
        above.retain(|f| !f.1.starts_with("socket:"));
        let mut own: Vec<&str> = above.iter().map(|f| f.1.as_str()).collect();
        own.sort();
        assert_eq!(
            own,
            [
                "anon_inode:[eventfd]",
                "anon_inode:[eventpoll]",
                "anon_inode:[timerfd]"
            ],
            "worker {id}: {fds:?}"
        );
    }
    let same = listeners[0] == listeners[1];
    assert_eq!(
        same,
        schedule == Schedule::Shared,
        "{schedule:?}: the workers' listening sockets {listeners:?}"
    );
    drop(leaked);
    stop_cleanly(p, &[1, 2]);
}

fn crash_and_respawn() {
    if skip() {
        return;
    }
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(1)
        .backoff(
            Duration::from_millis(50),
            Duration::from_millis(500),
            Duration::from_millis(200),
        )
        .exec(worker_path())
        .start_exec()
        .expect("start_exec");
    let (forks, _) = wait_ready(&mut p, 1);
    let (_, pid1) = forks[0];
    // Round-robin fds: stdio, the channel, the worker's spare eventfd; no listener.
    let fds = util::fds_of(pid1 as i32);
    let above: Vec<&str> = fds
        .iter()
        .filter(|f| f.0 > 2)
        .map(|f| f.1.as_str())
        .collect();
    assert_eq!(above.len(), 2, "{fds:?}");
    assert!(
        above[0].starts_with("socket:") && fds.iter().any(|f| f.0 == 3),
        "{fds:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    p.send(1, b"exit 1").unwrap();
    let mut exit = None;
    let mut respawned = None;
    pump(&mut p, Duration::from_secs(10), |_, e| {
        match e {
            E::Exit {
                id: 1,
                code,
                signal,
                after,
            } => exit = Some((code, signal, after)),
            E::Listening(id, 0) if id != 1 => respawned = Some(id),
            _ => {}
        }
        respawned.is_some()
    });
    assert_eq!(exit, Some((Some(1), None, false)));
    let id = respawned.unwrap();
    assert_eq!(id, 2);
    assert_eq!(ask(&mut p, id, "ping"), "pong 2");
    let bodies = get_n(&mut p, 2);
    assert_eq!(
        bodies,
        ["hello from exec'd worker 2", "hello from exec'd worker 2"]
    );
    assert_eq!(p.stats().crashes, 1);
    stop_cleanly(p, &[2]);
}

fn missing_program_exits_127_with_backoff() {
    let dir = tmpdir("missing");
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(1)
        .backoff(
            Duration::from_millis(50),
            Duration::from_millis(400),
            Duration::from_secs(5),
        )
        .exec(dir.join("no-such-program"))
        .start_exec()
        .expect("start_exec: the path is only exec'd in the children");
    let t0 = Instant::now();
    let mut exits = Vec::new();
    while t0.elapsed() < Duration::from_millis(2000) {
        match ev(&mut p, Duration::from_millis(20)) {
            E::Exit { code, signal, .. } => {
                assert_eq!((code, signal), (Some(forkcluster::EXIT_EXEC_FAILED), None));
                exits.push(t0.elapsed());
            }
            E::Online(id) | E::Listening(id, _) => panic!("worker {id} came up without a program"),
            _ => {}
        }
    }
    // 50, 100, 200, 400, 400 ms apart: a handful of exits, never a tight loop.
    assert!(exits.len() >= 3, "{exits:?}");
    assert!(
        exits.len() <= 10,
        "a fork loop: {} exits in 2 s: {exits:?}",
        exits.len()
    );
    let gaps: Vec<Duration> = exits.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(40)),
        "{gaps:?}"
    );
    assert!(gaps.last() > gaps.first(), "the delay grows: {gaps:?}");
    assert!(p.stats().backoffs >= 2);
    drop(p);
    let _ = std::fs::remove_dir_all(dir);
}

fn args_cwd_and_env_reach_the_program() {
    if skip() {
        return;
    }
    let dir = tmpdir("cwd");
    std::env::set_var("FORKCLUSTER_STRAY", "from the primary's environment");
    std::env::set_var("FC_INHERITED", "yes");
    let mut p = Cluster::builder()
        .workers(1)
        .env("FC_BUILDER", "b")
        .env("FC_BOTH", "builder")
        .exec(worker_path())
        .exec_args(["--one", "two words"])
        .exec_cwd(&dir)
        .start_exec()
        .expect("start_exec");
    let _ = wait_ready(&mut p, 1);
    assert_eq!(ask(&mut p, 1, "args"), "--one two words");
    assert_eq!(
        Path::new(&ask(&mut p, 1, "cwd")),
        dir.canonicalize().unwrap()
    );
    assert_eq!(ask(&mut p, 1, "env FC_INHERITED"), "FC_INHERITED=yes");
    assert_eq!(ask(&mut p, 1, "env FC_BUILDER"), "FC_BUILDER=b");
    // The protocol's variables are unset by from_env, and the primary's own are not passed on.
    assert_eq!(
        ask(&mut p, 1, "env FORKCLUSTER_WORKER"),
        "FORKCLUSTER_WORKER unset"
    );
    assert_eq!(
        ask(&mut p, 1, "env FORKCLUSTER_STRAY"),
        "FORKCLUSTER_STRAY unset"
    );
    let id = p.fork_with_env(&[("FC_BOTH", "fork")]).unwrap();
    let _ = wait_ready(&mut p, 1);
    assert_eq!(ask(&mut p, id, "env FC_BOTH"), "FC_BOTH=fork");
    assert_eq!(ask(&mut p, 1, "env FC_BOTH"), "FC_BOTH=builder");
    stop_cleanly(p, &[1, id]);
    let _ = std::fs::remove_dir_all(dir);
}

fn restart_picks_up_a_new_worker_binary() {
    if skip() {
        return;
    }
    let dir = tmpdir("restart");
    let prog = dir.join("worker");
    let real = worker_path();
    let install = |version: &str| {
        let tmp = dir.join("worker.new");
        std::fs::write(
            &tmp,
            format!(
                "#!/bin/sh\nFC_VERSION={version} exec '{}' \"$@\"\n",
                real.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &prog).unwrap();
    };
    install("1");
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(1)
        .exec(&prog)
        .start_exec()
        .expect("start_exec");
    let _ = wait_ready(&mut p, 1);
    assert_eq!(ask(&mut p, 1, "env FC_VERSION"), "FC_VERSION=1");
    install("2");
    p.restart();
    let mut new = None;
    let mut old_gone = false;
    pump(&mut p, Duration::from_secs(15), |_, e| {
        match e {
            E::Listening(id, 0) if id != 1 => new = Some(id),
            E::Exit {
                id: 1, code, after, ..
            } => {
                assert_eq!((code, after), (Some(0), true));
                old_gone = true;
            }
            _ => {}
        }
        new.is_some() && old_gone
    });
    let id = new.unwrap();
    assert_eq!(ask(&mut p, id, "env FC_VERSION"), "FC_VERSION=2");
    assert_eq!(get_n(&mut p, 1), [format!("hello from exec'd worker {id}")]);
    stop_cleanly(p, &[id]);
    let _ = std::fs::remove_dir_all(dir);
}

fn from_env_outside_a_cluster_is_a_clear_error() {
    std::env::remove_var("FORKCLUSTER_WORKER");
    match Worker::from_env() {
        Err(Error::Invalid(why)) => assert!(why.contains("FORKCLUSTER_WORKER"), "{why}"),
        other => panic!("{other:?}"),
    }
    // Variables that name an fd which is not a channel.
    let (r, w) = rustix::pipe::pipe().unwrap();
    std::env::set_var("FORKCLUSTER_WORKER", "1");
    std::env::set_var("FORKCLUSTER_CHANNEL_FD", r.as_raw_fd().to_string());
    std::env::set_var("FORKCLUSTER_SCHEDULE", "rr");
    std::env::set_var("FORKCLUSTER_NONBLOCKING", "0");
    std::env::set_var("FORKCLUSTER_LISTENERS", "");
    let raw = r.as_raw_fd();
    // from_env owns the fd it names (and closes it when it fails).
    std::mem::forget(r);
    match Worker::from_env() {
        Err(Error::Invalid(why)) => assert!(why.contains("SOCK_SEQPACKET"), "{why}"),
        other => panic!("{other:?}"),
    }
    // SAFETY: F_GETFD only reads flags.
    assert_eq!(unsafe { libc::fcntl(raw, libc::F_GETFD) }, -1, "closed");
    // The variables are gone either way.
    assert!(std::env::vars().all(|(k, _)| !k.starts_with("FORKCLUSTER_")));
    drop(w);
    // A malformed variable.
    std::env::set_var("FORKCLUSTER_WORKER", "one");
    match Worker::from_env() {
        Err(Error::Invalid(why)) => assert!(why.contains("FORKCLUSTER_WORKER"), "{why}"),
        other => panic!("{other:?}"),
    }
    // The example program run by hand says why and exits 2.
    if !skip() {
        let out = std::process::Command::new(worker_path())
            .env_remove("FORKCLUSTER_WORKER")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("FORKCLUSTER_WORKER is not set"), "{err}");
    }
}

fn start_refuses_what_cannot_work() {
    let e = Cluster::builder().workers(1).exec("/bin/true").start(|_| 0);
    assert!(matches!(e, Err(Error::Invalid(w)) if w.contains("start_exec")));
    let e = Cluster::builder().workers(1).start_exec();
    assert!(matches!(e, Err(Error::Invalid(w)) if w.contains("Builder::exec")));
    let e = Cluster::builder()
        .workers(1)
        .hang_timeout(Duration::from_secs(1))
        .exec("/bin/true")
        .start_exec();
    assert!(matches!(e, Err(Error::Invalid(w)) if w.contains("hang_timeout")));
    let e = Cluster::builder()
        .workers(1)
        .schedule(Schedule::Shared)
        .max_requests(10, 0)
        .exec("/bin/true")
        .start_exec();
    assert!(matches!(e, Err(Error::Invalid(w)) if w.contains("max_requests")));
    let e = Cluster::builder()
        .workers(1)
        .exec("/bin/true")
        .exec_args(["a\0b"])
        .start_exec();
    assert!(matches!(e, Err(Error::Invalid(w)) if w.contains("NUL")));
    let e = Cluster::builder().workers(1).exec("").start_exec();
    assert!(matches!(e, Err(Error::Invalid(_))));
    // SAFETY: getpid has no preconditions.
    assert!(util::children_of(unsafe { libc::getpid() }).is_empty());
}

fn exec_primary_example() {
    if skip() {
        return;
    }
    let port = std::net::TcpListener::bind(lo0())
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ex = util::Examples::locate();
    let mut child = ex
        .command("exec_primary")
        .args(["--listen", &format!("127.0.0.1:{port}"), "--workers", "2"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Until both workers have answered (round-robin alternates between them).
    let mut seen = [false; 2];
    let mut body = String::new();
    let ok = util::wait_until(Duration::from_secs(15), || {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n");
        let mut r = String::new();
        let _ = s.read_to_string(&mut r);
        for (i, w) in seen.iter_mut().enumerate() {
            *w |= r.ends_with(&format!("hello from exec'd worker {}\n", i + 1));
        }
        body = r;
        seen == [true, true]
    });
    // Their answers to the primary's pings are printed by now.
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY (test code): SIGTERM to the example this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let end = Instant::now() + Duration::from_secs(15);
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("exec_primary did not stop");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(ok, "no answer: {body:?}\n{err}");
    assert!(st.success(), "{st}\n{err}");
    assert!(err.contains("worker 1 says: pong 1"), "{err}");
    assert!(err.contains("worker 2 says: pong 2"), "{err}");
}

/// `field` of `/proc/PID/status` (`Uid`, `Gid`, `NoNewPrivs`), whitespace-normalised.
fn status_of(pid: u32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn exec_as_nobody_drops_before_exec() {
    if skip() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("    skipped: not root (changing the workers' user needs root)");
        return;
    }
    let name = std::ffi::CString::new("nobody").unwrap();
    // SAFETY: the test process is single-threaded; the entry is read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        println!("    skipped: this machine has no user `nobody`");
        return;
    }
    // SAFETY: non-null result of getpwnam, read before any other lookup.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(1)
        .user("nobody")
        .no_new_privs(true)
        .exec(worker_path())
        .start_exec()
        .expect("start_exec");
    let (forks, _) = wait_ready(&mut p, 1);
    let pid = forks[0].1;
    assert_eq!(status_of(pid, "Uid"), format!("{uid} {uid} {uid} {uid}"));
    assert_eq!(status_of(pid, "Gid"), format!("{gid} {gid} {gid} {gid}"));
    assert_eq!(status_of(pid, "NoNewPrivs"), "1");
    assert_eq!(exe_of(pid).file_name().unwrap(), "exec_worker");
    assert_eq!(ask(&mut p, 1, "ping"), "pong 1");
    assert_eq!(get_n(&mut p, 1), ["hello from exec'd worker 1"]);
    stop_cleanly(p, &[1]);
}
