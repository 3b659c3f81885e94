//! UDP listeners and the sockets a worker lends out (issue 11, items 4 and 6), end to end: real
//! forks, real sockets on `127.0.0.1:0`.
//!
//! Runs under the fork-per-test runner of `tests/util` (`harness = false`). Clients run in a
//! forked child ([`client`]) that closes every fd it inherited, while the primary pumps its
//! event loop; every test bounds its waits and ends with every child reaped.

mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forkcluster::{Cluster, Error, Event, ListenAddr, Next, Primary, Schedule, Worker};

fn main() {
    if !std::env::args().any(|a| a == "--list") {
        util::Examples::locate().build(&["exec_worker"]);
    }
    util::run(tests![
        udp_echo_by_every_worker_round_robin_and_shared => 40,
        mixed_listeners_keep_their_indices => 40,
        worker_fds_with_udp => 30,
        std_incoming_loop_in_every_worker_under_shared => 30,
        start_refuses_what_cannot_work,
        exec_worker_gets_its_udp_socket => 40,
    ])
}

// ----- events ----------------------------------------------------------------------------------

#[derive(Debug)]
enum E {
    Fork {
        id: u32,
        pid: u32,
    },
    Listening {
        id: u32,
        listener: usize,
        addr: ListenAddr,
    },
    Message {
        id: u32,
        payload: String,
    },
    Exit {
        id: u32,
        code: Option<i32>,
        after: bool,
    },
    Other,
    Idle,
    Done,
}

fn own(e: Event<'_>) -> E {
    match e {
        Event::Fork { id, pid } => E::Fork { id, pid },
        Event::Listening { id, listener, addr } => E::Listening {
            id,
            listener,
            addr: addr.clone(),
        },
        Event::Message { id, payload, .. } => E::Message {
            id,
            payload: String::from_utf8_lossy(payload).into_owned(),
        },
        Event::Exit {
            id,
            status,
            exited_after_disconnect,
            ..
        } => E::Exit {
            id,
            code: status.code(),
            after: exited_after_disconnect,
        },
        Event::Idle => E::Idle,
        _ => E::Other,
    }
}

const STEP: Duration = Duration::from_millis(20);

fn ev(p: &mut Primary) -> E {
    match p.next_event_timeout(STEP) {
        Ok(Some(e)) => own(e),
        Ok(None) => E::Done,
        Err(e) => panic!("next_event failed: {e}"),
    }
}

/// Pumps until `f` returns true; panics after `limit`.
fn pump(p: &mut Primary, limit: Duration, mut f: impl FnMut(E) -> bool) {
    let end = Instant::now() + limit;
    loop {
        assert!(Instant::now() < end, "timed out after {limit:?}");
        if f(ev(p)) {
            return;
        }
    }
}

/// Pumps until `n` workers announced every listener; returns `(id, pid)` of each, and the
/// addresses the `Listening` events named, by listener index.
fn wait_ready(p: &mut Primary, n: usize) -> (Vec<(u32, u32)>, BTreeMap<usize, ListenAddr>) {
    let listeners = p.listen_addrs().count();
    let mut forks = Vec::new();
    let mut ready: BTreeMap<u32, usize> = BTreeMap::new();
    let mut addrs = BTreeMap::new();
    pump(p, Duration::from_secs(10), |e| {
        match e {
            E::Fork { id, pid } => forks.push((id, pid)),
            E::Listening { id, listener, addr } => {
                *ready.entry(id).or_default() += 1;
                addrs.insert(listener, addr);
            }
            E::Exit { id, code, .. } => panic!("worker {id} exited during start-up: {code:?}"),
            E::Done => panic!("the cluster ended during start-up"),
            _ => {}
        }
        ready.values().filter(|&&k| k == listeners).count() >= n
    });
    (forks, addrs)
}

/// The next message of worker `id` (others are dropped).
fn message_of(p: &mut Primary, want: u32) -> String {
    let mut got = None;
    pump(p, Duration::from_secs(10), |e| match e {
        E::Message { id, payload } if id == want => {
            got = Some(payload);
            true
        }
        E::Exit { id, code, .. } => panic!("worker {id} exited: {code:?}"),
        _ => false,
    });
    got.unwrap()
}

/// Graceful stop: every worker gets `Disconnect`, returns 0, and the loop ends.
fn stop_gracefully(mut p: Primary, n: usize) {
    p.stop(true);
    let mut exits = 0;
    pump(&mut p, Duration::from_secs(10), |e| match e {
        E::Exit { id, code, after } => {
            assert_eq!(code, Some(0), "worker {id} exit");
            assert!(after, "worker {id} exited after its disconnect");
            exits += 1;
            false
        }
        E::Done => true,
        _ => false,
    });
    assert_eq!(exits, n);
    finish(p);
}

fn finish(p: Primary) {
    drop(p);
    let left = util::children_of(me());
    assert!(left.is_empty(), "children left: {left:?}");
}

fn me() -> i32 {
    std::process::id() as i32
}

fn lo0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn udp_addr(p: &Primary, i: usize) -> SocketAddr {
    match p.listen_addrs().nth(i) {
        Some(ListenAddr::Udp(a)) => *a,
        other => panic!("listener {i} is not UDP: {other:?}"),
    }
}

fn tcp_addr(p: &Primary, i: usize) -> SocketAddr {
    match p.listen_addrs().nth(i) {
        Some(ListenAddr::Tcp(a)) => *a,
        other => panic!("listener {i} is not TCP: {other:?}"),
    }
}

fn tmp_path(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("fc-udp-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

// ----- the worker ------------------------------------------------------------------------------

/// What worker `w` holds for each listener: `T` (TCP listener), `U` (Unix listener), `D` (UDP
/// socket) or `-` (nothing), space-separated.
fn holdings(w: &Worker) -> String {
    let n = w.listen_addrs().count();
    (0..n)
        .map(|i| {
            if w.tcp_listener(i).is_some() {
                "T"
            } else if w.unix_listener(i).is_some() {
                "U"
            } else if w.udp_socket(i).is_some() {
                "D"
            } else {
                "-"
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A worker with its own poll loop over its fd and its UDP sockets: every connection gets
/// `id=<id> listener=<i>\n`; every datagram on UDP listener `i` gets `id=<id> listener=<i>
/// <datagram>` back (after `delay`, so that a busy worker leaves the next datagrams to the
/// others); the message `probe` gets [`holdings`]; returns 0 at `Disconnect`.
fn serve(mut w: Worker, delay: Duration) -> i32 {
    let id = w.id();
    let n = w.listen_addrs().count();
    let udp: Vec<usize> = (0..n).filter(|&i| w.udp_socket(i).is_some()).collect();
    // Every worker makes the shared sockets nonblocking: the mode is one for all of them.
    for &i in &udp {
        w.udp_socket(i).unwrap().set_nonblocking(true).unwrap();
    }
    let mut buf = [0u8; 2048];
    loop {
        loop {
            let probe = match w.try_next() {
                Ok(Some(Next::Connection(mut c))) => {
                    let _ = c.write_all(format!("id={id} listener={}\n", c.listener).as_bytes());
                    false
                }
                Ok(Some(Next::Message(m))) => m.payload == b"probe",
                Ok(Some(Next::Disconnect)) => {
                    assert!(
                        udp.iter().all(|&i| w.udp_socket(i).is_none()),
                        "a disconnecting worker holds no socket"
                    );
                    return 0;
                }
                Ok(None) => break,
                Err(e) => {
                    eprintln!("worker {id}: {e}");
                    return 1;
                }
            };
            if probe {
                let h = holdings(&w);
                w.send(h.as_bytes()).unwrap();
            }
        }
        for &i in &udp {
            let s = w.udp_socket(i).unwrap();
            loop {
                match s.recv_from(&mut buf) {
                    Ok((len, from)) => {
                        let mut out = format!("id={id} listener={i} ").into_bytes();
                        out.extend_from_slice(&buf[..len]);
                        s.send_to(&out, from).unwrap();
                        std::thread::sleep(delay);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("worker {id}: recv_from: {e}"),
                }
            }
        }
        use rustix::event::{poll, PollFd, PollFlags};
        let mut fds = vec![PollFd::new(&w, PollFlags::IN)];
        for &i in &udp {
            fds.push(PollFd::new(w.udp_socket(i).unwrap(), PollFlags::IN));
        }
        let t = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 50_000_000,
        };
        match poll(&mut fds, Some(&t)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => panic!("worker {id}: poll: {e}"),
        }
    }
}

// ----- clients ---------------------------------------------------------------------------------

/// Closes every fd of this process but stdio and `keep` (a forked client holds nothing of the
/// primary's).
fn close_all_but(keep: RawFd) {
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if fd > 2 && fd != keep {
            // SAFETY (test code): the child never uses the objects owning these fds again (it
            // leaves with `_exit`).
            unsafe { libc::close(fd) };
        }
    }
}

/// Runs `f` in a forked client while the primary pumps its events; returns what `f` returned.
fn client(p: &mut Primary, limit: Duration, f: impl FnOnce() -> String) -> String {
    client_events(p, limit, f).0
}

/// [`client`], and the events the primary had meanwhile (but `Idle`).
fn client_events(p: &mut Primary, limit: Duration, f: impl FnOnce() -> String) -> (String, Vec<E>) {
    let mut events = Vec::new();
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
    let wfd = w.as_raw_fd();
    let pid = util::fork_child(move || {
        close_all_but(wfd);
        let out = f();
        let mut file = std::fs::File::from(w);
        file.write_all(out.as_bytes()).unwrap();
        0
    });
    let end = Instant::now() + limit;
    let status = loop {
        match ev(p) {
            E::Idle => {}
            e => events.push(e),
        }
        let mut st = 0;
        // SAFETY (test code): reaps the child this function forked.
        if unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) } == pid {
            break st;
        }
        if Instant::now() >= end {
            // SAFETY (test code): the child this function forked.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut st, 0);
            }
            panic!("client did not finish within {limit:?}");
        }
    };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "client failed: {status}"
    );
    let mut out = String::new();
    std::fs::File::from(r).read_to_string(&mut out).unwrap();
    (out, events)
}

/// Sends `per` datagrams from each of `socks` fresh sockets to `to`, then reads every answer;
/// one line per answer, `<request> => <answer>`.
fn udp_round(to: SocketAddr, socks: usize, per: usize) -> String {
    let socks: Vec<UdpSocket> = (0..socks)
        .map(|_| {
            let s = UdpSocket::bind(lo0()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s
        })
        .collect();
    let mut out = String::new();
    for (k, s) in socks.iter().enumerate() {
        for j in 0..per {
            s.send_to(format!("c{k}-{j}").as_bytes(), to).unwrap();
        }
    }
    let mut buf = [0u8; 256];
    for (k, s) in socks.iter().enumerate() {
        for _ in 0..per {
            let (n, from) = s.recv_from(&mut buf).expect("an answer to every datagram");
            assert_eq!(from, to, "answered from the cluster's socket");
            out.push_str(&format!("c{k} => {}\n", String::from_utf8_lossy(&buf[..n])));
        }
    }
    out
}

fn udp_ask(to: SocketAddr, what: &str) -> String {
    let s = UdpSocket::bind(lo0()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.send_to(what.as_bytes(), to).unwrap();
    let mut buf = [0u8; 256];
    let (n, _) = s.recv_from(&mut buf).expect("an answer");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn tcp_fetch(to: SocketAddr) -> String {
    let mut s = TcpStream::connect(to).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn unix_fetch(path: &Path) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

// ----- tests -----------------------------------------------------------------------------------

/// Node's clustered `dgram`: one UDP socket, bound by the primary, read by every worker. Every
/// datagram from many client sockets is answered, by more than one worker, in a hand-off
/// schedule (datagrams are not handed off) as in the shared one; the graceful stop still ends
/// every worker with its disconnect.
fn udp_echo_by_every_worker_round_robin_and_shared() {
    for schedule in [Schedule::RoundRobin, Schedule::Shared] {
        let mut p = Cluster::builder()
            .listen_udp(lo0())
            .workers(3)
            .schedule(schedule)
            .start(|w| serve(w, Duration::from_millis(2)))
            .unwrap();
        let (forks, addrs) = wait_ready(&mut p, 3);
        assert_eq!(forks.len(), 3);
        let to = udp_addr(&p, 0);
        assert_eq!(to.ip().to_string(), "127.0.0.1");
        assert_ne!(to.port(), 0, "port 0 picked a real port");
        match &addrs[&0] {
            ListenAddr::Udp(a) => assert_eq!(*a, to),
            other => panic!("Listening for a UDP listener named {other:?}"),
        }
        assert_eq!(addrs[&0].to_string(), format!("udp:{to}"));
        let out = client(&mut p, Duration::from_secs(20), || udp_round(to, 30, 4));
        let mut ids = BTreeSet::new();
        let mut answered = 0;
        for line in out.lines() {
            let (client, answer) = line.split_once(" => ").unwrap();
            let mut it = answer.splitn(3, ' ');
            let id: u32 = it
                .next()
                .unwrap()
                .strip_prefix("id=")
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(it.next(), Some("listener=0"));
            let req = it.next().unwrap();
            assert!(req.starts_with(&format!("{client}-")), "{line}");
            ids.insert(id);
            answered += 1;
        }
        assert_eq!(answered, 120, "every datagram answered ({schedule:?})");
        assert!(
            ids.len() >= 2,
            "datagrams reached more than one worker ({schedule:?}): {ids:?}"
        );
        assert_eq!(p.stats().connections, 0, "no datagram was handed off");
        stop_gracefully(p, 3);
    }
}

/// TCP, UDP, Unix and an inherited UDP socket (`listener_fd`) in one index space, in builder
/// order: each answers with its own index; in round-robin the worker holds only the UDP
/// sockets, in the shared schedule every socket, each lent out as its std type.
fn mixed_listeners_keep_their_indices() {
    // (Reuseport: the listen_udp socket is the seat's own, the inherited one, which has no
    // SO_REUSEPORT, is shared: see tests/schedules.rs for the seats.)
    for schedule in [Schedule::RoundRobin, Schedule::Shared, Schedule::ReusePort] {
        let path = tmp_path(schedule.name());
        let mine = UdpSocket::bind(lo0()).unwrap();
        let mine_addr = mine.local_addr().unwrap();
        let mut p = Cluster::builder()
            .listen(lo0())
            .listen_udp(lo0())
            .listen_unix(&path)
            .listener_fd(OwnedFd::from(mine))
            .workers(2)
            .schedule(schedule)
            .start(|w| serve(w, Duration::ZERO))
            .unwrap();
        let (forks, addrs) = wait_ready(&mut p, 2);
        let kinds: Vec<String> = addrs.values().map(|a| a.to_string()).collect();
        assert!(matches!(addrs[&0], ListenAddr::Tcp(_)), "{kinds:?}");
        assert!(matches!(addrs[&1], ListenAddr::Udp(_)), "{kinds:?}");
        assert!(matches!(addrs[&2], ListenAddr::Unix(_)), "{kinds:?}");
        match &addrs[&3] {
            ListenAddr::Udp(a) => assert_eq!(*a, mine_addr, "the inherited socket's address"),
            other => panic!("listener 3: {other:?}"),
        }
        for &(id, _) in &forks {
            p.send(id, b"probe").unwrap();
            let h = message_of(&mut p, id);
            let want = match schedule {
                Schedule::RoundRobin => "- D - D",
                _ => "T D U D",
            };
            assert_eq!(h, want, "worker {id} holds ({schedule:?})");
        }
        let (tcp, udp1, udp3) = (tcp_addr(&p, 0), udp_addr(&p, 1), mine_addr);
        let path2 = path.clone();
        let out = client(&mut p, Duration::from_secs(20), move || {
            let mut out = String::new();
            for _ in 0..4 {
                out.push_str(&tcp_fetch(tcp));
                out.push_str(&unix_fetch(&path2));
                out.push_str(&udp_ask(udp1, "one"));
                out.push('\n');
                out.push_str(&udp_ask(udp3, "three"));
                out.push('\n');
            }
            out
        });
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 16, "{out}");
        for chunk in lines.chunks(4) {
            let idx = |l: &str| -> String { l.split(' ').nth(1).unwrap_or("").to_string() };
            assert_eq!(idx(chunk[0]), "listener=0", "{out}");
            assert_eq!(idx(chunk[1]), "listener=2", "{out}");
            assert_eq!(idx(chunk[2]), "listener=1", "{out}");
            assert!(chunk[2].ends_with(" one"), "{out}");
            assert_eq!(idx(chunk[3]), "listener=3", "{out}");
            assert!(chunk[3].ends_with(" three"), "{out}");
        }
        stop_gracefully(p, 2);
        assert!(!path.exists(), "the Unix socket file is removed at stop");
    }
}

/// The link targets of `pid`'s fds that this process did not have (by number and target).
fn extra_fds(pid: u32, base: &[(i32, String)]) -> Vec<String> {
    util::fds_of(pid as i32)
        .into_iter()
        .filter(|f| !base.contains(f))
        .map(|f| f.1)
        .collect()
}

fn target_of(fd: &impl AsFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// A worker holds exactly: its channel and spare fd, every UDP socket (any schedule), and
/// where workers accept, the stream listeners with its epoll set and pause timer (not made
/// when there is no stream listener to accept on).
fn worker_fds_with_udp() {
    let base: Vec<(i32, String)> = util::fds_of(me())
        .into_iter()
        .filter(|(_, t)| !t.starts_with("/proc/"))
        .collect();
    let cases: [(Schedule, bool, &[&str]); 3] = [
        (
            Schedule::RoundRobin,
            true,
            &["eventfd", "socket:", "socket:"],
        ),
        (
            Schedule::Shared,
            true,
            &[
                "eventfd",
                "eventpoll",
                "socket:",
                "socket:",
                "socket:",
                "timerfd",
            ],
        ),
        (Schedule::Shared, false, &["eventfd", "socket:", "socket:"]),
    ];
    for (schedule, with_tcp, want) in cases {
        let tcp = TcpListener::bind(lo0()).unwrap();
        let udp = UdpSocket::bind(lo0()).unwrap();
        let (tcp_t, udp_t) = (target_of(&tcp), target_of(&udp));
        let mut b = Cluster::builder();
        if with_tcp {
            b = b.tcp_listener(tcp);
        } else {
            drop(tcp);
        }
        let mut p = b
            .udp_socket(udp)
            .workers(2)
            .schedule(schedule)
            .start(|w| serve(w, Duration::ZERO))
            .unwrap();
        let (forks, _) = wait_ready(&mut p, 2);
        for &(id, pid) in &forks {
            let kinds_of = |extra: &[String]| -> Vec<String> {
                let mut k: Vec<String> = extra
                    .iter()
                    .map(|t| {
                        ["eventfd", "eventpoll", "timerfd", "socket:"]
                            .into_iter()
                            .find(|k| t.contains(k))
                            .unwrap_or(t.as_str())
                            .to_string()
                    })
                    .collect();
                k.sort();
                k
            };
            // The worker closes its spare fd for the moment of each read of its channel (and
            // makes it again right after): look until it is back (qemu-user is slow there).
            let mut extra = extra_fds(pid, &base);
            let end = std::time::Instant::now() + Duration::from_secs(2);
            while kinds_of(&extra) != want && std::time::Instant::now() < end {
                std::thread::sleep(Duration::from_millis(10));
                extra = extra_fds(pid, &base);
            }
            let kinds = kinds_of(&extra);
            assert_eq!(
                kinds, want,
                "worker {id} ({schedule:?}, tcp {with_tcp}): {extra:?}"
            );
            assert!(
                extra.contains(&udp_t),
                "worker {id} holds the UDP socket: {extra:?}"
            );
            assert_eq!(
                extra.contains(&tcp_t),
                with_tcp && schedule == Schedule::Shared,
                "worker {id} ({schedule:?}) and the TCP listener: {extra:?}"
            );
        }
        stop_gracefully(p, 2);
    }
}

/// Item 6: with `app_accepts`, a plain std `TcpListener::incoming()` loop over
/// `tcp_listener(0)` runs in every worker and serves real clients; the listener is blocking
/// there, and `next` takes no connection from it.
fn std_incoming_loop_in_every_worker_under_shared() {
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(2)
        .schedule(Schedule::Shared)
        .app_accepts(true)
        .start(|mut w| -> forkcluster::Result<()> {
            let id = w.id();
            // Once before serving: the worker announces its listeners (Event::Listening).
            while w.try_next()?.is_some() {}
            let l = w
                .tcp_listener(0)
                .expect("shared: the worker holds the listener");
            let fl = rustix::fs::fcntl_getfl(l).unwrap();
            let blocking = !fl.contains(rustix::fs::OFlags::NONBLOCK);
            for s in l.incoming() {
                let mut s = s?;
                let _ = writeln!(s, "id={id} blocking={blocking}");
            }
            Ok(())
        })
        .unwrap();
    wait_ready(&mut p, 2);
    let to = tcp_addr(&p, 0);
    let out = client(&mut p, Duration::from_secs(20), move || {
        (0..20).map(|_| tcp_fetch(to)).collect()
    });
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 20, "{out}");
    let ids: BTreeSet<&str> = lines
        .iter()
        .map(|l| {
            assert!(l.ends_with(" blocking=true"), "{l}");
            l.split(' ').next().unwrap()
        })
        .collect();
    assert!(ids.len() >= 2, "more than one worker served: {out}");
    finish(p);
}

fn start_refuses_what_cannot_work() {
    let err = |b: forkcluster::Builder| match b.workers(1).start(|_| 0) {
        Err(e) => e,
        Ok(_) => panic!("started"),
    };
    // The primary accepts in the hand-off schedules, and under reuseport on a seat's socket
    // while nobody holds it: the application cannot.
    for s in [
        Schedule::RoundRobin,
        Schedule::LeastConnections,
        Schedule::Sticky,
        Schedule::ReusePort,
    ] {
        let e = err(Cluster::builder()
            .listen(lo0())
            .schedule(s)
            .app_accepts(true));
        assert!(
            matches!(&e, Error::Invalid(w) if w.contains("app_accepts")),
            "{e}"
        );
    }
    let e = err(Cluster::builder()
        .listen(lo0())
        .schedule(Schedule::Shared)
        .app_accepts(true)
        .max_requests(10, 0));
    assert!(
        matches!(&e, Error::Invalid(w) if w.contains("max_requests")),
        "{e}"
    );
    // A Unix datagram socket is not a listener the cluster serves.
    let e = err(Cluster::builder().listener_fd(OwnedFd::from(UnixDatagram::unbound().unwrap())));
    assert!(
        matches!(&e, Error::Invalid(w) if w.contains("Unix datagram")),
        "{e}"
    );
    // Nor is a file.
    let f = std::fs::File::open("/dev/null").unwrap();
    let e = err(Cluster::builder().listener_fd(OwnedFd::from(f)));
    assert!(matches!(&e, Error::Os { .. }), "{e}");
    assert!(util::children_of(me()).is_empty());
}

/// An exec'd worker gets the UDP socket as an fd after its channel, in round-robin too (and
/// no TCP listener there), and `Worker::from_env` lends it out again.
fn exec_worker_gets_its_udp_socket() {
    if util::under_qemu() {
        eprintln!("skipped: under qemu-user the kernel cannot exec the target's binaries");
        return;
    }
    for (schedule, want) in [
        (Schedule::RoundRobin, &[3, 4][..]),
        (Schedule::Shared, &[3, 4, 5][..]),
    ] {
        let mut p = Cluster::builder()
            .listen(lo0())
            .listen_udp(lo0())
            .workers(1)
            .schedule(schedule)
            .exec(util::Examples::locate().path("exec_worker"))
            .start_exec()
            .unwrap();
        let (forks, addrs) = wait_ready(&mut p, 1);
        assert!(matches!(addrs[&1], ListenAddr::Udp(_)));
        let (id, pid) = forks[0];
        let sockets: Vec<i32> = util::fds_of(pid as i32)
            .into_iter()
            .filter(|f| f.0 > 2 && f.1.starts_with("socket:"))
            .map(|f| f.0)
            .collect();
        assert_eq!(sockets, want, "exec'd worker's sockets ({schedule:?})");
        p.send(id, b"udp 0").unwrap();
        assert_eq!(message_of(&mut p, id), "udp none", "listener 0 is TCP");
        p.send(id, b"udp 1").unwrap();
        let to = udp_addr(&p, 1);
        let (answer, events) =
            client_events(&mut p, Duration::from_secs(10), move || udp_ask(to, "hi"));
        assert_eq!(answer, format!("udp {id} hi"));
        let said = events.iter().find_map(|e| match e {
            E::Message { id: i, payload } if *i == id => Some(payload.clone()),
            _ => None,
        });
        let said = match said {
            Some(s) => s,
            None => message_of(&mut p, id),
        };
        assert_eq!(said, "udp ok");
        stop_gracefully(p, 1);
    }
}
