//! `cargo bench --bench wire`: the channel's frame rate, round-trip latency and fd-passing rate
//! across a real `fork()`, each printed next to the C limit for the same work on the same machine.
//!
//! # What is measured
//!
//! | figure | ours | C limit (`../shared/bench/peers/c`) |
//! |---|---|---|
//! | `oneway_frames_per_s` | primary `Channel::send`s N `Message` frames, the worker `Channel::recv`s them into a `RecvBuf` and checks every sequence number; the receiver times from its "go" frame to the last frame | `seqpacket_rate seq-oneway` (same structure: receiver times from "go" to the last datagram, but with `send`/`recv`) |
//! | `oneway_frames_per_s@c_sendmsg` | the same figure | `fdpass_rate oneway-nofd`: one-way with `sendmsg`/`recvmsg` and a control buffer, as the channel must (it carries fds) |
//! | `rtt_p50_us`, `rtt_p99_us` | primary sends a frame, the worker echoes it; 1000 warm-up round trips | `seqpacket_rate seq-pingpong` |
//! | `fds_per_s_new` | each frame carries a fresh `eventfd`, the sender closes it after the send, the worker drops (closes) what it receives; timed by the sender until the worker's count arrives | `fdpass_rate oneway-new` |
//! | `fds_per_s_same` | the same `/dev/null` fd on every frame | `fdpass_rate oneway-same` (`-f devnull`) |
//!
//! **Sizes.** The C programs send `-s SIZE` bytes per datagram. A frame is a 16-byte header plus
//! its payload, so the headline figures (no suffix) use a **64-byte payload, 80 bytes on the
//! wire**, against C run with `-s 80`: the same bytes per datagram. The `_wire64` figures use a
//! 48-byte payload (64 bytes on the wire) against C's default `-s 64`, the figures in
//! `RESULTS.md`.
//!
//! Every figure is followed by a `.cpu_ns_per_op` line: the CPU time (user + system, from
//! `getrusage`) that both processes spent per frame, per fd or per round trip. Wall-clock rates
//! on this shared VM swing by ±30 % between runs; the CPU cost per operation moves much less and
//! is the better measure of what the channel's code costs.
//!
//! **Ratios** are ours/C for rates and C/ours for latencies and CPU costs, so 1.00 means "as
//! fast as C" in every line. `ratio` compares the medians; `paired` is the median of the
//! per-repetition ratios (ours and C of one repetition ran back to back). Each figure is the
//! median of `WIRE_REPS` repetitions, ours and C interleaved (the order alternates per
//! repetition). The `pinned_` set runs both processes on one CPU, as
//! `scripts/ipc.sh` does with `taskset -c 0`: the bench pins itself before it forks (the worker
//! inherits the mask) and pins each C program in `pre_exec`, which is what `taskset` does.
//!
//! If `/usr/bin/node` exists, Node's `cluster` IPC (`node/ipc_bench.js`) runs once for reference.
//!
//! Settings (environment): `WIRE_N` (one-way frames, 300000), `WIRE_PINGS` (10000),
//! `WIRE_FD_N` (100000), `WIRE_REPS` (3), `WIRE_PIN` (1: also the pinned set), `WIRE_C` (1: run
//! the C limits), `WIRE_NODE` (1), `PEERS_DIR` (the C sources, when `../shared/bench/peers/c`
//! is not there). A free argument
//! filters the figures by name (`cargo bench --bench wire -- rtt`; a `pinned_` prefix runs only
//! the pinned set).
//!
//! Every forked child has `PR_SET_PDEATHSIG` and an `alarm()`, every child is reaped, and every
//! program the bench starts runs under a deadline.

use std::error::Error as StdError;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use forkcluster::channel::{Channel, RecvBuf};
use forkcluster::frame::{Frame, Kind, HEADER_LEN, MAX_PAYLOAD};
use forkcluster::Error;

type R<T> = Result<T, Box<dyn StdError>>;

/// Round trips discarded before the samples, as in the C programs.
const WARMUP: usize = 1000;
/// Hard time limit of each forked child.
const CHILD_ALARM_SECS: u32 = 60;
/// Hard time limit of the whole bench.
const BENCH_ALARM_SECS: u32 = 300;
/// Time limit of each external program (C limit, node).
const PROGRAM_DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Settings and figures

struct Cfg {
    n: usize,
    pings: usize,
    fd_n: usize,
    reps: usize,
    pin: bool,
    /// Run only the pinned set (the filter started with `pinned_`).
    pinned_only: bool,
    c: bool,
    node: bool,
    filter: Option<String>,
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("wire: ignoring {name}={v:?} (not a number)");
            default
        }),
        Err(_) => default,
    }
}

impl Cfg {
    fn from_env() -> Cfg {
        let arg = std::env::args().skip(1).find(|a| !a.starts_with('-'));
        let pinned_only = arg.as_deref().is_some_and(|a| a.starts_with("pinned_"));
        let filter = arg.map(|a| a.trim_start_matches("pinned_").to_owned());
        Cfg {
            n: env_usize("WIRE_N", 300_000).max(1),
            pings: env_usize("WIRE_PINGS", 10_000).max(1),
            fd_n: env_usize("WIRE_FD_N", 100_000).max(1),
            reps: env_usize("WIRE_REPS", 3).max(1),
            pin: env_usize("WIRE_PIN", 1) != 0 || pinned_only,
            pinned_only,
            c: env_usize("WIRE_C", 1) != 0,
            node: env_usize("WIRE_NODE", 1) != 0,
            filter,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Test {
    Oneway,
    PingPong,
    FdNew,
    FdSame,
}

#[derive(Clone, Copy)]
struct Fig {
    /// Printed name; latency figures print `rtt_p50_us{suffix}` and `rtt_p99_us{suffix}`.
    name: &'static str,
    test: Test,
    /// Our payload bytes; C runs with `-s payload + HEADER_LEN`.
    payload: usize,
    /// Also compare with `fdpass_rate oneway-nofd`: the same one-way work done with
    /// `sendmsg`/`recvmsg` (what the channel must use to carry fds) instead of `send`/`recv`.
    c_alt: bool,
}

const FIGS: &[Fig] = &[
    Fig {
        name: "oneway_frames_per_s",
        test: Test::Oneway,
        payload: 64,
        c_alt: true,
    },
    Fig {
        name: "oneway_frames_per_s_wire64",
        test: Test::Oneway,
        payload: 48,
        c_alt: false,
    },
    Fig {
        name: "rtt",
        test: Test::PingPong,
        payload: 64,
        c_alt: false,
    },
    Fig {
        name: "rtt_wire64",
        test: Test::PingPong,
        payload: 48,
        c_alt: false,
    },
    Fig {
        name: "fds_per_s_new",
        test: Test::FdNew,
        payload: 64,
        c_alt: false,
    },
    Fig {
        name: "fds_per_s_same",
        test: Test::FdSame,
        payload: 64,
        c_alt: false,
    },
];

impl Fig {
    fn count(&self, cfg: &Cfg) -> usize {
        match self.test {
            Test::Oneway => cfg.n,
            Test::PingPong => cfg.pings,
            Test::FdNew | Test::FdSame => cfg.fd_n,
        }
    }

    fn selected(&self, cfg: &Cfg) -> bool {
        match &cfg.filter {
            Some(f) => {
                let suffix = self.name.strip_prefix("rtt").unwrap_or("");
                self.name.contains(f.as_str())
                    || (self.test == Test::PingPong
                        && (format!("rtt_p50_us{suffix}").contains(f.as_str())
                            || format!("rtt_p99_us{suffix}").contains(f.as_str())))
            }
            None => true,
        }
    }
}

/// One measurement: a rate (per second) or a latency pair (p50, p99 in µs).
#[derive(Clone, Copy, Debug)]
enum Val {
    Rate(f64),
    Lat(f64, f64),
}

// ---------------------------------------------------------------------------------------------
// Processes: fork with a guard, reap, CPU affinity

enum Forked {
    Parent(libc::pid_t),
    Child,
}

/// `fork()`. The bench is single-threaded (it never spawns a thread), so the child is a faithful
/// copy and may run any code.
fn fork() -> R<Forked> {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: getpid and fork have no preconditions; no other thread exists (see above).
    let (parent, pid) = unsafe { (libc::getpid(), libc::fork()) };
    match pid {
        p if p < 0 => Err(format!("fork: {}", std::io::Error::last_os_error()).into()),
        0 => {
            // SAFETY: plain system calls with valid arguments.
            unsafe {
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                );
                if libc::getppid() != parent {
                    libc::_exit(2);
                }
                libc::alarm(CHILD_ALARM_SECS);
            }
            Ok(Forked::Child)
        }
        p => Ok(Forked::Parent(p)),
    }
}

/// In a forked child: runs `f` and exits with 0 (ok), 1 (error) or 101 (panic).
fn child_main<F: FnOnce() -> R<()>>(f: F) -> ! {
    let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("wire: child: {e}");
            1
        }
        Err(_) => 101,
    };
    let _ = std::io::stderr().flush();
    // SAFETY: leaves the forked child without running the parent's exit handlers or unwinding
    // into the parent's stack frames.
    unsafe { libc::_exit(code) }
}

/// Waits for `pid` and fails unless it exited with status 0.
fn reap(pid: libc::pid_t) -> R<()> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer; `pid` is our child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(format!("waitpid {pid}: {e}").into());
        }
    }
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(())
    } else {
        Err(format!("child {pid} failed (wait status {status:#x})").into())
    }
}

fn get_affinity() -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data; the kernel fills at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = core::mem::zeroed();
        libc::sched_getaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &mut set);
        set
    }
}

fn set_affinity(set: &libc::cpu_set_t) -> std::io::Result<()> {
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let r = unsafe { libc::sched_setaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), set) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn one_cpu(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { core::mem::zeroed() };
    // SAFETY: CPU_SET bounds-checks `cpu` against the set's size.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set
}

fn first_cpu(set: &libc::cpu_set_t) -> usize {
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET bounds-checks `c` against the set's size.
        .find(|&c| unsafe { libc::CPU_ISSET(c, set) })
        .unwrap_or(0)
}

/// Runs `f` with this process (and so the children it forks) pinned to `cpu`, if any.
fn with_pin<T>(cpu: Option<usize>, f: impl FnOnce() -> R<T>) -> R<T> {
    let Some(cpu) = cpu else { return f() };
    let saved = get_affinity();
    set_affinity(&one_cpu(cpu))?;
    let r = f();
    set_affinity(&saved)?;
    r
}

/// CPU time (user + system, ns) of this process (`RUSAGE_SELF`) or of its reaped children
/// (`RUSAGE_CHILDREN`, which includes their reaped descendants).
fn cpu_ns(who: libc::c_int) -> f64 {
    // SAFETY: `ru` is a valid out-pointer of the right type.
    let ru = unsafe {
        let mut ru: libc::rusage = core::mem::zeroed();
        libc::getrusage(who, &mut ru);
        ru
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 * 1e9 + tv.tv_usec as f64 * 1e3;
    t(ru.ru_utime) + t(ru.ru_stime)
}

// ---------------------------------------------------------------------------------------------
// Our side: the crate's Channel across a fork

fn seq_bytes(i: usize) -> [u8; 8] {
    (i as u64).to_le_bytes()
}

/// Primary → worker, `n` frames of `payload` bytes. The worker (receiver) times from the "go"
/// frame it sends to the last frame, as `seq-oneway`'s receiver does, and reports the time.
fn ours_oneway(n: usize, payload: usize) -> R<Val> {
    let (primary, worker) = Channel::pair()?;
    let pid = match fork()? {
        Forked::Parent(pid) => pid,
        Forked::Child => {
            drop(primary);
            child_main(|| {
                let mut buf = RecvBuf::new();
                let t0 = Instant::now();
                worker.send(&Frame::new(Kind::Message, 0, b"go"), &[])?;
                for i in 0..n {
                    let got = worker.recv(&mut buf)?;
                    let f = got.frame;
                    if f.seq() != i as u32
                        || f.payload().len() != payload
                        || f.payload()[..8] != seq_bytes(i)
                    {
                        return Err(format!("oneway: sequence error at {i}").into());
                    }
                }
                let ns = t0.elapsed().as_nanos() as u64;
                worker.send(&Frame::new(Kind::Message, 0, &ns.to_le_bytes()), &[])?;
                Ok(())
            })
        }
    };
    drop(worker);
    let run = || -> R<u64> {
        let mut buf = RecvBuf::new();
        let go = primary.recv(&mut buf)?;
        if go.frame.payload() != b"go" {
            return Err("oneway: no go frame".into());
        }
        let mut data = [0u8; MAX_PAYLOAD];
        for i in 0..n {
            data[..8].copy_from_slice(&seq_bytes(i));
            primary.send(&Frame::new(Kind::Message, i as u32, &data[..payload]), &[])?;
        }
        let done = primary.recv(&mut buf)?;
        let ns: [u8; 8] = done.frame.payload().try_into()?;
        Ok(u64::from_le_bytes(ns))
    };
    let res = run();
    drop(primary);
    reap(pid)?;
    let ns = res?;
    Ok(Val::Rate(n as f64 / (ns as f64 / 1e9)))
}

/// Ping-pong: primary sends, worker echoes the frame back; `pings` timed round trips.
fn ours_pingpong(pings: usize, payload: usize) -> R<Val> {
    let (primary, worker) = Channel::pair()?;
    let pid = match fork()? {
        Forked::Parent(pid) => pid,
        Forked::Child => {
            drop(primary);
            child_main(|| {
                let mut buf = RecvBuf::new();
                loop {
                    match worker.recv(&mut buf) {
                        Ok(got) => worker.send(&got.frame, &[])?,
                        Err(Error::Closed) => return Ok(()),
                        Err(e) => return Err(e.into()),
                    }
                }
            })
        }
    };
    drop(worker);
    let run = || -> R<Vec<u64>> {
        let mut buf = RecvBuf::new();
        let mut data = [0u8; MAX_PAYLOAD];
        let mut samples = Vec::with_capacity(pings);
        for i in 0..WARMUP + pings {
            data[..8].copy_from_slice(&seq_bytes(i));
            let t0 = Instant::now();
            primary.send(&Frame::new(Kind::Message, i as u32, &data[..payload]), &[])?;
            let back = primary.recv(&mut buf)?;
            let dt = t0.elapsed().as_nanos() as u64;
            if back.frame.seq() != i as u32 || back.frame.payload()[..8] != seq_bytes(i) {
                return Err("pingpong: echo mismatch".into());
            }
            if i >= WARMUP {
                samples.push(dt);
            }
        }
        Ok(samples)
    };
    let res = run();
    drop(primary); // the worker sees end of file and exits
    reap(pid)?;
    let mut s = res?;
    s.sort_unstable();
    // Same percentile indices as bench_common.h's print_latency.
    let n = s.len();
    let p50 = s[n / 2] as f64 / 1e3;
    let p99 = s[((n as f64 * 0.99) as usize).min(n - 1)] as f64 / 1e3;
    Ok(Val::Lat(p50, p99))
}

/// Primary → worker, `n` frames with one fd each; timed by the sender until the worker's count
/// arrives, as `fdpass_rate`'s one-way tests do.
fn ours_fdpass(n: usize, payload: usize, fresh: bool) -> R<Val> {
    let (primary, worker) = Channel::pair()?;
    let pid = match fork()? {
        Forked::Parent(pid) => pid,
        Forked::Child => {
            drop(primary);
            child_main(|| {
                let mut buf = RecvBuf::new();
                let mut fds = 0u64;
                for i in 0..n {
                    let got = worker.recv(&mut buf)?;
                    if got.frame.seq() != i as u32 || got.frame.payload()[..8] != seq_bytes(i) {
                        return Err(format!("fdpass: sequence error at {i}").into());
                    }
                    fds += got.fds.len() as u64;
                    // `got` drops here: its fd is closed, the last reference for a fresh eventfd.
                }
                worker.send(&Frame::new(Kind::Message, 0, &fds.to_le_bytes()), &[])?;
                Ok(())
            })
        }
    };
    drop(worker);
    let run = || -> R<u64> {
        let same: Option<OwnedFd> = if fresh {
            None
        } else {
            Some(
                fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")?
                    .into(),
            )
        };
        let mut buf = RecvBuf::new();
        let mut data = [0u8; MAX_PAYLOAD];
        let t0 = Instant::now();
        for i in 0..n {
            data[..8].copy_from_slice(&seq_bytes(i));
            let frame = Frame::new(Kind::Message, i as u32, &data[..payload]).with_fds(1);
            match &same {
                Some(fd) => primary.send(&frame, &[fd.as_fd()])?,
                None => {
                    let fd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?;
                    primary.send(&frame, &[fd.as_fd()])?;
                    drop(fd);
                }
            }
        }
        let done = primary.recv(&mut buf)?;
        let ns = t0.elapsed().as_nanos() as u64;
        let got: [u8; 8] = done.frame.payload().try_into()?;
        if u64::from_le_bytes(got) != n as u64 {
            return Err(
                format!("fdpass: worker got {} fds of {n}", u64::from_le_bytes(got)).into(),
            );
        }
        Ok(ns)
    };
    let res = run();
    drop(primary);
    reap(pid)?;
    let ns = res?;
    Ok(Val::Rate(n as f64 / (ns as f64 / 1e9)))
}

fn run_ours(fig: &Fig, cfg: &Cfg, pin: Option<usize>) -> R<Val> {
    with_pin(pin, || match fig.test {
        Test::Oneway => ours_oneway(cfg.n, fig.payload),
        Test::PingPong => ours_pingpong(cfg.pings, fig.payload),
        Test::FdNew => ours_fdpass(cfg.fd_n, fig.payload, true),
        Test::FdSame => ours_fdpass(cfg.fd_n, fig.payload, false),
    })
}

// ---------------------------------------------------------------------------------------------
// External programs: build the C limits, run them (and node) under a deadline, parse the output

/// Removes the scratch directory when the bench ends, however it ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The C sources: `../shared/bench/peers/c` from the crate root, else `$PEERS_DIR` (that folder,
/// or its `c/` subfolder).
fn find_peers_c() -> Option<PathBuf> {
    let has = |d: &Path| d.join("seqpacket_rate.c").is_file() && d.join("fdpass_rate.c").is_file();
    let rel = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/bench/peers/c");
    if has(&rel) {
        return rel.canonicalize().ok().or(Some(rel));
    }
    let env = PathBuf::from(std::env::var_os("PEERS_DIR")?);
    [env.clone(), env.join("c")].into_iter().find(|d| has(d))
}

/// Copies the sources to `scratch/c` (the shared folder is read-only) and builds
/// `seqpacket_rate` and `fdpass_rate` into `scratch/bin` with the Makefile (or `cc -O2`).
fn build_c(src: &Path, scratch: &Path) -> R<PathBuf> {
    let csrc = scratch.join("c");
    let bin = scratch.join("bin");
    fs::create_dir_all(&csrc)?;
    fs::create_dir_all(&bin)?;
    for e in fs::read_dir(src)? {
        let p = e?.path();
        let name = p.file_name().and_then(|s| s.to_str()).unwrap_or("");
        if p.is_file() && (name.ends_with(".c") || name.ends_with(".h") || name == "Makefile") {
            fs::copy(&p, csrc.join(name))?;
        }
    }
    let progs = ["seqpacket_rate", "fdpass_rate"];
    let made = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&csrc)
        .arg(format!("BIN={}", bin.display()))
        .args(progs.iter().map(|p| bin.join(p)))
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !made {
        for p in progs {
            let ok = Command::new("cc")
                .args(["-O2", "-Wall", "-Wextra", "-o"])
                .arg(bin.join(p))
                .arg(csrc.join(format!("{p}.c")))
                .status()?
                .success();
            if !ok {
                return Err(format!("cc {p}.c failed").into());
            }
        }
    }
    Ok(bin)
}

/// Runs `cmd` (optionally pinned to `cpu`) in its own process group and returns its stdout.
/// Past the deadline the group is killed. Waits with `poll` on the output pipe, so the bench
/// does not wake up while the program runs.
fn run_program(cmd: &mut Command, cpu: Option<usize>, deadline: Duration) -> R<String> {
    cmd.stdout(Stdio::piped())
        .stdin(Stdio::null())
        .process_group(0);
    if let Some(cpu) = cpu {
        let set = one_cpu(cpu);
        // SAFETY: the closure only makes the sched_setaffinity system call (async-signal-safe).
        unsafe {
            cmd.pre_exec(move || set_affinity(&set));
        }
    }
    let mut child = cmd.spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut out = child.stdout.take().ok_or("no stdout pipe")?;
    let end = Instant::now() + deadline;
    let mut text = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut timed_out = false;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            timed_out = true;
            break;
        }
        let mut pfd = libc::pollfd {
            fd: out.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e.into());
        }
        if r == 0 {
            continue;
        }
        match out.read(&mut chunk) {
            Ok(0) => break,
            Ok(k) => text.extend_from_slice(&chunk[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    if timed_out {
        // SAFETY: signals the process group we created for this child.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    let status = child.wait()?;
    if timed_out {
        return Err(format!("{cmd:?}: no result within {deadline:?}").into());
    }
    if !status.success() {
        return Err(format!("{cmd:?}: {status}").into());
    }
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// The value after `key` (`"msgs/s="`, `"median="`, `"p99="`) on the first line that starts
/// with `test`.
fn field(out: &str, test: &str, key: &str) -> R<f64> {
    out.lines()
        .filter(|l| l.split_whitespace().next() == Some(test))
        .flat_map(|l| l.split_whitespace())
        .find_map(|t| t.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no {key} for {test} in output {out:?}").into())
}

/// Runs the C limit of `fig` (with `alt`, its `sendmsg`/`recvmsg` variant).
fn run_c(fig: &Fig, cfg: &Cfg, bin: &Path, pin: Option<usize>, alt: bool) -> R<Val> {
    let size = (fig.payload + HEADER_LEN).to_string();
    let count = fig.count(cfg).to_string();
    let (prog, test, count_flag) = match fig.test {
        Test::Oneway if alt => ("fdpass_rate", "oneway-nofd", "-n"),
        Test::Oneway => ("seqpacket_rate", "seq-oneway", "-n"),
        Test::PingPong => ("seqpacket_rate", "seq-pingpong", "-p"),
        Test::FdNew => ("fdpass_rate", "oneway-new", "-n"),
        Test::FdSame => ("fdpass_rate", "oneway-same", "-n"),
    };
    let mut cmd = Command::new(bin.join(prog));
    cmd.args([count_flag, &count, "-s", &size, test]);
    let out = run_program(&mut cmd, pin, PROGRAM_DEADLINE)?;
    Ok(match fig.test {
        Test::PingPong => Val::Lat(field(&out, test, "median=")?, field(&out, test, "p99=")?),
        _ => Val::Rate(field(&out, test, "msgs/s=")?),
    })
}

// ---------------------------------------------------------------------------------------------
// Reporting

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn list(v: &[f64], prec: usize) -> String {
    let s: Vec<String> = v.iter().map(|x| format!("{x:.prec$}")).collect();
    s.join(" ")
}

/// Prints one line: `name  ours  c=...  ratio=...  paired=...  reps ...`. `higher_better` picks
/// ours/C (rates) or C/ours (latencies). `ratio` compares the medians; `paired` is the median of
/// the per-repetition ratios (each rep's ours and C ran back to back, so they share the
/// machine's load at that moment).
fn line(name: &str, ours: &[f64], c: &[f64], prec: usize, higher_better: bool) {
    let o = median(ours.to_vec());
    if c.is_empty() {
        println!(
            "{name:<44} {o:>11.prec$}  c=n/a          reps ours=[{}]",
            list(ours, prec)
        );
        return;
    }
    let cm = median(c.to_vec());
    let r = |o: f64, c: f64| if higher_better { o / c } else { c / o };
    let paired = median(ours.iter().zip(c).map(|(&o, &c)| r(o, c)).collect());
    let cs = format!("c={cm:.prec$}");
    println!(
        "{name:<44} {o:>11.prec$}  {cs:<13}  ratio={:.2}  paired={paired:.2}   reps ours=[{}] c=[{}]",
        r(o, cm),
        list(ours, prec),
        list(c, prec)
    );
}

/// Prints `fig`'s line(s); `tag` is appended to the name (an alternative C reference).
/// After the figure itself, a `.cpu_ns_per_op` line: the CPU time (user + system) that both
/// processes spent per frame (per round trip for `rtt`), which the machine's noise moves much
/// less than wall-clock rates.
fn report(prefix: &str, fig: &Fig, ours: &[(Val, f64)], c: &[(Val, f64)], tag: &str) {
    let rates = |v: &[(Val, f64)]| -> Vec<f64> {
        v.iter()
            .filter_map(|x| match x.0 {
                Val::Rate(r) => Some(r),
                Val::Lat(..) => None,
            })
            .collect()
    };
    let lat = |v: &[(Val, f64)], p99: bool| -> Vec<f64> {
        v.iter()
            .filter_map(|x| match x.0 {
                Val::Lat(a, b) => Some(if p99 { b } else { a }),
                Val::Rate(_) => None,
            })
            .collect()
    };
    let cpu = |v: &[(Val, f64)]| -> Vec<f64> { v.iter().map(|x| x.1).collect() };
    if ours.is_empty() {
        println!("{prefix}{:<44} failed", fig.name);
        return;
    }
    match fig.test {
        Test::PingPong => {
            let suffix = fig.name.strip_prefix("rtt").unwrap_or("");
            line(
                &format!("{prefix}rtt_p50_us{suffix}"),
                &lat(ours, false),
                &lat(c, false),
                2,
                false,
            );
            line(
                &format!("{prefix}rtt_p99_us{suffix}"),
                &lat(ours, true),
                &lat(c, true),
                2,
                false,
            );
        }
        _ => line(
            &format!("{prefix}{}{tag}", fig.name),
            &rates(ours),
            &rates(c),
            0,
            true,
        ),
    }
    line(
        &format!("{prefix}{}{tag}.cpu_ns_per_op", fig.name),
        &cpu(ours),
        &cpu(c),
        0,
        false,
    );
}

/// Runs the selected figures `cfg.reps` times, ours and C interleaved, and prints them. Returns
/// our median headline one-way rate, if it ran.
fn run_set(cfg: &Cfg, figs: &[Fig], cbin: Option<&Path>, pin: Option<usize>) -> Option<f64> {
    let prefix = if pin.is_some() { "pinned_" } else { "" };
    let mut ours: Vec<Vec<(Val, f64)>> = vec![Vec::new(); figs.len()];
    let mut c: Vec<Vec<(Val, f64)>> = vec![Vec::new(); figs.len()];
    let mut c_alt: Vec<Vec<(Val, f64)>> = vec![Vec::new(); figs.len()];
    // CPU time of both processes (ours: the bench and its worker; C: the program and its
    // child) per operation, warm-up round trips included.
    let ops = |fig: &Fig| {
        (fig.count(cfg)
            + if fig.test == Test::PingPong {
                WARMUP
            } else {
                0
            }) as f64
    };
    let measure = |fig: &Fig, f: &mut dyn FnMut() -> R<Val>, with_self: bool| -> R<(Val, f64)> {
        let (s0, c0) = (cpu_ns(libc::RUSAGE_SELF), cpu_ns(libc::RUSAGE_CHILDREN));
        let v = f()?;
        let (s1, c1) = (cpu_ns(libc::RUSAGE_SELF), cpu_ns(libc::RUSAGE_CHILDREN));
        let cpu = (c1 - c0) + if with_self { s1 - s0 } else { 0.0 };
        Ok((v, cpu / ops(fig)))
    };
    for rep in 0..cfg.reps {
        for (k, fig) in figs.iter().enumerate() {
            let order: &[bool] = if rep % 2 == 0 {
                &[true, false]
            } else {
                &[false, true]
            };
            for &is_ours in order {
                if is_ours {
                    match measure(fig, &mut || run_ours(fig, cfg, pin), true) {
                        Ok(v) => ours[k].push(v),
                        Err(e) => eprintln!("wire: {prefix}{} (ours): {e}", fig.name),
                    }
                } else if let Some(bin) = cbin {
                    match measure(fig, &mut || run_c(fig, cfg, bin, pin, false), false) {
                        Ok(v) => c[k].push(v),
                        Err(e) => eprintln!("wire: {prefix}{} (C): {e}", fig.name),
                    }
                    if fig.c_alt {
                        match measure(fig, &mut || run_c(fig, cfg, bin, pin, true), false) {
                            Ok(v) => c_alt[k].push(v),
                            Err(e) => eprintln!("wire: {prefix}{} (C sendmsg): {e}", fig.name),
                        }
                    }
                }
            }
        }
    }
    let mut headline = None;
    for (k, fig) in figs.iter().enumerate() {
        report(prefix, fig, &ours[k], &c[k], "");
        if fig.c_alt && !c_alt[k].is_empty() {
            report(prefix, fig, &ours[k], &c_alt[k], "@c_sendmsg");
        }
        if fig.name == "oneway_frames_per_s" && !ours[k].is_empty() {
            let v = ours[k].iter().filter_map(|x| match x.0 {
                Val::Rate(r) => Some(r),
                Val::Lat(..) => None,
            });
            headline = Some(median(v.collect()));
        }
    }
    let _ = std::io::stdout().flush();
    headline
}

/// Node's cluster IPC, once, for reference (unpinned, json, windowed flow control).
fn run_node(peers_c: &Path, cfg: &Cfg, ours_p2w: Option<f64>) {
    let node = Path::new("/usr/bin/node");
    let script = peers_c.join("../node/ipc_bench.js");
    if !node.exists() || !script.is_file() {
        return;
    }
    let n = (cfg.n / 5).max(1000).to_string();
    let pings = (cfg.pings / 2).max(100).to_string();
    let mut cmd = Command::new(node);
    cmd.arg(&script)
        .args(["--n", &n, "--pings", &pings, "--reps", "1"])
        .args(["w2p", "p2w", "pingpong"]);
    let out = match run_program(&mut cmd, None, Duration::from_secs(30)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("wire: node: {e}");
            return;
        }
    };
    let vs = |v: f64| match ours_p2w {
        Some(o) => format!("  ours/node={:.2}", o / v),
        None => String::new(),
    };
    if let Ok(v) = field(&out, "w2p", "msgs/s=") {
        println!(
            "{:<44} {v:>11.0}  (reference, n={n})",
            "node_w2p_msgs_per_s"
        );
    }
    if let Ok(v) = field(&out, "p2w", "msgs/s=") {
        println!(
            "{:<44} {v:>11.0}  (reference, n={n}){}",
            "node_p2w_msgs_per_s",
            vs(v)
        );
    }
    if let (Ok(a), Ok(b)) = (
        field(&out, "pingpong", "median="),
        field(&out, "pingpong", "p99="),
    ) {
        println!(
            "{:<44} {a:>11.2}  (reference, pings={pings})",
            "node_rtt_p50_us"
        );
        println!(
            "{:<44} {b:>11.2}  (reference, pings={pings})",
            "node_rtt_p99_us"
        );
    }
}

fn main() {
    // A hard bound on the whole bench; forked children die with it (PR_SET_PDEATHSIG).
    // SAFETY: alarm has no preconditions.
    unsafe { libc::alarm(BENCH_ALARM_SECS) };
    let started = Instant::now();
    let cfg = Cfg::from_env();
    let figs: Vec<Fig> = FIGS.iter().copied().filter(|f| f.selected(&cfg)).collect();

    let scratch =
        Scratch(std::env::temp_dir().join(format!("forkcluster-wire-{}", std::process::id())));
    let peers_c = find_peers_c();
    let cbin = match &peers_c {
        _ if !cfg.c => None,
        Some(src) => match build_c(src, &scratch.0) {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("wire: building the C limits failed: {e}; printing ours only");
                None
            }
        },
        None => {
            eprintln!(
                "wire: C limit sources not found (../shared/bench/peers/c or $PEERS_DIR); printing ours only"
            );
            None
        }
    };

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pin_cpu = first_cpu(&get_affinity());
    println!(
        "# forkcluster wire bench: {cpus} cpus, median of {} reps (ours and C interleaved); n={} pings={} fd_n={}",
        cfg.reps, cfg.n, cfg.pings, cfg.fd_n
    );
    match &peers_c {
        Some(p) if cbin.is_some() => println!("# C limits built from {}", p.display()),
        _ => println!("# C limits: not available"),
    }
    println!(
        "# headline figures: payload {} B = {} B on the wire, C run with -s {} (same bytes per datagram);",
        64,
        64 + HEADER_LEN,
        64 + HEADER_LEN
    );
    println!(
        "#   *_wire64: payload 48 B = 64 B on the wire, C with -s 64 (the RESULTS.md setting)"
    );
    println!(
        "#   *@c_sendmsg: the same figure against fdpass_rate oneway-nofd (C with sendmsg/recvmsg)"
    );
    println!("#   *.cpu_ns_per_op: user+system CPU of both processes per frame / fd / round trip");
    println!(
        "# ratio = ours/C for rates, C/ours for latencies and CPU: 1.00 = as fast as the C limit"
    );

    let ours_oneway = if cfg.pinned_only {
        None
    } else {
        println!("# unpinned (the scheduler places primary and worker)");
        run_set(&cfg, &figs, cbin.as_deref(), None)
    };
    if cfg.pin && !figs.is_empty() {
        println!("# pinned: both processes on CPU {pin_cpu} (as scripts/ipc.sh: taskset -c 0)");
        run_set(&cfg, &figs, cbin.as_deref(), Some(pin_cpu));
    }
    if cfg.node && cfg.filter.is_none() {
        if let Some(p) = &peers_c {
            println!("# node cluster IPC (ipc_bench.js, json, flow window, unpinned, one run)");
            run_node(p, &cfg, ours_oneway);
        }
    }
    println!("# done in {:.1} s", started.elapsed().as_secs_f64());
}
