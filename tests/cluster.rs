//! The cluster end to end, as Node's own `test-cluster-*` files check it: real forks, real
//! sockets on `127.0.0.1:0`, real signals.
//!
//! Runs under the fork-per-test runner of `tests/util` (`harness = false`): every test is its own
//! single-threaded process (a primary needs one), bounded by the runner's `alarm` and by its own
//! deadlines, and reaps every child it made. Clients never run in the primary: they run in a
//! forked child ([`client`]) while the primary pumps its event loop.
//!
//! The binary has a counting `#[global_allocator]`, so that `zero_allocations_on_the_hot_path`
//! can prove that dispatch, connection receipt and messages allocate nothing.

mod util;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use forkcluster::frame::{self, FrameError, MAX_FDS, MAX_PAYLOAD};
use forkcluster::{Cluster, Error, Event, ListenAddr, Next, Schedule, Worker};

fn main() {
    util::run(tests![
        event_order_and_ids_never_reused,
        sigkill_gives_one_disconnect_and_one_exit,
        exit_code_42,
        panicking_worker_exits_101_and_spares_siblings,
        disconnect_is_planned_and_clean,
        workers_die_with_the_primary,
        messages_both_ways_in_order,
        fds_travel_both_ways,
        eaddrinuse_and_first_cluster_keeps_serving,
        round_robin_is_fair,
        queued_connections_survive_a_killed_worker,
        worker_fds_and_signal_state,
        shared_schedule_and_port_zero,
        ipv6_listener,
        unix_listener_and_cleanup,
        several_listeners_round_robin,
        several_listeners_shared,
        job_pool_without_listener,
        protocol_violations_are_contained,
        zero_allocations_on_the_hot_path => 30,
        zero_allocations_least_connections => 30,
        zero_allocations_sticky => 30,
        zero_allocations_reuseport => 30,
        primary_and_workers_survive_eintr,
        per_worker_env_and_cluster_stats,
        defer_accept_hands_over_only_connections_with_data,
        start_refuses_bad_settings_and_threads,
    ])
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

fn allocs() -> u64 {
    ALLOCS.load(Ordering::Relaxed) as u64
}

use util::cl::*;

// ---------------------------------------------------------------------------------------------
// 1. Lifecycle order and ids.

/// Node's test-cluster-worker-events / -fork-env: fork → online → listening → disconnect → exit
/// for every worker, ids from 1, and a respawned worker gets a fresh id.
fn event_order_and_ids_never_reused() {
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(3)
        .backoff(
            Duration::from_millis(10),
            Duration::from_millis(10),
            Duration::from_secs(1),
        )
        .start(serve)
        .unwrap();
    let (forks, mut log) = wait_ready(&mut p, 3);
    assert_eq!(
        forks.iter().map(|f| f.0).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "ids start at 1"
    );
    let pids: BTreeSet<u32> = forks.iter().map(|f| f.1).collect();
    assert_eq!(pids.len(), 3, "distinct pids");
    for (id, pid) in &forks {
        assert_eq!(p.worker(*id).map(|w| w.pid), Some(*pid));
    }

    // A crash: the replacement is a new worker with the next id.
    kill(forks[1].1, libc::SIGKILL);
    log.extend(until(&mut p, Duration::from_secs(10), |e| {
        matches!(e, E::Listening { id: 4, .. })
    }));
    assert!(
        log.iter().any(|e| matches!(e, E::Fork { id: 4, .. })),
        "respawned worker is id 4: {log:?}"
    );
    assert!(
        !log.iter().any(
            |e| matches!(e, E::Fork { id, .. } if *id < 4 && !forks.iter().any(|f| f.0 == *id))
        ),
        "no id reused"
    );
    // The respawned worker serves.
    let addr = tcp_addr(&p, 0);
    let ids = u32s(&client_quiet(&mut p, Duration::from_secs(10), move || {
        fetch_ids(addr, 6)
    }));
    assert!(ids.contains(&4) && !ids.contains(&2), "served by {ids:?}");

    p.disconnect_all();
    log.extend(until(&mut p, Duration::from_secs(10), |e| {
        matches!(e, E::Done)
    }));

    for id in [1u32, 2, 3, 4] {
        let kinds: Vec<&str> = log
            .iter()
            .filter(|e| e.id() == Some(id))
            .map(E::kind)
            .collect();
        assert_eq!(
            kinds,
            ["fork", "online", "listening", "disconnect", "exit"],
            "worker {id}'s events: {log:?}"
        );
        let exit = log
            .iter()
            .find(|e| matches!(e, E::Exit { id: i, .. } if *i == id))
            .unwrap();
        let fork_pid = log
            .iter()
            .find_map(|e| match e {
                E::Fork { id: i, pid } if *i == id => Some(*pid),
                _ => None,
            })
            .unwrap();
        match exit {
            E::Exit {
                pid,
                code,
                signal,
                after,
                ..
            } => {
                assert_eq!(*pid, fork_pid);
                if id == 2 {
                    assert_eq!((*code, *signal, *after), (None, Some(libc::SIGKILL), false));
                } else {
                    assert_eq!((*code, *signal, *after), (Some(0), None, true));
                }
            }
            _ => unreachable!(),
        }
    }
    assert!(
        !log.iter()
            .any(|e| matches!(e, E::Fork { id, .. } if *id > 4)),
        "no respawn during a stop: {log:?}"
    );
    finish(p);
}

// ---------------------------------------------------------------------------------------------
// 2-4. How workers leave.

/// Node's test-cluster-worker-kill / -worker-death: a crash is one disconnect and one exit.
fn sigkill_gives_one_disconnect_and_one_exit() {
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(2)
        .respawn(false)
        .start(serve)
        .unwrap();
    let (forks, _) = wait_ready(&mut p, 2);
    let (victim, vpid) = forks[0];
    kill(vpid, libc::SIGKILL);
    let mut log = until(
        &mut p,
        Duration::from_secs(10),
        |e| matches!(e, E::Exit { id, .. } if *id == victim),
    );
    log.extend(settle(&mut p, Duration::from_millis(300)));
    let mine: Vec<&E> = log.iter().filter(|e| e.id() == Some(victim)).collect();
    assert_eq!(
        mine.len(),
        2,
        "exactly one disconnect and one exit: {log:?}"
    );
    assert!(matches!(mine[0], E::Disconnect(_)), "{log:?}");
    match mine[1] {
        E::Exit {
            pid,
            code,
            signal,
            after,
            ..
        } => {
            assert_eq!(*pid, vpid);
            assert_eq!(*code, None);
            assert_eq!(*signal, Some(libc::SIGKILL));
            assert!(!*after, "a crash is not exited_after_disconnect");
        }
        other => panic!("expected Exit, got {other:?}"),
    }
    assert!(
        !log.iter().any(|e| matches!(e, E::Fork { .. })),
        "respawn is off"
    );
    assert!(p.worker(victim).is_none(), "gone from the table");
    assert_eq!(p.workers().count(), 1);
    // The other worker still serves.
    let addr = tcp_addr(&p, 0);
    let ids = u32s(&client_quiet(&mut p, Duration::from_secs(10), move || {
        fetch_ids(addr, 4)
    }));
    assert_eq!(ids, vec![forks[1].0; 4]);
    finish(p);
}

/// Node's test-cluster-worker-exit: the worker's return value (or `exit`) is its exit code.
fn exit_code_42() {
    let mut p = Cluster::builder()
        .workers(2)
        .respawn(false)
        .start(|w: Worker| -> i32 {
            if w.id() == 1 {
                42
            } else {
                std::process::exit(42)
            }
        })
        .unwrap();
    let mut exits = BTreeMap::new();
    let log = until(&mut p, Duration::from_secs(10), |e| {
        if let E::Exit {
            id,
            code,
            signal,
            after,
            ..
        } = e
        {
            exits.insert(*id, (*code, *signal, *after));
        }
        exits.len() == 2
    });
    for id in [1, 2] {
        assert_eq!(exits[&id], (Some(42), None, false), "worker {id}: {log:?}");
        let kinds: Vec<&str> = log
            .iter()
            .filter(|e| e.id() == Some(id))
            .map(E::kind)
            .collect();
        assert_eq!(kinds, ["fork", "online", "disconnect", "exit"], "{log:?}");
    }
    assert_eq!(p.workers().count(), 0);
    finish(p);
}

/// Writes to a pipe if dropped in a process other than the one that made it: proof that a
/// worker unwound through the primary's stack frames (copied by fork) in the test function.
struct Tripwire {
    pid: i32,
    fd: RawFd,
}

impl Drop for Tripwire {
    fn drop(&mut self) {
        if me() != self.pid {
            // SAFETY: writing one byte from a live buffer to an fd this test opened.
            unsafe { libc::write(self.fd, b"U".as_ptr().cast(), 1) };
        }
    }
}

/// A worker whose function panics is a worker that exits with 101, like a Rust `main` that
/// panics. The panic must not unwind into the copy of the primary's stack in the worker process:
/// there, dropping the copied `Primary` would SIGKILL the worker's siblings, and the
/// application's destructors would run in the worker.
fn panicking_worker_exits_101_and_spares_siblings() {
    let (r, w) = pipe();
    let _tripwire = Tripwire {
        pid: me(),
        fd: w.as_raw_fd(),
    };
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(3)
        .respawn(false)
        .start(|mut w: Worker| -> i32 {
            if w.id() == 3 {
                // Announce, take one message, then panic.
                let _ = w.next();
                panic!("worker 3 panics on purpose");
            }
            serve(w)
        })
        .unwrap();
    let (forks, _) = wait_ready(&mut p, 3);
    p.send(3, b"panic now").unwrap();
    let mut log = until(&mut p, Duration::from_secs(10), |e| {
        matches!(e, E::Exit { id: 3, .. })
    });
    log.extend(settle(&mut p, Duration::from_millis(300)));
    let exit = log.iter().find(|e| matches!(e, E::Exit { id: 3, .. }));
    assert!(
        matches!(
            exit,
            Some(E::Exit {
                code: Some(101),
                after: false,
                ..
            })
        ),
        "worker 3 exits with 101: {log:?}"
    );
    assert!(
        !log.iter()
            .any(|e| matches!(e, E::Exit { id, .. } if *id != 3)),
        "the siblings were not touched: {log:?}"
    );
    assert!(util::alive(forks[0].1 as i32) && util::alive(forks[1].1 as i32));
    rustix::io::ioctl_fionbio(&r, true).unwrap();
    let mut b = [0u8; 8];
    assert!(
        File::from(r).read(&mut b).is_err(),
        "the panic unwound through the test function in the worker"
    );
    let addr = tcp_addr(&p, 0);
    let ids = u32s(&client_quiet(&mut p, Duration::from_secs(10), move || {
        fetch_ids(addr, 4)
    }));
    let mut ids = ids;
    ids.sort();
    assert_eq!(ids, vec![1, 1, 2, 2]);
    finish(p);
}

/// Node's test-cluster-worker-disconnect / -kill: asked to leave is `exitedAfterDisconnect`,
/// and a planned exit is not respawned.
fn disconnect_is_planned_and_clean() {
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(3)
        .start(|mut w: Worker| -> i32 {
            while let Some(n) = w.next().expect("next") {
                match n {
                    Next::Connection(mut c) => {
                        let _ = c.write_all(&reply(w.id(), 0));
                    }
                    Next::Message(_) => {}
                    Next::Disconnect => {
                        assert!(w.is_disconnecting());
                        break;
                    }
                }
            }
            0
        })
        .unwrap();
    let (forks, _) = wait_ready(&mut p, 3);
    p.disconnect(1).unwrap();
    // Node: worker.isConnected() is false once 'disconnect' fired.
    let mut connected_after_disconnect = None;
    let mut log = Vec::new();
    pump(&mut p, Duration::from_secs(10), |p, e| {
        if let E::Disconnect(1) = e {
            connected_after_disconnect = Some(p.worker(1).map(|w| w.connected));
        }
        let exit = matches!(e, E::Exit { id: 1, .. });
        if !matches!(e, E::Idle) {
            log.push(e);
        }
        exit
    });
    assert!(
        matches!(connected_after_disconnect, Some(None | Some(false))),
        "{connected_after_disconnect:?}"
    );
    let mine: Vec<&E> = log.iter().filter(|e| e.id() == Some(1)).collect();
    assert_eq!(mine.len(), 2, "{log:?}");
    assert!(matches!(mine[0], E::Disconnect(1)));
    assert!(
        matches!(
            mine[1],
            E::Exit {
                code: Some(0),
                signal: None,
                after: true,
                ..
            }
        ),
        "{log:?}"
    );

    // Respawn is for exits nobody asked for: a disconnected worker is not replaced.
    log.extend(settle(&mut p, Duration::from_millis(400)));
    assert!(
        !log.iter().any(|e| matches!(e, E::Fork { .. })),
        "a planned exit is not respawned: {log:?}"
    );
    assert_eq!(p.workers().count(), 2);

    // worker.kill() is not a planned exit (Node's test-cluster-worker-kill: exitedAfterDisconnect
    // false): it dies by the signal and, respawn being on, is replaced by worker 4.
    p.kill(2, forkcluster::Signal::TERM).unwrap();
    let log = until(&mut p, Duration::from_secs(10), |e| {
        matches!(e, E::Listening { id: 4, .. })
    });
    assert!(
        log.iter().any(|e| matches!(
            e,
            E::Exit {
                id: 2,
                code: None,
                signal: Some(libc::SIGTERM),
                after: false,
                ..
            }
        )),
        "{log:?}"
    );
    assert_eq!(p.disconnect(1), Err(Error::NoSuchWorker(1)));
    assert!(util::alive(forks[2].1 as i32));
    let info = p.worker(3).unwrap();
    assert!(info.connected && !info.exited_after_disconnect);
    finish(p);
}

// ---------------------------------------------------------------------------------------------
// 5. No orphans.

/// Node's test-cluster-master-kill: when the primary dies (SIGKILL, no chance to clean up),
/// every worker is gone within a second.
fn workers_die_with_the_primary() {
    let (r, w) = pipe();
    let primary = util::fork_child(move || {
        let mut p = Cluster::builder()
            .listen(lo0())
            .workers(3)
            .start(serve)
            .unwrap();
        let (forks, _) = wait_ready(&mut p, 3);
        let mut out = Vec::new();
        for (_, pid) in forks {
            out.extend_from_slice(&pid.to_le_bytes());
        }
        File::from(w).write_all(&out).unwrap();
        loop {
            let _ = ev(&mut p, Duration::from_secs(1));
        }
    });
    let guard = util::KillOnDrop(primary);
    let mut pipe = File::from(r);
    let mut buf = [0u8; 12];
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
    let pids = u32s(&buf);
    for &pid in &pids {
        assert!(util::alive(pid as i32), "worker {pid} alive before");
    }
    drop(guard); // SIGKILL and reap the primary
    let gone = util::wait_until(Duration::from_secs(1), || {
        pids.iter().all(|&pid| !util::alive(pid as i32))
    });
    assert!(gone, "workers outlived the primary: {pids:?}");
}

// ---------------------------------------------------------------------------------------------
// 6-7. Messages.

const MSGS: u32 = 3000;

fn msg_len(seq: u32) -> usize {
    match seq % 5 {
        0 => MAX_PAYLOAD,
        1 => 4,
        _ => 4 + (seq as usize * 131) % (MAX_PAYLOAD - 4),
    }
}

fn fill_msg(buf: &mut [u8], seq: u32) -> &[u8] {
    let len = msg_len(seq);
    buf[..4].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in buf[4..len].iter_mut().enumerate() {
        *b = (seq as usize + i) as u8;
    }
    &buf[..len]
}

fn check_msg(payload: &[u8], seq: u32) -> bool {
    let mut buf = vec![0u8; MAX_PAYLOAD];
    payload == fill_msg(&mut buf, seq)
}

/// Node's test-cluster-message / -send-deadlock: thousands of messages both ways arrive whole
/// and in order, up to the largest payload; a larger one is refused on both sides.
fn messages_both_ways_in_order() {
    let mut p = Cluster::builder()
        .workers(1)
        .respawn(false)
        .start(|mut w: Worker| -> i32 {
            let mut buf = vec![0u8; MAX_PAYLOAD + 1];
            for seq in 0..MSGS {
                w.send(fill_msg(&mut buf, seq)).unwrap();
            }
            let over = matches!(w.send(&buf), Err(Error::Capacity(_)));
            let mut expect = 0u32;
            let mut bad = 0u32;
            while expect < MSGS {
                match w.next().unwrap() {
                    Some(Next::Message(m)) => {
                        if !check_msg(m.payload, expect) {
                            bad += 1;
                        }
                        expect += 1;
                    }
                    Some(Next::Connection(_)) => bad += 1,
                    Some(Next::Disconnect) | None => break,
                }
            }
            let mut report = vec![b'R', over as u8];
            report.extend_from_slice(&bad.to_le_bytes());
            report.extend_from_slice(&expect.to_le_bytes());
            w.send(&report).unwrap();
            // Stay until asked to leave.
            while let Ok(Some(n)) = w.next() {
                if let Next::Disconnect = n {
                    break;
                }
            }
            0
        })
        .unwrap();

    // Worker → primary. Its first message comes after its `Online` (Node: 'online' is emitted
    // before any 'message' of that worker), and the rest follow in order.
    let head = until(&mut p, Duration::from_secs(10), |e| {
        matches!(e, E::Message { .. })
    });
    assert_eq!(
        head.iter().map(E::kind).collect::<Vec<_>>(),
        ["fork", "online", "message"]
    );
    let Some(E::Message { payload, .. }) = head.last() else {
        unreachable!()
    };
    assert!(check_msg(payload, 0), "message 0 damaged");
    let mut seq = 1;
    pump(&mut p, Duration::from_secs(20), |_, e| {
        match e {
            E::Message {
                id: 1,
                payload,
                fds,
            } => {
                assert!(fds.is_empty());
                assert!(
                    check_msg(&payload, seq),
                    "message {seq} out of order or damaged ({} bytes)",
                    payload.len()
                );
                seq += 1;
            }
            E::Idle => {}
            other => panic!("unexpected {other:?}"),
        }
        seq == MSGS
    });

    // Oversize, from the primary.
    let big = vec![7u8; MAX_PAYLOAD + 1];
    assert!(matches!(p.send(1, &big), Err(Error::Capacity(_))));
    assert!(matches!(p.broadcast(&big), Err(Error::Capacity(_))));
    assert_eq!(p.send(9, b"x"), Err(Error::NoSuchWorker(9)));

    // Primary → worker: `send` never blocks; when the queue is full, run the loop a moment.
    let mut buf = vec![0u8; MAX_PAYLOAD];
    let end = Instant::now() + Duration::from_secs(20);
    let mut report = None;
    for seq in 0..MSGS {
        loop {
            assert!(Instant::now() < end, "sending timed out at {seq}");
            match p.send(1, fill_msg(&mut buf, seq)) {
                Ok(()) => break,
                Err(e) if e.is_would_block() => match ev(&mut p, Duration::from_millis(1)) {
                    E::Idle => {}
                    E::Message { payload, .. } => report = Some(payload),
                    other => panic!("unexpected {other:?}"),
                },
                Err(e) => panic!("send {seq}: {e}"),
            }
        }
    }
    if report.is_none() {
        let log = until(&mut p, Duration::from_secs(20), |e| {
            matches!(e, E::Message { .. })
        });
        if let Some(E::Message { payload, .. }) = log.into_iter().last() {
            report = Some(payload);
        }
    }
    let report = report.unwrap();
    assert_eq!(report[0], b'R');
    assert_eq!(
        report[1], 1,
        "the worker's oversize send gave Error::Capacity"
    );
    assert_eq!(u32s(&report[2..10]), vec![0, MSGS], "bad, received");
    finish(p);
}

fn read_all(fd: OwnedFd) -> Vec<u8> {
    let mut v = Vec::new();
    File::from(fd).read_to_end(&mut v).unwrap();
    v
}

/// Node's test-cluster-send-handle / net handles over IPC: fds in messages both ways, up to
/// MAX_FDS; one more is refused on both sides; nothing leaks.
fn fds_travel_both_ways() {
    let mut p = Cluster::builder()
        .workers(1)
        .respawn(false)
        .start(|mut w: Worker| -> i32 {
            // 1. The primary's pipe write end arrives: write into it.
            let fd = match w.next().unwrap() {
                Some(Next::Message(mut m)) => {
                    assert_eq!(m.payload, b"write-end");
                    assert_eq!(m.fds.len(), 1);
                    m.fds.pop().unwrap()
                }
                other => panic!("worker: {other:?}"),
            };
            File::from(fd).write_all(b"from the worker").unwrap();
            // 2. A read end of the worker's pipe goes to the primary.
            let (r, wr) = pipe();
            w.send_with_fds(b"read-end", &[r.as_fd()]).unwrap();
            drop(r);
            File::from(wr).write_all(b"to the primary").unwrap();
            // 3. MAX_FDS read ends, each pipe carrying its index.
            let mut reads = Vec::new();
            for i in 0..=MAX_FDS {
                let (r, wr) = pipe();
                File::from(wr).write_all(&[i as u8]).unwrap();
                reads.push(r);
            }
            let all: Vec<BorrowedFd<'_>> = reads.iter().map(|r| r.as_fd()).collect();
            w.send_with_fds(b"eight", &all[..MAX_FDS]).unwrap();
            // 4. One more is refused here.
            let refused = matches!(w.send_with_fds(b"nine", &all), Err(Error::Capacity(_)));
            drop(all);
            drop(reads);
            // 5. MAX_FDS from the primary: report what each carried.
            let got: Vec<u8> = match w.next().unwrap() {
                Some(Next::Message(m)) => m.fds.into_iter().flat_map(read_all).collect(),
                other => panic!("worker: {other:?}"),
            };
            let mut rep = vec![refused as u8];
            rep.extend_from_slice(&got);
            w.send(&rep).unwrap();
            while let Ok(Some(n)) = w.next() {
                if let Next::Disconnect = n {
                    break;
                }
            }
            0
        })
        .unwrap();
    wait_ready(&mut p, 1);
    let before = util::fd_count();

    let (r, wr) = pipe();
    p.send_with_fds(1, b"write-end", &[wr.as_fd()]).unwrap();
    drop(wr);
    assert_eq!(read_all(r), b"from the worker");

    let mut msgs = Vec::new();
    pump(&mut p, Duration::from_secs(10), |_, e| {
        match e {
            E::Message { payload, fds, .. } => msgs.push((payload, fds)),
            E::Idle => {}
            other => panic!("unexpected {other:?}"),
        }
        msgs.len() == 2
    });
    let (payload, mut fds) = msgs.remove(0);
    assert_eq!(payload, b"read-end");
    assert_eq!(fds.len(), 1);
    assert_eq!(read_all(fds.pop().unwrap()), b"to the primary");
    let (payload, fds) = msgs.remove(0);
    assert_eq!(payload, b"eight");
    assert_eq!(fds.len(), MAX_FDS);
    for fd in &fds {
        assert!(util::is_cloexec(fd), "received fds are close-on-exec");
    }
    let carried: Vec<u8> = fds.into_iter().flat_map(read_all).collect();
    assert_eq!(carried, (0..MAX_FDS as u8).collect::<Vec<_>>());

    // MAX_FDS + 1 from the primary is refused; MAX_FDS goes.
    let mut ends = Vec::new();
    for i in 0..=MAX_FDS {
        let (r, wr) = pipe();
        File::from(wr).write_all(&[100 + i as u8]).unwrap();
        ends.push(r);
    }
    let all: Vec<BorrowedFd<'_>> = ends.iter().map(|r| r.as_fd()).collect();
    assert!(matches!(
        p.send_with_fds(1, b"nine", &all),
        Err(Error::Capacity(_))
    ));
    p.send_with_fds(1, b"eight", &all[..MAX_FDS]).unwrap();
    drop(all);
    drop(ends);
    let log = until(&mut p, Duration::from_secs(10), |e| {
        matches!(e, E::Message { .. })
    });
    let Some(E::Message { payload, .. }) = log.last() else {
        unreachable!()
    };
    assert_eq!(
        payload[0], 1,
        "the worker's MAX_FDS + 1 send gave Error::Capacity"
    );
    assert_eq!(
        &payload[1..],
        (100..100 + MAX_FDS as u8).collect::<Vec<_>>()
    );
    assert_eq!(util::fd_count(), before, "no fd leaked in the primary");
    finish(p);
}

// ---------------------------------------------------------------------------------------------
// 8-10. Listeners and dispatch.

/// Node's test-cluster-eaddrinuse / -bind-twice: a second cluster on a port in use fails with
/// EADDRINUSE, leaves nothing behind, and the first one keeps serving.
fn eaddrinuse_and_first_cluster_keeps_serving() {
    let mut a = Cluster::builder()
        .listen(lo0())
        .workers(2)
        .start(serve)
        .unwrap();
    wait_ready(&mut a, 2);
    let addr = tcp_addr(&a, 0);
    let fds = util::fd_count();
    for schedule in [Schedule::RoundRobin, Schedule::Shared] {
        let e = Cluster::builder()
            .listen(addr)
            .workers(2)
            .schedule(schedule)
            .start(serve)
            .expect_err("second cluster on a port in use");
        assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE), "{e}");
    }
    // A Unix path bound by an earlier listener of the failed cluster is removed again.
    let path = sock_path("inuse");
    let e = Cluster::builder()
        .listen_unix(&path)
        .listen(addr)
        .workers(1)
        .start(serve)
        .expect_err("second cluster on a port in use");
    assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE), "{e}");
    let leftover = path.exists();
    let _ = std::fs::remove_file(&path);
    assert_eq!(util::fd_count(), fds, "a failed start leaks no fd");
    assert_eq!(
        util::children_of(me()).len(),
        2,
        "a failed start forks nothing"
    );
    let ids = u32s(&client_quiet(&mut a, Duration::from_secs(10), move || {
        fetch_ids(addr, 4)
    }));
    assert_eq!(ids.len(), 4);
    assert!(
        !leftover,
        "a failed start left its Unix socket file {path:?} behind"
    );
    finish(a);
}

/// Node's test-cluster-rr-distribution idea: sequential connections go to every worker in turn.
fn round_robin_is_fair() {
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(4)
        .start(serve)
        .unwrap();
    wait_ready(&mut p, 4);
    let addr = tcp_addr(&p, 0);
    let ids = u32s(&client_quiet(&mut p, Duration::from_secs(15), move || {
        fetch_ids(addr, 200)
    }));
    assert_eq!(ids.len(), 200);
    let mut per: BTreeMap<u32, usize> = BTreeMap::new();
    for id in &ids {
        *per.entry(*id).or_default() += 1;
    }
    assert_eq!(per.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    for (id, n) in &per {
        assert!((40..=60).contains(n), "worker {id} got {n} of 200: {per:?}");
    }
    // The primary's counters agree with what the clients saw.
    for (id, n) in &per {
        assert_eq!(p.worker(*id).unwrap().connections, *n as u64);
    }
    finish(p);
}

/// A worker that stops reading, with connections queued in its channel, is SIGKILLed: every one
/// of those connections is answered in full by the other worker. No accepted connection is lost
/// at dispatch (Node loses them: nodejs/node#21746).
fn queued_connections_survive_a_killed_worker() {
    const N: usize = 40;
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(2)
        .respawn(false)
        .start(|mut w: Worker| -> i32 {
            let r = reply(w.id(), 0);
            loop {
                let Some(n) = w.next().expect("next") else {
                    return 0;
                };
                let gate = match n {
                    Next::Connection(mut c) => {
                        let _ = c.write_all(&r);
                        false
                    }
                    Next::Message(m) => m.payload == b"gate",
                    Next::Disconnect => return 0,
                };
                if gate {
                    // Stop reading: connections pile up in the channel.
                    w.send(b"gated").unwrap();
                    loop {
                        std::thread::sleep(Duration::from_secs(60));
                    }
                }
            }
        })
        .unwrap();
    let (forks, _) = wait_ready(&mut p, 2);
    p.send(1, b"gate").unwrap();
    until(
        &mut p,
        Duration::from_secs(10),
        |e| matches!(e, E::Message { id: 1, payload, .. } if payload == b"gated"),
    );
    let addr = tcp_addr(&p, 0);
    let mut queued = 0usize;
    let mut killed = false;
    let mut log = Vec::new();
    let out = client(
        &mut p,
        Duration::from_secs(15),
        move || {
            let mut conns: Vec<TcpStream> = (0..N).map(|_| connect(addr)).collect();
            let mut out = Vec::new();
            for c in conns.iter_mut() {
                let mut b = Vec::new();
                match c.read_to_end(&mut b) {
                    Ok(_) => match parse_reply(&b) {
                        Some((id, _)) => out.push(id as u8),
                        None => out.push(0xfe),
                    },
                    Err(_) => out.push(0xff),
                }
            }
            for c in conns {
                abort_close(c);
            }
            out
        },
        |p, e| {
            if !killed {
                if let (Some(a), Some(b)) = (p.worker(1), p.worker(2)) {
                    if a.connections + b.connections == N as u64 && a.queued_bytes > 0 {
                        // Every connection was dispatched; worker 1 holds some, unread.
                        assert_eq!(
                            a.queued_bytes as u64,
                            18 * a.connections,
                            "worker 1 read none"
                        );
                        queued = a.queued_bytes / 18;
                        kill(forks[0].1, libc::SIGKILL);
                        killed = true;
                    }
                }
            }
            if !matches!(e, E::Idle) {
                log.push(e);
            }
        },
    );
    assert!(killed, "worker 1 never had connections queued");
    assert!(queued >= 1);
    assert_eq!(out.len(), N);
    assert!(
        out.iter().all(|&id| id == 2),
        "every connection answered in full by worker 2 ({queued} were queued for worker 1): {out:?}"
    );
    log.extend(until(&mut p, Duration::from_secs(5), |_| true));
    let _ = log;
    assert_eq!(p.worker(2).unwrap().connections, N as u64);
    finish(p);
}

// ---------------------------------------------------------------------------------------------
// 11. What a worker holds.

fn status_field(pid: u32, name: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
}

/// The fds of `pid` that are not in `base` (same number, same target).
fn extra_fds(pid: u32, base: &[(i32, String)]) -> Vec<(i32, String)> {
    util::fds_of(pid as i32)
        .into_iter()
        .filter(|f| !base.contains(f))
        .collect()
}

/// The fds of this process, minus the directory listing itself.
fn own_fds() -> Vec<(i32, String)> {
    util::fds_of(me())
        .into_iter()
        .filter(|(_, t)| !t.starts_with("/proc/"))
        .collect()
}

/// DESIGN §5: a worker holds stdio and its own channel (round-robin), plus the listener and its
/// own epoll (shared): no listener in round-robin, no sibling's channel, none of the primary's
/// epoll or signalfd. Its signal mask is empty and it ignores only what the parent ignored.
fn worker_fds_and_signal_state() {
    let base = own_fds();
    let sig_ign = status_field(me() as u32, "SigIgn:");
    let ign = u64::from_str_radix(&sig_ign, 16).unwrap();
    assert_ne!(
        ign & 1 << (libc::SIGPIPE - 1),
        0,
        "Rust's runtime ignores SIGPIPE"
    );
    for schedule in [Schedule::RoundRobin, Schedule::Shared] {
        let l = TcpListener::bind(lo0()).unwrap();
        let listener_target = std::fs::read_link(format!("/proc/self/fd/{}", l.as_raw_fd()))
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let mut p = Cluster::builder()
            .tcp_listener(l)
            .workers(3)
            .schedule(schedule)
            .start(serve)
            .unwrap();
        let (forks, _) = wait_ready(&mut p, 3);
        let primary_extra: Vec<String> = own_fds()
            .into_iter()
            .filter(|f| !base.contains(f))
            .map(|f| f.1)
            .collect();
        assert!(primary_extra.contains(&listener_target));
        let mut channels = BTreeSet::new();
        for &(id, pid) in &forks {
            let extra = extra_fds(pid, &base);
            let targets: Vec<&str> = extra.iter().map(|f| f.1.as_str()).collect();
            let sockets: Vec<&str> = targets
                .iter()
                .copied()
                .filter(|t| t.starts_with("socket:") && *t != listener_target)
                .collect();
            assert_eq!(
                sockets.len(),
                1,
                "worker {id} ({schedule:?}) has one channel: {extra:?}"
            );
            assert!(
                primary_extra.iter().any(|t| t == sockets[0]),
                "the channel is the one the primary holds the other copy of"
            );
            channels.insert(sockets[0].to_string());
            assert!(
                !targets.iter().any(|t| t.contains("signalfd")),
                "worker {id} holds the primary's signalfd: {extra:?}"
            );
            match schedule {
                Schedule::RoundRobin => {
                    // Its channel, and the spare fd (an eventfd) that a hand-off's fd always
                    // has room to land in (issue 9: no connection lost to EMFILE).
                    assert_eq!(
                        extra.len(),
                        2,
                        "worker {id}: its channel and spare: {extra:?}"
                    );
                    assert_eq!(
                        targets.iter().filter(|t| t.contains("[eventfd]")).count(),
                        1,
                        "worker {id}: its spare fd: {extra:?}"
                    );
                }
                _ => {
                    assert!(
                        targets.contains(&listener_target.as_str()),
                        "worker {id} holds the listener in the shared schedule: {extra:?}"
                    );
                    assert_eq!(
                        targets.iter().filter(|t| t.contains("eventpoll")).count(),
                        1,
                        "worker {id}: its own epoll only: {extra:?}"
                    );
                    // Its own epoll set and (for pauses in accepting) at most one timer of its
                    // own; nothing else.
                    assert!(
                        targets.iter().filter(|t| t.contains("timerfd")).count() <= 1,
                        "worker {id}: {extra:?}"
                    );
                    assert!(
                        targets.iter().filter(|t| t.contains("[eventfd]")).count() <= 1,
                        "worker {id}: at most its spare fd: {extra:?}"
                    );
                    let others = targets.iter().filter(|t| {
                        !t.contains("eventpoll")
                            && !t.contains("timerfd")
                            && !t.contains("[eventfd]")
                            && **t != listener_target
                            && **t != sockets[0]
                    });
                    assert_eq!(others.count(), 0, "worker {id}: {extra:?}");
                }
            }
            assert_eq!(
                status_field(pid, "SigBlk:"),
                "0000000000000000",
                "worker {id}: empty signal mask"
            );
            assert_eq!(
                status_field(pid, "SigIgn:"),
                sig_ign,
                "worker {id}: ignores what the parent ignored"
            );
        }
        assert_eq!(channels.len(), 3, "each worker has its own channel");
        finish(p);
        assert_eq!(own_fds(), base, "the dropped primary closed all its fds");
    }
    assert_eq!(status_field(me() as u32, "SigBlk:"), "0000000000000000");
}

// ---------------------------------------------------------------------------------------------
// 12. Schedules and listeners.

/// A worker that answers, then holds the connection until the client closes it: while it does,
/// it cannot accept, so the next connection must go to another worker.
fn serve_and_hold(mut w: Worker) -> i32 {
    let id = w.id();
    while let Some(n) = w.next().expect("next") {
        match n {
            Next::Connection(mut c) => {
                let _ = c.write_all(&reply(id, c.listener));
                let mut b = [0u8; 16];
                while matches!(c.read(&mut b), Ok(n) if n > 0) {}
            }
            Next::Message(_) => {}
            Next::Disconnect => break,
        }
    }
    0
}

/// Node's test-cluster-shared-handle-bind / SCHED_NONE, and port 0: one real port for all.
fn shared_schedule_and_port_zero() {
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(4)
        .schedule(Schedule::Shared)
        .start(serve_and_hold)
        .unwrap();
    let (_, log) = wait_ready(&mut p, 4);
    let addr = tcp_addr(&p, 0);
    assert_ne!(addr.port(), 0);
    let listening: Vec<String> = log
        .iter()
        .filter_map(|e| match e {
            E::Listening { listener, addr, .. } => {
                assert_eq!(*listener, 0);
                Some(addr.to_string())
            }
            _ => None,
        })
        .collect();
    assert_eq!(listening, vec![addr.to_string(); 4]);
    let ids = u32s(&client_quiet(&mut p, Duration::from_secs(10), move || {
        // Four connections held open at once: four workers.
        let mut held = Vec::new();
        let mut out = Vec::new();
        for _ in 0..4 {
            let mut s = connect(addr);
            let mut b = vec![0u8; REPLY_LEN];
            s.read_exact(&mut b).unwrap();
            out.extend_from_slice(&parse_reply(&b).unwrap().0.to_le_bytes());
            held.push(s);
        }
        for s in held {
            abort_close(s);
        }
        // And sequential ones still work.
        for _ in 0..8 {
            let mut s = connect(addr);
            let mut b = vec![0u8; REPLY_LEN];
            s.read_exact(&mut b).unwrap();
            out.extend_from_slice(&parse_reply(&b).unwrap().0.to_le_bytes());
            abort_close(s);
        }
        out
    }));
    let distinct: BTreeSet<u32> = ids[..4].iter().copied().collect();
    assert_eq!(
        distinct.len(),
        4,
        "held connections went to all four workers: {ids:?}"
    );
    // The shared schedule counts what the workers accepted.
    let total: u64 = p.workers().map(|w| w.connections).sum();
    assert_eq!(total, 12);
    finish(p);
}

fn ipv6_listener() {
    let start = Cluster::builder()
        .listen("[::1]:0".parse().unwrap())
        .workers(2)
        .start(serve);
    let mut p = match start {
        Ok(p) => p,
        Err(e)
            if e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
                || e.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
        {
            println!("ipv6_listener: skipped, no IPv6 here ({e})");
            return;
        }
        Err(e) => panic!("start on [::1]:0: {e}"),
    };
    wait_ready(&mut p, 2);
    let addr = tcp_addr(&p, 0);
    assert!(addr.is_ipv6() && addr.port() != 0);
    let ids = u32s(&client_quiet(&mut p, Duration::from_secs(10), move || {
        fetch_ids(addr, 4)
    }));
    assert_eq!(ids.iter().copied().collect::<BTreeSet<_>>().len(), 2);
    finish(p);
}

fn unix_listener_and_cleanup() {
    let path = sock_path("unix");
    let _ = std::fs::remove_file(&path);
    let mut p = Cluster::builder()
        .listen_unix(&path)
        .workers(2)
        .start(serve)
        .unwrap();
    wait_ready(&mut p, 2);
    match p.listen_addrs().next() {
        Some(ListenAddr::Unix(a)) => assert_eq!(a.as_pathname(), Some(path.as_path())),
        other => panic!("{other:?}"),
    }
    let path2 = path.clone();
    let ids = u32s(&client_quiet(&mut p, Duration::from_secs(10), move || {
        let mut out = Vec::new();
        for _ in 0..4 {
            let b = fetch_unix(&path2).unwrap();
            out.extend_from_slice(&parse_reply(&b).unwrap().0.to_le_bytes());
        }
        out
    }));
    assert_eq!(ids.iter().copied().collect::<BTreeSet<_>>().len(), 2);
    assert!(path.exists());
    finish(p);
    assert!(
        !path.exists(),
        "the socket file is removed when the primary is dropped"
    );
}

/// Several listeners of every kind in one cluster; `Connection::listener` names the right one.
fn several_listeners(schedule: Schedule) {
    let path = sock_path(&format!("multi-{schedule:?}"));
    let _ = std::fs::remove_file(&path);
    let own = TcpListener::bind(lo0()).unwrap();
    let own_addr = own.local_addr().unwrap();
    let mut p = Cluster::builder()
        .listen(lo0())
        .listen(lo0())
        .listen_unix(&path)
        .tcp_listener(own)
        .workers(2)
        .schedule(schedule)
        .start(serve)
        .unwrap();
    let (_, log) = wait_ready(&mut p, 2);
    let addrs: Vec<String> = p.listen_addrs().map(|a| a.to_string()).collect();
    assert_eq!(addrs.len(), 4);
    assert_eq!(tcp_addr(&p, 3), own_addr);
    assert_ne!(tcp_addr(&p, 0), tcp_addr(&p, 1));
    for e in &log {
        if let E::Listening { listener, addr, .. } = e {
            assert_eq!(addr.to_string(), addrs[*listener]);
        }
    }
    let tcp = [tcp_addr(&p, 0), tcp_addr(&p, 1), tcp_addr(&p, 3)];
    let path2 = path.clone();
    let out = client_quiet(&mut p, Duration::from_secs(10), move || {
        let mut out = Vec::new();
        for round in 0..3 {
            for (i, want) in [(0usize, 0usize), (1, 1), (2, 3)] {
                let b = fetch(tcp[i]).unwrap();
                let (_, l) = parse_reply(&b).unwrap();
                assert_eq!(l, want, "round {round}: tcp listener {want}");
            }
            let b = fetch_unix(&path2).unwrap();
            assert_eq!(parse_reply(&b).unwrap().1, 2, "unix listener");
            out.push(round);
        }
        out
    });
    assert_eq!(out, vec![0, 1, 2]);
    finish(p);
    assert!(!path.exists());
}

fn several_listeners_round_robin() {
    several_listeners(Schedule::RoundRobin);
}

fn several_listeners_shared() {
    several_listeners(Schedule::Shared);
}

// ---------------------------------------------------------------------------------------------
// 13. Workers without a network.

/// Node's "cluster for non-network work": jobs as messages, results back, then a clean stop.
fn job_pool_without_listener() {
    const JOBS: u64 = 300;
    let mut p = Cluster::builder()
        .workers(3)
        .start(|mut w: Worker| -> i32 {
            loop {
                let job = match w.next().unwrap() {
                    Some(Next::Message(m)) => u64::from_le_bytes(m.payload.try_into().unwrap()),
                    Some(Next::Connection(_)) => return 3,
                    Some(Next::Disconnect) | None => return 0,
                };
                let mut out = [0u8; 16];
                out[..8].copy_from_slice(&job.to_le_bytes());
                out[8..].copy_from_slice(&(job * job + 1).to_le_bytes());
                w.send(&out).unwrap();
            }
        })
        .unwrap();
    let (forks, _) = wait_ready(&mut p, 3);
    let mut idle: Vec<u32> = forks.iter().map(|f| f.0).collect();
    let mut next = 0u64;
    let mut results = BTreeMap::new();
    let mut per: BTreeMap<u32, u32> = BTreeMap::new();
    pump(&mut p, Duration::from_secs(15), |p, e| {
        match e {
            E::Message { id, payload, .. } => {
                let job = u64::from_le_bytes(payload[..8].try_into().unwrap());
                let res = u64::from_le_bytes(payload[8..].try_into().unwrap());
                assert!(results.insert(job, res).is_none(), "job {job} twice");
                *per.entry(id).or_default() += 1;
                idle.push(id);
            }
            E::Idle => {}
            other => panic!("unexpected {other:?}"),
        }
        while next < JOBS {
            let Some(id) = idle.pop() else { break };
            p.send(id, &next.to_le_bytes()).unwrap();
            next += 1;
        }
        results.len() as u64 == JOBS
    });
    for (job, res) in &results {
        assert_eq!(*res, job * job + 1);
    }
    assert_eq!(per.len(), 3, "every worker worked: {per:?}");
    p.disconnect_all();
    let log = until(&mut p, Duration::from_secs(10), |e| matches!(e, E::Done));
    let exits: Vec<&E> = log.iter().filter(|e| matches!(e, E::Exit { .. })).collect();
    assert_eq!(exits.len(), 3);
    for e in exits {
        assert!(
            matches!(
                e,
                E::Exit {
                    code: Some(0),
                    after: true,
                    ..
                }
            ),
            "{e:?}"
        );
    }
    finish(p);
}

// ---------------------------------------------------------------------------------------------
// 14. A hostile worker.

fn raw_header(kind: u8, fds: u8, len: u32) -> [u8; frame::HEADER_LEN] {
    let mut h = [0u8; frame::HEADER_LEN];
    h[0..2].copy_from_slice(&frame::MAGIC);
    h[2] = frame::VERSION;
    h[3] = kind;
    h[5] = fds;
    h[8..12].copy_from_slice(&99u32.to_le_bytes());
    h[12..16].copy_from_slice(&len.to_le_bytes());
    h
}

fn raw_send(chan: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(16))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    let n = rustix::net::sendmsg(
        chan,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .unwrap();
    assert_eq!(n, bytes.len());
}

/// Sends what `mode` names straight on the worker's channel, bypassing the API.
fn misbehave(w: &Worker, mode: &[u8]) {
    // Round-robin without listeners: the worker's fd is its channel.
    let chan = w.as_fd();
    let mut pipes = Vec::new();
    for _ in 0..9 {
        pipes.push(pipe().0);
    }
    let fds: Vec<BorrowedFd<'_>> = pipes.iter().map(|p| p.as_fd()).collect();
    match mode {
        b"magic" => raw_send(chan, b"XXXXXXXXXXXXXXXXXXXXXX", &[]),
        b"empty" => raw_send(chan, b"", &[]),
        b"fds" => raw_send(chan, &raw_header(5, 0, 0), &fds[..2]),
        b"ctrunc" => raw_send(chan, &raw_header(5, 8, 0), &fds[..9]),
        b"kind" => {
            let mut f = raw_header(3, 1, 2).to_vec();
            f.extend_from_slice(&[0, 0]);
            raw_send(chan, &f, &fds[..1]);
        }
        b"listening" => {
            let mut f = raw_header(2, 0, 2).to_vec();
            f.extend_from_slice(&[5, 0]);
            raw_send(chan, &f, &[]);
        }
        other => panic!("mode {other:?}"),
    }
}

/// A worker that breaks the protocol is reported (`WorkerError`), its channel is closed
/// (`Disconnect`; the worker sees end of file and leaves), the others keep working, and the
/// primary keeps none of what it sent.
fn protocol_violations_are_contained() {
    type Check = fn(&Error) -> bool;
    let modes: [(&[u8], Check); 6] = [
        (b"magic", |e| {
            matches!(e, Error::Frame(FrameError::Magic(_)))
        }),
        (b"empty", |e| {
            matches!(e, Error::Frame(FrameError::Short { len: 0 }))
        }),
        (b"fds", |e| {
            matches!(
                e,
                Error::FdMismatch {
                    header: 0,
                    received: 2
                }
            )
        }),
        (b"ctrunc", |e| matches!(e, Error::ControlTruncated)),
        (b"kind", |e| matches!(e, Error::Invalid(_))),
        (b"listening", |e| matches!(e, Error::Invalid(_))),
    ];
    let n = modes.len() as u32 + 2;
    let before_start = util::fd_count();
    let mut p = Cluster::builder()
        .workers(n as usize)
        .respawn(false)
        .start(|mut w: Worker| -> i32 {
            loop {
                let mut mode = Vec::new();
                match w.next().unwrap() {
                    Some(Next::Message(m)) => mode.extend_from_slice(m.payload),
                    Some(Next::Connection(_)) => return 3,
                    Some(Next::Disconnect) => break,
                    None => return 4,
                }
                if mode.starts_with(b"echo") {
                    w.send(&mode).unwrap();
                    continue;
                }
                misbehave(&w, &mode);
                // The primary closes the channel: end of file here.
                return match w.next() {
                    Ok(Some(Next::Disconnect)) => match w.next() {
                        Ok(None) => 7,
                        _ => 5,
                    },
                    _ => 6,
                };
            }
            0
        })
        .unwrap();
    wait_ready(&mut p, n as usize);
    let good = 1u32;
    let clean = n;

    // What one worker costs the primary in fds, from a clean exit.
    let c0 = util::fd_count();
    p.disconnect(clean).unwrap();
    until(
        &mut p,
        Duration::from_secs(10),
        |e| matches!(e, E::Exit { id, .. } if *id == clean),
    );
    let per_worker = c0 - util::fd_count();
    assert!(per_worker >= 1);

    for (i, (mode, check)) in modes.iter().enumerate() {
        let id = i as u32 + 2;
        let c = util::fd_count();
        p.send(id, mode).unwrap();
        let log = until(
            &mut p,
            Duration::from_secs(10),
            |e| matches!(e, E::Exit { id: x, .. } if *x == id),
        );
        let mine: Vec<&E> = log.iter().filter(|e| e.id() == Some(id)).collect();
        let mode = String::from_utf8_lossy(mode);
        assert_eq!(mine.len(), 3, "{mode}: {log:?}");
        match mine[0] {
            E::WorkerError { error, .. } => assert!(check(error), "{mode}: {error:?}"),
            other => panic!("{mode}: expected WorkerError, got {other:?}"),
        }
        assert!(matches!(mine[1], E::Disconnect(_)), "{mode}: {log:?}");
        // A worker that breaks the protocol is killed at once (issue 9): SIGKILL, not a
        // wait for it to notice its closed channel.
        assert!(
            matches!(
                mine[2],
                E::Exit {
                    signal: Some(9),
                    after: false,
                    ..
                }
            ),
            "{mode}: the worker was killed at once: {log:?}"
        );
        assert_eq!(
            util::fd_count(),
            c - per_worker,
            "{mode}: the primary leaked fds"
        );
        // The good worker still answers.
        p.send(good, b"echo ping").unwrap();
        let log = until(&mut p, Duration::from_secs(10), |e| {
            matches!(e, E::Message { .. })
        });
        assert!(
            matches!(log.last(), Some(E::Message { id: 1, payload, .. }) if payload == b"echo ping"),
            "{mode}: {log:?}"
        );
    }
    assert_eq!(p.workers().count(), 1);
    finish(p);
    assert_eq!(util::fd_count(), before_start, "nothing leaked in all");
}

// ---------------------------------------------------------------------------------------------
// 15. No allocation on the hot path.

const WARM: u64 = 100;
const COUNT: u64 = 2000;

/// The worker of the allocation test. Connections: the count over its receipts
/// `WARM+1..=WARM+COUNT` goes to the primary as `D` + u64. Messages: each is echoed; the count
/// over echoes `WARM+1..=WARM+COUNT` goes as `M` + u64. Nothing here allocates after warm-up.
fn counting_worker(mut w: Worker) -> i32 {
    let r = reply(w.id(), 0);
    let (mut conns, mut cbase) = (0u64, 0u64);
    let (mut msgs, mut mbase) = (0u64, 0u64);
    let mut buf = [0u8; 16];
    loop {
        let mut out = 0usize;
        match w.next() {
            Ok(Some(Next::Connection(mut c))) => {
                let _ = c.write_all(&r);
                drop(c);
                conns += 1;
                if conns == WARM {
                    cbase = allocs();
                    buf[0] = b'W';
                    out = 1;
                } else if conns == WARM + COUNT {
                    let d = allocs() - cbase;
                    buf[0] = b'D';
                    buf[1..9].copy_from_slice(&d.to_le_bytes());
                    out = 9;
                }
            }
            Ok(Some(Next::Message(m))) => {
                let len = m.payload.len().min(buf.len());
                buf[..len].copy_from_slice(&m.payload[..len]);
                drop(m);
                w.send(&buf[..len]).unwrap();
                msgs += 1;
                if msgs == WARM {
                    mbase = allocs();
                } else if msgs == WARM + COUNT {
                    let d = allocs() - mbase;
                    buf[0] = b'M';
                    buf[1..9].copy_from_slice(&d.to_le_bytes());
                    out = 9;
                }
            }
            Ok(Some(Next::Disconnect)) | Ok(None) => return 0,
            Err(_) => return 2,
        }
        if out > 0 {
            w.send(&buf[..out]).unwrap();
        }
    }
}

fn u64_at(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[1..9]);
    u64::from_le_bytes(a)
}

/// DESIGN §7: accept → dispatch → receive, and messages both ways, allocate nothing, in the
/// primary and in the workers. The measured loops below use fixed buffers only.
fn zero_allocations_on_the_hot_path() {
    zero_allocations(Schedule::RoundRobin);
}

fn zero_allocations_least_connections() {
    zero_allocations(Schedule::LeastConnections);
}

fn zero_allocations_sticky() {
    zero_allocations(Schedule::Sticky);
}

fn zero_allocations_reuseport() {
    zero_allocations(Schedule::ReusePort);
}

fn zero_allocations(schedule: Schedule) {
    // The counter counts.
    let before = allocs();
    let v = std::hint::black_box(vec![1u8; 64]);
    assert!(allocs() > before && v.len() == 64);
    drop(v);
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(2)
        .respawn(false)
        .schedule(schedule)
        .start(counting_worker)
        .unwrap();
    wait_ready(&mut p, 2);
    let addr = tcp_addr(&p, 0);
    let (stop_r, stop_w) = pipe();
    let stop_fd = stop_r.as_raw_fd();
    // The client: sequential connections until told to stop.
    let cl = util::fork_child(move || {
        close_all_but(&[0, 1, 2, stop_fd]);
        for i in 0..3 * (WARM + COUNT) {
            let mut pfd = [libc::pollfd {
                fd: stop_fd,
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(pfd.as_mut_ptr(), 1, 0) } > 0 {
                return 0;
            }
            // Sticky: from many client addresses, so that both workers get connections.
            let b = if schedule == Schedule::Sticky {
                fetch_from(addr, [127, 0, 0, 1 + (i % 64) as u8]).unwrap()
            } else {
                fetch(addr).unwrap()
            };
            assert!(parse_reply(&b).is_some());
        }
        1
    });
    drop(stop_r);
    let guard = util::KillOnDrop(cl);

    // Connections.
    let end = Instant::now() + Duration::from_secs(20);
    let (mut warm, mut done) = (0, 0);
    let mut base = 0;
    let mut primary_conn_allocs = u64::MAX;
    let mut worker_conn_allocs = [u64::MAX; 2];
    while done < 2 {
        assert!(Instant::now() < end, "connection phase timed out");
        match p.next_event_timeout(Duration::from_millis(100)) {
            Ok(Some(Event::Message { id, payload, .. })) => match payload.first() {
                Some(b'W') => {
                    warm += 1;
                    if warm == 2 {
                        base = allocs();
                    }
                }
                Some(b'D') => {
                    worker_conn_allocs[(id - 1) as usize] = u64_at(payload);
                    done += 1;
                    if done == 2 {
                        primary_conn_allocs = allocs() - base;
                    }
                }
                _ => panic!("unexpected message"),
            },
            Ok(Some(Event::Idle)) => {}
            Ok(Some(other)) => panic!("unexpected event {other}"),
            Ok(None) => panic!("cluster ended"),
            Err(e) => panic!("next_event: {e}"),
        }
    }
    File::from(stop_w).write_all(b"x").unwrap();
    // The client may be in the middle of a connection: keep serving until it is gone.
    let st = loop {
        let mut st = 0;
        // SAFETY: waiting for our own child, into a live int.
        if unsafe { libc::waitpid(cl, &mut st, libc::WNOHANG) } == cl {
            break st;
        }
        assert!(Instant::now() < end, "the client did not stop");
        match ev(&mut p, Duration::from_millis(5)) {
            E::Idle => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    std::mem::forget(guard);
    assert!(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0);

    // Messages: round trips with each worker in turn.
    let mut primary_msg_allocs = 0;
    let mut worker_msg_allocs = [u64::MAX; 2];
    let mut msg = [0u8; 5];
    msg[0] = b'E';
    let mut got = 0;
    for i in 0..WARM + COUNT {
        if i == WARM {
            base = allocs();
        }
        for id in 1..=2u32 {
            msg[1..5].copy_from_slice(&(i as u32).to_le_bytes());
            p.send(id, &msg).unwrap();
            loop {
                assert!(Instant::now() < end, "message phase timed out");
                match p.next_event_timeout(Duration::from_millis(100)) {
                    Ok(Some(Event::Message {
                        id: from, payload, ..
                    })) => {
                        if payload.first() == Some(&b'M') {
                            worker_msg_allocs[(from - 1) as usize] = u64_at(payload);
                            got += 1;
                            continue;
                        }
                        assert!(from == id && payload == msg, "echo out of order");
                        break;
                    }
                    Ok(Some(Event::Idle)) => {}
                    Ok(Some(other)) => panic!("unexpected event {other}"),
                    Ok(None) => panic!("cluster ended"),
                    Err(e) => panic!("next_event: {e}"),
                }
            }
        }
        if i == WARM + COUNT - 1 {
            primary_msg_allocs = allocs() - base;
        }
    }
    while got < 2 {
        match ev(&mut p, Duration::from_millis(100)) {
            E::Message { id, payload, .. } if payload[0] == b'M' => {
                worker_msg_allocs[(id - 1) as usize] = u64_at(&payload);
                got += 1;
            }
            E::Idle => assert!(Instant::now() < end, "no report from the workers"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        worker_conn_allocs,
        [0, 0],
        "allocations in workers over {COUNT} connection receipts each"
    );
    assert_eq!(
        primary_conn_allocs,
        0,
        "allocations in the primary over {} dispatched connections",
        2 * COUNT
    );
    assert_eq!(
        worker_msg_allocs,
        [0, 0],
        "allocations in workers over {COUNT} message round trips each"
    );
    assert_eq!(
        primary_msg_allocs,
        0,
        "allocations in the primary over {} message round trips",
        2 * COUNT
    );
    finish(p);
}

// ---------------------------------------------------------------------------------------------
// EINTR.

static USR1: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_usr1(_: libc::c_int) {
    USR1.fetch_add(1, Ordering::Relaxed);
}

/// A SIGUSR1 handler without SA_RESTART: blocking calls fail with EINTR when it runs.
fn install_usr1() {
    // SAFETY: a zeroed sigaction with a valid handler and an empty mask; the handler only
    // touches an atomic.
    unsafe {
        let mut sa: libc::sigaction = core::mem::zeroed();
        sa.sa_sigaction = on_usr1 as *const () as usize;
        sa.sa_flags = 0;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(
            libc::sigaction(libc::SIGUSR1, &sa, core::ptr::null_mut()),
            0
        );
    }
}

/// Signals the primary does not handle interrupt its `epoll_wait` (and a worker's wait) with
/// EINTR; both carry on serving.
fn primary_and_workers_survive_eintr() {
    install_usr1();
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(2)
        .respawn(false)
        .start(|w: Worker| -> i32 {
            install_usr1();
            serve(w)
        })
        .unwrap();
    let (forks, _) = wait_ready(&mut p, 2);
    let addr = tcp_addr(&p, 0);
    let targets = [me() as u32, forks[0].1, forks[1].1];
    let ids = u32s(&client(
        &mut p,
        Duration::from_secs(15),
        move || {
            let mut out = Vec::new();
            for i in 0..60 {
                for &t in &targets {
                    kill(t, libc::SIGUSR1);
                }
                if i % 10 == 0 {
                    // Let everyone block again before the next signal.
                    std::thread::sleep(Duration::from_millis(20));
                    for &t in &targets {
                        kill(t, libc::SIGUSR1);
                    }
                }
                out.extend(fetch_ids(addr, 1));
            }
            out
        },
        |_, e| assert!(!matches!(e, E::Exit { .. } | E::Done), "unexpected {e:?}"),
    ));
    assert_eq!(ids.len(), 60);
    assert!(
        USR1.load(Ordering::Relaxed) > 0,
        "the primary never got SIGUSR1"
    );
    // And the primary still reacts to events afterwards.
    p.send(1, b"still there?").unwrap();
    let log = settle(&mut p, Duration::from_millis(100));
    assert!(log.is_empty(), "{log:?}");
    for (_, pid) in &forks {
        assert!(util::alive(*pid as i32));
    }
    finish(p);
}

/// Node's `cluster.fork(env)`: the builder's variables reach every worker, `fork_with_env`'s only
/// that one; the cluster's counters follow forks, crashes and exits.
fn per_worker_env_and_cluster_stats() {
    let mut p = Cluster::builder()
        .workers(1)
        .respawn(false)
        .env("FC_ALL", "everyone")
        .start(|mut w: Worker| -> i32 {
            let all = std::env::var("FC_ALL").unwrap_or_default();
            let one = std::env::var("FC_ONE").unwrap_or_else(|_| "-".into());
            w.send(format!("{all} {one}").as_bytes()).unwrap();
            while let Ok(Some(n)) = w.next() {
                if let Next::Disconnect = n {
                    break;
                }
            }
            0
        })
        .unwrap();
    let second = p.fork_with_env(&[("FC_ONE", "only-me")]).unwrap();
    let mut got = BTreeMap::new();
    pump(&mut p, Duration::from_secs(10), |_, e| {
        if let E::Message { id, payload, .. } = e {
            got.insert(id, String::from_utf8(payload).unwrap());
        }
        got.len() == 2
    });
    assert_eq!(got[&1], "everyone -");
    assert_eq!(got[&second], "everyone only-me");
    let pid1 = p.worker(1).expect("worker 1 alive").pid;
    kill(pid1, libc::SIGKILL);
    until(&mut p, Duration::from_secs(10), |e| {
        matches!(e, E::Exit { id: 1, .. })
    });
    let st = p.stats();
    assert_eq!((st.forks, st.exits, st.crashes), (2, 1, 1), "{st:?}");
    p.disconnect_all();
    until(&mut p, Duration::from_secs(10), |e| matches!(e, E::Done));
    let st = p.stats();
    assert_eq!((st.forks, st.exits, st.crashes), (2, 2, 1), "{st:?}");
    finish(p);
}

/// `defer_accept`: a client that connects and sends nothing is not handed to any worker; once it
/// sends, its connection is handed over and served.
fn defer_accept_hands_over_only_connections_with_data() {
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(2)
        .defer_accept(5)
        .start(|mut w: Worker| -> i32 {
            let reply = reply(w.id(), 0);
            while let Some(n) = w.next().expect("worker: next") {
                match n {
                    Next::Connection(mut c) => {
                        // Read what the client sent (so that closing sends no reset), answer.
                        let mut b = [0u8; 1];
                        let _ = c.read(&mut b);
                        let _ = c.write_all(&reply);
                    }
                    Next::Message(_) => {}
                    Next::Disconnect => break,
                }
            }
            0
        })
        .unwrap();
    wait_ready(&mut p, 2);
    let addr = tcp_addr(&p, 0);
    // The client holds a silent connection for 600 ms, then reports how many connections the
    // primary had handed out by then (read back below through stats), then sends a byte.
    let (r, w) = pipe();
    let rfd = r.as_raw_fd();
    let (r2, w2) = pipe();
    let w2fd = w2.as_raw_fd();
    let pid = util::fork_child(move || {
        close_all_but(&[0, 1, 2, rfd, w2fd]);
        let mut s = connect(addr);
        let mut gate = File::from(r);
        let mut b = [0u8; 1];
        // Wait for the primary's "checked" signal before speaking.
        gate.read_exact(&mut b).unwrap();
        s.write_all(b"x").unwrap();
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).unwrap();
        File::from(w2).write_all(&reply).unwrap();
        0
    });
    let _guard = util::KillOnDrop(pid);
    let silent_until = Instant::now() + Duration::from_millis(600);
    while Instant::now() < silent_until {
        let _ = ev(&mut p, STEP);
    }
    assert_eq!(
        p.stats().connections,
        0,
        "a connection without data was handed over"
    );
    File::from(w).write_all(b"go").unwrap();
    rustix::io::ioctl_fionbio(&r2, true).unwrap();
    let mut out = File::from(r2);
    let mut reply = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 1024];
    while Instant::now() < end {
        match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let _ = ev(&mut p, STEP);
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        parse_reply(&reply).is_some(),
        "no reply after the client spoke: {reply:?}"
    );
    assert_eq!(p.stats().connections, 1);
    let st = util::wait_child(pid, Duration::from_secs(5));
    std::mem::forget(_guard);
    assert!(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0);
    finish(p);
}

/// `start` fails with a clear error, forks nothing and leaves no fd behind, when the process has
/// another thread (fork would be unsound) or a setting cannot work.
fn start_refuses_bad_settings_and_threads() {
    let before = util::fd_count();
    let err = |b: forkcluster::Builder| b.start(|_w: Worker| 0).map(drop).unwrap_err();
    assert!(matches!(
        err(Cluster::builder().workers(0)),
        Error::Invalid(_)
    ));
    assert!(matches!(
        err(Cluster::builder().workers(3).max_workers(2)),
        Error::Invalid(_)
    ));
    assert!(matches!(
        err(Cluster::builder().max_in_flight(0)),
        Error::Invalid(_)
    ));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        let _ = rx.recv();
    });
    let e = err(Cluster::builder().workers(1).listen(lo0()));
    assert!(
        matches!(e, Error::Invalid(m) if m.contains("thread")),
        "{e}"
    );
    tx.send(()).unwrap();
    t.join().unwrap();
    assert!(util::children_of(me()).is_empty(), "a refused start forked");
    assert_eq!(util::fd_count(), before, "a refused start left fds open");
}
