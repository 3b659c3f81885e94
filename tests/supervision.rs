//! Supervision, end to end: real signals, real processes, real load on 127.0.0.1.
//!
//! Each test runs in its own forked process (the runner of `tests/util`, `harness = false`).
//! The primary runs in a further forked child ([`start_primary`]), so that the test can signal it
//! and check its exit status; it reports every lifecycle event as one line on a pipe, and the
//! workers report what they do on the same pipe. Every process a test starts is reaped (or
//! killed and reaped by a guard), and only those pids are ever signalled.
//!
//! `rolling_restart_under_load_drops_nothing` drives the real `hello` example with `wrk`
//! (`apt-get install wrk`); it builds the example first when run under cargo.

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use forkcluster::{Builder, Cluster, Connection, Event, ListenAddr, Next, Worker};
use util::{alive, children_of, fork_child, wait_child, wait_until, KillOnDrop};

fn main() {
    util::run(tests![
        respawn_after_sigkill,
        crash_loop_backs_off,
        backoff_resets_once_a_respawned_worker_is_healthy,
        fatal_exit_code_is_not_respawned,
        graceful_stop_finishes_in_flight_request,
        graceful_timeout_kills_worker_that_ignores_disconnect,
        fast_stop_on_sigint,
        rolling_restart_under_load_drops_nothing => 60,
        ttin_ttou_change_worker_count,
        hung_worker_is_killed_idle_worker_is_not,
        max_requests_recycles_without_failures,
        emfile_flood_pauses_accept_without_spinning,
        shared_emfile_flood_pauses_worker_accept,
        sigkill_of_primary_leaves_no_worker,
    ])
}

// ---------------------------------------------------------------------------------------------
// Reporting: one line per event on a pipe, written by the primary and by workers.

/// The write end of the event pipe, in the primary's process and (inherited) in its workers.
static EVFD: AtomicI32 = AtomicI32::new(-1);

/// Milliseconds on the monotonic clock (comparable across processes).
fn mono_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

/// Writes one line `<ms> <text>` to the event pipe (one `write`, shorter than `PIPE_BUF`: atomic).
fn report(text: &str) {
    let fd = EVFD.load(Ordering::Relaxed);
    if fd < 0 {
        return;
    }
    let line = format!("{:.3} {text}\n", mono_ms());
    unsafe { libc::write(fd, line.as_ptr().cast(), line.len()) };
}

fn event_line(ev: &Event<'_>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match ev {
        Event::Fork { id, pid } => format!("fork {id} {pid}"),
        Event::Online { id } => format!("online {id}"),
        Event::Listening { id, .. } => format!("listening {id}"),
        Event::Message { id, .. } => format!("message {id}"),
        Event::Disconnect { id } => format!("disconnect {id}"),
        Event::Exit {
            id,
            pid,
            status,
            exited_after_disconnect,
        } => format!(
            "exit {id} {pid} {} {} {}",
            status.code().unwrap_or(-1),
            status.signal().unwrap_or(0),
            *exited_after_disconnect as u8
        ),
        Event::WorkerError { id, .. } => format!("workererror {id}"),
        Event::Backoff { delay } => format!("backoff {}", delay.as_millis()),
        Event::Fatal { id, code } => format!("fatal {id} {code}"),
        Event::Hung { id } => format!("hung {id}"),
        Event::Recycle { id } => format!("recycle {id}"),
        Event::Scale { workers } => format!("scale {workers}"),
        Event::Restart {
            old,
            new,
            remaining,
        } => format!("restart {old} {new} {remaining}"),
        Event::RestartDone => "restartdone".into(),
        Event::Stopping { graceful } => format!("stopping {}", *graceful as u8),
        Event::AcceptPaused { .. } => "acceptpaused".into(),
        Event::Idle => "idle".into(),
        _ => "other".into(),
    }
}

/// One reported line: when, what, and its numeric arguments.
#[derive(Debug, Clone)]
struct Ev {
    t: f64,
    k: String,
    a: Vec<i64>,
}

/// The read end of the event pipe, with everything read so far.
struct Events {
    fd: OwnedFd,
    buf: Vec<u8>,
    all: Vec<Ev>,
    eof: bool,
}

impl Events {
    /// Reads whatever is there, waiting at most `ms` for something.
    fn pump(&mut self, ms: i32) {
        if self.eof {
            if ms > 0 {
                std::thread::sleep(Duration::from_millis(ms as u64));
            }
            return;
        }
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            return;
        }
        let mut chunk = [0u8; 8192];
        let n = unsafe { libc::read(self.fd.as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len()) };
        if n == 0 {
            self.eof = true;
            return;
        }
        if n < 0 {
            return;
        }
        self.buf.extend_from_slice(&chunk[..n as usize]);
        while let Some(p) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=p).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            let mut w = line.split_whitespace();
            let t = w.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
            let k = w.next().unwrap_or("").to_string();
            let a = w.filter_map(|s| s.parse().ok()).collect();
            self.all.push(Ev { t, k, a });
        }
    }

    /// Pumps until `cond` holds over everything read, for at most `limit`.
    fn wait(&mut self, limit: Duration, mut cond: impl FnMut(&[Ev]) -> bool) -> bool {
        let end = Instant::now() + limit;
        loop {
            if cond(&self.all) {
                return true;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.pump((left.as_millis() as i32).clamp(1, 20));
        }
    }

    /// Pumps for `d`, whatever comes.
    fn idle(&mut self, d: Duration) {
        self.wait(d, |_| false);
    }

    fn of(&self, k: &str) -> Vec<Ev> {
        self.all.iter().filter(|e| e.k == k).cloned().collect()
    }

    fn count(&self, k: &str) -> usize {
        self.all.iter().filter(|e| e.k == k).count()
    }

    fn dump(&self) -> String {
        let t0 = self.all.first().map_or(0.0, |e| e.t);
        self.all
            .iter()
            .map(|e| format!("  +{:7.1} ms {} {:?}\n", e.t - t0, e.k, e.a))
            .collect()
    }
}

/// A primary running in a forked child of the test.
struct Prim {
    pid: i32,
    port: u16,
    ev: Events,
    reaped: bool,
}

impl Drop for Prim {
    fn drop(&mut self) {
        if !self.reaped {
            drop(KillOnDrop(self.pid));
        }
    }
}

impl Prim {
    fn signal(&self, sig: i32) {
        assert_eq!(unsafe { libc::kill(self.pid, sig) }, 0, "kill {sig}");
    }

    /// Worker pid by id, from its `fork` line.
    fn worker_pid(&self, id: i64) -> i32 {
        self.ev
            .all
            .iter()
            .find(|e| e.k == "fork" && e.a[0] == id)
            .map(|e| e.a[1] as i32)
            .unwrap_or_else(|| panic!("no fork of worker {id}:\n{}", self.ev.dump()))
    }

    /// Pids of workers forked and not yet reported by `exit`.
    fn live_pids(&self) -> Vec<i32> {
        let exited: Vec<i64> = self.ev.of("exit").iter().map(|e| e.a[1]).collect();
        self.ev
            .of("fork")
            .iter()
            .map(|e| e.a[1])
            .filter(|p| !exited.contains(p))
            .map(|p| p as i32)
            .collect()
    }

    /// Waits until `n` workers have sent `listening` (all of them, counting respawns).
    fn wait_listening(&mut self, n: usize) {
        let ok = self.ev.wait(Duration::from_secs(5), |a| {
            a.iter().filter(|e| e.k == "listening").count() >= n
        });
        assert!(ok, "{n} workers not listening:\n{}", self.ev.dump());
    }

    /// Waits for the primary to exit; returns its wait status and when it was seen to exit.
    fn wait_exit(&mut self, limit: Duration) -> (i32, Instant) {
        self.reaped = true;
        let st = wait_child(self.pid, limit);
        let at = Instant::now();
        self.ev.pump(0);
        (st, at)
    }
}

/// Starts a cluster of `setup(builder)` with `worker` in a forked child, listening on
/// 127.0.0.1:0, and waits for its port. `pre` runs in the child before the cluster starts.
fn start_primary_with<W, R>(
    pre: impl FnOnce(),
    setup: impl FnOnce(Builder) -> Builder,
    worker: W,
) -> Prim
where
    W: FnMut(Worker) -> R + 'static,
    R: forkcluster::ExitCode,
{
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let wr_raw = wr.as_raw_fd();
    let rd_raw = rd.as_raw_fd();
    let pid = fork_child(move || {
        unsafe { libc::close(rd_raw) };
        EVFD.store(wr_raw, Ordering::Relaxed);
        pre();
        let b = setup(Cluster::builder().listen("127.0.0.1:0".parse().unwrap()));
        let mut p = match b.start(worker) {
            Ok(p) => p,
            Err(e) => {
                report(&format!("starterror {e}"));
                return 3;
            }
        };
        let port = match p.listen_addrs().next() {
            Some(ListenAddr::Tcp(a)) => a.port(),
            _ => 0,
        };
        report(&format!("addr {port}"));
        loop {
            match p.next_event() {
                Ok(Some(ev)) => report(&event_line(&ev)),
                Ok(None) => break,
                Err(e) => {
                    report(&format!("error {e}"));
                    return 4;
                }
            }
        }
        report("done");
        0
    });
    drop(wr);
    let ev = Events {
        fd: rd,
        buf: Vec::new(),
        all: Vec::new(),
        eof: false,
    };
    let mut prim = Prim {
        pid,
        port: 0,
        ev,
        reaped: false,
    };
    let ev = &mut prim.ev;
    assert!(
        ev.wait(Duration::from_secs(5), |a| a.iter().any(|e| e.k == "addr")),
        "primary did not start:\n{}",
        ev.dump()
    );
    prim.port = ev.of("addr")[0].a[0] as u16;
    assert_ne!(prim.port, 0);
    prim
}

fn start_primary<W, R>(setup: impl FnOnce(Builder) -> Builder, worker: W) -> Prim
where
    W: FnMut(Worker) -> R + 'static,
    R: forkcluster::ExitCode,
{
    start_primary_with(|| {}, setup, worker)
}

fn exited_ok(st: i32) -> bool {
    libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0
}

// ---------------------------------------------------------------------------------------------
// HTTP, the smallest that works: one request per connection.

/// Reads a request head; false on end of file or error first.
fn read_request(c: &mut Connection) -> bool {
    let mut buf = [0u8; 2048];
    let mut len = 0;
    loop {
        match c.read(&mut buf[len..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => len += n,
        }
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            return true;
        }
        if len == buf.len() {
            return false;
        }
    }
}

fn respond(c: &mut Connection, id: u32) {
    let body = format!("worker {id} pid {}\n", std::process::id());
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = c.write_all(resp.as_bytes());
}

/// A worker that answers one request per connection, `delay` after reading it, and returns on
/// disconnect.
fn serve(mut w: Worker, delay: Duration) -> i32 {
    let id = w.id();
    loop {
        match w.next() {
            Ok(Some(Next::Connection(mut c))) => {
                if read_request(&mut c) {
                    report(&format!("w_request {id}"));
                    std::thread::sleep(delay);
                    respond(&mut c, id);
                }
            }
            Ok(Some(Next::Message(_))) => {}
            Ok(Some(Next::Disconnect)) | Ok(None) => return 0,
            Err(_) => return 1,
        }
    }
}

/// The body of a complete `200` response, or why it is not one.
fn body_of(resp: &str) -> Result<&str, String> {
    let Some((head, body)) = resp.split_once("\r\n\r\n") else {
        return Err(format!("no header end: {resp:?}"));
    };
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(format!("not 200: {resp:?}"));
    }
    let len: usize =
        util::content_length(head).ok_or_else(|| format!("no content-length: {resp:?}"))?;
    if body.len() != len {
        return Err(format!(
            "body {} bytes, expected {len}: {resp:?}",
            body.len()
        ));
    }
    Ok(body)
}

fn send_request(port: u16) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
    Ok(s)
}

fn read_response(mut s: TcpStream) -> Result<String, String> {
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e}"))?;
    body_of(&out).map(str::to_string)
}

/// One request on a new connection; the response body.
fn get(port: u16) -> Result<String, String> {
    read_response(send_request(port).map_err(|e| format!("connect/write: {e}"))?)
}

// ---------------------------------------------------------------------------------------------
// 1. A worker killed with SIGKILL is respawned: new id, new pid, Exit first, then Fork.

fn respawn_after_sigkill() {
    let mut p = start_primary(|b| b.workers(2), |w| serve(w, Duration::ZERO));
    p.wait_listening(2);
    let victim = p.worker_pid(1);
    let mark = p.ev.all.len();
    assert_eq!(unsafe { libc::kill(victim, libc::SIGKILL) }, 0);
    let ok = p.ev.wait(Duration::from_secs(3), |a| {
        a[mark..].iter().any(|e| e.k == "listening" && e.a[0] == 3)
    });
    assert!(ok, "no respawn:\n{}", p.ev.dump());
    let tail = &p.ev.all[mark..];
    let exit = tail
        .iter()
        .position(|e| e.k == "exit")
        .unwrap_or_else(|| panic!("no exit:\n{}", p.ev.dump()));
    let fork = tail
        .iter()
        .position(|e| e.k == "fork")
        .unwrap_or_else(|| panic!("no fork:\n{}", p.ev.dump()));
    let (x, f) = (&tail[exit], &tail[fork]);
    assert_eq!(
        x.a,
        vec![1, victim as i64, -1, libc::SIGKILL as i64, 0],
        "exit line"
    );
    assert!(exit < fork, "Fork before Exit:\n{}", p.ev.dump());
    assert_eq!(f.a[0], 3, "a new id");
    assert_ne!(f.a[1], victim as i64, "a new pid");
    assert!(alive(f.a[1] as i32));
    assert!(!alive(victim));
    // The cluster still serves, with both workers.
    for _ in 0..4 {
        get(p.port).unwrap();
    }
    p.signal(libc::SIGTERM);
    let (st, _) = p.wait_exit(Duration::from_secs(5));
    assert!(exited_ok(st), "primary status {st:#x}");
}

// ---------------------------------------------------------------------------------------------
// 2. A crash loop backs off instead of becoming a fork bomb.

fn crash_loop_backs_off() {
    let max = 800;
    let mut p = start_primary(
        |b| {
            b.workers(1).backoff(
                Duration::from_millis(100),
                Duration::from_millis(max),
                Duration::from_secs(1),
            )
        },
        |_w| 1,
    );
    let t0 = Instant::now();
    p.ev.idle(Duration::from_secs(3).saturating_sub(t0.elapsed()));
    let forks = p.ev.count("fork");
    let delays: Vec<i64> = p.ev.of("backoff").iter().map(|e| e.a[0]).collect();
    // 0, 0.1, 0.3, 0.7, 1.5, 2.3 s: six forks; without backoff it would be hundreds.
    assert!(
        (3..=8).contains(&forks),
        "{forks} forks in 3 s:\n{}",
        p.ev.dump()
    );
    assert!(delays.len() >= 4, "backoff events {delays:?}");
    assert_eq!(delays[0], 100, "first delay is the minimum: {delays:?}");
    for w in delays.windows(2) {
        assert_eq!(
            w[1],
            (w[0] * 2).min(max as i64),
            "doubling, capped: {delays:?}"
        );
    }
    assert_eq!(
        *delays.last().unwrap(),
        max as i64,
        "capped at the maximum: {delays:?}"
    );
    assert!(p.ev.of("exit").iter().all(|e| e.a[2] == 1 && e.a[4] == 0));
    p.signal(libc::SIGTERM);
    let (st, _) = p.wait_exit(Duration::from_secs(5));
    assert!(exited_ok(st), "primary status {st:#x}");
    assert_eq!(p.ev.count("fork"), p.ev.count("exit"), "{}", p.ev.dump());
}

/// "Healthy uptime resets it": once a worker forked after the crash loop has stayed up for the
/// healthy uptime, the loop is over, and a later crash starts again from the minimum delay (not
/// from where the old streak left off).
fn backoff_resets_once_a_respawned_worker_is_healthy() {
    let tmp = TempDir::new();
    let flag = tmp.0.join("crash");
    std::fs::write(&flag, b"").unwrap();
    let f = flag.clone();
    let mut p = start_primary(
        |b| {
            b.workers(1).backoff(
                Duration::from_millis(100),
                Duration::from_millis(800),
                Duration::from_millis(500),
            )
        },
        move |w| {
            if f.exists() {
                return 1;
            }
            serve(w, Duration::ZERO)
        },
    );
    // The loop: 100, 200, 400, 800 ms.
    let ok = p.ev.wait(Duration::from_secs(3), |a| {
        a.iter().filter(|e| e.k == "backoff").count() >= 4
    });
    assert!(ok, "no crash loop:\n{}", p.ev.dump());
    std::fs::remove_file(&flag).unwrap();
    // The next respawn lives: the loop is over once it has been up for the healthy uptime.
    p.wait_listening(1);
    p.ev.idle(Duration::from_millis(1000));
    let backoffs = p.ev.count("backoff");
    assert_eq!(backoffs, 4, "{}", p.ev.dump());
    // A fresh worker (TTIN) that dies young: one crash, so the shortest delay.
    p.signal(libc::SIGTTIN);
    p.wait_listening(2);
    let young = p.ev.of("fork").last().unwrap().a[1] as i32;
    assert_eq!(unsafe { libc::kill(young, libc::SIGKILL) }, 0);
    let ok = p.ev.wait(Duration::from_secs(2), |a| {
        a.iter().filter(|e| e.k == "backoff").count() > backoffs
    });
    assert!(
        ok,
        "no Backoff for a young worker's crash:\n{}",
        p.ev.dump()
    );
    assert_eq!(
        p.ev.of("backoff")[backoffs].a,
        vec![100],
        "the streak of the old loop was not reset:\n{}",
        p.ev.dump()
    );
    p.signal(libc::SIGTERM);
    let (st, _) = p.wait_exit(Duration::from_secs(5));
    assert!(exited_ok(st), "primary status {st:#x}");
}

// ---------------------------------------------------------------------------------------------
// 3. The fatal exit code is reported and not respawned.

fn fatal_exit_code_is_not_respawned() {
    let mut p = start_primary(
        |b| b.workers(2).fatal_exit_code(2),
        |w: Worker| {
            if w.id() == 1 {
                std::thread::sleep(Duration::from_millis(300));
                return 2;
            }
            serve(w, Duration::ZERO)
        },
    );
    let ok =
        p.ev.wait(Duration::from_secs(3), |a| a.iter().any(|e| e.k == "fatal"));
    assert!(ok, "no Fatal:\n{}", p.ev.dump());
    p.ev.idle(Duration::from_millis(1500));
    assert_eq!(p.ev.of("fatal")[0].a, vec![1, 2]);
    let exit = &p.ev.of("exit")[0];
    assert_eq!(exit.a[0], 1);
    assert_eq!(exit.a[2], 2, "exit code");
    assert_eq!(p.ev.count("fork"), 2, "respawned:\n{}", p.ev.dump());
    assert_eq!(p.ev.count("backoff"), 0);
    // The other worker serves on.
    let body = get(p.port).unwrap();
    assert!(body.starts_with("worker 2 "), "{body}");
    p.signal(libc::SIGTERM);
    let (st, _) = p.wait_exit(Duration::from_secs(5));
    assert!(exited_ok(st), "primary status {st:#x}");
}

// ---------------------------------------------------------------------------------------------
// 4. SIGTERM stops gracefully: a request in flight gets its whole response.

fn graceful_stop_finishes_in_flight_request() {
    let mut p = start_primary(|b| b.workers(2), |w| serve(w, Duration::from_secs(1)));
    p.wait_listening(2);
    let s = send_request(p.port).unwrap();
    let ok = p.ev.wait(Duration::from_secs(3), |a| {
        a.iter().any(|e| e.k == "w_request")
    });
    assert!(ok, "request not received:\n{}", p.ev.dump());
    let t0 = Instant::now();
    p.signal(libc::SIGTERM);
    let body = read_response(s).unwrap_or_else(|e| panic!("{e}\n{}", p.ev.dump()));
    assert!(body.starts_with("worker "), "{body}");
    let (st, at) = p.wait_exit(Duration::from_secs(5));
    assert!(exited_ok(st), "primary status {st:#x}:\n{}", p.ev.dump());
    assert!(
        at.duration_since(t0) >= Duration::from_millis(800),
        "primary exited before the slow request was done"
    );
    assert_eq!(p.ev.of("stopping")[0].a, vec![1], "graceful");
    for e in p.ev.of("exit") {
        assert_eq!((e.a[2], e.a[4]), (0, 1), "clean, planned exit: {e:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. A worker that ignores the disconnect is killed after the graceful timeout.

fn graceful_timeout_kills_worker_that_ignores_disconnect() {
    let mut p = start_primary(
        |b| b.workers(1).graceful_timeout(Duration::from_secs(1)),
        |mut w: Worker| -> i32 {
            loop {
                if let Ok(Some(Next::Disconnect)) = w.next() {
                    report("w_ignoring");
                    loop {
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        },
    );
    p.wait_listening(1);
    let t0 = mono_ms();
    p.signal(libc::SIGTERM);
    let ok =
        p.ev.wait(Duration::from_secs(4), |a| a.iter().any(|e| e.k == "exit"));
    assert!(ok, "no exit:\n{}", p.ev.dump());
    assert_eq!(p.ev.count("w_ignoring"), 1, "{}", p.ev.dump());
    let exit = &p.ev.of("exit")[0];
    assert_eq!(exit.a[3], libc::SIGKILL as i64, "killed: {exit:?}");
    let after = exit.t - t0;
    assert!(
        (900.0..2000.0).contains(&after),
        "killed after {after} ms, timeout 1 s"
    );
    let (st, _) = p.wait_exit(Duration::from_secs(3));
    assert!(exited_ok(st), "primary status {st:#x}");
}

// ---------------------------------------------------------------------------------------------
// 6. SIGINT stops fast: workers get SIGTERM (even mid-request), the primary exits at once.

fn fast_stop_on_sigint() {
    let mut p = start_primary(
        |b| b.workers(2).fast_timeout(Duration::from_secs(3)),
        |w| serve(w, Duration::from_secs(10)),
    );
    p.wait_listening(2);
    let _s = send_request(p.port).unwrap();
    assert!(p.ev.wait(Duration::from_secs(3), |a| a
        .iter()
        .any(|e| e.k == "w_request")));
    let t0 = Instant::now();
    p.signal(libc::SIGINT);
    let (st, at) = p.wait_exit(Duration::from_secs(5));
    let took = at.duration_since(t0);
    assert!(exited_ok(st), "primary status {st:#x}");
    assert!(
        took < Duration::from_millis(1000),
        "fast stop took {took:?}"
    );
    p.ev.wait(Duration::from_secs(1), |a| a.iter().any(|e| e.k == "done"));
    assert_eq!(p.ev.of("stopping")[0].a, vec![0], "fast");
    let exits = p.ev.of("exit");
    assert_eq!(exits.len(), 2, "{}", p.ev.dump());
    for e in exits {
        assert_eq!(e.a[3], libc::SIGTERM as i64, "SIGTERM: {e:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 7. SIGHUP restarts every worker of `hello` under wrk load, keep-alive and not, with no failed
// request (after puma's `restart_does_not_drop_connections`).

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A command that runs the `hello` example built for this binary's target and profile
/// (`target/[<triple>/]<profile>/examples/hello`), through the target's runner when one is set,
/// tied to the test. Under cargo it is built first (a no-op when fresh): `cargo test --test
/// supervision` alone does not build examples.
fn hello_command() -> Command {
    let ex = util::Examples::locate();
    ex.build(&["hello"]);
    tie(ex.command("hello"))
}

/// A command whose process dies with the test (`PR_SET_PDEATHSIG`).
fn tied(path: &std::path::Path) -> Command {
    tie(Command::new(path))
}

/// `c`, made to die with the test (`PR_SET_PDEATHSIG`), with stdin from /dev/null.
fn tie(mut c: Command) -> Command {
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    c.stdin(Stdio::null());
    c
}

/// A scratch directory of this test's own, removed on drop (pass or fail).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let d = std::env::temp_dir().join(format!("forkcluster-sup-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A process the test spawned: killed and reaped on drop unless [`Spawned::wait`] reaped it.
struct Spawned(Option<std::process::Child>);

impl Spawned {
    fn pid(&self) -> i32 {
        self.0.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Waits for it for at most `limit`; kills it and panics after that.
    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let end = Instant::now() + limit;
        let c = self.0.as_mut().expect("already reaped");
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                self.0 = None;
                return st;
            }
            assert!(
                Instant::now() < end,
                "pid {} did not exit within {limit:?}",
                c.id()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn live_children(pid: i32) -> Vec<i32> {
    children_of(pid).into_iter().filter(|&p| alive(p)).collect()
}

fn rolling_restart_under_load_drops_nothing() {
    let wrk = which("wrk").unwrap_or_else(|| {
        panic!("wrk is not installed (needed for the rolling restart test): apt-get install wrk")
    });
    let tmp = TempDir::new();
    let dir = &tmp.0;
    let log = dir.join("hello.err");
    let port = free_port();
    let mut server = Spawned(Some(
        hello_command()
            .args(["--listen", &format!("127.0.0.1:{port}"), "--workers", "2"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start hello"),
    ));
    let hpid = server.pid();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let listening = || read_log().matches(" listening on ").count();
    assert!(
        wait_until(Duration::from_secs(10), || listening() >= 2),
        "hello did not start:\n{}",
        read_log()
    );
    get(port).unwrap();
    let before = live_children(hpid);
    assert_eq!(before.len(), 2, "workers {before:?}");

    let url = format!("http://127.0.0.1:{port}/");
    let run_wrk = |close: bool, out: &std::path::Path| {
        let mut c = tied(&wrk);
        c.args(["-t1", "-c16", "-d5s", "--timeout", "4s"]);
        if close {
            c.args(["-H", "Connection: close"]);
        }
        Spawned(Some(
            c.arg(&url)
                .stdout(std::fs::File::create(out).unwrap())
                .stderr(Stdio::null())
                .spawn()
                .expect("start wrk"),
        ))
    };
    let (ka_out, close_out) = (dir.join("wrk-ka.txt"), dir.join("wrk-close.txt"));
    let mut wrks = [run_wrk(false, &ka_out), run_wrk(true, &close_out)];
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(unsafe { libc::kill(hpid, libc::SIGHUP) }, 0);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(unsafe { libc::kill(hpid, libc::SIGHUP) }, 0);
    for w in &mut wrks {
        w.wait(Duration::from_secs(15));
    }
    let (ka_txt, close_txt) = (
        std::fs::read_to_string(&ka_out).unwrap(),
        std::fs::read_to_string(&close_out).unwrap(),
    );
    println!(
        "    wrk keep-alive: {}",
        ka_txt
            .lines()
            .find(|l| l.contains("requests in"))
            .unwrap_or("?")
    );
    println!(
        "    wrk close:      {}",
        close_txt
            .lines()
            .find(|l| l.contains("requests in"))
            .unwrap_or("?")
    );
    for (what, txt) in [("keep-alive", &ka_txt), ("Connection: close", &close_txt)] {
        assert!(txt.contains("requests in"), "wrk {what} output:\n{txt}");
        assert!(
            !txt.contains("Socket errors") && !txt.contains("Non-2xx"),
            "failed requests during the rolling restart ({what}):\n{txt}\nhello:\n{}",
            read_log()
        );
    }
    let replaced = wait_until(Duration::from_secs(10), || {
        let now = live_children(hpid);
        now.len() == 2 && now.iter().all(|p| !before.contains(p))
    });
    assert!(
        replaced,
        "workers before {before:?}, now {:?}:\n{}",
        live_children(hpid),
        read_log()
    );
    let log_txt = read_log();
    assert!(log_txt.matches("restart: worker").count() >= 2, "{log_txt}");
    assert!(log_txt.contains("restart done"), "{log_txt}");
    assert_eq!(unsafe { libc::kill(hpid, libc::SIGTERM) }, 0);
    let st = server.wait(Duration::from_secs(15));
    assert!(st.success(), "hello exit status {st}:\n{}", read_log());
}

// ---------------------------------------------------------------------------------------------
// 8. SIGTTIN adds a worker, SIGTTOU removes one, never below one.

fn ttin_ttou_change_worker_count() {
    let mut p = start_primary(|b| b.workers(2), |w| serve(w, Duration::ZERO));
    p.wait_listening(2);
    let scale = |p: &mut Prim, sig: i32, n: usize| {
        let mark = p.ev.count("scale");
        p.signal(sig);
        let ok = p.ev.wait(Duration::from_secs(3), |a| {
            a.iter().filter(|e| e.k == "scale").count() > mark
        });
        assert!(ok, "no Scale after signal {sig}:\n{}", p.ev.dump());
        assert_eq!(p.ev.of("scale")[mark].a, vec![n as i64]);
        let ok = wait_until(Duration::from_secs(3), || {
            p.ev.pump(0);
            live_children(p.pid).len() == n && p.live_pids().len() == n
        });
        assert!(
            ok,
            "want {n} workers, have {:?}:\n{}",
            live_children(p.pid),
            p.ev.dump()
        );
    };
    scale(&mut p, libc::SIGTTIN, 3);
    p.wait_listening(3);
    scale(&mut p, libc::SIGTTOU, 2);
    scale(&mut p, libc::SIGTTOU, 1);
    scale(&mut p, libc::SIGTTOU, 1);
    p.ev.idle(Duration::from_millis(300));
    assert_eq!(live_children(p.pid).len(), 1);
    // Workers removed by TTOU left on purpose (and the newest went first).
    let exits = p.ev.of("exit");
    assert_eq!(
        exits.iter().map(|e| (e.a[0], e.a[4])).collect::<Vec<_>>(),
        vec![(3, 1), (2, 1)]
    );
    assert_eq!(p.ev.count("fork"), 3, "nothing respawned:\n{}", p.ev.dump());
    get(p.port).unwrap();
    p.signal(libc::SIGTERM);
    let (st, _) = p.wait_exit(Duration::from_secs(5));
    assert!(exited_ok(st), "primary status {st:#x}");
}

// ---------------------------------------------------------------------------------------------
// 9. A busy worker without heartbeat is killed and replaced; an idle one is left alone.

fn hung_worker_is_killed_idle_worker_is_not() {
    let mut p = start_primary(
        |b| b.workers(2).hang_timeout(Duration::from_secs(1)),
        |mut w: Worker| -> i32 {
            loop {
                match w.next() {
                    Ok(Some(Next::Connection(_c))) => {
                        report(&format!("w_spin {}", w.id()));
                        #[allow(clippy::empty_loop)]
                        loop {
                            core::hint::spin_loop();
                        }
                    }
                    Ok(Some(Next::Message(_))) => {}
                    _ => return 0,
                }
            }
        },
    );
    p.wait_listening(2);
    // Idle, blocked in Worker::next, for 2.5 times the timeout: nobody is touched.
    p.ev.idle(Duration::from_millis(2500));
    assert_eq!(
        p.ev.count("hung"),
        0,
        "idle worker declared hung:\n{}",
        p.ev.dump()
    );
    assert_eq!(p.ev.count("exit"), 0, "{}", p.ev.dump());
    let _c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    assert!(p.ev.wait(Duration::from_secs(2), |a| a
        .iter()
        .any(|e| e.k == "w_spin")));
    let spin = p.ev.of("w_spin")[0].clone();
    let id = spin.a[0];
    let ok = p.ev.wait(Duration::from_secs(4), |a| {
        a.iter().any(|e| e.k == "exit") && a.iter().filter(|e| e.k == "fork").count() >= 3
    });
    assert!(ok, "hung worker not replaced:\n{}", p.ev.dump());
    assert_eq!(
        p.ev.of("hung").iter().map(|e| e.a[0]).collect::<Vec<_>>(),
        vec![id]
    );
    let exit = &p.ev.of("exit")[0];
    assert_eq!(exit.a[0], id);
    assert!(
        exit.a[3] == libc::SIGABRT as i64 || exit.a[3] == libc::SIGKILL as i64,
        "killed by SIGABRT or SIGKILL: {exit:?}"
    );
    let fork = p.ev.of("fork")[2].clone();
    let took = fork.t - spin.t;
    assert!(
        took <= 2000.0,
        "replaced {took} ms after it hung (timeout 1 s)"
    );
    // The other worker, idle all along, is still the same process.
    assert_eq!(p.ev.count("hung"), 1);
    assert_eq!(p.ev.count("exit"), 1);
    p.signal(libc::SIGTERM);
    let (st, _) = p.wait_exit(Duration::from_secs(5));
    assert!(exited_ok(st), "primary status {st:#x}");
}

// ---------------------------------------------------------------------------------------------
// 10. max_requests recycles workers without a failed request.

fn max_requests_recycles_without_failures() {
    let mut p = start_primary(
        |b| b.workers(2).max_requests(50, 10),
        |w| serve(w, Duration::ZERO),
    );
    p.wait_listening(2);
    let first: Vec<i32> = p.live_pids();
    let port = p.port;
    let threads: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut bodies = Vec::new();
                for _ in 0..125 {
                    bodies.push(get(port));
                }
                bodies
            })
        })
        .collect();
    let mut pids = std::collections::BTreeSet::new();
    let mut failures = Vec::new();
    for t in threads {
        for r in t.join().unwrap() {
            match r {
                Ok(b) => {
                    pids.insert(b.split_whitespace().nth(3).unwrap_or("").to_string());
                }
                Err(e) => failures.push(e),
            }
        }
    }
    p.ev.idle(Duration::from_millis(200));
    assert!(
        failures.is_empty(),
        "{} of 500 failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // The rule, whatever the machine's speed: every worker that served more than
    // `max_requests` plus its jitter (60) was recycled. (How many recycles 500 connections
    // make depends on how long a replacement takes to listen: the old worker serves until
    // then. Under qemu-user that is tens of milliseconds, and the count drops.)
    let recycled: std::collections::BTreeSet<i64> =
        p.ev.of("recycle").iter().map(|e| e.a[0]).collect();
    let mut served: std::collections::BTreeMap<i64, usize> = Default::default();
    for e in p.ev.of("w_request") {
        *served.entry(e.a[0]).or_default() += 1;
    }
    for (id, n) in &served {
        assert!(
            *n <= 60 || recycled.contains(id),
            "worker {id} served {n} and was not recycled:\n{}",
            p.ev.dump()
        );
    }
    assert!(
        recycled.len() >= 2,
        "{} recycles for 500 connections:\n{}",
        recycled.len(),
        p.ev.dump()
    );
    assert!(pids.len() >= 3, "served by {pids:?}");
    assert!(
        first.iter().all(|&p| !alive(p)),
        "first workers {first:?} still alive"
    );
    for e in p.ev.of("exit") {
        assert_eq!((e.a[2], e.a[4]), (0, 1), "recycled cleanly: {e:?}");
    }
    p.signal(libc::SIGTERM);
    let (st, _) = p.wait_exit(Duration::from_secs(5));
    assert!(exited_ok(st), "primary status {st:#x}");
}

// ---------------------------------------------------------------------------------------------
// 11. EMFILE: the primary pauses accepting instead of spinning, and recovers.

fn cpu_secs(pid: i32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    // After the comm: state is field 3, utime 14, stime 15.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn emfile_flood_pauses_accept_without_spinning() {
    let mut p = start_primary_with(
        || {
            let lim = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
        },
        |b| b.workers(1),
        |w| serve(w, Duration::ZERO),
    );
    p.wait_listening(1);
    // Held open, sending nothing: the worker blocks reading the first one, its queue fills, and
    // the primary holds the rest until it runs out of fds.
    let addr: SocketAddr = ([127, 0, 0, 1], p.port).into();
    let flood: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap())
        .collect();
    let ok = p.ev.wait(Duration::from_secs(3), |a| {
        a.iter().any(|e| e.k == "acceptpaused")
    });
    assert!(ok, "no AcceptPaused:\n{}", p.ev.dump());
    let cpu0 = cpu_secs(p.pid);
    p.ev.idle(Duration::from_secs(2));
    let cpu = cpu_secs(p.pid) - cpu0;
    println!("    primary CPU over 2 s of EMFILE: {cpu:.2} s");
    assert!(
        cpu < 0.3,
        "primary used {cpu:.2} s of CPU in 2 s under EMFILE: busy loop"
    );
    drop(flood);
    let mut last = Err(String::new());
    let ok = wait_until(Duration::from_secs(5), || {
        p.ev.pump(0);
        last = get(p.port);
        last.is_ok()
    });
    assert!(ok, "no recovery after the flood: {last:?}\n{}", p.ev.dump());
    p.signal(libc::SIGTERM);
    let (st, _) = p.wait_exit(Duration::from_secs(5));
    assert!(exited_ok(st), "primary status {st:#x}");
}

/// The same flood in the shared schedule, where the workers accept: `hello --schedule shared`
/// with 64 fds. A worker out of fds must pause accepting (not fail, which would drop every
/// connection it serves, and not spin), and take connections again once it has fds.
fn shared_emfile_flood_pauses_worker_accept() {
    let tmp = TempDir::new();
    let dir = &tmp.0;
    let log = dir.join("hello-emfile.err");
    let port = free_port();
    let mut cmd = hello_command();
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut server = Spawned(Some(
        cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--workers", "1"])
            .args(["--schedule", "shared"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start hello"),
    ));
    let hpid = server.pid();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(10), || read_log()
            .contains(" listening on ")),
        "hello did not start:\n{}",
        read_log()
    );
    let workers = live_children(hpid);
    assert_eq!(workers.len(), 1);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let flood: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        alive(workers[0]),
        "the worker out of fds died:\n{}",
        read_log()
    );
    let cpu0 = cpu_secs(workers[0]);
    std::thread::sleep(Duration::from_secs(2));
    let cpu = cpu_secs(workers[0]) - cpu0;
    println!("    worker CPU over 2 s of EMFILE: {cpu:.2} s");
    assert_eq!(
        live_children(hpid),
        workers,
        "the worker out of fds died:\n{}",
        read_log()
    );
    assert!(
        cpu < 0.3,
        "worker used {cpu:.2} s of CPU in 2 s under EMFILE: busy loop"
    );
    drop(flood);
    let mut last = Err(String::new());
    let ok = wait_until(Duration::from_secs(5), || {
        last = get(port);
        last.is_ok()
    });
    assert!(ok, "no recovery after the flood: {last:?}\n{}", read_log());
    assert!(!read_log().contains("exited"), "{}", read_log());
    assert_eq!(unsafe { libc::kill(hpid, libc::SIGTERM) }, 0);
    let st = server.wait(Duration::from_secs(15));
    assert!(st.success(), "hello exit status {st}:\n{}", read_log());
}

// ---------------------------------------------------------------------------------------------
// 12. A primary killed with SIGKILL takes its workers with it.

fn sigkill_of_primary_leaves_no_worker() {
    let mut p = start_primary(|b| b.workers(3), |w| serve(w, Duration::from_secs(10)));
    p.wait_listening(3);
    let _s = send_request(p.port).unwrap();
    assert!(p.ev.wait(Duration::from_secs(3), |a| a
        .iter()
        .any(|e| e.k == "w_request")));
    let workers = p.live_pids();
    assert_eq!(workers.len(), 3);
    p.signal(libc::SIGKILL);
    let t0 = Instant::now();
    let (st, _) = p.wait_exit(Duration::from_secs(2));
    assert!(libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL);
    let gone = wait_until(Duration::from_secs(1).saturating_sub(t0.elapsed()), || {
        workers.iter().all(|&w| !alive(w))
    });
    assert!(
        gone,
        "workers left behind: {:?}",
        workers.iter().filter(|&&w| alive(w)).collect::<Vec<_>>()
    );
}
