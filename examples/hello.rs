//! `hello`: the main example. An HTTP/1.1 server (keep-alive) whose workers all serve one port,
//! each answering `200` with `hello from worker <id> (pid <pid>)`.
//!
//! ```text
//! cargo run --release --example hello -- [--listen ADDR] [--workers N]
//!                                         [--schedule rr|shared|reuseport|lc|sticky]
//!                                         [--max-requests N] [--hang-timeout SECS]
//!                                         [--defer-accept SECS] [--systemd]
//!                                         [--user NAME|UID] [--cpu-affinity auto|CPU,CPU,..]
//!                                         [--nofile N] [--backlog N]
//!                                         [--say-seat] [--slow-ms MS]
//! ```
//!
//! Bench options (bench/run.sh `schedules`; off by default, and then the request path has one
//! more branch, never taken, and no other change): `--say-seat` adds `X-Worker: <id>` and `X-Seat: <seat>` headers to
//! every response (`Worker::id` and `Worker::seat`: a replacement keeps the seat, not the id);
//! `--slow-ms MS` makes every request whose target starts with `/slow` block its worker for MS
//! ms before the answer (a slow handler); `--backlog N` sets the listen backlog (default 511).
//!
//! `--systemd`: serve the sockets systemd passes (socket activation, `LISTEN_FDS`) instead of
//! `--listen` (which stays the fallback when none is passed); under `Type=notify` the primary
//! tells systemd `READY=1`, `RELOADING=1`, `STOPPING=1`, `STATUS=` and pings its watchdog.
//!
//! Defaults: `127.0.0.1:8080`, one worker per CPU, round-robin, max requests 1,000,000 (+10%
//! jitter), hang timeout 30 s, deferred accept 5 s (`TCP_DEFER_ACCEPT`; 0 turns each off). Every lifecycle event is one
//! line on stderr. SIGTERM and SIGQUIT stop gracefully, SIGINT fast, SIGHUP restarts every worker
//! without dropping a request, SIGTTIN/SIGTTOU add or remove a worker; crashed workers are
//! respawned (with backoff), hung ones killed and replaced. Exit status 0 after a stop.
//!
//! Deployment: `--user nobody` (as root) binds as root and runs every worker as `nobody`;
//! `--cpu-affinity auto` pins worker slot i to allowed CPU i (modulo their number), or to the
//! listed CPUs in turn; `--nofile N` raises the open-file limit of the primary and the workers
//! (up to the hard limit) and prints what was set. Workers show in `ps` as `fc-worker-<id>`.
//!
//! Each worker runs one epoll loop over its cluster fd and its connections. The request path
//! allocates nothing: the response is built once per worker and connection slots are reserved
//! up front.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use forkcluster::{Affinity, Cluster, Connection, Event, Next, Schedule, Worker};
use rustix::event::epoll;

const WORKER_TOKEN: u64 = u64::MAX;
const MAX_CONNS: usize = 4096;
/// Per-connection request buffer: requests here are a few hundred bytes at most; a larger
/// header block is refused (connection closed).
const CONN_BUF: usize = 1024;
/// After a disconnect request, idle keep-alive connections get this long to send one more
/// request (answered with `Connection: close`) before they are closed.
const DRAIN: Duration = Duration::from_secs(2);

struct Opts {
    listen: std::net::SocketAddr,
    workers: Option<usize>,
    schedule: Schedule,
    max_requests: u64,
    hang: u64,
    defer: u32,
    systemd: bool,
    user: Option<String>,
    affinity: Option<Affinity>,
    nofile: Option<u64>,
    backlog: Option<i32>,
    say_seat: bool,
    slow_ms: u64,
}

fn usage(msg: &str) -> ! {
    eprintln!("hello: {msg}");
    eprintln!(
        "usage: hello [--listen ADDR] [--workers N] [--schedule rr|shared|reuseport|lc|sticky] [--max-requests N] [--hang-timeout SECS] [--defer-accept SECS] [--systemd] [--user NAME|UID] [--cpu-affinity auto|CPU,CPU,..] [--nofile N] [--backlog N] [--say-seat] [--slow-ms MS]"
    );
    std::process::exit(2)
}

fn opts() -> Opts {
    let mut o = Opts {
        listen: "127.0.0.1:8080"
            .parse()
            .unwrap_or_else(|_| usage("bad default")),
        workers: None,
        schedule: Schedule::RoundRobin,
        max_requests: 1_000_000,
        hang: 30,
        defer: 5,
        systemd: false,
        user: None,
        affinity: None,
        nofile: None,
        backlog: None,
        say_seat: false,
        slow_ms: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--listen" => {
                o.listen = val()
                    .parse()
                    .unwrap_or_else(|_| usage("bad --listen address"))
            }
            "--workers" => {
                o.workers = Some(val().parse().unwrap_or_else(|_| usage("bad --workers")))
            }
            "--schedule" => {
                o.schedule = Schedule::from_name(&val())
                    .unwrap_or_else(|| usage("--schedule is rr, shared, reuseport, lc or sticky"))
            }
            "--max-requests" => {
                o.max_requests = val()
                    .parse()
                    .unwrap_or_else(|_| usage("bad --max-requests"))
            }
            "--defer-accept" => {
                o.defer = val()
                    .parse()
                    .unwrap_or_else(|_| usage("bad --defer-accept"))
            }
            "--hang-timeout" => {
                o.hang = val()
                    .parse()
                    .unwrap_or_else(|_| usage("bad --hang-timeout"))
            }
            "--systemd" => o.systemd = true,
            "--user" => o.user = Some(val()),
            "--cpu-affinity" => {
                let v = val();
                o.affinity = Some(if v == "auto" {
                    Affinity::Auto
                } else {
                    let mut cpus = Vec::new();
                    for c in v.split(',') {
                        match c.parse() {
                            Ok(c) => cpus.push(c),
                            Err(_) => usage("--cpu-affinity is auto or CPU,CPU,.."),
                        }
                    }
                    Affinity::List(cpus)
                })
            }
            "--nofile" => o.nofile = Some(val().parse().unwrap_or_else(|_| usage("bad --nofile"))),
            "--backlog" => {
                o.backlog = Some(val().parse().unwrap_or_else(|_| usage("bad --backlog")))
            }
            "--say-seat" => o.say_seat = true,
            "--slow-ms" => o.slow_ms = val().parse().unwrap_or_else(|_| usage("bad --slow-ms")),
            "-h" | "--help" => usage("help"),
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    o
}

fn main() -> Result<(), forkcluster::Error> {
    let o = opts();
    let mut b = Cluster::builder();
    if o.systemd {
        b = b.systemd_listeners()?;
    }
    if b.listener_count() == 0 {
        // Not socket-activated (or no --systemd): --listen.
        b = b.listen(o.listen);
    }
    let mut b = b
        .schedule(o.schedule)
        .nonblocking_streams(true)
        .graceful_timeout(Duration::from_secs(10));
    if let Some(n) = o.workers {
        b = b.workers(n);
    }
    if o.max_requests > 0 {
        b = b.max_requests(o.max_requests, o.max_requests / 10);
    }
    if o.defer > 0 {
        // HTTP clients speak first: hand over only connections whose request arrived.
        b = b.defer_accept(o.defer);
    }
    if o.hang > 0 {
        b = b.hang_timeout(Duration::from_secs(o.hang));
    }
    if let Some(user) = o.user {
        // The primary binds as who it is (root, for port 80) and keeps that; the workers drop
        // to the user before they run `serve`.
        b = b.user(user);
    }
    if let Some(a) = o.affinity {
        b = b.cpu_affinity(a);
    }
    let asked_nofile = o.nofile.is_some();
    if let Some(n) = o.nofile {
        b = b.nofile_limit(n);
    }
    if let Some(n) = o.backlog {
        b = b.backlog(n);
    }
    let (say_seat, slow_ms) = (o.say_seat, o.slow_ms);
    let mut primary = b.start(move |w| serve(w, say_seat, slow_ms))?;
    for addr in primary.listen_addrs() {
        eprintln!("primary {} serving on {addr}", std::process::id());
    }
    if asked_nofile {
        match primary.nofile_limit() {
            Some(n) => eprintln!("open files: up to {n} per process"),
            None => eprintln!("open files: unlimited"),
        }
    }
    while let Some(event) = primary.next_event()? {
        if let Event::Message { .. } = event {
            continue;
        }
        eprintln!("{event}");
    }
    let st = primary.stats();
    eprintln!(
        "primary {}: all workers gone ({} forks, {} crashes; {} connections handed out, {} recovered from workers that died before taking them)",
        std::process::id(),
        st.forks,
        st.crashes,
        st.connections,
        st.recovered
    );
    Ok(())
}

struct Conn {
    c: Connection,
    buf: [u8; CONN_BUF],
    len: usize,
}

struct Server {
    ep: std::os::fd::OwnedFd,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    open: usize,
    keep_alive: Vec<u8>,
    close: Vec<u8>,
    draining: Option<Instant>,
    /// `--slow-ms`: requests for `/slow...` block the worker this long.
    slow: Option<Duration>,
}

/// The worker: one epoll loop.
fn serve(mut worker: Worker, say_seat: bool, slow_ms: u64) -> forkcluster::Result<()> {
    let body = format!("hello from worker {} (pid {})\n", worker.id(), worker.pid());
    let mut head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n",
        body.len()
    );
    if say_seat {
        head += &format!("X-Worker: {}\r\nX-Seat: {}\r\n", worker.id(), seat(&worker));
    }
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    epoll::add(
        &ep,
        worker.as_fd(),
        epoll::EventData::new_u64(WORKER_TOKEN),
        epoll::EventFlags::IN,
    )?;
    let mut s = Server {
        ep,
        conns: Vec::with_capacity(MAX_CONNS),
        free: Vec::with_capacity(MAX_CONNS),
        open: 0,
        keep_alive: format!("{head}\r\n{body}").into_bytes(),
        close: format!("{head}Connection: close\r\n\r\n{body}").into_bytes(),
        draining: None,
        slow: (slow_ms > 0).then(|| Duration::from_millis(slow_ms)),
    };
    let mut events = [epoll::Event {
        flags: epoll::EventFlags::empty(),
        data: epoll::EventData::new_u64(0),
    }; 128];
    let mut accepting = true;
    take_work(&mut worker, &mut s, &mut accepting)?;
    loop {
        if let Some(since) = s.draining {
            if s.open == 0 || since.elapsed() >= DRAIN {
                return Ok(());
            }
        }
        // Wake at least once a second so the heartbeat moves while idle.
        let timeout = rustix::time::Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        let n = match epoll::wait(&s.ep, &mut events, Some(&timeout)) {
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        worker.heartbeat();
        for ev in &events[..n] {
            match ev.data.u64() {
                WORKER_TOKEN => take_work(&mut worker, &mut s, &mut accepting)?,
                i => s.readable(i as usize),
            }
        }
    }
}

/// The worker's seat (its place among the workers, which a replacement inherits), for
/// `--say-seat`.
fn seat(worker: &Worker) -> u32 {
    worker.seat()
}

fn take_work(worker: &mut Worker, s: &mut Server, accepting: &mut bool) -> forkcluster::Result<()> {
    while *accepting {
        match worker.try_next() {
            Ok(Some(Next::Connection(c))) => s.add(c),
            Ok(Some(Next::Message(_))) => {}
            Ok(Some(Next::Disconnect)) | Err(forkcluster::Error::Closed) => {
                *accepting = false;
                let _ = epoll::delete(&s.ep, worker.as_fd());
                s.draining = Some(Instant::now());
            }
            Ok(None) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Server {
    fn add(&mut self, c: Connection) {
        let i = match self.free.pop() {
            Some(i) => i,
            None if self.conns.len() < MAX_CONNS => {
                self.conns.push(None);
                self.conns.len() - 1
            }
            None => return, // full: dropping `c` closes it
        };
        if let Some(tcp) = c.as_tcp() {
            let _ = rustix::net::sockopt::set_tcp_nodelay(tcp, true);
        }
        if epoll::add(
            &self.ep,
            &c,
            epoll::EventData::new_u64(i as u64),
            epoll::EventFlags::IN,
        )
        .is_err()
        {
            self.free.push(i);
            return;
        }
        self.conns[i] = Some(Conn {
            c,
            buf: [0; CONN_BUF],
            len: 0,
        });
        self.open += 1;
        // With deferred accept the request is already here: serve it now rather than after
        // another trip through epoll_wait.
        self.readable(i);
    }

    fn drop_conn(&mut self, i: usize) {
        if let Some(conn) = self.conns[i].take() {
            // The primary may still hold its copy of the socket for a moment after handing it
            // over (it closes it right after `sendmsg`), so the fd is removed from epoll
            // explicitly rather than by its last close.
            let _ = epoll::delete(&self.ep, &conn.c);
            self.free.push(i);
            self.open -= 1;
        }
    }

    fn readable(&mut self, i: usize) {
        let draining = self.draining.is_some();
        let slow = self.slow;
        let Some(conn) = self.conns.get_mut(i).and_then(|c| c.as_mut()) else {
            return;
        };
        let n = match conn.c.read(&mut conn.buf[conn.len..]) {
            Ok(0) => return self.drop_conn(i),
            Ok(n) => n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::Interrupted =>
            {
                return
            }
            Err(_) => return self.drop_conn(i),
        };
        conn.len += n;
        let mut off = 0;
        let mut close = false;
        while let Some(end) = memchr::memmem::find(&conn.buf[off..conn.len], b"\r\n\r\n") {
            let head = &conn.buf[off..off + end + 2];
            close = draining || wants_close(head);
            if let Some(d) = slow {
                if head.starts_with(b"GET /slow") {
                    std::thread::sleep(d);
                }
            }
            let resp = if close { &self.close } else { &self.keep_alive };
            if conn.c.write_all(resp).is_err() {
                close = true;
            }
            off += end + 4;
            if close {
                break;
            }
        }
        if close || (off == 0 && conn.len == CONN_BUF) {
            return self.drop_conn(i);
        }
        conn.buf.copy_within(off..conn.len, 0);
        conn.len -= off;
    }
}

/// Whether the header block has `Connection: close` (case-insensitive).
fn wants_close(head: &[u8]) -> bool {
    const KEY: &[u8] = b"\r\nconnection:";
    let mut rest = head;
    while let Some(p) = memchr::memchr(b'\r', rest) {
        let h = &rest[p..];
        if h.len() >= KEY.len() && h[..KEY.len()].eq_ignore_ascii_case(KEY) {
            let v = &h[KEY.len()..];
            let v = &v[v.iter().take_while(|b| b.is_ascii_whitespace()).count()..];
            if v.len() >= 5 && v[..5].eq_ignore_ascii_case(b"close") {
                return true;
            }
        }
        rest = &rest[p + 1..];
    }
    false
}
