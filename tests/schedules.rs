//! The schedules' rules, end to end: reuseport seats (one socket per seat, kept across a
//! worker's death and restart, drained at scale-down, restored after a worker's `shutdown`),
//! least-connections' choice, and sticky clients. Real forks, real sockets on 127.0.0.1,
//! real signals; every test reaps what it forked (`finish`).

mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use forkcluster::{Cluster, Next, Primary, Schedule, State, Worker};
use util::cl::*;

fn main() {
    util::run(tests![
        reuseport_one_socket_per_seat_kept_across_a_restart => 40,
        reuseport_backlog_survives_a_sigkilled_worker,
        reuseport_scale_down_drains_then_closes_the_seat,
        reuseport_shutdown_touches_only_its_own_seat,
        least_connections_avoids_a_worker_holding_a_connection => 30,
        sticky_clients_keep_their_seat_across_a_respawn => 40,
        max_connections_per_worker_sends_the_rest_elsewhere => 30,
        a_refused_connection_is_served_by_another_worker => 30,
        reuseport_udp_one_socket_per_seat_kept_across_a_respawn => 30,
    ])
}

/// The inodes of the sockets listening on `port` (`/proc/net/tcp`, state `0A`).
fn listening_inodes(port: u16) -> BTreeSet<u64> {
    let t = std::fs::read_to_string("/proc/net/tcp").unwrap();
    t.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let lport = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            (lport == port && *f.get(3)? == "0A").then(|| f.get(9)?.parse().ok())?
        })
        .collect()
}

/// The inodes of the UDP sockets bound to `port` (`/proc/net/udp`).
fn udp_inodes(port: u16) -> BTreeSet<u64> {
    let t = std::fs::read_to_string("/proc/net/udp").unwrap();
    t.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let lport = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            (lport == port).then(|| f.get(9)?.parse().ok())?
        })
        .collect()
}

/// The socket inodes process `pid` holds.
fn socket_inodes(pid: u32) -> BTreeSet<u64> {
    util::fds_of(pid as i32)
        .into_iter()
        .filter_map(|(_, l)| l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
        .collect()
}

fn pids(p: &Primary) -> BTreeMap<u32, u32> {
    p.workers().map(|w| (w.id, w.pid)).collect()
}

/// Each worker's listening socket (exactly one, checked) among `listening` (read once:
/// `/proc/net/tcp` is slow to read on a machine with many sockets).
fn seat_socket_of(pid: u32, listening: &BTreeSet<u64>) -> u64 {
    let mine: Vec<u64> = socket_inodes(pid)
        .intersection(listening)
        .copied()
        .collect();
    assert_eq!(
        mine.len(),
        1,
        "worker {pid} holds listening sockets {mine:?}"
    );
    mine[0]
}

fn reuseport(n: usize) -> forkcluster::Builder {
    Cluster::builder()
        .listen(lo0())
        .workers(n)
        .schedule(Schedule::ReusePort)
}

/// `n` connections made at once (they wait in the backlogs), then each read to its end:
/// the ids that answered (u32 LE); a reset or a short reply fails the client.
fn burst(addr: SocketAddr, n: usize) -> Vec<u8> {
    let conns: Vec<TcpStream> = (0..n)
        .map(|i| {
            let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {i}: {e}"));
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            s
        })
        .collect();
    let mut out = Vec::new();
    for (i, mut s) in conns.into_iter().enumerate() {
        let mut b = Vec::new();
        s.read_to_end(&mut b)
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        let (id, _) = parse_reply(&b).unwrap_or_else(|| panic!("connection {i}: reply {b:?}"));
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

/// Reuseport: every worker holds exactly one listening socket, a different one each, and the
/// kernel spreads connections over them; after a rolling restart the new workers hold the
/// very same sockets (same inodes), and the primary never handed a connection over.
fn reuseport_one_socket_per_seat_kept_across_a_restart() {
    let mut p = reuseport(3).start(serve).unwrap();
    wait_ready(&mut p, 3);
    let addr = tcp_addr(&p, 0);
    let port = addr.port();
    let listening = listening_inodes(port);
    let before: BTreeSet<u64> = pids(&p)
        .values()
        .map(|&pid| seat_socket_of(pid, &listening))
        .collect();
    assert_eq!(before.len(), 3, "one socket per seat");
    assert_eq!(listening, before, "and no other");
    let ids = u32s(&client_quiet(&mut p, Duration::from_secs(15), move || {
        fetch_ids(addr, 60)
    }));
    let served: BTreeSet<u32> = ids.iter().copied().collect();
    assert!(
        served.len() >= 2,
        "the kernel spread 60 connections: {served:?}"
    );
    p.restart();
    let mut exits = 0;
    pump(&mut p, Duration::from_secs(20), |_, e| {
        if let E::Exit { after, .. } = e {
            assert!(after, "an old worker left on purpose");
            exits += 1;
        }
        exits == 3
    });
    let now = pids(&p);
    assert!(now.keys().all(|&id| id > 3), "all replaced: {now:?}");
    let listening = listening_inodes(port);
    let after: BTreeSet<u64> = now
        .values()
        .map(|&pid| seat_socket_of(pid, &listening))
        .collect();
    assert_eq!(after, before, "the replacements hold the same sockets");
    assert_eq!(p.stats().connections, 0, "nothing went through the primary");
    finish(p);
}

/// Connections waiting in a stopped worker's socket are not lost when it is SIGKILLed: the
/// primary keeps the socket, and its connections are served (by the primary's hand-off to
/// the other worker, or by the respawned worker in the same seat).
fn reuseport_backlog_survives_a_sigkilled_worker() {
    let mut p = reuseport(2).start(serve).unwrap();
    wait_ready(&mut p, 2);
    let addr = tcp_addr(&p, 0);
    let victim = pids(&p)[&1];
    kill(victim, libc::SIGSTOP);
    let started = Instant::now();
    let mut killed = false;
    let ids = u32s(&client(
        &mut p,
        Duration::from_secs(30),
        move || burst(addr, 40),
        |_, _| {
            if !killed && started.elapsed() > Duration::from_millis(500) {
                killed = true;
                kill(victim, libc::SIGKILL);
            }
        },
    ));
    assert!(killed);
    assert_eq!(ids.len(), 40, "every connection answered");
    assert!(!ids.contains(&1), "the stopped worker answered nothing");
    let from_2 = ids.iter().filter(|&&i| i == 2).count();
    let via_primary = p.stats().connections;
    // About half of the 40 were in the victim's socket; they reached worker 2 through the
    // primary or the replacement directly.
    assert!(
        from_2 < 40 || via_primary > 0,
        "no connection waited in the victim's socket? ids {ids:?}"
    );
    finish(p);
}

/// Scale-down: the seat of the worker that leaves is polled by the primary while it finishes
/// (its connections go to the others), then drained and closed: one listening socket fewer.
fn reuseport_scale_down_drains_then_closes_the_seat() {
    let mut p = reuseport(3)
        .graceful_timeout(Duration::from_secs(1))
        .start(serve)
        .unwrap();
    wait_ready(&mut p, 3);
    let addr = tcp_addr(&p, 0);
    let port = addr.port();
    assert_eq!(listening_inodes(port).len(), 3);
    let all = pids(&p);
    for &pid in all.values() {
        kill(pid, libc::SIGSTOP);
    }
    p.scale(2).unwrap();
    settle(&mut p, Duration::from_millis(100));
    let leaving: Vec<u32> = p
        .workers()
        .filter(|w| w.state == State::Disconnecting)
        .map(|w| w.id)
        .collect();
    assert_eq!(leaving.len(), 1, "one worker leaves: {leaving:?}");
    let leaving = leaving[0];
    for (&id, &pid) in &all {
        if id != leaving {
            kill(pid, libc::SIGCONT);
        }
    }
    let ids = u32s(&client(
        &mut p,
        Duration::from_secs(30),
        move || burst(addr, 60),
        |_, _| {},
    ));
    assert_eq!(ids.len(), 60);
    assert!(!ids.contains(&leaving), "the leaving worker was stopped");
    assert!(
        p.stats().connections > 0,
        "its seat's connections went through the primary"
    );
    // It is SIGKILLed at its graceful timeout; then its seat closes.
    until(
        &mut p,
        Duration::from_secs(10),
        |e| matches!(e, E::Exit { id, .. } if *id == leaving),
    );
    settle(&mut p, Duration::from_millis(100));
    assert_eq!(
        listening_inodes(port).len(),
        2,
        "the seat's socket is closed"
    );
    assert_eq!(p.workers().count(), 2, "no replacement");
    let ids = u32s(&client_quiet(&mut p, Duration::from_secs(15), move || {
        fetch_ids(addr, 20)
    }));
    assert_eq!(ids.len(), 20);
    finish(p);
}

/// A worker that shuts its own listening socket down (`SHUT_RD`) takes only its seat out:
/// every connection goes to the other socket meanwhile, and the primary has the socket listen
/// again (`listeners_restored`).
fn reuseport_shutdown_touches_only_its_own_seat() {
    fn shut_on_message(mut w: Worker) -> i32 {
        let id = w.id();
        while let Some(n) = w.next().expect("worker: next") {
            match n {
                Next::Connection(mut c) => {
                    let _ = c.write_all(&reply(id, 0));
                }
                Next::Message(_) => {
                    for fd in 3..256 {
                        // SAFETY: only used while this loop runs; fds that are not open fail.
                        let b = unsafe { BorrowedFd::borrow_raw(fd) };
                        if rustix::net::sockopt::socket_acceptconn(b).unwrap_or(false) {
                            rustix::net::shutdown(b, rustix::net::Shutdown::Read).unwrap();
                        }
                    }
                    w.send(b"shut").unwrap();
                }
                Next::Disconnect => break,
            }
        }
        0
    }
    let mut p = reuseport(2).start(shut_on_message).unwrap();
    wait_ready(&mut p, 2);
    let addr = tcp_addr(&p, 0);
    let port = addr.port();
    let other = seat_socket_of(pids(&p)[&2], &listening_inodes(port));
    p.send(1, b"shut").unwrap();
    until(&mut p, Duration::from_secs(5), |e| {
        matches!(e, E::Message { .. })
    });
    // (The primary may have restored worker 1's socket already: it checks every second.)
    assert!(
        listening_inodes(port).contains(&other),
        "worker 2's socket still listens"
    );
    let ids = u32s(&client_quiet(&mut p, Duration::from_secs(15), move || {
        fetch_ids(addr, 40)
    }));
    assert_eq!(ids.len(), 40, "no connection refused or reset meanwhile");
    let end = Instant::now() + Duration::from_secs(5);
    while p.stats().listeners_restored == 0 {
        assert!(Instant::now() < end, "the socket was not restored");
        settle(&mut p, Duration::from_millis(50));
    }
    assert_eq!(listening_inodes(port).len(), 2, "listening again");
    let ids = u32s(&client_quiet(&mut p, Duration::from_secs(15), move || {
        fetch_ids(addr, 60)
    }));
    assert!(
        ids.contains(&1) && ids.contains(&2),
        "both serve again: {ids:?}"
    );
    finish(p);
}

/// A worker that holds connections (a request starting with `H` is kept, unanswered, until
/// the worker disconnects) and answers the others.
fn hold_or_serve(mut w: Worker) -> i32 {
    let id = w.id();
    let mut held = Vec::new();
    while let Some(n) = w.next().expect("worker: next") {
        match n {
            Next::Connection(mut c) => {
                let mut b = [0u8; 1];
                if c.read_exact(&mut b).is_ok() && b[0] == b'H' {
                    w.send(b"held").unwrap();
                    held.push(c);
                } else {
                    let _ = c.write_all(&reply(id, 0));
                }
            }
            Next::Message(_) => {}
            Next::Disconnect => break,
        }
    }
    0
}

/// `n` sequential requests (`G`), each read to its end: the ids (u32 LE). The worker drops
/// the connection before the client sees its end, so its count is down when the next comes.
fn get_ids(addr: SocketAddr, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"G").unwrap();
        let mut b = Vec::new();
        s.read_to_end(&mut b).unwrap();
        let (id, _) = parse_reply(&b).unwrap_or_else(|| panic!("request {i}: {b:?}"));
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

/// Least connections: with one worker holding a connection, every new connection goes to
/// the other; round-robin (the control) gives the holder half of them.
fn least_connections_avoids_a_worker_holding_a_connection() {
    for schedule in [Schedule::LeastConnections, Schedule::RoundRobin] {
        let mut p = Cluster::builder()
            .listen(lo0())
            .workers(2)
            .schedule(schedule)
            .start(hold_or_serve)
            .unwrap();
        wait_ready(&mut p, 2);
        let addr = tcp_addr(&p, 0);
        let mut held = TcpStream::connect(addr).unwrap();
        held.write_all(b"H").unwrap();
        let holder = match until(&mut p, Duration::from_secs(5), |e| {
            matches!(e, E::Message { .. })
        })
        .pop()
        {
            Some(E::Message { id, .. }) => id,
            other => panic!("{other:?}"),
        };
        let ids = u32s(&client_quiet(&mut p, Duration::from_secs(15), move || {
            get_ids(addr, 20)
        }));
        let to_holder = ids.iter().filter(|&&i| i == holder).count();
        match schedule {
            Schedule::LeastConnections => {
                assert_eq!(
                    to_holder, 0,
                    "least-connections gave the holder {to_holder} of 20"
                )
            }
            _ => assert_eq!(to_holder, 10, "round-robin alternates"),
        }
        let info = p.worker(holder).unwrap();
        assert_eq!(info.open_connections, 1, "{info:?}");
        drop(held);
        finish(p);
    }
}

/// The seat that answers (the reply carries the worker id; the seat comes from the table).
fn seat_ids(addr: SocketAddr, ips: u8, rounds: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rounds {
        for ip in 1..=ips {
            let b = fetch_from(addr, [127, 0, 0, ip]).unwrap();
            let (id, _) = parse_reply(&b).unwrap_or_else(|| panic!("from .{ip}: {b:?}"));
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
    out
}

/// Sticky: every client address always reaches the same seat; when a seat's worker is killed
/// only that seat's clients move (to other seats), and once its replacement listens every
/// client is back on its own seat.
fn sticky_clients_keep_their_seat_across_a_respawn() {
    const IPS: u8 = 120;
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(4)
        .schedule(Schedule::Sticky)
        // The replacement is forked by the test once the "during" phase is over (however
        // slow the machine), as a respawn would be: into the lowest vacant seat.
        .respawn(false)
        .start(serve)
        .unwrap();
    wait_ready(&mut p, 4);
    let addr = tcp_addr(&p, 0);
    let seat_of =
        |p: &Primary| -> BTreeMap<u32, u32> { p.workers().map(|w| (w.id, w.seat)).collect() };
    let seats = seat_of(&p);
    let ids = u32s(&client_quiet(&mut p, Duration::from_secs(20), move || {
        seat_ids(addr, IPS, 2)
    }));
    let first: Vec<u32> = ids[..IPS as usize].iter().map(|id| seats[id]).collect();
    let second: Vec<u32> = ids[IPS as usize..].iter().map(|id| seats[id]).collect();
    assert_eq!(first, second, "each address keeps its seat");
    let used: BTreeSet<u32> = first.iter().copied().collect();
    assert_eq!(used.len(), 4, "{IPS} addresses over 4 seats: {used:?}");
    // Kill the worker in seat 1.
    let (&victim, _) = seats.iter().find(|(_, &s)| s == 1).unwrap();
    kill(p.worker(victim).unwrap().pid, libc::SIGKILL);
    until(&mut p, Duration::from_secs(5), |e| {
        matches!(e, E::Exit { .. })
    });
    let during = u32s(&client(
        &mut p,
        Duration::from_secs(20),
        move || seat_ids(addr, IPS, 1),
        |_, _| {},
    ));
    let seats_now = seat_of(&p);
    let mut kept = 0;
    for (i, id) in during.iter().enumerate() {
        let s = seats_now[id];
        if first[i] == 1 {
            assert_ne!(s, 1, "seat 1 is empty");
        } else {
            assert_eq!(
                s,
                first[i],
                "address .{} moved from seat {}",
                i + 1,
                first[i]
            );
            kept += 1;
        }
    }
    assert!(kept > 0 && kept < IPS as usize);
    // The replacement sits in seat 1 and gets its clients back.
    p.fork().unwrap();
    until(&mut p, Duration::from_secs(10), |e| {
        matches!(e, E::Listening { .. })
    });
    let seats = seat_of(&p);
    assert_eq!(seats.values().filter(|&&s| s == 1).count(), 1, "{seats:?}");
    let after = u32s(&client_quiet(&mut p, Duration::from_secs(20), move || {
        seat_ids(addr, IPS, 1)
    }));
    let after: Vec<u32> = after.iter().map(|id| seats[id]).collect();
    assert_eq!(after, first, "every address is back on its seat");
    finish(p);
}

/// `max_connections_per_worker(1)`: while one worker holds a connection, every new one goes to
/// the other, in every hand-off schedule; nothing is refused at the client.
fn max_connections_per_worker_sends_the_rest_elsewhere() {
    for schedule in [
        Schedule::RoundRobin,
        Schedule::LeastConnections,
        Schedule::Sticky,
    ] {
        let mut p = Cluster::builder()
            .listen(lo0())
            .workers(2)
            .schedule(schedule)
            .max_connections_per_worker(1)
            .start(hold_or_serve)
            .unwrap();
        wait_ready(&mut p, 2);
        let addr = tcp_addr(&p, 0);
        let mut held = TcpStream::connect(addr).unwrap();
        held.write_all(b"H").unwrap();
        let holder = match until(&mut p, Duration::from_secs(5), |e| {
            matches!(e, E::Message { .. })
        })
        .pop()
        {
            Some(E::Message { id, .. }) => id,
            other => panic!("{other:?}"),
        };
        let ids = u32s(&client_quiet(&mut p, Duration::from_secs(15), move || {
            get_ids(addr, 20)
        }));
        assert_eq!(ids.len(), 20);
        assert!(
            ids.iter().all(|&i| i != holder),
            "{schedule:?}: the worker at its limit got {ids:?}"
        );
        drop(held);
        finish(p);
    }
}

/// A worker refuses every connection (`Worker::refuse`, before reading it): each one is
/// served in full by the other worker, whether the primary handed it over (round-robin) or
/// the worker accepted it itself (reuseport).
fn a_refused_connection_is_served_by_another_worker() {
    fn refuse_if_first(mut w: Worker) -> i32 {
        let id = w.id();
        while let Some(n) = w.next().expect("worker: next") {
            match n {
                Next::Connection(c) if id == 1 => w.refuse(c).unwrap(),
                Next::Connection(mut c) => {
                    let _ = c.write_all(&reply(id, 0));
                }
                Next::Message(_) => {}
                Next::Disconnect => break,
            }
        }
        0
    }
    for schedule in [Schedule::RoundRobin, Schedule::ReusePort, Schedule::Shared] {
        let mut p = Cluster::builder()
            .listen(lo0())
            .workers(2)
            .schedule(schedule)
            .start(refuse_if_first)
            .unwrap();
        wait_ready(&mut p, 2);
        let addr = tcp_addr(&p, 0);
        // Worker 2 is stopped while the connections arrive, so that worker 1 gets some to
        // refuse whatever the kernel picks (shared); it goes on after 300 ms.
        let w2 = pids(&p)[&2];
        kill(w2, libc::SIGSTOP);
        let started = Instant::now();
        let mut resumed = false;
        let ids = u32s(&client(
            &mut p,
            Duration::from_secs(20),
            move || burst(addr, 40),
            |_, e| {
                assert!(!matches!(e, E::Exit { .. }), "{e:?}");
                if !resumed && started.elapsed() > Duration::from_millis(300) {
                    resumed = true;
                    kill(w2, libc::SIGCONT);
                }
            },
        ));
        assert_eq!(ids.len(), 40);
        assert!(ids.iter().all(|&i| i == 2), "{schedule:?}: {ids:?}");
        assert!(p.stats().refused > 0, "{schedule:?}: worker 1 refused some");
        assert_eq!(p.worker(1).unwrap().open_connections, 0);
        finish(p);
    }
}

/// Reuseport with a UDP listener: each worker holds its seat's own UDP socket (one each, all
/// bound to the port), datagrams from many client sockets reach more than one worker, and a
/// respawned worker gets the same socket back.
fn reuseport_udp_one_socket_per_seat_kept_across_a_respawn() {
    fn echo_id(mut w: Worker) -> i32 {
        let id = w.id().to_string();
        let mut buf = [0u8; 64];
        loop {
            match w.try_next() {
                Ok(Some(Next::Disconnect)) | Err(_) => return 0,
                _ => {}
            }
            let Some(sock) = w.udp_socket(0) else {
                return 0;
            };
            sock.set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            if let Ok((_, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(id.as_bytes(), from);
            }
        }
    }
    let mut p = Cluster::builder()
        .listen_udp(lo0())
        .workers(3)
        .schedule(Schedule::ReusePort)
        .start(echo_id)
        .unwrap();
    wait_ready(&mut p, 3);
    let addr = match p.listen_addrs().next() {
        Some(forkcluster::ListenAddr::Udp(a)) => *a,
        other => panic!("{other:?}"),
    };
    let bound = udp_inodes(addr.port());
    let by_pid: BTreeMap<u32, u64> = pids(&p)
        .values()
        .map(|&pid| {
            let mine: Vec<u64> = socket_inodes(pid).intersection(&bound).copied().collect();
            assert_eq!(mine.len(), 1, "worker {pid} holds UDP sockets {mine:?}");
            (pid, mine[0])
        })
        .collect();
    let sockets: BTreeSet<u64> = by_pid.values().copied().collect();
    assert_eq!(sockets.len(), 3, "one UDP socket per seat");
    let ask = move || {
        let mut out = Vec::new();
        for _ in 0..30 {
            let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c.send_to(b"?", addr).unwrap();
            let mut b = [0u8; 16];
            let n = c.recv(&mut b).expect("an answer");
            let id: u32 = std::str::from_utf8(&b[..n]).unwrap().parse().unwrap();
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    };
    let ids = u32s(&client_quiet(&mut p, Duration::from_secs(20), ask));
    let served: BTreeSet<u32> = ids.iter().copied().collect();
    assert!(
        served.len() >= 2,
        "30 client sockets over 3 seats: {served:?}"
    );
    // A respawn sits in the same seat and holds the same socket.
    let (&victim, _) = pids(&p).iter().next().unwrap();
    let victim_sock = by_pid[&pids(&p)[&victim]];
    kill(pids(&p)[&victim], libc::SIGKILL);
    until(&mut p, Duration::from_secs(10), |e| {
        matches!(e, E::Listening { .. })
    });
    let new = p.workers().find(|w| w.id > 3).expect("a respawned worker");
    let mine: Vec<u64> = socket_inodes(new.pid)
        .intersection(&bound)
        .copied()
        .collect();
    assert_eq!(
        mine,
        vec![victim_sock],
        "the respawn holds the dead worker's socket"
    );
    finish(p);
}
