//! Node's disconnect model, end to end (issue 11, item 5): `Event::Disconnect` comes when a
//! worker's channel closes, while the worker may still be alive finishing the connections it
//! holds, and `Exit` follows when it exits. Ported from Node's test-cluster-worker-no-exit.js
//! (a worker that disconnects keeps serving what it holds and exits only after),
//! test-cluster-kill-disconnect.js (a worker's own disconnect, and its disconnect-then-exit, are
//! both `exitedAfterDisconnect` at both events) and test-cluster-net-server-drop-connection.js
//! (workers told to disconnect while they hold connections), and checked path by path: the
//! worker's `disconnect()`, the primary's `disconnect(id)`, `kill`, a graceful stop, a rolling
//! restart and a worker function that returns. Each test asserts the exact order of the events
//! of the workers it is about.
//!
//! Real forks, real sockets on `127.0.0.1:0`, real signals, under the fork-per-test runner of
//! `tests/util` (`harness = false`). A client runs in a forked child that holds none of the
//! primary's fds, sends `hold`, waits until the test lets it go (one byte on a pipe), sends
//! `finish` and checks the whole reply; the worker holding its connection answers only then.
//! So "the worker is still serving" is a fact the test controls, not a race. Every test
//! reaps its clients and checks that the primary left no child behind.

mod util;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use forkcluster::{
    Cluster, Connection, Error, Event, ListenAddr, Next, Primary, Schedule, State, Worker,
};

fn main() {
    util::run(tests![
        worker_disconnect_keeps_serving_what_it_holds,
        primary_disconnect_is_reported_when_the_worker_takes_it,
        worker_disconnect_and_disconnect_then_exit_are_both_after_disconnect,
        kill_reports_disconnect_and_exit_together_at_exit,
        worker_returning_reports_disconnect_and_exit_together,
        graceful_stop_reports_each_disconnect_before_the_exits,
        rolling_restart_disconnects_the_old_worker_while_it_finishes,
        a_worker_that_never_answers_is_disconnected_at_exit,
        a_disconnected_worker_takes_no_new_connections_rr,
        a_disconnected_worker_takes_no_new_connections_shared,
    ])
}

// ---------------------------------------------------------------------------------------------
// Events, owned, and what the primary said about a worker when its `Disconnect` came.

#[derive(Debug, Clone, PartialEq)]
enum E {
    Fork(u32),
    Online(u32),
    Listening(u32),
    Message(u32, Vec<u8>),
    Disconnect(u32),
    Exit {
        id: u32,
        code: Option<i32>,
        signal: Option<i32>,
        after: bool,
    },
    Restart {
        old: u32,
        new: u32,
    },
    RestartDone,
    Stopping,
    Other(String),
    Idle,
    Done,
}

impl E {
    fn id(&self) -> Option<u32> {
        match self {
            E::Fork(id)
            | E::Online(id)
            | E::Listening(id)
            | E::Message(id, _)
            | E::Disconnect(id)
            | E::Exit { id, .. } => Some(*id),
            _ => None,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            E::Fork(_) => "fork",
            E::Online(_) => "online",
            E::Listening(_) => "listening",
            E::Message(..) => "message",
            E::Disconnect(_) => "disconnect",
            E::Exit { .. } => "exit",
            E::Restart { .. } => "restart",
            E::RestartDone => "restart-done",
            E::Stopping => "stopping",
            E::Other(_) => "other",
            E::Idle => "idle",
            E::Done => "done",
        }
    }
}

/// What the primary showed of a worker at its `Disconnect`.
#[derive(Debug, Clone, Copy)]
struct AtDisconnect {
    /// Its process was alive (not a zombie, not gone).
    alive: bool,
    /// Its row: `connected`, `exited_after_disconnect`, `state` (`None`: not in the table).
    row: Option<(bool, bool, State)>,
    /// What `send` to it gave.
    send: Result<(), Error>,
}

/// The events of one test, with the pid of each worker and what was seen at each `Disconnect`.
#[derive(Default)]
struct Rec {
    log: Vec<E>,
    pids: BTreeMap<u32, u32>,
    at: BTreeMap<u32, AtDisconnect>,
}

impl Rec {
    /// The kinds of worker `id`'s events, in order.
    fn kinds(&self, id: u32) -> Vec<&'static str> {
        self.log
            .iter()
            .filter(|e| e.id() == Some(id))
            .map(E::kind)
            .collect()
    }

    fn pos(&self, e: &E) -> usize {
        self.log
            .iter()
            .position(|x| x == e)
            .unwrap_or_else(|| panic!("no {e:?} in {:?}", self.log))
    }

    fn exit_of(&self, id: u32) -> (Option<i32>, Option<i32>, bool) {
        self.log
            .iter()
            .find_map(|e| match e {
                E::Exit {
                    id: i,
                    code,
                    signal,
                    after,
                } if *i == id => Some((*code, *signal, *after)),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no exit of worker {id}: {:?}", self.log))
    }
}

const STEP: Duration = Duration::from_millis(20);

/// One event (or `Idle` after [`STEP`]), recorded; at a `Disconnect`, the worker's state.
fn step(p: &mut Primary, rec: &mut Rec) -> E {
    let e = match p.next_event_timeout(STEP) {
        Ok(None) => E::Done,
        Ok(Some(ev)) => match ev {
            Event::Fork { id, pid } => {
                rec.pids.insert(id, pid);
                E::Fork(id)
            }
            Event::Online { id } => E::Online(id),
            Event::Listening { id, .. } => E::Listening(id),
            Event::Message { id, payload, .. } => E::Message(id, payload.to_vec()),
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
            Event::Restart { old, new, .. } => E::Restart { old, new },
            Event::RestartDone => E::RestartDone,
            Event::Stopping { .. } => E::Stopping,
            Event::Idle => E::Idle,
            other => E::Other(other.to_string()),
        },
        Err(e) => panic!("next_event failed: {e}"),
    };
    if let E::Disconnect(id) = e {
        let pid = rec.pids.get(&id).copied().unwrap_or(0) as i32;
        let row = p
            .worker(id)
            .map(|w| (w.connected, w.exited_after_disconnect, w.state));
        let send = p.send(id, b"after the disconnect");
        rec.at.insert(
            id,
            AtDisconnect {
                alive: util::alive(pid),
                row,
                send,
            },
        );
    }
    if !matches!(e, E::Idle) {
        rec.log.push(e.clone());
    }
    e
}

/// Pumps events until `cond` holds for one; panics after `limit` or if the cluster ends first.
fn until(p: &mut Primary, rec: &mut Rec, limit: Duration, mut cond: impl FnMut(&E) -> bool) {
    let end = Instant::now() + limit;
    loop {
        assert!(
            Instant::now() < end,
            "timed out after {limit:?}; events: {:?}",
            rec.log
        );
        let e = step(p, rec);
        if cond(&e) {
            return;
        }
        assert!(e != E::Done, "the cluster ended: {:?}", rec.log);
    }
}

/// Pumps events for `d`, and returns those of that time.
fn settle(p: &mut Primary, rec: &mut Rec, d: Duration) -> Vec<E> {
    let from = rec.log.len();
    let end = Instant::now() + d;
    while Instant::now() < end {
        if step(p, rec) == E::Done {
            break;
        }
    }
    rec.log[from..].to_vec()
}

/// Pumps until `n` workers are listening.
fn wait_listening(p: &mut Primary, rec: &mut Rec, n: usize) {
    let mut k = 0;
    until(p, rec, Duration::from_secs(10), |e| {
        k += usize::from(matches!(e, E::Listening(_)));
        k == n
    });
}

fn addr_of(p: &Primary) -> SocketAddr {
    match p.listen_addrs().next() {
        Some(ListenAddr::Tcp(a)) => *a,
        other => panic!("not a TCP listener: {other:?}"),
    }
}

fn me() -> i32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

/// Drops the primary and checks that it left no child behind.
fn finish(p: Primary) {
    drop(p);
    let left = util::children_of(me());
    assert!(left.is_empty(), "children left behind: {left:?}");
}

// ---------------------------------------------------------------------------------------------
// The held connection: a client that holds it until the test lets it go, a worker that holds it
// until the client says `finish`.

const REPLY: &[u8] = b"finished: every byte of the held connection\n";
const LIMIT: Duration = Duration::from_secs(10);
const MS50: Duration = Duration::from_millis(50);

fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap()
}

/// Closes every fd of this process but `keep` (in a forked client: it must hold none of the
/// primary's channels, whose end of file the workers wait for).
fn close_all_but(keep: &[RawFd]) {
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if !keep.contains(&fd) {
            // SAFETY: closing an fd of this forked child, which owns nothing else.
            unsafe { libc::close(fd) };
        }
    }
}

/// A client in a forked child: connects, sends `hold`, waits for the go byte, sends `finish`,
/// reads the reply to its end. Exits 0 when the reply is [`REPLY`], whole.
struct Client {
    pid: i32,
    go: File,
}

impl Client {
    fn start(addr: SocketAddr) -> Client {
        let (r, w) = pipe();
        let rfd = r.as_raw_fd();
        let pid = util::fork_child(move || {
            close_all_but(&[0, 1, 2, rfd]);
            let mut go = File::from(r);
            let Ok(mut s) = TcpStream::connect(addr) else {
                return 2;
            };
            s.set_read_timeout(Some(LIMIT)).unwrap();
            if s.write_all(b"hold\n").is_err() {
                return 3;
            }
            let mut b = [0u8; 1];
            if go.read_exact(&mut b).is_err() {
                return 4;
            }
            if s.write_all(b"finish\n").is_err() {
                return 5;
            }
            let mut reply = Vec::new();
            match s.read_to_end(&mut reply) {
                Ok(_) if reply == REPLY => 0,
                Ok(_) => 6,
                Err(_) => 7,
            }
        });
        Client {
            pid,
            go: File::from(w),
        }
    }

    /// Lets the client finish.
    fn release(&mut self) {
        self.go.write_all(b"g").unwrap();
    }

    /// Lets the client finish, and asserts that its connection was lost (its worker was
    /// killed holding it).
    fn lost(mut self) {
        self.release();
        let st = util::wait_child(self.pid, LIMIT);
        assert!(
            !(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0),
            "a reply from a killed worker?"
        );
    }

    /// Waits for the client and asserts that it got the whole reply.
    fn served(self) {
        let st = util::wait_child(self.pid, LIMIT);
        assert!(
            libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
            "the held connection was not served to completion (client status {st:#x})"
        );
    }
}

/// Reads one line (without its `\n`) from a held connection.
fn line(c: &mut Connection) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while let Ok(1) = c.read(&mut b) {
        if b[0] == b'\n' {
            break;
        }
        out.push(b[0]);
    }
    out
}

/// What a holding worker does once it holds a connection.
#[derive(Clone, Copy, PartialEq)]
enum Then {
    /// Waits for the primary's `Disconnect`.
    Wait,
    /// Calls `Worker::disconnect()` itself.
    Disconnect,
}

/// A worker that takes connections, reads `hold` from each, keeps it, and tells the primary
/// (`holding`). When its loop ends (the primary's `Disconnect`, or its own and then the end of
/// its channel) it serves every connection it holds to completion, then returns 0. Other
/// codes say what went wrong.
fn holder(mut w: Worker, then: Then) -> i32 {
    let mut held = Vec::new();
    let mut disconnects = 0;
    loop {
        match w.next() {
            Ok(Some(Next::Connection(mut c))) => {
                let tcp = c.as_tcp().unwrap();
                tcp.set_read_timeout(Some(LIMIT)).unwrap();
                match &line(&mut c)[..] {
                    b"hold" => {}
                    b"ping" => {
                        let _ = c.write_all(format!("{}\n", w.id()).as_bytes());
                        continue;
                    }
                    _ => return 10,
                }
                held.push(c);
                if w.send(b"holding").is_err() {
                    return 11;
                }
                if then == Then::Disconnect {
                    if w.disconnect().is_err() || !w.is_disconnecting() {
                        return 12;
                    }
                    // Disconnected: nothing more goes to the primary.
                    if w.send(b"late") != Err(Error::Closed) {
                        return 13;
                    }
                    // A second call does nothing.
                    if w.disconnect().is_err() {
                        return 14;
                    }
                }
            }
            Ok(Some(Next::Message(_))) => {}
            Ok(Some(Next::Disconnect)) => {
                disconnects += 1;
                if then == Then::Disconnect {
                    // Not after the worker's own disconnect.
                    return 15;
                }
            }
            // The channel closed after the disconnect: what was queued was read.
            Ok(None) => break,
            Err(_) => return 16,
        }
    }
    if then == Then::Wait && disconnects != 1 {
        return 17;
    }
    for mut c in held {
        if line(&mut c) != b"finish" {
            return 18;
        }
        if c.write_all(REPLY).is_err() {
            return 19;
        }
    }
    0
}

/// Starts a client, and pumps until a worker says it holds the connection; returns the
/// client and that worker's id.
fn hold(p: &mut Primary, rec: &mut Rec) -> (Client, u32) {
    let client = Client::start(addr_of(p));
    let mut id = 0;
    until(p, rec, LIMIT, |e| match e {
        E::Message(i, m) if m == b"holding" => {
            id = *i;
            true
        }
        _ => false,
    });
    (client, id)
}

/// Checks what the primary showed of a worker at its `Disconnect`, when it is still finishing.
fn check_still_finishing(rec: &Rec, id: u32) {
    let at = rec.at[&id];
    assert!(at.alive, "worker {id} is alive at its Disconnect: {at:?}");
    assert_eq!(
        at.row,
        Some((false, true, State::Disconnecting)),
        "worker {id}'s row at its Disconnect: not connected, exited after disconnect"
    );
    assert_eq!(at.send, Err(Error::Closed), "send to a disconnected worker");
}

// ---------------------------------------------------------------------------------------------
// The paths.

/// test-cluster-worker-no-exit.js, and the worker's own `disconnect()`: the primary reports
/// `Disconnect` while the worker holds a connection, the worker serves it to the end, and its
/// `Exit` comes only after, as one after a disconnect. It counts until it is gone: no
/// replacement before its exit; one (respawn is on) after it.
fn worker_disconnect_keeps_serving_what_it_holds() {
    let mut p = Cluster::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .workers(1)
        .backoff(MS50, MS50, Duration::from_secs(1))
        .start(|w: Worker| holder(w, Then::Disconnect))
        .unwrap();
    let mut rec = Rec::default();
    wait_listening(&mut p, &mut rec, 1);
    let (mut client, _) = hold(&mut p, &mut rec);
    until(&mut p, &mut rec, LIMIT, |e| *e == E::Disconnect(1));
    check_still_finishing(&rec, 1);
    // It keeps the connection as long as the client does: no exit, no replacement.
    let later = settle(&mut p, &mut rec, Duration::from_millis(500));
    assert!(later.is_empty(), "nothing while it finishes: {later:?}");
    assert!(util::alive(rec.pids[&1] as i32));
    assert_eq!(p.workers().count(), 1);
    client.release();
    until(&mut p, &mut rec, LIMIT, |e| {
        matches!(e, E::Exit { id: 1, .. })
    });
    client.served();
    assert_eq!(rec.exit_of(1), (Some(0), None, true));
    assert_eq!(
        rec.kinds(1),
        [
            "fork",
            "online",
            "listening",
            "message",
            "disconnect",
            "exit"
        ]
    );
    // Replaced once gone, not before.
    until(&mut p, &mut rec, LIMIT, |e| *e == E::Listening(2));
    assert!(
        exit_pos(&rec, 1) < rec.pos(&E::Fork(2)),
        "the replacement is forked after the exit: {:?}",
        rec.log
    );
    assert_eq!(p.stats().crashes, 0, "a disconnect is not a crash");
    finish(p);
}

/// test-cluster-net-server-drop-connection.js's disconnect, from the primary: `disconnect(id)`
/// while the worker holds a connection. `Disconnect` comes when the worker took the request
/// (its `next` returned `Next::Disconnect` and it answered), before the held connection is
/// finished; `Exit` after it. Asked to leave: not replaced.
fn primary_disconnect_is_reported_when_the_worker_takes_it() {
    let mut p = Cluster::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .workers(2)
        .start(|w: Worker| holder(w, Then::Wait))
        .unwrap();
    let mut rec = Rec::default();
    wait_listening(&mut p, &mut rec, 2);
    let (mut client, a) = hold(&mut p, &mut rec);
    let b = 3 - a;
    p.disconnect(a).unwrap();
    until(&mut p, &mut rec, LIMIT, |e| *e == E::Disconnect(a));
    check_still_finishing(&rec, a);
    let later = settle(&mut p, &mut rec, Duration::from_millis(500));
    assert!(later.is_empty(), "nothing while it finishes: {later:?}");
    client.release();
    until(
        &mut p,
        &mut rec,
        LIMIT,
        |e| matches!(e, E::Exit { id, .. } if *id == a),
    );
    client.served();
    assert_eq!(rec.exit_of(a), (Some(0), None, true));
    assert_eq!(
        rec.kinds(a),
        [
            "fork",
            "online",
            "listening",
            "message",
            "disconnect",
            "exit"
        ]
    );
    let later = settle(&mut p, &mut rec, Duration::from_millis(300));
    assert!(
        !later.iter().any(|e| matches!(e, E::Fork(_))),
        "asked to leave: not replaced: {later:?}"
    );
    assert_eq!(p.wanted_workers(), 1);
    // The other worker was not touched.
    assert_eq!(rec.kinds(b), ["fork", "online", "listening"]);
    assert!(p.worker(b).is_some_and(|w| w.connected));
    finish(p);
}

/// test-cluster-kill-disconnect.js: from inside the worker, `disconnect()` (then waiting for
/// the channel's end) and `disconnect()` followed by an immediate exit (Node's worker-side
/// `kill()`) both give `Disconnect` then `Exit`, with `exited_after_disconnect` true at both.
fn worker_disconnect_and_disconnect_then_exit_are_both_after_disconnect() {
    let mut p = Cluster::builder()
        .workers(2)
        .respawn(false)
        .start(|mut w: Worker| -> i32 {
            let _ = w.next(); // announce, take the go message
            if w.disconnect().is_err() {
                return 20;
            }
            if w.id() == 2 {
                // Node's worker.kill(): gone right after the disconnect.
                return 0;
            }
            // Node's worker.disconnect(): the loop ends once the primary closed its end.
            loop {
                match w.next() {
                    Ok(None) => return 0,
                    Ok(Some(Next::Disconnect)) => return 21,
                    Ok(Some(_)) => {}
                    Err(_) => return 22,
                }
            }
        })
        .unwrap();
    let mut rec = Rec::default();
    let mut online = 0;
    until(&mut p, &mut rec, LIMIT, |e| {
        online += usize::from(matches!(e, E::Online(_)));
        online == 2
    });
    p.broadcast(b"go").unwrap();
    let mut exits = 0;
    until(&mut p, &mut rec, LIMIT, |e| {
        exits += usize::from(matches!(e, E::Exit { .. }));
        exits == 2
    });
    for id in [1, 2] {
        assert_eq!(
            rec.kinds(id),
            ["fork", "online", "disconnect", "exit"],
            "worker {id}: {:?}",
            rec.log
        );
        let at = rec.at[&id];
        if id == 1 {
            // It waits for the end of its channel, which the primary closes at its `Close`:
            // still in the table at its `Disconnect` (and maybe exited already).
            assert!(
                matches!(at.row, Some((false, true, _))),
                "worker {id}: exited_after_disconnect at its Disconnect: {at:?}"
            );
        } else {
            // Gone right after its `Close`: the primary may have reaped it before it read that,
            // and then both events come together (the row is gone at the `Disconnect`).
            assert!(
                matches!(at.row, None | Some((false, true, _))),
                "worker {id}: exited_after_disconnect at its Disconnect: {at:?}"
            );
        }
        assert_eq!(rec.exit_of(id), (Some(0), None, true), "worker {id}");
    }
    assert_eq!(forks_after(&mut p, &mut rec), 0, "respawn is off");
    finish(p);
}

/// Pumps for a while once the last worker is gone; returns the forks seen (none is wanted).
fn forks_after(p: &mut Primary, rec: &mut Rec) -> usize {
    assert_eq!(p.workers().count(), 0, "{:?}", rec.log);
    settle(p, rec, Duration::from_millis(300))
        .iter()
        .filter(|e| matches!(e, E::Fork(_)))
        .count()
}

fn exit_pos(rec: &Rec, id: u32) -> usize {
    rec.log
        .iter()
        .position(|e| matches!(e, E::Exit { id: i, .. } if *i == id))
        .unwrap_or_else(|| panic!("no exit of worker {id}: {:?}", rec.log))
}

/// `kill` is not a disconnect: the worker dies by the signal holding its connection, and its
/// `Disconnect` and `Exit` come together, at its exit (it is gone at its `Disconnect`), not
/// after a disconnect. Respawn is on: replaced. The same for a worker that was disconnecting:
/// `Disconnect` when it answered, `Exit` (after a disconnect, by the signal) at the kill.
fn kill_reports_disconnect_and_exit_together_at_exit() {
    let mut p = Cluster::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .workers(2)
        .backoff(MS50, MS50, Duration::from_secs(1))
        .start(|w: Worker| holder(w, Then::Wait))
        .unwrap();
    let mut rec = Rec::default();
    wait_listening(&mut p, &mut rec, 2);
    let (client, a) = hold(&mut p, &mut rec);
    p.kill(a, forkcluster::Signal::TERM).unwrap();
    until(
        &mut p,
        &mut rec,
        LIMIT,
        |e| matches!(e, E::Exit { id, .. } if *id == a),
    );
    let d = rec.pos(&E::Disconnect(a));
    assert!(
        matches!(rec.log[d + 1], E::Exit { id, .. } if id == a),
        "Disconnect and Exit together: {:?}",
        rec.log
    );
    assert!(!rec.at[&a].alive, "gone at its Disconnect");
    assert_eq!(rec.exit_of(a), (None, Some(libc::SIGTERM), false));
    assert_eq!(
        rec.kinds(a),
        [
            "fork",
            "online",
            "listening",
            "message",
            "disconnect",
            "exit"
        ]
    );
    // The client's connection died with the worker.
    client.lost();
    until(&mut p, &mut rec, LIMIT, |e| *e == E::Listening(3));

    // A worker holding a connection is asked to leave: `Disconnect` at its answer; then killed
    // while it finishes: `Exit` by the signal, still after a disconnect.
    let (client, b) = hold(&mut p, &mut rec);
    p.disconnect(b).unwrap();
    until(&mut p, &mut rec, LIMIT, |e| *e == E::Disconnect(b));
    check_still_finishing(&rec, b);
    p.kill(b, forkcluster::Signal::KILL).unwrap();
    until(
        &mut p,
        &mut rec,
        LIMIT,
        |e| matches!(e, E::Exit { id, .. } if *id == b),
    );
    assert_eq!(rec.exit_of(b), (None, Some(libc::SIGKILL), true));
    assert_eq!(
        rec.kinds(b),
        [
            "fork",
            "online",
            "listening",
            "message",
            "disconnect",
            "exit"
        ]
    );
    client.lost();
    finish(p);
}

/// Node's test-cluster-disconnect-exitedAfterDisconnect-exit: a worker function that returns
/// (without a disconnect) is an exit nobody asked for: `Disconnect` and `Exit` together at its
/// exit, not after a disconnect, and replaced.
fn worker_returning_reports_disconnect_and_exit_together() {
    let mut p = Cluster::builder()
        .workers(1)
        .backoff(MS50, MS50, Duration::from_secs(1))
        .start(|mut w: Worker| -> i32 {
            let _ = w.next(); // announce, take the go message
            if w.id() == 1 {
                0
            } else {
                while let Ok(Some(_)) = w.next() {}
                0
            }
        })
        .unwrap();
    let mut rec = Rec::default();
    until(&mut p, &mut rec, LIMIT, |e| *e == E::Online(1));
    p.send(1, b"go").unwrap();
    until(&mut p, &mut rec, LIMIT, |e| *e == E::Online(2));
    let d = rec.pos(&E::Disconnect(1));
    assert_eq!(
        rec.log[d + 1],
        E::Exit {
            id: 1,
            code: Some(0),
            signal: None,
            after: false
        },
        "{:?}",
        rec.log
    );
    assert!(!rec.at[&1].alive);
    assert_eq!(rec.kinds(1), ["fork", "online", "disconnect", "exit"]);
    assert!(rec.pos(&E::Fork(2)) > d + 1, "replaced after its exit");
    finish(p);
}

/// A graceful stop disconnects every worker: each `Disconnect` comes when that worker took the
/// request, while it still holds its connection; the `Exit`s follow as each finishes; then the
/// cluster ends.
fn graceful_stop_reports_each_disconnect_before_the_exits() {
    let mut p = Cluster::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .workers(2)
        .start(|w: Worker| holder(w, Then::Wait))
        .unwrap();
    let mut rec = Rec::default();
    wait_listening(&mut p, &mut rec, 2);
    let (mut c1, a) = hold(&mut p, &mut rec);
    let (mut c2, b) = hold(&mut p, &mut rec);
    assert_eq!(a + b, 3, "round-robin: one connection each");
    p.stop(true);
    let mut n = 0;
    until(&mut p, &mut rec, LIMIT, |e| {
        n += usize::from(matches!(e, E::Disconnect(_)));
        n == 2
    });
    for id in [1, 2] {
        check_still_finishing(&rec, id);
    }
    let later = settle(&mut p, &mut rec, Duration::from_millis(300));
    assert!(later.is_empty(), "nothing while they finish: {later:?}");
    c1.release();
    until(
        &mut p,
        &mut rec,
        LIMIT,
        |e| matches!(e, E::Exit { id, .. } if *id == a),
    );
    c2.release();
    until(&mut p, &mut rec, LIMIT, |e| *e == E::Done);
    c1.served();
    c2.served();
    for id in [1, 2] {
        assert_eq!(
            rec.kinds(id),
            [
                "fork",
                "online",
                "listening",
                "message",
                "disconnect",
                "exit"
            ]
        );
        assert_eq!(rec.exit_of(id), (Some(0), None, true));
    }
    // Stopping, both disconnects (while both finish), then the exits.
    let last_disconnect = rec.pos(&E::Disconnect(1)).max(rec.pos(&E::Disconnect(2)));
    assert!(rec.pos(&E::Stopping) < last_disconnect);
    assert!(last_disconnect < exit_pos(&rec, 1).min(exit_pos(&rec, 2)));
    finish(p);
}

/// A rolling restart: the new worker listens, the old one is asked to leave, and its
/// `Disconnect` comes when it took the request, while it finishes its connection, after the
/// `Restart` event; its `Exit` after the client was served.
fn rolling_restart_disconnects_the_old_worker_while_it_finishes() {
    let mut p = Cluster::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .workers(1)
        .start(|w: Worker| holder(w, Then::Wait))
        .unwrap();
    let mut rec = Rec::default();
    wait_listening(&mut p, &mut rec, 1);
    let (mut client, _) = hold(&mut p, &mut rec);
    p.restart();
    until(&mut p, &mut rec, LIMIT, |e| *e == E::Disconnect(1));
    check_still_finishing(&rec, 1);
    assert!(rec.pos(&E::Listening(2)) < rec.pos(&E::Restart { old: 1, new: 2 }));
    assert!(rec.pos(&E::Restart { old: 1, new: 2 }) < rec.pos(&E::Disconnect(1)));
    let later = settle(&mut p, &mut rec, Duration::from_millis(300));
    assert!(
        !later
            .iter()
            .any(|e| matches!(e, E::Exit { .. } | E::Fork(_))),
        "nothing while it finishes: {later:?}"
    );
    client.release();
    until(&mut p, &mut rec, LIMIT, |e| {
        matches!(e, E::Exit { id: 1, .. })
    });
    client.served();
    assert_eq!(rec.exit_of(1), (Some(0), None, true));
    assert_eq!(
        rec.kinds(1),
        [
            "fork",
            "online",
            "listening",
            "message",
            "disconnect",
            "exit"
        ]
    );
    assert!(rec.log.contains(&E::RestartDone));
    assert_eq!(rec.kinds(2), ["fork", "online", "listening"]);
    finish(p);
}

/// A worker that is asked to leave but never reads its channel again (it is busy, or speaks
/// the wire without answering) cannot take the request: its `Disconnect` comes at its exit,
/// right before `Exit`, and that exit is still one after a disconnect.
fn a_worker_that_never_answers_is_disconnected_at_exit() {
    let mut p = Cluster::builder()
        .workers(1)
        .graceful_timeout(Duration::from_millis(400))
        .start(|mut w: Worker| -> i32 {
            let _ = w.next(); // announce, take the go message
            std::thread::sleep(Duration::from_secs(60));
            0
        })
        .unwrap();
    let mut rec = Rec::default();
    until(&mut p, &mut rec, LIMIT, |e| *e == E::Online(1));
    p.send(1, b"go").unwrap();
    // Let it take the message, then ask it to leave.
    let _ = settle(&mut p, &mut rec, Duration::from_millis(100));
    p.disconnect(1).unwrap();
    let t0 = Instant::now();
    until(&mut p, &mut rec, LIMIT, |e| {
        matches!(e, E::Exit { id: 1, .. })
    });
    assert!(
        t0.elapsed() >= Duration::from_millis(350),
        "killed at its timeout"
    );
    let d = rec.pos(&E::Disconnect(1));
    assert!(
        matches!(rec.log[d + 1], E::Exit { id: 1, .. }),
        "{:?}",
        rec.log
    );
    assert!(!rec.at[&1].alive);
    assert_eq!(rec.exit_of(1), (None, Some(libc::SIGKILL), true));
    assert_eq!(rec.kinds(1), ["fork", "online", "disconnect", "exit"]);
    assert_eq!(forks_after(&mut p, &mut rec), 0);
    finish(p);
}

/// `n` connections in a forked client, one after the other, each sending `ping`; returns the
/// ids that answered (pumping the primary meanwhile).
fn pings(p: &mut Primary, rec: &mut Rec, n: usize) -> Vec<u32> {
    let addr = addr_of(p);
    let (r, w) = pipe();
    let wfd = w.as_raw_fd();
    let pid = util::fork_child(move || {
        close_all_but(&[0, 1, 2, wfd]);
        let mut out = File::from(w);
        for _ in 0..n {
            let Ok(mut s) = TcpStream::connect(addr) else {
                return 2;
            };
            s.set_read_timeout(Some(LIMIT)).unwrap();
            let mut reply = String::new();
            if s.write_all(b"ping\n").is_err() || s.read_to_string(&mut reply).is_err() {
                return 3;
            }
            if out.write_all(reply.as_bytes()).is_err() {
                return 4;
            }
        }
        0
    });
    // (The parent's copy of the write end went with the closure.)
    let end = Instant::now() + LIMIT;
    loop {
        let mut st = 0;
        // SAFETY: waitpid on the child this test forked.
        if unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) } == pid {
            assert!(
                libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
                "pinger {st:#x}"
            );
            break;
        }
        assert!(Instant::now() < end, "pinger did not finish: {:?}", rec.log);
        step(p, rec);
    }
    let mut text = String::new();
    File::from(r).read_to_string(&mut text).unwrap();
    text.lines().map(|l| l.parse().unwrap()).collect()
}

/// Once a worker disconnected itself, it takes no new connection (round-robin: the primary
/// hands it none; shared: it closed its copies of the listeners): every new client is answered
/// by the other worker while the first still finishes the one it holds.
fn no_new_connections(schedule: Schedule) {
    let mut p = Cluster::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .workers(2)
        .schedule(schedule)
        .start(|w: Worker| holder(w, Then::Disconnect))
        .unwrap();
    let mut rec = Rec::default();
    wait_listening(&mut p, &mut rec, 2);
    // Whichever worker holds the first connection disconnects itself.
    let (mut client, a) = hold(&mut p, &mut rec);
    let b = 3 - a;
    until(&mut p, &mut rec, LIMIT, |e| *e == E::Disconnect(a));
    check_still_finishing(&rec, a);
    assert_eq!(pings(&mut p, &mut rec, 8), [b; 8], "{:?}", rec.log);
    assert!(util::alive(rec.pids[&a] as i32), "still finishing");
    assert_eq!(p.workers().count(), 2, "not replaced while it finishes");
    client.release();
    until(
        &mut p,
        &mut rec,
        LIMIT,
        |e| matches!(e, E::Exit { id, .. } if *id == a),
    );
    client.served();
    assert_eq!(rec.exit_of(a), (Some(0), None, true));
    assert_eq!(
        rec.kinds(a),
        [
            "fork",
            "online",
            "listening",
            "message",
            "disconnect",
            "exit"
        ]
    );
    finish(p);
}

fn a_disconnected_worker_takes_no_new_connections_rr() {
    no_new_connections(Schedule::RoundRobin);
}

fn a_disconnected_worker_takes_no_new_connections_shared() {
    no_new_connections(Schedule::Shared);
}
