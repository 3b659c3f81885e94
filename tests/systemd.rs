//! systemd integration with real components: a test-owned `AF_UNIX` datagram socket as
//! `NOTIFY_SOCKET` (path and abstract), socket activation by `systemd-socket-activate` of the
//! `sd_listen` example (one and two named sockets, datagram, a whole cluster with its
//! notifications across start, SIGHUP and SIGTERM), and the errors for fds that are not
//! listening sockets, passed in this process (`dup2` onto fd 3) and through `exec`.
//!
//! Runs under the fork-per-test runner of `tests/util` (`harness = false`): each test is its own
//! single-threaded process, so it may set and unset environment variables and take fds 3, 4,
//! ... as a socket-activated service does. The binary has a counting `#[global_allocator]` to
//! show that notifications allocate nothing.

mod util;

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use forkcluster::systemd::{self, Lifecycle, Notifier, SocketFamily, SocketKind};
use forkcluster::{Cluster, Error, Event, Next, State};

fn main() {
    if !std::env::args().any(|a| a == "--list") {
        build_examples();
    }
    util::run(tests![
        notify_every_message_on_a_path_socket,
        notify_every_message_on_an_abstract_socket,
        notify_never_blocks_nor_kills,
        notify_allocates_nothing,
        watchdog_interval_and_cadence,
        notify_from_env_without_a_socket,
        lifecycle_sends_in_systemd_order,
        listen_fds_without_activation,
        listen_fds_adopts_stream_and_datagram_sockets,
        listen_fds_rejects_what_is_not_a_listening_socket,
        builder_serves_activated_sockets => 30,
        socket_activate_one_socket => 30,
        socket_activate_two_named_sockets => 30,
        socket_activate_datagram_socket => 30,
        exec_with_a_pipe_or_an_unlistened_socket_as_fd_3 => 30,
        socket_activate_cluster_notifies_start_hup_term => 60,
        hello_under_socket_activation_notifies_start_hup_term => 60,
        hello_serves_two_activated_sockets => 30,
    ]);
}

// ---------------------------------------------------------------------------------------------
// A counting allocator: every alloc, alloc_zeroed and realloc in this process (an AtomicUsize:
// powerpc and other 32-bit targets have no 64-bit atomics).

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; the counter is an atomic.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.realloc(p, l, n)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// ---------------------------------------------------------------------------------------------
// Helpers

/// `target/<profile>`: the test binary is `target/<profile>/deps/systemd-<hash>`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// `cargo test --test systemd` does not build examples: build `sd_listen` and `hello` for this
/// profile.
fn build_examples() {
    let dir = profile_dir();
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_string(),
        Some(p) => p.to_string(),
    };
    let status = Command::new(option_env!("CARGO").unwrap_or("cargo"))
        .args([
            "build",
            "--quiet",
            "--example",
            "sd_listen",
            "--example",
            "hello",
            "--profile",
            &profile,
        ])
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(dir.parent().expect("target dir"))
        .status()
        .expect("run cargo build --example sd_listen");
    assert!(status.success(), "cargo build --example sd_listen failed");
}

fn sd_listen() -> PathBuf {
    example_path("sd_listen")
}

fn example_path(name: &str) -> PathBuf {
    profile_dir().join("examples").join(name)
}

const SOCKET_ACTIVATE: &str = "/usr/bin/systemd-socket-activate";

/// Whether `systemd-socket-activate` is installed (Debian's `systemd` package); prints why a
/// test does nothing when it is not.
fn have_socket_activate() -> bool {
    let ok = Path::new(SOCKET_ACTIVATE).exists();
    if !ok {
        println!("skipped: {SOCKET_ACTIVATE} is not installed (apt-get install systemd)");
    }
    ok
}

/// A fresh directory for this test's sockets and logs.
fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("forkcluster-systemd-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

fn mono_usec() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY (test code): `t` is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1_000
}

/// The next datagram on `sock`, as text (fails after 5 s).
fn recv(sock: &UnixDatagram) -> String {
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 1024];
    let n = sock.recv(&mut buf).expect("a notification within 5 s");
    String::from_utf8(buf[..n].to_vec()).expect("utf-8 notification")
}

/// Whether a datagram is waiting on `sock`.
fn pending(sock: &UnixDatagram) -> bool {
    // FIONREAD on a Unix datagram socket: the size of the next datagram, 0 when none.
    rustix::io::ioctl_fionread(sock).expect("FIONREAD") > 0
}

/// Every kind of message, in order, with the bytes each must be.
fn send_and_check_every_message(n: &Notifier, sock: &UnixDatagram) {
    n.ready().unwrap();
    assert_eq!(recv(sock), "READY=1");
    let before = mono_usec();
    n.reloading().unwrap();
    let after = mono_usec();
    let msg = recv(sock);
    let usec: u64 = msg
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("{msg:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("{msg:?}"));
    assert!(
        before <= usec && usec <= after,
        "{before} <= {usec} <= {after}"
    );
    n.ready().unwrap();
    assert_eq!(recv(sock), "READY=1");
    n.status(3, 4).unwrap();
    assert_eq!(recv(sock), "STATUS=3/4 workers");
    n.status_text("draining\nREADY=1").unwrap();
    assert_eq!(recv(sock), "STATUS=draining");
    n.watchdog().unwrap();
    assert_eq!(recv(sock), "WATCHDOG=1");
    n.mainpid(4242).unwrap();
    assert_eq!(recv(sock), "MAINPID=4242");
    n.send("EXTEND_TIMEOUT_USEC=5000000").unwrap();
    assert_eq!(recv(sock), "EXTEND_TIMEOUT_USEC=5000000");
    n.stopping().unwrap();
    assert_eq!(recv(sock), "STOPPING=1");
    let long = "x".repeat(systemd::MAX_NOTIFICATION);
    assert!(matches!(n.status_text(&long), Err(Error::Capacity(_))));
    assert!(!pending(sock), "nothing else was sent");
}

/// Puts `fd` at number `at` (without close-on-exec, as a service manager passes it).
fn put_at(fd: impl IntoRawFd, at: RawFd) {
    let raw = fd.into_raw_fd();
    if raw == at {
        // SAFETY (test code): clearing FD_CLOEXEC on an fd we own.
        unsafe { libc::fcntl(raw, libc::F_SETFD, 0) };
        return;
    }
    // SAFETY (test code): both are fds of this process; the copy at `at` is then owned by the
    // protocol (listen_fds takes it) and the original is closed.
    unsafe {
        assert_eq!(libc::dup2(raw, at), at, "dup2");
        libc::close(raw);
    }
}

fn is_open(fd: RawFd) -> bool {
    // SAFETY (test code): F_GETFD only reads flags.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

fn set_activation_env(n: usize, names: Option<&str>) {
    std::env::set_var("LISTEN_PID", std::process::id().to_string());
    std::env::set_var("LISTEN_FDS", n.to_string());
    match names {
        Some(v) => std::env::set_var("LISTEN_FDNAMES", v),
        None => std::env::remove_var("LISTEN_FDNAMES"),
    }
}

fn activation_env_is_gone() -> bool {
    ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"]
        .iter()
        .all(|v| std::env::var_os(v).is_none())
}

/// Runs `f` in a forked child (its fds 3, 4, ... are its own to replace) and checks it passed.
fn in_child(f: impl FnOnce() -> i32) {
    let pid = util::fork_child(f);
    let st = util::wait_child(pid, Duration::from_secs(15));
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "child failed (status {st:#x})"
    );
}

/// Sends one GET and reads the whole response (the server closes after it).
fn get(mut s: impl Read + Write) -> String {
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .expect("send request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    out
}

fn body(resp: &str) -> &str {
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp:?}");
    resp.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

fn tcp(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port()
}

/// `systemd-socket-activate ARGS` with stdout and stderr in files of `dir`, started once it
/// says it listens on all `sockets` (a port taken by someone else in the meantime: it fails,
/// and another port is tried). `args(ports)` gives the arguments for the ports picked.
struct Activated {
    child: Child,
    out: PathBuf,
    err: PathBuf,
    ports: Vec<u16>,
}

impl Activated {
    fn start(dir: &Path, tcp_ports: usize, args: impl Fn(&[u16]) -> Vec<String>) -> Activated {
        for _attempt in 0..5 {
            let ports: Vec<u16> = (0..tcp_ports).map(|_| free_port()).collect();
            let out = dir.join("stdout");
            let err = dir.join("stderr");
            let child = Command::new(SOCKET_ACTIVATE)
                .args(args(&ports))
                .stdin(Stdio::null())
                .stdout(File::create(&out).expect("stdout file"))
                .stderr(File::create(&err).expect("stderr file"))
                .spawn()
                .expect("spawn systemd-socket-activate");
            let mut a = Activated {
                child,
                out,
                err,
                ports,
            };
            let want = args(&a.ports).iter().filter(|s| s.as_str() == "-l").count();
            let listening = util::wait_until(Duration::from_secs(5), || {
                a.stderr().matches("Listening on ").count() >= want
                    || a.child.try_wait().ok().flatten().is_some()
            });
            if listening && a.child.try_wait().ok().flatten().is_none() {
                return a;
            }
            let _ = a.child.kill();
            let _ = a.child.wait();
            eprintln!(
                "systemd-socket-activate did not listen, again: {}",
                a.stderr()
            );
        }
        panic!("systemd-socket-activate never listened");
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for exit within `limit`; the exit code.
    fn wait(&mut self, limit: Duration) -> i32 {
        let end = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st.code().unwrap_or(-1);
            }
            if Instant::now() >= end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "did not exit within {limit:?}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// sd_notify

fn notify_every_message_on_a_path_socket() {
    let dir = temp_dir("path");
    let path = dir.join("notify");
    let sock = UnixDatagram::bind(&path).expect("bind");
    std::env::set_var("NOTIFY_SOCKET", &path);
    let n = Notifier::from_env(true).unwrap().expect("a notifier");
    assert!(std::env::var_os("NOTIFY_SOCKET").is_none(), "unset");
    assert!(
        util::is_cloexec(&n.as_fd()),
        "the notifier's socket is close-on-exec"
    );
    send_and_check_every_message(&n, &sock);
    // Kept: the notifier works without the variable.
    assert!(Notifier::from_env(true).unwrap().is_none());
    n.ready().unwrap();
    assert_eq!(recv(&sock), "READY=1");
    let _ = std::fs::remove_dir_all(&dir);
}

fn notify_every_message_on_an_abstract_socket() {
    let name = format!("forkcluster-test-notify-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
    let sock = UnixDatagram::bind_addr(&addr).expect("bind abstract");
    std::env::set_var("NOTIFY_SOCKET", format!("@{name}"));
    // Not unset on request: the variable stays.
    let n = Notifier::from_env(false).unwrap().expect("a notifier");
    assert!(std::env::var_os("NOTIFY_SOCKET").is_some());
    send_and_check_every_message(&n, &sock);
    // The same through `new`.
    let n = Notifier::new(format!("@{name}")).unwrap();
    n.stopping().unwrap();
    assert_eq!(recv(&sock), "STOPPING=1");
}

fn notify_never_blocks_nor_kills() {
    let dir = temp_dir("block");
    let path = dir.join("notify");
    let sock = UnixDatagram::bind(&path).expect("bind");
    let n = Notifier::new(&path).unwrap();
    // A service manager that does not read: the queue fills, and then each send fails at once
    // with EAGAIN instead of waiting.
    let t0 = Instant::now();
    let mut sent = 0;
    let err = loop {
        match n.watchdog() {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 100_000, "the queue never filled");
    };
    assert!(err.is_would_block(), "{err}");
    for _ in 0..100 {
        assert!(n.status(1, 2).unwrap_err().is_would_block());
    }
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(sent > 0);
    // Reading makes room again.
    assert_eq!(recv(&sock), "WATCHDOG=1");
    n.ready().unwrap();
    // No one there any more: an error (ECONNREFUSED, ENOENT), not a SIGPIPE.
    drop(sock);
    let e = n.ready().unwrap_err();
    assert!(e.raw_os_error().is_some(), "{e}");
    std::fs::remove_file(&path).unwrap();
    let e = n.stopping().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    assert!(e.to_string().contains("NOTIFY_SOCKET"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn notify_allocates_nothing() {
    let dir = temp_dir("alloc");
    let path = dir.join("notify");
    let sock = UnixDatagram::bind(&path).expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut n = Notifier::new(&path).unwrap();
    n.set_watchdog_interval(Some(Duration::from_nanos(1)));
    let mut buf = [0u8; 256];
    let mut lens = [0usize; 8];
    let before = ALLOCS.load(Ordering::Relaxed);
    for i in 0..1_000usize {
        let k = i % 8;
        match k {
            0 => n.ready().unwrap(),
            1 => n.reloading().unwrap(),
            2 => n.stopping().unwrap(),
            3 => n.status(i, 1_000).unwrap(),
            4 => n.status_text("serving").unwrap(),
            5 => n.watchdog().unwrap(),
            6 => n.mainpid(i as u32).unwrap(),
            _ => assert!(n
                .watchdog_if_due(Instant::now() + Duration::from_millis(1))
                .unwrap()),
        }
        lens[k] = sock.recv(&mut buf).expect("recv");
    }
    let allocs = ALLOCS.load(Ordering::Relaxed) - before;
    assert_eq!(allocs, 0, "1,000 notifications allocated {allocs} times");
    assert!(lens.iter().all(|&l| l > 0), "{lens:?}");
    // The state machine over it: 1,000 steps of start, reload, scale and watchdog.
    let mut sd = Lifecycle::new(n);
    let mut received = 0;
    let before = ALLOCS.load(Ordering::Relaxed);
    for i in 0..1_000usize {
        match i % 10 {
            0 => sd.reloading(),
            5 => sd.reloaded(),
            _ => sd.workers(i % 4, 3),
        }
        sd.tick(Instant::now());
        while rustix::io::ioctl_fionread(&sock).unwrap_or(0) > 0 {
            sock.recv(&mut buf).expect("recv");
            received += 1;
        }
    }
    let allocs = ALLOCS.load(Ordering::Relaxed) - before;
    assert_eq!(allocs, 0, "1,000 lifecycle steps allocated {allocs} times");
    assert_eq!(sd.send_errors(), 0);
    assert!(received > 1_000, "{received}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn watchdog_interval_and_cadence() {
    let me = std::process::id().to_string();
    std::env::remove_var("WATCHDOG_PID");
    std::env::set_var("WATCHDOG_USEC", "2000000");
    assert_eq!(
        systemd::watchdog_interval(false).unwrap(),
        Some(Duration::from_secs(1))
    );
    std::env::set_var("WATCHDOG_PID", &me);
    assert_eq!(
        systemd::watchdog_interval(false).unwrap(),
        Some(Duration::from_secs(1))
    );
    // Meant for another process (the parent that inherited it to us): off.
    std::env::set_var("WATCHDOG_PID", "1");
    assert_eq!(systemd::watchdog_interval(false).unwrap(), None);
    for (usec, pid) in [
        ("0", &me[..]),
        ("x", &me),
        ("-5", &me),
        ("100", "0"),
        ("100", "y"),
    ] {
        std::env::set_var("WATCHDOG_USEC", usec);
        std::env::set_var("WATCHDOG_PID", pid);
        assert!(
            matches!(systemd::watchdog_interval(false), Err(Error::Invalid(_))),
            "{usec} {pid}"
        );
    }
    std::env::set_var("WATCHDOG_USEC", "60000");
    std::env::set_var("WATCHDOG_PID", &me);
    assert_eq!(
        systemd::watchdog_interval(true).unwrap(),
        Some(Duration::from_millis(30))
    );
    assert!(std::env::var_os("WATCHDOG_USEC").is_none());
    assert!(std::env::var_os("WATCHDOG_PID").is_none());
    assert_eq!(systemd::watchdog_interval(true).unwrap(), None);

    // Through the notifier, with a real socket: due every 30 ms, not before.
    let dir = temp_dir("watchdog");
    let path = dir.join("notify");
    let sock = UnixDatagram::bind(&path).expect("bind");
    std::env::set_var("NOTIFY_SOCKET", &path);
    std::env::set_var("WATCHDOG_USEC", "60000");
    let t0 = Instant::now();
    let mut n = Notifier::from_env(true).unwrap().expect("a notifier");
    assert_eq!(n.watchdog_interval(), Some(Duration::from_millis(30)));
    let first = n.next_watchdog().expect("a deadline");
    assert!(first >= t0 + Duration::from_millis(30));
    assert!(!n.watchdog_if_due(Instant::now()).unwrap());
    assert!(!pending(&sock));
    let mut sent = 0;
    while sent < 5 {
        let at = n.next_watchdog().unwrap();
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        let now = Instant::now();
        assert!(n.watchdog_if_due(now).unwrap());
        assert_eq!(n.next_watchdog(), Some(now + Duration::from_millis(30)));
        assert!(!n.watchdog_if_due(now).unwrap(), "once per interval");
        assert_eq!(recv(&sock), "WATCHDOG=1");
        sent += 1;
    }
    assert!(t0.elapsed() >= Duration::from_millis(150));
    n.set_watchdog_interval(None);
    assert_eq!(n.next_watchdog(), None);
    assert!(!n
        .watchdog_if_due(Instant::now() + Duration::from_secs(9))
        .unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

fn notify_from_env_without_a_socket() {
    std::env::remove_var("NOTIFY_SOCKET");
    std::env::set_var("WATCHDOG_USEC", "1000000");
    assert!(Notifier::from_env(true).unwrap().is_none());
    assert!(std::env::var_os("WATCHDOG_USEC").is_none(), "unset even so");
    for bad in ["relative/notify", "vsock:2:999", "@", ""] {
        std::env::set_var("NOTIFY_SOCKET", bad);
        let e = Notifier::from_env(true).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{bad:?}: {e}");
        assert!(std::env::var_os("NOTIFY_SOCKET").is_none());
    }
}

/// Every notification waiting on `sock`, in order.
fn drain(sock: &UnixDatagram) -> Vec<String> {
    let mut v = Vec::new();
    while pending(sock) {
        v.push(recv(sock));
    }
    v
}

fn lifecycle_sends_in_systemd_order() {
    let dir = temp_dir("lifecycle");
    let path = dir.join("notify");
    let sock = UnixDatagram::bind(&path).expect("bind");
    let mut sd = Lifecycle::new(Notifier::new(&path).unwrap());
    let none: [&str; 0] = [];
    // Start: STATUS as workers come up, READY=1 once all listen, nothing when nothing changed.
    sd.workers(0, 2);
    sd.workers(1, 2);
    assert!(!sd.is_ready());
    sd.workers(2, 2);
    sd.workers(2, 2);
    assert_eq!(
        drain(&sock),
        [
            "STATUS=0/2 workers",
            "STATUS=1/2 workers",
            "STATUS=2/2 workers",
            "READY=1"
        ]
    );
    assert!(sd.is_ready());
    // A reload: RELOADING=1 once, no READY=1 while it runs, READY=1 after it.
    sd.reloading();
    sd.reloading();
    assert!(!sd.is_ready());
    sd.workers(3, 2);
    sd.workers(2, 2);
    let v = drain(&sock);
    assert_eq!(v.len(), 3, "{v:?}");
    assert!(v[0].starts_with("RELOADING=1\nMONOTONIC_USEC="), "{v:?}");
    assert_eq!(v[1..], ["STATUS=3/2 workers", "STATUS=2/2 workers"]);
    sd.reloaded();
    assert_eq!(drain(&sock), none, "READY waits for the next count");
    sd.workers(1, 2);
    sd.workers(2, 2);
    assert_eq!(
        drain(&sock),
        ["STATUS=1/2 workers", "STATUS=2/2 workers", "READY=1"]
    );
    // reloaded() without a reload changes nothing.
    sd.reloaded();
    sd.workers(2, 2);
    assert_eq!(drain(&sock), none);
    // Scaling: STATUS only; READY=1 was said.
    sd.workers(2, 3);
    sd.workers(3, 3);
    assert_eq!(drain(&sock), ["STATUS=2/3 workers", "STATUS=3/3 workers"]);
    // Stop: STOPPING=1 once, then nothing of the rest.
    sd.stopping();
    sd.stopping();
    sd.workers(1, 3);
    sd.reloading();
    sd.reloaded();
    sd.workers(3, 3);
    assert_eq!(drain(&sock), ["STOPPING=1"]);
    assert!(!sd.is_ready());
    assert_eq!(sd.deadline(), None, "no watchdog without WATCHDOG_USEC");
    sd.tick(Instant::now());
    assert_eq!(drain(&sock), none);
    assert_eq!(sd.send_errors(), 0);
    // With a watchdog, tick pings when due; failed sends are counted, never fatal.
    std::env::set_var("NOTIFY_SOCKET", &path);
    std::env::set_var("WATCHDOG_USEC", "20000");
    let mut sd = Lifecycle::new(Notifier::from_env(true).unwrap().unwrap());
    let at = sd.deadline().expect("a watchdog deadline");
    sd.tick(at - Duration::from_millis(5));
    assert_eq!(drain(&sock), none);
    sd.tick(at);
    assert_eq!(drain(&sock), ["WATCHDOG=1"]);
    assert_eq!(sd.deadline(), Some(at + Duration::from_millis(10)));
    drop(sock);
    sd.workers(1, 1);
    sd.tick(at + Duration::from_secs(1));
    assert_eq!(sd.send_errors(), 3, "STATUS, READY and WATCHDOG failed");
    assert!(sd.is_ready());
    sd.notifier().send("STATUS=x").unwrap_err();
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// listen_fds in this process

fn listen_fds_without_activation() {
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    assert!(systemd::listen_fds(true).unwrap().is_empty());
    // Meant for another process: nothing taken, and the variables go.
    in_child(|| {
        put_at(TcpListener::bind("127.0.0.1:0").unwrap(), 3);
        set_activation_env(1, Some("web"));
        std::env::set_var("LISTEN_PID", "1");
        assert!(systemd::listen_fds(true).unwrap().is_empty());
        assert!(activation_env_is_gone());
        assert!(is_open(3), "fd 3 is not ours to take or close");
        // Malformed: an error, and still unset.
        set_activation_env(1, None);
        std::env::set_var("LISTEN_FDS", "one");
        assert!(matches!(
            systemd::listen_fds(true),
            Err(Error::Invalid("LISTEN_FDS is not a number"))
        ));
        assert!(activation_env_is_gone());
        std::env::set_var("LISTEN_PID", "me");
        std::env::set_var("LISTEN_FDS", "1");
        assert!(matches!(systemd::listen_fds(true), Err(Error::Invalid(_))));
        assert!(is_open(3), "not taken on a malformed variable");
        // One name for two fds: taken, and closed with the error.
        put_at(TcpListener::bind("127.0.0.1:0").unwrap(), 4);
        set_activation_env(2, Some("web"));
        assert!(matches!(
            systemd::listen_fds(true),
            Err(Error::Invalid(
                "LISTEN_FDNAMES does not have one name per fd of LISTEN_FDS"
            ))
        ));
        assert!(!is_open(3) && !is_open(4), "closed with the error");
        assert!(activation_env_is_gone());
        0
    });
}

fn listen_fds_adopts_stream_and_datagram_sockets() {
    in_child(|| {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_addr = tcp.local_addr().unwrap();
        let dir = temp_dir("adopt");
        let upath = dir.join("sock");
        let unix = UnixListener::bind(&upath).unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_addr = udp.local_addr().unwrap();
        let tcp6 = TcpListener::bind("[::1]:0").ok();
        put_at(tcp, 3);
        put_at(unix, 4);
        put_at(udp, 5);
        let n = if let Some(l) = tcp6 {
            put_at(l, 6);
            4
        } else {
            println!("no IPv6 loopback: fd 6 not tested");
            3
        };
        set_activation_env(
            n,
            Some(&"web:sock:dns:web6"[..if n == 4 { 17 } else { 12 }]),
        );
        let got = systemd::listen_fds(false).unwrap();
        assert!(!activation_env_is_gone(), "kept on request");
        assert_eq!(got.len(), n);
        let want = [
            ("web", SocketFamily::Inet, SocketKind::Stream),
            ("sock", SocketFamily::Unix, SocketKind::Stream),
            ("dns", SocketFamily::Inet, SocketKind::Datagram),
            ("web6", SocketFamily::Inet6, SocketKind::Stream),
        ];
        for (i, (s, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(s.fd.as_raw_fd(), 3 + i as i32);
            assert_eq!((s.name.as_str(), s.family, s.kind), w);
            assert!(util::is_cloexec(&s.fd), "fd {} close-on-exec", 3 + i);
        }
        assert_eq!(
            got[0].local_addr().unwrap().to_string(),
            tcp_addr.to_string()
        );
        assert_eq!(
            got[1].local_addr().unwrap().to_string(),
            format!("unix:{}", upath.display())
        );
        assert_eq!(
            got[2].local_addr().unwrap().to_string(),
            format!("udp:{udp_addr}")
        );
        // Taken once per process: a second call takes nothing, even with the variables there.
        assert!(systemd::listen_fds(true).unwrap().is_empty());
        assert!(activation_env_is_gone());
        // The sockets work: accept on the adopted TCP listener.
        let mut it = got.into_iter();
        let l = TcpListener::from(OwnedFd::from(it.next().unwrap()));
        let mut c = TcpStream::connect(tcp_addr).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        drop(it);
        assert!(!is_open(4) && !is_open(5), "dropped, closed");
        let _ = std::fs::remove_dir_all(&dir);
        0
    });
    // Without LISTEN_FDNAMES every name is "unknown", as libsystemd says.
    in_child(|| {
        put_at(TcpListener::bind("127.0.0.1:0").unwrap(), 3);
        set_activation_env(1, None);
        let got = systemd::listen_fds(true).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].name, "unknown");
        assert!(activation_env_is_gone());
        0
    });
}

/// A raw socket of the given domain and type, for the shapes std does not make.
fn raw_socket(domain: i32, ty: i32, proto: i32) -> OwnedFd {
    // SAFETY (test code): socket() returns a new fd or -1.
    let fd = unsafe { libc::socket(domain, ty, proto) };
    assert!(
        fd >= 0,
        "socket({domain}, {ty}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY (test code): a fresh fd owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn expect_activation_error(n: usize, fd: RawFd, why: &str, setup: fn()) {
    in_child(move || {
        setup();
        set_activation_env(n, None);
        let e = systemd::listen_fds(true).unwrap_err();
        match e {
            Error::Activation { fd: got, why: w } => {
                assert_eq!(got, fd, "{e}");
                assert_eq!(w, why, "{e}");
            }
            other => panic!("want an activation error for fd {fd}, got {other}"),
        }
        assert_eq!(e.to_string(), format!("socket activation: fd {fd} {why}"));
        assert!(activation_env_is_gone(), "unset on an error too");
        for i in 0..n as i32 {
            assert!(!is_open(3 + i), "fd {} closed after the error", 3 + i);
        }
        0
    });
}

fn listen_fds_rejects_what_is_not_a_listening_socket() {
    expect_activation_error(1, 3, "is not a socket", || {
        let (r, _w) = pipe();
        put_at(r, 3);
    });
    expect_activation_error(1, 3, "is not a socket", || {
        put_at(File::open("/dev/null").unwrap(), 3);
    });
    expect_activation_error(1, 3, "is a stream socket that is not listening", || {
        put_at(raw_socket(libc::AF_INET, libc::SOCK_STREAM, 0), 3);
    });
    expect_activation_error(1, 3, "is a stream socket that is not listening", || {
        let (a, _b) = UnixStream::pair().unwrap();
        put_at(a, 3);
    });
    expect_activation_error(
        1,
        3,
        "is a socket of a type other than SOCK_STREAM and SOCK_DGRAM",
        || {
            put_at(raw_socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0), 3);
        },
    );
    expect_activation_error(
        1,
        3,
        "is a socket of a family other than AF_INET, AF_INET6 and AF_UNIX",
        || {
            put_at(
                raw_socket(libc::AF_NETLINK, libc::SOCK_DGRAM, libc::NETLINK_ROUTE),
                3,
            );
        },
    );
    // The second of two is not open: the first is closed too, nothing leaks.
    expect_activation_error(2, 4, "is not open", || {
        put_at(TcpListener::bind("127.0.0.1:0").unwrap(), 3);
        // SAFETY (test code): fd 4 is closed if it is open; nothing of ours uses it.
        unsafe { libc::close(4) };
    });
    // The first error is reported (fd 3), and fd 4, a good listener, is closed as well.
    expect_activation_error(2, 3, "is not a socket", || {
        put_at(File::open("/dev/null").unwrap(), 3);
        put_at(TcpListener::bind("127.0.0.1:0").unwrap(), 4);
    });
}

/// A pipe (close-on-exec), read end first.
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY (test code): `fds` has room for the two fds pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY (test code): two fresh fds, owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

// ---------------------------------------------------------------------------------------------
// The builder with activated sockets: a real cluster in this process

fn builder_serves_activated_sockets() {
    in_child(|| {
        let web = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = web.local_addr().unwrap().port();
        let dir = temp_dir("builder");
        let upath = dir.join("sock");
        let unix = UnixListener::bind(&upath).unwrap();
        put_at(web, 3);
        put_at(unix, 4);
        set_activation_env(2, Some("web:local"));
        let mut primary = Cluster::builder()
            .systemd_listeners()
            .unwrap()
            .workers(2)
            .start(|mut w| -> forkcluster::Result<()> {
                let env = if activation_env_is_gone() {
                    "clean"
                } else {
                    "inherited"
                };
                let body = format!("worker {} env={env}\n", w.id());
                while let Some(next) = w.next()? {
                    match next {
                        Next::Connection(mut c) => {
                            let mut b = [0u8; 1024];
                            let _ = c.read(&mut b);
                            let _ = write!(
                                c,
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                body.len()
                            );
                        }
                        Next::Message(_) => {}
                        Next::Disconnect => break,
                    }
                }
                Ok(())
            })
            .unwrap();
        assert!(activation_env_is_gone());
        let addrs: Vec<String> = primary.listen_addrs().map(|a| a.to_string()).collect();
        assert_eq!(
            addrs,
            [
                format!("127.0.0.1:{port}"),
                format!("unix:{}", upath.display())
            ]
        );
        // Both workers listening on both listeners.
        let end = Instant::now() + Duration::from_secs(10);
        while primary
            .workers()
            .filter(|w| w.state == State::Listening)
            .count()
            < 2
        {
            assert!(Instant::now() < end, "workers did not listen");
            let _ = primary
                .next_event_timeout(Duration::from_millis(20))
                .unwrap();
        }
        let upath2 = upath.clone();
        let client = util::fork_child(move || {
            for _ in 0..4 {
                let r = get(tcp(port));
                assert!(body(&r).ends_with(" env=clean\n"), "{r:?}");
                let u = UnixStream::connect(&upath2).unwrap();
                u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let r = get(u);
                assert!(body(&r).starts_with("worker "), "{r:?}");
            }
            0
        });
        let end = Instant::now() + Duration::from_secs(10);
        let status = loop {
            let _ = primary
                .next_event_timeout(Duration::from_millis(10))
                .unwrap();
            let mut st = 0;
            // SAFETY (test code): reaping our own client child.
            if unsafe { libc::waitpid(client, &mut st, libc::WNOHANG) } == client {
                break st;
            }
            assert!(Instant::now() < end, "client did not finish");
        };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "client failed"
        );
        primary.stop(false);
        while let Some(e) = primary.next_event_timeout(Duration::from_secs(5)).unwrap() {
            assert!(!matches!(e, Event::Idle), "stop did not finish");
        }
        drop(primary);
        let _ = std::fs::remove_dir_all(&dir);
        0
    });
    // A UDP socket is adopted (listener 1, shared by every worker); a Unix datagram socket
    // the cluster cannot serve, and says which fd.
    in_child(|| {
        put_at(TcpListener::bind("127.0.0.1:0").unwrap(), 3);
        put_at(UdpSocket::bind("127.0.0.1:0").unwrap(), 4);
        set_activation_env(2, None);
        let b = Cluster::builder().systemd_listeners().unwrap();
        assert_eq!(b.listener_count(), 2, "the UDP socket is a listener");
        assert!(activation_env_is_gone());
        0
    });
    in_child(|| {
        put_at(TcpListener::bind("127.0.0.1:0").unwrap(), 3);
        put_at(UnixDatagram::unbound().unwrap(), 4);
        set_activation_env(2, None);
        match Cluster::builder().systemd_listeners() {
            Err(Error::Activation { fd: 4, why }) => {
                assert!(why.contains("Unix datagram"), "{why}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a Unix datagram socket was adopted as a listener"),
        }
        assert!(activation_env_is_gone());
        0
    });
    // Not activated: nothing added, and the cluster starts on what else it was given.
    in_child(|| {
        std::env::remove_var("LISTEN_FDS");
        let primary = Cluster::builder()
            .systemd_listeners()
            .unwrap()
            .listen("127.0.0.1:0".parse().unwrap())
            .workers(1)
            .start(|_w| ())
            .unwrap();
        assert_eq!(primary.listen_addrs().count(), 1);
        0
    });
}

// ---------------------------------------------------------------------------------------------
// systemd-socket-activate launching the example

/// Connects (which makes systemd-socket-activate exec the program) and returns the body.
fn get_tcp_body(port: u16) -> String {
    body(&get(tcp(port))).to_string()
}

fn socket_activate_one_socket() {
    if !have_socket_activate() {
        return;
    }
    let dir = temp_dir("one");
    let prog = sd_listen();
    let mut a = Activated::start(&dir, 1, |p| {
        let mut v = args(&["-l"]);
        v.push(format!("127.0.0.1:{}", p[0]));
        v.push(prog.display().to_string());
        v
    });
    let port = a.ports[0];
    assert_eq!(get_tcp_body(port), "unknown\n");
    assert_eq!(a.wait(Duration::from_secs(10)), 0, "{}", a.stderr());
    let out = a.stdout();
    assert_eq!(
        out,
        format!(
            "fd=3 name=unknown family=inet kind=stream addr=127.0.0.1:{port} cloexec=yes\n\
             LISTEN_PID=unset\nLISTEN_FDS=unset\nLISTEN_FDNAMES=unset\ncount=1\n"
        )
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The main example with two named sockets (TCP and Unix): both are served by the cluster,
/// and a graceful stop ends it with status 0.
fn hello_serves_two_activated_sockets() {
    if !have_socket_activate() {
        return;
    }
    let dir = temp_dir("hello-two");
    let upath = dir.join("admin.sock");
    let prog = example_path("hello");
    let up = upath.display().to_string();
    let mut a = Activated::start(&dir, 1, |p| {
        let mut v = args(&["-l"]);
        v.push(format!("127.0.0.1:{}", p[0]));
        v.push("--fdname=web".into());
        v.extend(args(&["-l", &up, "--fdname=admin"]));
        v.push(prog.display().to_string());
        v.extend(args(&[
            "--systemd",
            "--workers",
            "2",
            "--defer-accept",
            "0",
        ]));
        v
    });
    let port = a.ports[0];
    assert!(get_tcp_body(port).starts_with("hello from worker "));
    let u = UnixStream::connect(&upath).expect("connect admin");
    u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(body(&get(u)).starts_with("hello from worker "));
    // SAFETY (test code): signalling the child we started.
    unsafe { libc::kill(a.pid(), libc::SIGTERM) };
    assert_eq!(a.wait(Duration::from_secs(15)), 0, "{}", a.stderr());
    let err = a.stderr();
    assert!(
        err.contains(&format!("serving on 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(err.contains(&format!("serving on unix:{up}")), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn socket_activate_two_named_sockets() {
    if !have_socket_activate() {
        return;
    }
    let dir = temp_dir("two");
    let upath = dir.join("admin.sock");
    let prog = sd_listen();
    let up = upath.display().to_string();
    let mut a = Activated::start(&dir, 1, |p| {
        let mut v = args(&["-l"]);
        v.push(format!("127.0.0.1:{}", p[0]));
        v.push("--fdname=web".into());
        v.extend(args(&["-l", &up, "--fdname=admin"]));
        v.push(prog.display().to_string());
        v
    });
    let port = a.ports[0];
    assert_eq!(get_tcp_body(port), "web\n");
    let u = UnixStream::connect(&upath).expect("connect admin");
    u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(body(&get(u)), "admin\n");
    assert_eq!(a.wait(Duration::from_secs(10)), 0, "{}", a.stderr());
    assert_eq!(
        a.stdout(),
        format!(
            "fd=3 name=web family=inet kind=stream addr=127.0.0.1:{port} cloexec=yes\n\
             fd=4 name=admin family=unix kind=stream addr=unix:{up} cloexec=yes\n\
             LISTEN_PID=unset\nLISTEN_FDS=unset\nLISTEN_FDNAMES=unset\ncount=2\n"
        )
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn socket_activate_datagram_socket() {
    if !have_socket_activate() {
        return;
    }
    let dir = temp_dir("dgram");
    let prog = sd_listen();
    let mut a = Activated::start(&dir, 1, |p| {
        let mut v = args(&["--datagram", "-l"]);
        v.push(format!("127.0.0.1:{}", p[0]));
        v.push("--fdname=dns".into());
        v.push(prog.display().to_string());
        v
    });
    let port = a.ports[0];
    // A datagram wakes systemd-socket-activate up, as a connection does for a stream socket.
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.send_to(b"hello", ("127.0.0.1", port)).unwrap();
    assert_eq!(a.wait(Duration::from_secs(10)), 0, "{}", a.stderr());
    assert_eq!(
        a.stdout(),
        format!(
            "fd=3 name=dns family=inet kind=datagram addr=udp:127.0.0.1:{port} cloexec=yes\n\
             LISTEN_PID=unset\nLISTEN_FDS=unset\nLISTEN_FDNAMES=unset\ncount=1\n"
        )
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `sh` sets `LISTEN_PID` to its own pid and execs the example with `fd` as fd 3.
fn exec_with_fd_3(fd: OwnedFd) -> (i32, String, String) {
    let raw = fd.as_raw_fd();
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\""])
        .arg(sd_listen())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY (test code): dup2 and fcntl are async-signal-safe; the closure only moves `raw`,
    // open in the parent, to fd 3 of the child (without close-on-exec).
    unsafe {
        cmd.pre_exec(move || {
            if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0);
            } else if libc::dup2(raw, 3) != 3 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn sh");
    drop(fd);
    // Reaped here; a hang is ended by the runner's alarm, which kills the test's process group.
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn exec_with_a_pipe_or_an_unlistened_socket_as_fd_3() {
    let (r, _w) = pipe();
    let (code, out, err) = exec_with_fd_3(r);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err, "sd_listen: socket activation: fd 3 is not a socket\n");
    assert_eq!(out, "");
    let (code, _, err) = exec_with_fd_3(raw_socket(libc::AF_INET, libc::SOCK_STREAM, 0));
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "sd_listen: socket activation: fd 3 is a stream socket that is not listening\n"
    );
    // And a good one, for contrast: a listening socket passed the same way is served.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let client = util::fork_child(move || {
        let b = get_tcp_body(port);
        if b == "unknown\n" {
            0
        } else {
            1
        }
    });
    let (code, out, err) = exec_with_fd_3(l.into());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("fd=3 name=unknown family=inet kind=stream"),
        "{out}"
    );
    let st = util::wait_child(client, Duration::from_secs(10));
    assert!(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0);
}

// ---------------------------------------------------------------------------------------------
// The whole picture: a socket-activated cluster and its notifications

/// Notifications until (and with) the first that `stop` accepts; watchdog pings are counted
/// apart and left out.
fn collect_until(
    sock: &UnixDatagram,
    pings: &mut usize,
    stop: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut v = Vec::new();
    loop {
        let m = recv(sock);
        if m == "WATCHDOG=1" {
            *pings += 1;
            continue;
        }
        let done = stop(&m);
        v.push(m);
        if done {
            return v;
        }
    }
}

fn socket_activate_cluster_notifies_start_hup_term() {
    notifies_start_hup_term("cluster", sd_listen(), &["--cluster", "2"], |b| {
        b.starts_with("hello from worker ") && b.ends_with(" env=clean\n")
    });
}

/// The main example under socket activation: `hello --systemd`, whose primary sends the
/// notifications itself (`Builder::sd_notify`, on by default).
fn hello_under_socket_activation_notifies_start_hup_term() {
    let hello = example_path("hello");
    notifies_start_hup_term("hello", hello, &["--systemd", "--workers", "2"], |b| {
        b.starts_with("hello from worker ")
    });
}

fn notifies_start_hup_term(tag: &str, prog: PathBuf, prog_args: &[&str], good: fn(&str) -> bool) {
    if !have_socket_activate() {
        return;
    }
    let dir = temp_dir(tag);
    let npath = dir.join("notify");
    let sock = UnixDatagram::bind(&npath).expect("bind notify socket");
    let notify = format!("NOTIFY_SOCKET={}", npath.display());
    let mut a = Activated::start(&dir, 1, |p| {
        let mut v = args(&["-l"]);
        v.push(format!("127.0.0.1:{}", p[0]));
        v.push("--fdname=web".into());
        v.extend(args(&["-E", &notify, "-E", "WATCHDOG_USEC=300000"]));
        v.push(prog.display().to_string());
        v.extend(args(prog_args));
        v
    });
    let port = a.ports[0];
    let mut pings = 0;

    // Start: the first connection execs the program; it is served once workers listen.
    let first = util::fork_child(move || i32::from(!good(&get_tcp_body(port))));
    let start = collect_until(&sock, &mut pings, |m| m == "READY=1");
    assert_eq!(
        start.last().map(String::as_str),
        Some("READY=1"),
        "{start:?}"
    );
    assert_eq!(
        start[start.len() - 2],
        "STATUS=2/2 workers",
        "all listen before READY: {start:?}"
    );
    assert!(
        start[..start.len() - 1]
            .iter()
            .all(|m| m.starts_with("STATUS=")),
        "{start:?}"
    );
    let st = util::wait_child(first, Duration::from_secs(10));
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "first request"
    );

    // The watchdog: WATCHDOG_USEC=300 ms, so a ping every 150 ms while idle.
    let t0 = Instant::now();
    let mut idle_pings = 0;
    while t0.elapsed() < Duration::from_millis(800) {
        assert_eq!(recv(&sock), "WATCHDOG=1");
        idle_pings += 1;
    }
    assert!(
        (2..=8).contains(&idle_pings),
        "{idle_pings} pings in 800 ms"
    );

    // SIGHUP: a rolling restart between RELOADING=1 and READY=1.
    let before = mono_usec();
    // SAFETY (test code): signalling the child we started.
    unsafe { libc::kill(a.pid(), libc::SIGHUP) };
    let reload = collect_until(&sock, &mut pings, |m| m == "READY=1");
    let r: Vec<&String> = reload
        .iter()
        .filter(|m| !m.starts_with("STATUS="))
        .collect();
    assert_eq!(r.len(), 2, "{reload:?}");
    let usec: u64 = r[0]
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("{reload:?}"))
        .parse()
        .unwrap();
    assert!(usec >= before && usec <= mono_usec(), "{usec}");
    assert_eq!(r[1], "READY=1");
    // STATUS lines come as the count changes; the last one before READY (if any) says all.
    if let Some(last) = reload.iter().rev().find(|m| m.starts_with("STATUS=")) {
        assert_eq!(last, "STATUS=2/2 workers", "{reload:?}");
    }
    let b = get_tcp_body(port);
    let id: u32 = b
        .split(' ')
        .nth(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert!(id >= 3, "a new worker serves after the restart: {b:?}");

    // SIGTERM: STOPPING=1, then the program exits 0.
    // SAFETY (test code): as above.
    unsafe { libc::kill(a.pid(), libc::SIGTERM) };
    let stop = collect_until(&sock, &mut pings, |m| m == "STOPPING=1");
    assert_eq!(stop, ["STOPPING=1"]);
    assert_eq!(a.wait(Duration::from_secs(15)), 0, "{}", a.stderr());
    while pending(&sock) {
        assert_eq!(
            recv(&sock),
            "WATCHDOG=1",
            "nothing but pings after STOPPING"
        );
    }
    let err = a.stderr();
    assert!(
        err.contains(&format!("listener 0: 127.0.0.1:{port}"))
            || err.contains(&format!("serving on 127.0.0.1:{port}")),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
