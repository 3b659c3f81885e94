//! Regression tests for issue 9 (hardening): the primary against a hostile or buggy worker, a
//! hostile client and bad timing. Every test is an attack found with a real misbehaving worker
//! (raw frames on its channel, signals to the primary, writes to shared memory, `shutdown`,
//! `SIGSTOP`...) and real TCP clients on 127.0.0.1, and asserts what a correct primary
//! guarantees: counts and orders, never latencies.
//!
//! Runs under the fork-per-test runner of `tests/util` (`harness = false`; `cargo test --test
//! hostile [NAME]`). The primary runs in the test process; clients run in forked children
//! ([`spawn_client`]) while the test pumps the primary's events; workers die with the test
//! (`PR_SET_PDEATHSIG`) and the runner kills the test's process group.
//!
//! On this branch every attack test is registered and FAILS on today's code (commit 5d7665b's
//! `src/`): that is what shows it reaches the attack. The fixes of issue 9 make them pass. One
//! test is a guard for a fix (`primary_does_not_steal_an_application_child_status`) and passes
//! today. Run one with `cargo test --test hostile NAME` (substring filter; `--exact`).
//!
//! | test | item | asserts | today (5d7665b) |
//! |---|---|---|---|
//! | `flood_of_messages_delays_a_signal_boundedly` | 1 | worker 1 floods `Message` frames (64 MiB `SO_SNDBUFFORCE`, ~87k queued before the primary reads, 500k in all); SIGTERM to the primary gives `Stopping` after ≤ 10,000 flood events | FAILS: `Stopping` after all 500,000 |
//! | `flood_of_online_frames_delays_a_signal_boundedly` | 1 | same with raw `Online` frames | FAILS: after all 500,000 |
//! | `flood_of_messages_with_fds_delays_a_signal_boundedly` | 1 | same with 8 fds per message | FAILS: after all 500,000 |
//! | `flood_of_messages_delays_an_accept_boundedly` | 1 | same flood; a client connects: it is dispatched after ≤ 10,000 flood events | FAILS: after all 500,000 |
//! | `flood_of_messages_delays_another_workers_message_boundedly` | 1 | same flood; worker 2 sends a message: it arrives after ≤ 10,000 flood events | FAILS: after all 500,000 |
//! | `socketpair_emfile_on_respawn_is_not_an_error_storm` | 2 | primary out of fds, worker SIGKILLed: 0 `Err` from 300 `next_event_timeout(10 ms)` calls; respawned once fds are back | FAILS: 297 of 300 calls `Err(EMFILE)` (at once) |
//! | `full_worker_table_is_not_an_error_storm` | 2 | `max_workers(1)`, the worker sent `Close` and lives on: 0 `Err` in 300 calls | FAILS: 291 of 300 `Err(Capacity("worker table full"))` |
//! | `garbage_then_sleep_is_killed_at_once_and_respawn_backs_off` | 3 | every worker sends garbage at start and sleeps (`fast_timeout` 60 s): ≤ 10 forks in 3 s (backoff 100 ms doubling), worker 1 gone within 3 s | FAILS: 32 forks (table full) in ms, none killed |
//! | `close_frame_then_sleep_is_killed_and_respawn_backs_off` | 3 | same with a `Close` frame (`graceful_timeout` 1 s) | FAILS: 32 forks, none killed |
//! | `shut_wr_then_sleep_is_killed_and_respawn_backs_off` | 3 | same with `shutdown(SHUT_WR)` on the channel | FAILS: 32 forks, none killed |
//! | `forged_heartbeat_does_not_hang_an_honest_worker` | 4 | worker 2 writes "busy" into every beat word of every `rw-s` shared page it has; idle worker 1 is not `Hung` and alive after 3 s (`hang_timeout` 1 s) | FAILS: worker 1 `Hung` + SIGABRT |
//! | `sigttin_from_a_worker_does_not_scale` | 5 | 30 × `kill(getppid(), SIGTTIN)` from worker 2: no `Scale`, 2 workers; the primary's own SIGTTIN still scales | FAILS: 30 `Scale`, 32 workers |
//! | `control_signals_from_a_worker_are_ignored` | 5 | HUP, TTOU, INT, QUIT, TERM from worker 2: no restart, scale, stop, fork or exit | FAILS: restart, scale to 1, fast stop |
//! | `ignored_sigchld_still_reports_exits_and_loses_nothing` | 6 | SIGCHLD `SIG_IGN` before `start`; worker 1 SIGKILLed with 16 queued: `Exit` seen, 0 of 40 lost; `SIG_IGN` restored on drop | FAILS: 16 of 40 lost, no `Exit` |
//! | `stopped_worker_with_queued_connections_is_hung_and_loses_nothing` | 7 | worker 1 SIGSTOPped, 20 connections (10 queued for it), `hang_timeout` 1 s: `Hung`, 0 lost within 10 s | FAILS: 10 of 20 wait 10 s in vain, no `Hung` |
//! | `subreaper_primary_reaps_orphaned_grandchildren` | 8 | `PR_SET_CHILD_SUBREAPER`; a worker's orphaned grandchild exits: no zombie left (`waitid(WNOWAIT)`) | FAILS: zombie left |
//! | `pid1_primary_reaps_orphaned_grandchildren` | 8 | same with the primary as PID 1 of a new PID namespace (skips if `unshare` fails) | FAILS: zombie left |
//! | `primary_does_not_steal_an_application_child_status` | 8 (guard) | not a subreaper: the application's own child keeps its status for its `waitpid` | passes (guard for the fix) |
//! | `emfile_while_recovering_a_dead_workers_queue_loses_nothing` | 9 | primary out of fds when it recovers a SIGKILLed worker's 15 queued connections: 0 of 30 lost | FAILS: 15 of 30 lost, 0 recovered |
//! | `emfile_in_a_worker_loses_no_connection` | 9 | worker out of fds when a connection arrives (it frees them after an error and calls `next` again): the client is answered | FAILS: `next` errs (`MSG_CTRUNC`), connection lost |
//! | `drop_leaves_a_replaced_socket_path_alone` | 10 | someone else's socket replaced the path: dropping the primary leaves it | FAILS: unlinked |
//! | `stale_socket_file_does_not_block_start` | 10 | a live socket at the path: `EADDRINUSE`, untouched (guard); a stale file: `start` works and serves | FAILS: stale file gives `EADDRINUSE` |
//! | `graceful_stop_closes_the_listening_port` | 11 | after a graceful stop (at `Stopping`, and once `None`): connect is refused, the port binds again | FAILS: connect succeeds, bind `EADDRINUSE` |
//! | `huge_fast_timeout_and_a_bad_frame_do_not_panic` | 12 | `fast_timeout(MAX)` + a bad frame: no panic | FAILS: panic "overflow when adding duration to instant" |
//! | `huge_fast_timeout_and_a_fast_stop_do_not_panic` | 12 | `fast_timeout(MAX)` + `stop(false)`: no panic | FAILS: same panic |
//! | `huge_graceful_timeout_and_a_disconnect_do_not_panic` | 12 | `graceful_timeout(MAX)` + `disconnect`: no panic | FAILS: same panic |
//! | `huge_backoff_and_a_crash_do_not_panic` | 12 | `backoff(MAX, MAX, 10 s)`: a serving worker killed, then a start-up crash: no panic | FAILS: same panic (at the first) |
//! | `extreme_max_requests_do_not_panic` | 12 | `max_requests(10, u64::MAX)`, `max_requests(u64::MAX, 2^62)`: `start` does not panic | FAILS: both panic "attempt to add with overflow" (debug) |
//! | `max_workers_beyond_the_token_field_is_refused` | 12 | `max_workers(2^24 + 1)` and `max_workers(usize::MAX)`: `start` returns `Invalid`/`Capacity` | FAILS: 2^24+1 aborts (allocation of 2 GiB under `RLIMIT_AS` 4 GiB), `usize::MAX` panics (overflow) |
//! | `failed_start_restores_the_signal_mask_and_removes_the_socket_file` | 13 | `start` fails after blocking signals (mmap `ENOMEM` under `RLIMIT_AS`): mask as before, no socket file | FAILS: mask 0x0 → 0x62800e, socket file left |
//! | `graceful_stop_with_full_queues_answers_every_accepted_connection` | 13 | both workers stop reading for 3 s, queues full, 40 accepted; graceful stop: 0 lost | FAILS: `stop()` blocks 1 s, then drops 28 of 40 |
//! | `shared_listener_shut_down_by_a_worker_is_recreated` | 14 | shared schedule; worker 1 `shutdown(SHUT_RD)`s the listener: clients served again within 5 s | FAILS: connection refused for good |
//!
//! Root is needed by the flood tests (`SO_SNDBUFFORCE`; they skip without `CAP_NET_ADMIN`) and
//! the PID 1 test (`unshare(CLONE_NEWPID)`; it skips if refused); the others run as any user
//! (the EMFILE tests lower only the soft fd limit).
//!
//! Not here, and why (see also `tests/hostile_api.rs`, not registered: tests that need new API —
//! `Builder::unix_mode`, `ClusterStats::ignored_signals`, `Event::SpawnFailed`,
//! `Worker::disconnect`):
//! * item 6's "signals later aimed at a reused pid": needs pid reuse on demand;
//! * item 13: the epoll add failing after fork (only a global `max_user_watches` sysctl injects
//!   it), a send error other than `EAGAIN` (none can be injected but `EPIPE` from a worker's
//!   `SHUT_RD`, whose outcome the issue does not fix), O(workers) work per event and the
//!   unbounded stop-time accept loop and `Drop`'s `waitpid` (only measurable as time or with
//!   ptrace, not as a count);
//! * item 15 is the fuzz target's own start-up probe, not a test of `tests/`.

mod util;

use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use forkcluster::frame::{Frame, Kind, HEADER_LEN};
use forkcluster::{Cluster, Error, Event, ListenAddr, Next, Primary, Schedule, Worker};

fn main() {
    // Workers killed with SIGABRT (hung) must not write core files into the crate.
    let core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: libc::RLIM_INFINITY,
    };
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &core) };
    util::run(tests![
        // 1. frame floods
        flood_of_messages_delays_a_signal_boundedly => 60,
        flood_of_online_frames_delays_a_signal_boundedly => 60,
        flood_of_messages_with_fds_delays_a_signal_boundedly => 90,
        flood_of_messages_delays_an_accept_boundedly => 60,
        flood_of_messages_delays_another_workers_message_boundedly => 60,
        // 2. respawn failures
        socketpair_emfile_on_respawn_is_not_an_error_storm,
        full_worker_table_is_not_an_error_storm,
        // 3. misbehaving workers and the backoff
        garbage_then_sleep_is_killed_at_once_and_respawn_backs_off,
        close_frame_then_sleep_is_killed_and_respawn_backs_off,
        shut_wr_then_sleep_is_killed_and_respawn_backs_off,
        // 4. heartbeat page
        forged_heartbeat_does_not_hang_an_honest_worker,
        // 5. signals from workers
        sigttin_from_a_worker_does_not_scale,
        control_signals_from_a_worker_are_ignored,
        // 6. SIGCHLD ignored
        ignored_sigchld_still_reports_exits_and_loses_nothing => 40,
        // 7. stopped worker
        stopped_worker_with_queued_connections_is_hung_and_loses_nothing => 40,
        // 8. orphans
        subreaper_primary_reaps_orphaned_grandchildren,
        pid1_primary_reaps_orphaned_grandchildren,
        primary_does_not_steal_an_application_child_status,
        // 9. EMFILE
        emfile_while_recovering_a_dead_workers_queue_loses_nothing => 40,
        emfile_in_a_worker_loses_no_connection,
        // 10. Unix socket paths
        drop_leaves_a_replaced_socket_path_alone,
        stale_socket_file_does_not_block_start,
        // 11. listeners after stop
        graceful_stop_closes_the_listening_port,
        // 12. overflows
        huge_fast_timeout_and_a_bad_frame_do_not_panic,
        huge_fast_timeout_and_a_fast_stop_do_not_panic,
        huge_graceful_timeout_and_a_disconnect_do_not_panic,
        huge_backoff_and_a_crash_do_not_panic,
        extreme_max_requests_do_not_panic,
        max_workers_beyond_the_token_field_is_refused,
        // 13. smaller ones
        failed_start_restores_the_signal_mask_and_removes_the_socket_file,
        graceful_stop_with_full_queues_answers_every_accepted_connection => 40,
        // 14. shared schedule
        shared_listener_shut_down_by_a_worker_is_recreated,
    ])
}

// ---------------------------------------------------------------------------------------------
// Events, owned, so that the primary can be used again while a test looks at them.

#[derive(Debug)]
#[allow(dead_code)]
enum E {
    Fork {
        id: u32,
        pid: u32,
    },
    Online(u32),
    Listening(u32),
    Message {
        id: u32,
        payload: Vec<u8>,
    },
    Disconnect(u32),
    Exit {
        id: u32,
        pid: u32,
        code: Option<i32>,
        signal: Option<i32>,
        after: bool,
    },
    WorkerError(u32, Error),
    Backoff(Duration),
    Hung(u32),
    Scale(usize),
    Restart,
    Stopping(bool),
    AcceptPaused,
    Other(String),
    Idle,
    /// `next_event` returned `None`.
    Done,
    /// `next_event` returned an error.
    Failed(Error),
}

fn own(e: Event<'_>) -> E {
    match e {
        Event::Fork { id, pid } => E::Fork { id, pid },
        Event::Online { id } => E::Online(id),
        Event::Listening { id, .. } => E::Listening(id),
        Event::Message { id, payload, .. } => E::Message {
            id,
            payload: payload.to_vec(),
        },
        Event::Disconnect { id } => E::Disconnect(id),
        Event::Exit {
            id,
            pid,
            status,
            exited_after_disconnect,
        } => E::Exit {
            id,
            pid,
            code: status.code(),
            signal: status.signal(),
            after: exited_after_disconnect,
        },
        Event::WorkerError { id, error } => E::WorkerError(id, error),
        Event::Backoff { delay } => E::Backoff(delay),
        Event::Hung { id } => E::Hung(id),
        Event::Scale { workers } => E::Scale(workers),
        Event::Restart { .. } | Event::RestartDone => E::Restart,
        Event::Stopping { graceful } => E::Stopping(graceful),
        Event::AcceptPaused { .. } => E::AcceptPaused,
        Event::Idle => E::Idle,
        other => E::Other(other.to_string()),
    }
}

/// The next event, or `Idle` after `d`; errors are returned as [`E::Failed`].
fn ev(p: &mut Primary, d: Duration) -> E {
    match p.next_event_timeout(d) {
        Ok(Some(e)) => own(e),
        Ok(None) => E::Done,
        Err(e) => E::Failed(e),
    }
}

fn is_msg(e: &E, from: u32, text: &[u8]) -> bool {
    matches!(e, E::Message { id, payload } if *id == from && payload == text)
}

/// Pumps events into `f` until it returns true; returns every event but `Idle`. Panics after
/// `limit`, on an error of the primary, and when the cluster ends unless `f` accepted that.
fn pump(p: &mut Primary, limit: Duration, mut f: impl FnMut(&mut Primary, &E) -> bool) -> Vec<E> {
    let end = Instant::now() + limit;
    let mut log = Vec::new();
    loop {
        assert!(
            Instant::now() < end,
            "timed out after {limit:?} waiting for events; seen: {log:?}"
        );
        let e = ev(p, Duration::from_millis(20));
        if let E::Failed(err) = &e {
            panic!("next_event failed: {err}; seen: {log:?}");
        }
        let hit = f(p, &e);
        let done = matches!(e, E::Done);
        if !matches!(e, E::Idle) {
            log.push(e);
        }
        if hit {
            return log;
        }
        assert!(
            !done,
            "the cluster ended while events were awaited: {log:?}"
        );
    }
}

/// Everything seen in a window of time, errors included (counted, and the first few kept).
struct Window {
    events: Vec<E>,
    errors: u64,
}

impl Window {
    fn count(&self, f: impl Fn(&E) -> bool) -> usize {
        self.events.iter().filter(|e| f(e)).count()
    }
    fn forks(&self) -> usize {
        self.count(|e| matches!(e, E::Fork { .. }))
    }
    fn summary(&self) -> String {
        let mut s = format!("{} errors; events:", self.errors);
        for e in self.events.iter().take(120) {
            s.push_str(&format!("\n    {e:?}"));
        }
        if self.events.len() > 120 {
            s.push_str(&format!("\n    ... {} more", self.events.len() - 120));
        }
        s
    }
}

/// Pumps for `d` whatever comes. An error of the primary is counted and the loop goes on after
/// a millisecond (an application that retries), so that an error storm cannot spin the test.
fn window(p: &mut Primary, d: Duration) -> Window {
    let end = Instant::now() + d;
    let mut w = Window {
        events: Vec::new(),
        errors: 0,
    };
    while Instant::now() < end {
        match ev(p, Duration::from_millis(10)) {
            E::Idle => {}
            E::Failed(e) => {
                w.errors += 1;
                if w.errors <= 3 {
                    w.events.push(E::Failed(e));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            E::Done => {
                w.events.push(E::Done);
                break;
            }
            e => w.events.push(e),
        }
    }
    w
}

/// Pumps until `n` workers are ready: listening when the cluster has listeners, else online.
/// Returns `(id, pid)` of every fork seen, in order.
fn wait_ready(p: &mut Primary, n: usize) -> Vec<(u32, u32)> {
    let listeners = p.listen_addrs().count() > 0;
    let mut forks = Vec::new();
    let mut ready = std::collections::BTreeSet::new();
    pump(p, Duration::from_secs(10), |_, e| {
        match e {
            E::Fork { id, pid } => forks.push((*id, *pid)),
            E::Online(id) if !listeners => {
                ready.insert(*id);
            }
            E::Listening(id) => {
                ready.insert(*id);
            }
            E::Exit { id, .. } => panic!("worker {id} exited during start-up: {e:?}"),
            _ => {}
        }
        ready.len() >= n
    });
    forks
}

fn pid_of(forks: &[(u32, u32)], id: u32) -> u32 {
    forks
        .iter()
        .find(|f| f.0 == id)
        .map(|f| f.1)
        .unwrap_or_else(|| panic!("no fork of worker {id}: {forks:?}"))
}

// ---------------------------------------------------------------------------------------------
// Small system helpers.

fn lo0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn tcp_addr(p: &Primary) -> SocketAddr {
    match p.listen_addrs().next() {
        Some(ListenAddr::Tcp(a)) => *a,
        other => panic!("listener 0 is not TCP: {other:?}"),
    }
}

fn me() -> i32 {
    unsafe { libc::getpid() }
}

fn kill(pid: u32, sig: i32) {
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap()
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// Sleeps for good: a worker that stopped cooperating.
fn sleep_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Waits up to `limit` for `fd` to be readable.
fn readable(fd: BorrowedFd<'_>, limit: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = limit.as_millis().min(i32::MAX as u128) as i32;
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// Reads exactly 8 bytes (a little-endian u64) from a pipe within `limit`.
fn read_u64(fd: &OwnedFd, limit: Duration) -> u64 {
    let end = Instant::now() + limit;
    let mut b = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        let left = end.saturating_duration_since(Instant::now());
        assert!(
            readable(fd.as_fd(), left),
            "nothing on the note pipe within {limit:?}"
        );
        let n = unsafe { libc::read(fd.as_raw_fd(), b[got..].as_mut_ptr().cast(), 8 - got) };
        assert!(n > 0, "note pipe closed");
        got += n as usize;
    }
    u64::from_le_bytes(b)
}

fn write_u64(fd: RawFd, v: u64) {
    let b = v.to_le_bytes();
    unsafe { libc::write(fd, b.as_ptr().cast(), 8) };
}

/// `setsockopt(SO_SNDBUFFORCE)` (root): lets a sender queue far more than `wmem_max`.
fn sndbuf_force(fd: BorrowedFd<'_>, bytes: i32) -> bool {
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&bytes as *const i32).cast(),
            4,
        )
    };
    rc == 0
}

fn sockopt_int(fd: RawFd, level: i32, name: i32) -> Option<i32> {
    let mut v: libc::c_int = 0;
    let mut len = 4 as libc::socklen_t;
    let rc = unsafe { libc::getsockopt(fd, level, name, (&mut v as *mut i32).cast(), &mut len) };
    (rc == 0).then_some(v)
}

/// The fds of this process that are sockets with `SO_TYPE == ty` (and, if asked, listening).
fn sockets_of_type(ty: i32, listening: bool) -> Vec<RawFd> {
    util::fds_of(me())
        .into_iter()
        .map(|(fd, _)| fd)
        .filter(|&fd| sockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE) == Some(ty))
        .filter(|&fd| {
            !listening || sockopt_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN) == Some(1)
        })
        .collect()
}

/// A worker's channel to the primary. Round-robin: `Worker::as_fd` is the channel; shared: the
/// one `SOCK_SEQPACKET` socket the worker holds.
fn channel_of(w: &Worker) -> RawFd {
    let fd = w.as_fd().as_raw_fd();
    if sockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE) == Some(libc::SOCK_SEQPACKET) {
        return fd;
    }
    let v = sockets_of_type(libc::SOCK_SEQPACKET, false);
    assert_eq!(v.len(), 1, "worker channel not found: {v:?}");
    v[0]
}

/// The signals blocked in this thread now, as a bit set (bit `n` for signal `n`).
fn blocked_signals() -> u64 {
    let mut set: libc::sigset_t = unsafe { core::mem::zeroed() };
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, core::ptr::null(), &mut set) };
    let mut bits = 0u64;
    for s in 1..64 {
        if unsafe { libc::sigismember(&set, s) } == 1 {
            bits |= 1 << s;
        }
    }
    bits
}

/// Whether this process has an exited, unreaped child (a zombie); its pid. `WNOWAIT` leaves it
/// as it is.
fn any_zombie_child() -> Option<i32> {
    let mut info: libc::siginfo_t = unsafe { core::mem::zeroed() };
    let rc = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if rc != 0 {
        return None;
    }
    let pid = unsafe { info.si_pid() };
    (pid != 0).then_some(pid)
}

/// Takes every free fd slot of this process (soft `RLIMIT_NOFILE` lowered to just above the fds
/// open now, the rest filled with `/dev/null`); gives them back when dropped.
struct FdHog {
    fds: Vec<OwnedFd>,
    old: libc::rlimit,
}

impl FdHog {
    fn fill() -> FdHog {
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) };
        let top = util::fds_of(me()).last().map_or(0, |f| f.0) as libc::rlim_t;
        let lim = libc::rlimit {
            rlim_cur: top + 32,
            rlim_max: old.rlim_max,
        };
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
        let mut fds = Vec::new();
        loop {
            let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                break;
            }
            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        FdHog { fds, old }
    }
}

impl Drop for FdHog {
    fn drop(&mut self) {
        self.fds.clear();
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &self.old) };
    }
}

/// A path for a Unix socket, unique to this test process.
fn sock_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("forkcluster-hostile-{}-{tag}.sock", me()))
}

// ---------------------------------------------------------------------------------------------
// Raw frames: what a hostile worker writes on its channel, bypassing the API.

fn frame_bytes(kind: Kind, payload: &[u8], fds: u8) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_LEN + payload.len()];
    let n = Frame::new(kind, 7, payload)
        .with_fds(fds)
        .encode(&mut b)
        .unwrap();
    b.truncate(n);
    b
}

/// One `sendmsg` of `bytes` with `fds`; `wait` false adds `MSG_DONTWAIT`.
fn raw_send(
    chan: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
    wait: bool,
) -> rustix::io::Result<usize> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(16))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    let flags = if wait {
        SendFlags::NOSIGNAL
    } else {
        SendFlags::NOSIGNAL | SendFlags::DONTWAIT
    };
    rustix::net::sendmsg(chan, &[IoSlice::new(bytes)], &mut control, flags)
}

fn borrow(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY (test code): the fd stays open for the rest of the worker's life.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// What a misbehaving worker does right after it started (before it is ready).
#[derive(Clone, Copy, Debug)]
enum Misbehave {
    /// A datagram that is not a frame.
    Garbage,
    /// A valid `Close` frame: the worker closes the channel but stays alive.
    Close,
    /// `shutdown(SHUT_WR)` on its channel: end of file for the primary, the worker stays alive.
    ShutWr,
}

fn misbehave(chan: RawFd, how: Misbehave) {
    match how {
        Misbehave::Garbage => {
            raw_send(borrow(chan), b"XXXXXXXXXXXXXXXXXXXXXXXX", &[], true).unwrap();
        }
        Misbehave::Close => {
            raw_send(borrow(chan), &frame_bytes(Kind::Close, b"", 0), &[], true).unwrap();
        }
        Misbehave::ShutWr => {
            assert_eq!(unsafe { libc::shutdown(chan, libc::SHUT_WR) }, 0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Workers and clients.

const REPLY_LEN: usize = 64;

/// What a serving worker writes on every connection: its id, padded so that a short read shows.
fn reply(id: u32) -> Vec<u8> {
    let mut r = format!("id={id:05} ").into_bytes();
    r.resize(REPLY_LEN - 1, b'.');
    r.push(b'\n');
    r
}

fn parse_reply(b: &[u8]) -> Option<u32> {
    if b.len() != REPLY_LEN {
        return None;
    }
    let id: u32 = std::str::from_utf8(b.get(3..8)?).ok()?.parse().ok()?;
    (reply(id) == b).then_some(id)
}

/// The serving worker: answers every connection with [`reply`]. Messages: `gate` (answers
/// `gated`, then never reads again), `pause MS` (answers `paused`, stops reading for MS
/// milliseconds), `echo...` (sent back). On `Disconnect` it serves what is still queued, then
/// returns 0.
fn serve(mut w: Worker) -> i32 {
    let id = w.id();
    let r = reply(id);
    loop {
        let cmd = match w.next() {
            Ok(Some(Next::Connection(mut c))) => {
                let _ = c.write_all(&r);
                continue;
            }
            Ok(Some(Next::Message(m))) => m.payload.to_vec(),
            Ok(Some(Next::Disconnect)) => return drain(&mut w),
            Ok(None) => return 0,
            Err(_) => return 1,
        };
        if cmd == b"gate" {
            let _ = w.send(b"gated");
            sleep_forever();
        } else if let Some(ms) = cmd.strip_prefix(b"pause ") {
            let ms: u64 = std::str::from_utf8(ms).unwrap().parse().unwrap();
            let _ = w.send(b"paused");
            sleep_ms(ms);
        } else if cmd.starts_with(b"echo") {
            let _ = w.send(&cmd);
        }
    }
}

/// After `Disconnect`: serve the connections still queued, then leave.
fn drain(w: &mut Worker) -> i32 {
    let r = reply(w.id());
    loop {
        match w.try_next() {
            Ok(Some(Next::Connection(mut c))) => {
                let _ = c.write_all(&r);
            }
            Ok(Some(_)) => {}
            _ => return 0,
        }
    }
}

/// Closes with a reset (`SO_LINGER` 0): no TIME_WAIT left behind.
fn abort_close(s: TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            core::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn connect_all(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {i} to {addr}: {e}")))
        .collect()
}

/// Reads every connection's reply until `end`; one byte per connection: the id of the worker
/// that answered in full, 0 for none (lost: reset, end of file, or nothing by `end`).
fn read_replies(conns: Vec<TcpStream>, end: Instant) -> Vec<u8> {
    conns
        .into_iter()
        .map(|mut c| {
            let left = end
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(10));
            c.set_read_timeout(Some(left)).unwrap();
            let mut b = Vec::new();
            let _ = c.read_to_end(&mut b);
            abort_close(c);
            parse_reply(&b).map_or(0, |id| id as u8)
        })
        .collect()
}

/// Closes every fd of this process but `keep` (in a forked client).
fn close_all_but(keep: &[RawFd]) {
    for (fd, _) in util::fds_of(me()) {
        if !keep.contains(&fd) {
            unsafe { libc::close(fd) };
        }
    }
}

/// A client in a forked child: it writes what it has to say (progress marks, results) on a pipe
/// that the test reads while it pumps the primary.
struct Client {
    pid: i32,
    r: File,
    out: Vec<u8>,
    eof: bool,
    reaped: bool,
}

fn spawn_client(f: impl FnOnce(&mut File)) -> Client {
    let (r, w) = pipe();
    let wfd = w.as_raw_fd();
    let pid = util::fork_child(move || {
        close_all_but(&[0, 1, 2, wfd]);
        let mut file = File::from(w);
        f(&mut file);
        0
    });
    rustix::io::ioctl_fionbio(&r, true).unwrap();
    Client {
        pid,
        r: File::from(r),
        out: Vec::new(),
        eof: false,
        reaped: false,
    }
}

impl Client {
    /// Reads what is there; true once the client closed its pipe (it is done).
    fn done(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        while !self.eof {
            match self.r.read(&mut buf) {
                Ok(0) => self.eof = true,
                Ok(n) => self.out.extend_from_slice(&buf[..n]),
                Err(_) => break,
            }
        }
        self.eof
    }

    /// Waits (without pumping) until the client wrote at least `n` bytes.
    fn wait_bytes(&mut self, n: usize, limit: Duration) {
        let end = Instant::now() + limit;
        while !self.done() && self.out.len() < n {
            assert!(
                Instant::now() < end,
                "client wrote {:?} in {limit:?}",
                self.out
            );
            readable(self.r.as_fd(), Duration::from_millis(20));
        }
        assert!(self.out.len() >= n, "client ended early: {:?}", self.out);
    }

    /// Pumps the primary into `on` until the client is done (at most `limit`); its output.
    fn run(&mut self, p: &mut Primary, limit: Duration, mut on: impl FnMut(&mut Primary, E)) {
        let end = Instant::now() + limit;
        while !self.done() {
            assert!(
                Instant::now() < end,
                "client did not finish within {limit:?}"
            );
            let e = ev(p, Duration::from_millis(5));
            on(p, e);
        }
    }

    /// Waits for the client's exit; its output. Fails if it failed.
    fn finish(mut self) -> Vec<u8> {
        let end = Instant::now() + Duration::from_secs(20);
        while !self.done() {
            assert!(Instant::now() < end, "client did not finish");
            readable(self.r.as_fd(), Duration::from_millis(20));
        }
        // With SIGCHLD ignored the kernel reaps the client itself (ECHILD): its pipe closed,
        // which is all there is to know.
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let mut st = 0;
            let r = unsafe { libc::waitpid(self.pid, &mut st, libc::WNOHANG) };
            if r == self.pid {
                assert!(
                    libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
                    "client failed (wait status {st:#x})"
                );
                break;
            }
            if r < 0 {
                break;
            }
            assert!(Instant::now() < end, "client did not exit");
            sleep_ms(2);
        }
        self.reaped = true;
        std::mem::take(&mut self.out)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if !self.reaped {
            drop(util::KillOnDrop(self.pid));
        }
    }
}

/// The client of the "no request lost" tests: `n` connections, then `C`, then one byte per
/// connection (see [`read_replies`]) read until `secs` after the start.
fn replies_client(addr: SocketAddr, n: usize, secs: u64) -> Client {
    spawn_client(move |out| {
        let end = Instant::now() + Duration::from_secs(secs);
        let conns = connect_all(addr, n);
        out.write_all(b"C").unwrap();
        let ids = read_replies(conns, end);
        out.write_all(&ids).unwrap();
    })
}

/// Ids that answered, from a [`replies_client`]'s output; `lost` is how many got nothing.
fn answered(out: &[u8]) -> (Vec<u8>, usize) {
    assert_eq!(out.first(), Some(&b'C'), "client output {out:?}");
    let ids = out[1..].to_vec();
    let lost = ids.iter().filter(|&&i| i == 0).count();
    (ids, lost)
}

// ---------------------------------------------------------------------------------------------
// 1. One worker floods its channel: the loop must stay fair.

/// Frames the flooder sends in all (it stops then, so that an unfair primary still ends).
const FLOOD_TOTAL: u64 = 500_000;
/// The most flood frames a fair loop may deliver before it looks at another ready fd. Its
/// per-wakeup budget is 64; this leaves two orders of magnitude.
const FLOOD_BOUND: u64 = 10_000;
/// The flooder first fills its channel (`SO_SNDBUFFORCE` 64 MiB) before the test lets the
/// primary read; fewer queued frames than this means the setup failed, not the primary.
const PREFILL_MIN: u64 = 3 * FLOOD_BOUND;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Flood {
    Messages,
    Online,
    MessagesWithFds,
}

/// Fills the channel until `EAGAIN`, writes how many frames that took on `note`, then keeps
/// sending (blocking) up to [`FLOOD_TOTAL`]; stops early if the primary closes the channel.
fn flood(w: &Worker, kind: Flood, note: RawFd) {
    let chan = w.as_fd();
    if !sndbuf_force(chan, 32 << 20) {
        // Not root (CAP_NET_ADMIN): the test skips.
        write_u64(note, u64::MAX);
        return;
    }
    let (bytes, nfds) = match kind {
        Flood::Messages => (frame_bytes(Kind::Message, b"flood", 0), 0),
        Flood::Online => (frame_bytes(Kind::Online, b"", 0), 0),
        Flood::MessagesWithFds => (frame_bytes(Kind::Message, b"flood", 8), 8),
    };
    let pipes: Vec<OwnedFd> = (0..nfds).map(|_| pipe().0).collect();
    let fds: Vec<BorrowedFd<'_>> = pipes.iter().map(|p| p.as_fd()).collect();
    let mut sent = 0u64;
    let mut noted = false;
    while sent < FLOOD_TOTAL {
        match raw_send(chan, &bytes, &fds, noted) {
            Ok(_) => sent += 1,
            Err(rustix::io::Errno::AGAIN) if !noted => {
                write_u64(note, sent);
                noted = true;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => break,
        }
    }
    if !noted {
        write_u64(note, sent);
    }
}

/// The worker of the flood tests: worker 1 floods on `flood`, everyone serves connections.
fn flood_worker(kind: Flood, note: RawFd) -> impl FnMut(Worker) -> i32 {
    move |mut w: Worker| -> i32 {
        let r = reply(w.id());
        loop {
            let cmd = match w.next() {
                Ok(Some(Next::Message(m))) => m.payload.to_vec(),
                Ok(Some(Next::Connection(mut c))) => {
                    let _ = c.write_all(&r);
                    continue;
                }
                _ => return 0,
            };
            if cmd == b"flood" {
                flood(&w, kind, note);
            } else if cmd == b"ping" {
                w.send(b"pong").unwrap();
                write_u64(note, 1);
            }
        }
    }
}

/// What becomes ready behind the flood.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Rival {
    /// SIGTERM for the primary: `Stopping`.
    Signal,
    /// A client connects: it is dispatched.
    Accept,
    /// The other worker sends a message: `Message` from worker 2.
    Worker,
}

/// Worker 1 floods; once its channel holds tens of thousands of frames, something else
/// becomes ready (a [`Rival`]). That must be handled after at most [`FLOOD_BOUND`] flood
/// frames. Today the primary re-reads the flooding channel until it is empty, so it comes after
/// every frame the flooder sends.
fn flood_delays_boundedly(kind: Flood, rival: Rival) {
    let (note_r, note_w) = pipe();
    let mut b = Cluster::builder().workers(2).respawn(false);
    if rival == Rival::Accept {
        b = b.listen(lo0());
    }
    let mut p = b.start(flood_worker(kind, note_w.as_raw_fd())).unwrap();
    drop(note_w);
    wait_ready(&mut p, 2);
    // Until `Idle`: nothing is left of the last epoll batch, so the next `epoll_wait` returns
    // the fds in the order they became ready: the flooding channel first, then the rival.
    let end = Instant::now() + Duration::from_secs(5);
    while !matches!(ev(&mut p, Duration::from_millis(50)), E::Idle) {
        assert!(Instant::now() < end, "setup: the cluster never went idle");
    }
    p.send(1, b"flood").unwrap();
    let prefill = read_u64(&note_r, Duration::from_secs(30));
    if prefill == u64::MAX {
        println!("    skipped: SO_SNDBUFFORCE needs CAP_NET_ADMIN");
        return;
    }
    assert!(
        prefill >= PREFILL_MIN,
        "setup: the flooder queued only {prefill} frames"
    );
    let mut client = None;
    match rival {
        Rival::Signal => kill(me() as u32, libc::SIGTERM),
        Rival::Accept => {
            let addr = tcp_addr(&p);
            let mut c = spawn_client(move |out| {
                let mut s = TcpStream::connect(addr).unwrap();
                out.write_all(b"C").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut b = Vec::new();
                let _ = s.read_to_end(&mut b);
            });
            // Connected: the listener is readable now, behind the flooding channel.
            c.wait_bytes(1, Duration::from_secs(5));
            client = Some(c);
        }
        Rival::Worker => {
            p.send(2, b"ping").unwrap();
            // Worker 2's `pong` is in its channel now, behind the flood.
            assert_eq!(read_u64(&note_r, Duration::from_secs(5)), 1);
        }
    }
    let end = Instant::now() + Duration::from_secs(40);
    let mut flooded = 0u64;
    let mut other = Vec::new();
    loop {
        if rival == Rival::Accept && p.stats().connections >= 1 {
            break;
        }
        assert!(
            Instant::now() < end,
            "nothing but flood in 40 s ({flooded} frames)"
        );
        match p.next_event_timeout(Duration::from_millis(100)) {
            Ok(Some(Event::Message { id: 1, .. })) | Ok(Some(Event::Online { id: 1 })) => {
                flooded += 1
            }
            Ok(Some(Event::Stopping { .. })) if rival == Rival::Signal => break,
            Ok(Some(Event::Message { id: 2, .. })) if rival == Rival::Worker => break,
            Ok(Some(e)) => {
                if other.len() < 20 {
                    other.push(e.to_string());
                }
            }
            Ok(None) => panic!("cluster ended: {other:?}"),
            Err(e) => panic!("next_event failed: {e}"),
        }
    }
    drop(p);
    if let Some(c) = client {
        c.finish();
    }
    let what = match rival {
        Rival::Signal => "SIGTERM (Stopping)",
        Rival::Accept => "a client's connection (dispatch)",
        Rival::Worker => "worker 2's message",
    };
    println!("    {kind:?}: {what} after {flooded} flood frames ({prefill} queued first)");
    assert!(
        flooded <= FLOOD_BOUND,
        "{what} was handled only after {flooded} flood frames of worker 1 ({prefill} were \
         queued when it became ready; bound {FLOOD_BOUND}): one worker starves the loop"
    );
}

fn flood_of_messages_delays_a_signal_boundedly() {
    flood_delays_boundedly(Flood::Messages, Rival::Signal);
}

fn flood_of_online_frames_delays_a_signal_boundedly() {
    flood_delays_boundedly(Flood::Online, Rival::Signal);
}

fn flood_of_messages_with_fds_delays_a_signal_boundedly() {
    flood_delays_boundedly(Flood::MessagesWithFds, Rival::Signal);
}

fn flood_of_messages_delays_an_accept_boundedly() {
    flood_delays_boundedly(Flood::Messages, Rival::Accept);
}

fn flood_of_messages_delays_another_workers_message_boundedly() {
    flood_delays_boundedly(Flood::Messages, Rival::Worker);
}

// ---------------------------------------------------------------------------------------------
// 2. A failed respawn is a supervision event, not an error storm.

/// The worker of a cluster without listeners: serves messages until disconnected.
fn idle_worker(mut w: Worker) -> i32 {
    loop {
        match w.next() {
            Ok(Some(Next::Disconnect)) | Ok(None) => return 0,
            Ok(Some(_)) => {}
            Err(_) => return 1,
        }
    }
}

/// Calls `next_event_timeout(10 ms)` `calls` times; the errors, and the first one.
fn count_errors(p: &mut Primary, calls: usize) -> (usize, Option<Error>, Vec<String>) {
    let mut errs = 0;
    let mut first = None;
    let mut seen = Vec::new();
    for _ in 0..calls {
        match p.next_event_timeout(Duration::from_millis(10)) {
            Err(e) => {
                errs += 1;
                first.get_or_insert(e);
            }
            Ok(Some(Event::Idle)) => {}
            Ok(Some(e)) => seen.push(e.to_string()),
            Ok(None) => break,
        }
    }
    (errs, first, seen)
}

/// The primary is out of fds when a crashed worker is to be respawned: `socketpair` fails with
/// `EMFILE`. Correct: reported, backed off, retried; `next_event` keeps returning events (an
/// application that uses `?` must not exit), and the worker is respawned once fds are back.
/// Today `on_tick` returns the error before it reschedules the tick: every later call fails at
/// once.
fn socketpair_emfile_on_respawn_is_not_an_error_storm() {
    let mut p = Cluster::builder()
        .workers(1)
        .backoff(
            Duration::from_millis(10),
            Duration::from_millis(10),
            Duration::from_secs(1),
        )
        .start(idle_worker)
        .unwrap();
    let forks = wait_ready(&mut p, 1);
    let hog = FdHog::fill();
    kill(pid_of(&forks, 1), libc::SIGKILL);
    let (errs, first, seen) = count_errors(&mut p, 300);
    drop(hog);
    // Recovery once there are fds again.
    let log = window(&mut p, Duration::from_secs(3));
    let respawned = log.forks();
    println!(
        "    {errs} errors in 300 calls (first: {first:?}); then {}",
        log.summary()
    );
    assert_eq!(
        errs, 0,
        "next_event failed {errs} times in 300 calls while respawn could not get fds (first: \
         {first:?}; events: {seen:?})"
    );
    assert!(
        seen.iter().any(|e| e.contains("exited")),
        "the crash was reported: {seen:?}"
    );
    assert!(
        respawned >= 1,
        "respawned once fds were back: {}",
        log.summary()
    );
}

/// The worker table is full (`max_workers(1)`) while the only worker has closed its channel
/// (`Close`) but lives on, so the replacement cannot be forked. Correct: no error storm (and,
/// with item 3, the worker is killed after the graceful timeout and then replaced). Today every
/// tick (periodic here: a hang timeout is set) returns `Capacity("worker table full")` before it
/// reschedules itself.
fn full_worker_table_is_not_an_error_storm() {
    let mut p = Cluster::builder()
        .workers(1)
        .max_workers(1)
        .hang_timeout(Duration::from_secs(30))
        .start(|w: Worker| -> i32 {
            misbehave(channel_of(&w), Misbehave::Close);
            sleep_forever()
        })
        .unwrap();
    pump(&mut p, Duration::from_secs(5), |_, e| {
        matches!(e, E::Disconnect(1))
    });
    let (errs, first, seen) = count_errors(&mut p, 300);
    assert_eq!(
        errs, 0,
        "next_event failed {errs} times in 300 calls with the worker table full (first: \
         {first:?}; events: {seen:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. A worker that breaks the protocol or closes its channel: killed, and replaced no faster
// than the crash-loop backoff allows.

/// Every worker misbehaves right after it started (before it is ready): a crash loop. Over
/// 3 s with a backoff doubling from 100 ms (0.1+0.2+0.4+0.8+1.6 s), at most about 6 forks are
/// possible; 10 is the bound. The first worker must be gone within the window (killed at once
/// for garbage although `fast_timeout` is 60 s; after the 1 s graceful timeout for a closed
/// channel). Today the replacement is forked at once, its replacement too, until the table
/// (32) is full, and a closed-channel worker is never killed.
fn misbehaving_crash_loop(how: Misbehave) {
    let mut p = Cluster::builder()
        .workers(1)
        .max_workers(32)
        .backoff(
            Duration::from_millis(100),
            Duration::from_secs(10),
            Duration::from_secs(1),
        )
        .graceful_timeout(Duration::from_secs(1))
        .fast_timeout(Duration::from_secs(60))
        .start(move |w: Worker| -> i32 {
            misbehave(channel_of(&w), how);
            sleep_forever()
        })
        .unwrap();
    let log = window(&mut p, Duration::from_secs(3));
    let forks = log.forks();
    let first_exit = log.count(|e| matches!(e, E::Exit { id: 1, .. }));
    let live = p.workers().count();
    drop(p);
    println!(
        "    {how:?}: {forks} forks in 3 s, {live} alive at the end, worker 1 exited: {first_exit}"
    );
    assert!(
        forks <= 10 && first_exit == 1,
        "{how:?}: {forks} forks in 3 s with a 100 ms doubling backoff (bound 10); worker 1 \
         exited: {first_exit} (must be 1); {live} alive at the end; {}",
        log.summary()
    );
}

fn garbage_then_sleep_is_killed_at_once_and_respawn_backs_off() {
    misbehaving_crash_loop(Misbehave::Garbage);
}

fn close_frame_then_sleep_is_killed_and_respawn_backs_off() {
    misbehaving_crash_loop(Misbehave::Close);
}

fn shut_wr_then_sleep_is_killed_and_respawn_backs_off() {
    misbehaving_crash_loop(Misbehave::ShutWr);
}

// ---------------------------------------------------------------------------------------------
// 4. A worker writes its siblings' heartbeat words.

/// The writable shared mappings of this process (`rw-s`, anonymous shared memory): where the
/// heartbeat words live. `(start, len)`.
fn shared_mappings() -> Vec<(usize, usize)> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let path: Vec<&str> = f.skip(3).collect();
            let path = path.join(" ");
            let anon_shared = path.starts_with("/dev/zero")
                || path.starts_with("[anon_shmem")
                || path.starts_with("/memfd:")
                || path.starts_with("/SYSV")
                || path.is_empty();
            if !(perms.starts_with("rw") && perms.ends_with('s') && anon_shared) {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            let a = usize::from_str_radix(a, 16).ok()?;
            let b = usize::from_str_radix(b, 16).ok()?;
            Some((a, b - a))
        })
        .collect()
}

/// Worker 2 writes "busy, beat 1" into every 4th word (where each worker's beat is) of every
/// shared page it can write, again and again. Worker 1 is honest and idle (blocked in
/// `Worker::next`, so it does not beat). With `hang_timeout(1 s)` an honest idle worker must not
/// be declared hung: it must not be possible for one worker to write another's beat. Today the
/// page is shared by all: worker 1 gets SIGABRT about a second later.
fn forged_heartbeat_does_not_hang_an_honest_worker() {
    let mut p = Cluster::builder()
        .workers(2)
        .respawn(false)
        .hang_timeout(Duration::from_secs(1))
        .start(|mut w: Worker| -> i32 {
            if w.id() != 2 {
                return idle_worker(w);
            }
            let maps = shared_mappings();
            let words: usize = maps.iter().map(|m| m.1 / 8 / 4).sum();
            // Its own beat stops moving once the attack starts, so the attacker itself is
            // "hung" a hang_timeout after this beat: the report must go out first (reading
            // /proc/self/maps can take long on a loaded machine).
            w.heartbeat();
            w.send(format!("mapped {} {words}", maps.len()).as_bytes())
                .unwrap();
            loop {
                // The 64-bit value 2 in every 4th 8-byte word, as two 32-bit stores (powerpc and
                // other 32-bit targets have no 64-bit atomics): the same bytes on every CPU.
                let two = 2u64.to_ne_bytes();
                let halves = [
                    u32::from_ne_bytes([two[0], two[1], two[2], two[3]]),
                    u32::from_ne_bytes([two[4], two[5], two[6], two[7]]),
                ];
                for &(start, len) in &maps {
                    let base = start as *const AtomicU32;
                    for k in (0..len / 8).step_by(4) {
                        for (i, half) in halves.iter().enumerate() {
                            // SAFETY (test code, the attack): a live shared mapping of this
                            // process, `len` bytes long.
                            unsafe { (*base.add(2 * k + i)).store(*half, Ordering::Relaxed) };
                        }
                    }
                }
                sleep_ms(20);
            }
        })
        .unwrap();
    wait_ready(&mut p, 2);
    let log = pump(&mut p, Duration::from_secs(5), |_, e| {
        matches!(e, E::Message { id: 2, .. })
    });
    let mapped = match log.last() {
        Some(E::Message { payload, .. }) => String::from_utf8_lossy(payload).into_owned(),
        _ => unreachable!(),
    };
    assert!(
        mapped != "mapped 0 0",
        "setup: worker 2 found no shared page"
    );
    let w = window(&mut p, Duration::from_secs(3));
    let hung1 = w.count(|e| matches!(e, E::Hung(1)));
    let exit1 = w.count(|e| matches!(e, E::Exit { id: 1, .. }));
    println!(
        "    worker 2 {mapped} (pages, words); in 3 s honest worker 1 Hung: {hung1}, exited: {exit1}"
    );
    assert_eq!(
        (hung1, exit1),
        (0, 0),
        "the idle, honest worker 1 was declared hung after worker 2 wrote the heartbeat \
         words it could reach ({mapped}): {}",
        w.summary()
    );
    assert!(p.worker(1).is_some());
}

// ---------------------------------------------------------------------------------------------
// 5. Control signals sent by a worker.

/// Worker 2 sends the primary SIGTTIN 30 times (50 ms apart, so that none merge). The cluster
/// must stay at 2 workers; a SIGTTIN from elsewhere (here the primary's own process) still
/// scales. Today it grows to 32.
fn sigttin_from_a_worker_does_not_scale() {
    let mut p = Cluster::builder()
        .workers(2)
        .start(|mut w: Worker| -> i32 {
            loop {
                let ttin = match w.next() {
                    Ok(Some(Next::Message(m))) => m.payload == b"ttin",
                    Ok(Some(Next::Connection(_))) => false,
                    _ => return 0,
                };
                if ttin {
                    for _ in 0..30 {
                        unsafe { libc::kill(libc::getppid(), libc::SIGTTIN) };
                        sleep_ms(50);
                    }
                    w.send(b"sent").unwrap();
                }
            }
        })
        .unwrap();
    wait_ready(&mut p, 2);
    p.send(2, b"ttin").unwrap();
    let mut log = pump(&mut p, Duration::from_secs(10), |_, e| {
        is_msg(e, 2, b"sent")
    });
    log.extend(window(&mut p, Duration::from_millis(500)).events);
    let scales: Vec<&E> = log.iter().filter(|e| matches!(e, E::Scale(_))).collect();
    let live = p.workers().count();
    println!(
        "    after 30 SIGTTIN from worker 2: {} Scale events, {live} workers, {} wanted",
        scales.len(),
        p.wanted_workers()
    );
    assert!(
        scales.is_empty() && p.wanted_workers() == 2 && live == 2,
        "a worker's SIGTTIN scaled the cluster: {} Scale events, {live} workers, {} wanted",
        scales.len(),
        p.wanted_workers()
    );
    // The same signal from outside the cluster still works.
    kill(me() as u32, libc::SIGTTIN);
    pump(&mut p, Duration::from_secs(3), |_, e| {
        matches!(e, E::Scale(3))
    });
}

/// Worker 2 sends the primary HUP, TTOU, INT, QUIT and TERM. None is obeyed: no restart, no
/// scale, no stop, and the same two workers serve on. SIGTERM from elsewhere still stops.
fn control_signals_from_a_worker_are_ignored() {
    let mut p = Cluster::builder()
        .workers(2)
        .start(|mut w: Worker| -> i32 {
            loop {
                let go = match w.next() {
                    Ok(Some(Next::Message(m))) => m.payload == b"signals",
                    Ok(Some(Next::Connection(_))) => false,
                    _ => return 0,
                };
                if go {
                    for sig in [
                        libc::SIGHUP,
                        libc::SIGTTOU,
                        libc::SIGINT,
                        libc::SIGQUIT,
                        libc::SIGTERM,
                    ] {
                        unsafe { libc::kill(libc::getppid(), sig) };
                        sleep_ms(50);
                    }
                    let _ = w.send(b"sent");
                }
            }
        })
        .unwrap();
    wait_ready(&mut p, 2);
    p.send(2, b"signals").unwrap();
    let mut log = pump(&mut p, Duration::from_secs(10), |_, e| {
        is_msg(e, 2, b"sent") || matches!(e, E::Stopping(_))
    });
    log.extend(window(&mut p, Duration::from_millis(500)).events);
    let obeyed: Vec<&E> = log
        .iter()
        .filter(|e| {
            matches!(
                e,
                E::Stopping(_) | E::Restart | E::Scale(_) | E::Fork { .. } | E::Exit { .. }
            )
        })
        .collect();
    assert!(
        obeyed.is_empty() && !p.is_stopping(),
        "signals from worker 2 were obeyed: {obeyed:?}"
    );
    let ids: Vec<u32> = p.workers().map(|w| w.id).collect();
    assert_eq!(ids, vec![1, 2]);
    kill(me() as u32, libc::SIGTERM);
    pump(&mut p, Duration::from_secs(3), |_, e| {
        matches!(e, E::Stopping(true))
    });
}

// ---------------------------------------------------------------------------------------------
// 6, 7, 9. A worker dies (or stops) with connections queued for it.

/// Gates worker 1 (it stops reading), opens `n` connections, and once every one is handed out
/// and some wait in worker 1's queue calls `at`, which acts on worker 1 (kill, ...). Pumps until
/// the client is done; returns the client's output, how many were queued for worker 1, and the
/// events.
fn with_queued_connections(
    p: &mut Primary,
    n: usize,
    gate: bool,
    secs: u64,
    mut at: impl FnMut(&mut Primary),
    mut after: impl FnMut(&mut Primary, &E),
) -> (Vec<u8>, usize, Vec<E>) {
    if gate {
        p.send(1, b"gate").unwrap();
        pump(p, Duration::from_secs(10), |_, e| is_msg(e, 1, b"gated"));
    }
    let mut client = replies_client(tcp_addr(p), n, secs);
    let mut acted = false;
    let mut queued = 0;
    let mut log = Vec::new();
    client.run(p, Duration::from_secs(secs + 10), |p, e| {
        if !acted {
            if let (Some(a), Some(b)) = (p.worker(1), p.worker(2)) {
                if a.connections + b.connections == n as u64 && a.queued_bytes > 0 {
                    queued = a.queued_bytes / 18;
                    acted = true;
                    at(p);
                }
            }
        }
        if let E::Failed(err) = &e {
            panic!("next_event failed: {err}");
        }
        after(p, &e);
        if !matches!(e, E::Idle) {
            log.push(e);
        }
    });
    assert!(acted, "worker 1 never had connections queued: {log:?}");
    (client.finish(), queued, log)
}

/// The process inherited SIGCHLD as `SIG_IGN`: the kernel would reap workers itself and send
/// no SIGCHLD. A worker killed with 20 connections queued must still be reported (`Exit`), and
/// its queue go to the other worker: 0 of 40 lost. `start` sets SIGCHLD to default and dropping
/// the primary restores `SIG_IGN`. Today no exit is ever seen and the queue is stranded.
fn ignored_sigchld_still_reports_exits_and_loses_nothing() {
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(2)
        .respawn(false)
        .start(serve)
        .unwrap();
    let forks = wait_ready(&mut p, 2);
    let pid1 = pid_of(&forks, 1);
    let (out, queued, log) = with_queued_connections(
        &mut p,
        40,
        true,
        8,
        |_| kill(pid1, libc::SIGKILL),
        |_, _| {},
    );
    let (ids, lost) = answered(&out);
    let mut log = log;
    if !log.iter().any(|e| matches!(e, E::Exit { id: 1, .. })) {
        // The clients can be answered (from the recovered queue) before the primary has read
        // the dead worker's channel to its end, which is when `Exit` comes: wait for it.
        log.extend(pump(&mut p, Duration::from_secs(10), |_, e| {
            matches!(e, E::Exit { id: 1, .. })
        }));
    }
    let exits = log
        .iter()
        .filter(|e| matches!(e, E::Exit { id: 1, .. }))
        .count();
    println!("    {queued} queued for the killed worker; {lost} of 40 lost; exit seen: {exits}");
    assert_eq!(
        lost, 0,
        "{lost} of 40 requests lost ({queued} were queued for the killed worker 1, Exit \
         events: {exits}): {ids:?}"
    );
    assert_eq!(exits, 1, "worker 1's death was never reported: {log:?}");
    drop(p);
    let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
    unsafe { libc::sigaction(libc::SIGCHLD, core::ptr::null(), &mut old) };
    assert_eq!(
        old.sa_sigaction,
        libc::SIG_IGN,
        "dropping the primary restores SIGCHLD's disposition"
    );
}

/// Worker 1 is stopped (SIGSTOP) while idle, so its heartbeat reads "idle"; connections handed
/// to it wait. With `hang_timeout(1 s)` queued hand-offs older than that count as hung: it is
/// declared `Hung`, killed, and its queue goes to worker 2: 0 of 20 lost within 10 s. Today
/// it is never declared hung and its connections wait forever.
fn stopped_worker_with_queued_connections_is_hung_and_loses_nothing() {
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(2)
        .respawn(false)
        .hang_timeout(Duration::from_secs(1))
        .start(serve)
        .unwrap();
    let forks = wait_ready(&mut p, 2);
    let pid1 = pid_of(&forks, 1);
    kill(pid1, libc::SIGSTOP);
    let (out, queued, log) = with_queued_connections(&mut p, 20, false, 10, |_| {}, |_, _| {});
    let (ids, lost) = answered(&out);
    let hung = log.iter().filter(|e| matches!(e, E::Hung(1))).count();
    println!("    {queued} queued for the stopped worker; {lost} of 20 lost; Hung: {hung}");
    let _ = unsafe { libc::kill(pid1 as i32, libc::SIGKILL) };
    assert_eq!(
        lost, 0,
        "{lost} of 20 requests waited 10 s in vain ({queued} were queued for the stopped \
         worker 1; Hung events: {hung}): {ids:?}"
    );
    assert_eq!(hung, 1, "the stopped worker was not declared hung: {log:?}");
}

/// The primary is out of fds when it recovers a dead worker's queue (`recvmsg` would truncate
/// the `SCM_RIGHTS` and the kernel would close the connections). Correct: nothing lost (a
/// reserve fd, or recovery waits until fds are back; here they come back when `Exit` is seen or
/// 2 s after the kill). Today every queued connection is lost.
fn emfile_while_recovering_a_dead_workers_queue_loses_nothing() {
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(2)
        .respawn(false)
        .start(serve)
        .unwrap();
    let forks = wait_ready(&mut p, 2);
    let pid1 = pid_of(&forks, 1);
    // The fd hog, and when worker 1 was killed.
    let state: std::cell::RefCell<(Option<FdHog>, Option<Instant>)> = Default::default();
    let (out, queued, log) = with_queued_connections(
        &mut p,
        30,
        true,
        10,
        |_| {
            let mut s = state.borrow_mut();
            s.0 = Some(FdHog::fill());
            kill(pid1, libc::SIGKILL);
            s.1 = Some(Instant::now());
        },
        |_, e| {
            let mut s = state.borrow_mut();
            let late = s.1.is_some_and(|t| t.elapsed() > Duration::from_secs(2));
            if s.0.is_some() && (matches!(e, E::Exit { id: 1, .. }) || late) {
                s.0 = None;
            }
        },
    );
    drop(state);
    let (ids, lost) = answered(&out);
    let rec = p.stats().recovered;
    println!("    {queued} queued for the killed worker, {rec} recovered; {lost} of 30 lost");
    assert_eq!(
        lost, 0,
        "{lost} of 30 requests lost ({queued} were queued for worker 1, killed while the \
         primary had no free fd; {rec} recovered): {ids:?} {log:?}"
    );
}

/// The worker itself is out of fds when a connection is handed to it. `Worker::next` must not
/// lose it: either it returns the connection (reserve fd), or it fails without consuming it;
/// this worker frees its fds after an error and calls `next` again. Today the `recvmsg`
/// truncates the `SCM_RIGHTS`, the kernel closes the connection, and `next` fails: the client
/// gets end of file.
fn emfile_in_a_worker_loses_no_connection() {
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(1)
        .respawn(false)
        .start(|mut w: Worker| -> i32 {
            let r = reply(w.id());
            let mut hog: Option<FdHog> = None;
            loop {
                let cmd = match w.next() {
                    Ok(Some(Next::Connection(mut c))) => {
                        let _ = c.write_all(&r);
                        continue;
                    }
                    Ok(Some(Next::Message(m))) => m.payload.to_vec(),
                    Ok(Some(Next::Disconnect)) | Ok(None) => return 0,
                    Err(e) => {
                        hog = None;
                        let _ = w.send(format!("error {e}").as_bytes());
                        continue;
                    }
                };
                if cmd == b"fill" {
                    hog = Some(FdHog::fill());
                    w.send(b"full").unwrap();
                }
                let _ = &hog;
            }
        })
        .unwrap();
    wait_ready(&mut p, 1);
    p.send(1, b"fill").unwrap();
    pump(&mut p, Duration::from_secs(5), |_, e| is_msg(e, 1, b"full"));
    let mut client = replies_client(tcp_addr(&p), 1, 5);
    let mut log = Vec::new();
    client.run(&mut p, Duration::from_secs(15), |_, e| {
        if !matches!(e, E::Idle) {
            log.push(e)
        }
    });
    let (ids, lost) = answered(&client.finish());
    assert_eq!(
        lost, 0,
        "the connection handed to a worker out of fds was lost: {ids:?}; events {log:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Orphaned grandchildren when the primary is a subreaper or PID 1.

/// Worker 1 forks a grandchild that exits 300 ms later, and exits at once. The grandchild is
/// reparented to the primary (a subreaper, or PID 1): once it exited, it must not stay a zombie.
/// Returns the zombie's pid, if one is left.
fn orphan_scenario() -> Option<i32> {
    let mut p = Cluster::builder()
        .workers(1)
        .respawn(false)
        .start(|_w: Worker| -> i32 {
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                sleep_ms(300);
                unsafe { libc::_exit(0) };
            }
            0
        })
        .unwrap();
    pump(&mut p, Duration::from_secs(5), |_, e| {
        matches!(e, E::Exit { id: 1, .. })
    });
    let _ = window(&mut p, Duration::from_millis(1500));
    let z = any_zombie_child();
    match z {
        Some(pid) => println!("    zombies left: 1 or more (pid {pid})"),
        None => println!("    zombies left: 0"),
    }
    let _ = std::io::stdout().flush();
    drop(p);
    z
}

fn subreaper_primary_reaps_orphaned_grandchildren() {
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 && util::under_qemu() {
        // qemu-user (7.2) does not pass PR_SET_CHILD_SUBREAPER on to the kernel.
        println!(
            "    skipped under qemu-user: prctl(PR_SET_CHILD_SUBREAPER): {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    assert_eq!(rc, 0);
    let z = orphan_scenario();
    assert_eq!(
        z, None,
        "an orphaned grandchild stays a zombie of the subreaper primary"
    );
}

fn pid1_primary_reaps_orphaned_grandchildren() {
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        println!(
            "    skipped: unshare(CLONE_NEWPID): {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    let pid = util::fork_child(|| {
        assert_eq!(me(), 1, "PID 1 of a new namespace");
        match orphan_scenario() {
            None => 0,
            Some(_) => 1,
        }
    });
    let st = util::wait_child(pid, Duration::from_secs(15));
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "as PID 1 the primary left an orphaned grandchild a zombie (or failed: wait status \
         {st:#x})"
    );
}

/// A guard for the fix of item 8 (passes today): a child the application forked itself, and
/// waits for, keeps its status: the primary (neither PID 1 nor a subreaper) never reaps it.
fn primary_does_not_steal_an_application_child_status() {
    let child = unsafe { libc::fork() };
    assert!(child >= 0);
    if child == 0 {
        sleep_ms(300);
        unsafe { libc::_exit(7) };
    }
    let _guard = util::KillOnDrop(child);
    let mut p = Cluster::builder().workers(1).start(idle_worker).unwrap();
    wait_ready(&mut p, 1);
    let _ = window(&mut p, Duration::from_secs(1));
    let mut st = 0;
    let r = unsafe { libc::waitpid(child, &mut st, libc::WNOHANG) };
    std::mem::forget(_guard);
    assert_eq!(
        r, child,
        "the application's child was reaped by someone else"
    );
    assert!(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 7);
    drop(p);
}

// ---------------------------------------------------------------------------------------------
// 10. Unix socket paths.

fn fetch_unix(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut b = Vec::new();
    s.read_to_end(&mut b)?;
    Ok(b)
}

/// Another server replaced the cluster's socket file (unlink, bind anew) while the primary
/// lives. Dropping the primary must leave that file alone (check device and inode first).
/// Today it unlinks whatever is at the path.
fn drop_leaves_a_replaced_socket_path_alone() {
    let path = sock_path("replaced");
    let _ = std::fs::remove_file(&path);
    let mut p = Cluster::builder()
        .listen_unix(&path)
        .workers(1)
        .start(serve)
        .unwrap();
    wait_ready(&mut p, 1);
    std::fs::remove_file(&path).unwrap();
    let theirs = UnixListener::bind(&path).unwrap();
    drop(p);
    let exists = path.exists();
    let answers = UnixStream::connect(&path).is_ok();
    drop(theirs);
    let _ = std::fs::remove_file(&path);
    assert!(
        exists && answers,
        "dropping the primary removed a socket file that is no longer its own (exists: \
         {exists}, answers: {answers})"
    );
}

/// A socket file left by a crashed run (nothing listens on it) must not make `start` fail; one
/// that something still answers on must (and stay). Today the stale file gives `EADDRINUSE`.
fn stale_socket_file_does_not_block_start() {
    // A live socket at the path: start fails, the live one is untouched (a guard; passes today).
    let live = sock_path("live");
    let _ = std::fs::remove_file(&live);
    let owner = UnixListener::bind(&live).unwrap();
    let r = Cluster::builder()
        .listen_unix(&live)
        .workers(1)
        .start(serve);
    assert!(
        matches!(&r, Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE)),
        "a path something answers on is in use: {:?}",
        r.as_ref().err()
    );
    drop(r);
    assert!(
        UnixStream::connect(&live).is_ok(),
        "the live socket still answers"
    );
    drop(owner);
    let _ = std::fs::remove_file(&live);

    // A stale one: bound, then its owner died (the file stays, nothing listens).
    let stale = sock_path("stale");
    let _ = std::fs::remove_file(&stale);
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let r = Cluster::builder()
        .listen_unix(&stale)
        .workers(1)
        .start(serve);
    let mut p = match r {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_file(&stale);
            panic!("start failed because of a stale socket file: {e}");
        }
    };
    wait_ready(&mut p, 1);
    let mut c = spawn_client({
        let stale = stale.clone();
        move |out| {
            let b = fetch_unix(&stale).unwrap_or_default();
            out.write_all(&[parse_reply(&b).map_or(0, |i| i as u8)])
                .unwrap();
        }
    });
    c.run(&mut p, Duration::from_secs(10), |_, _| {});
    let got = c.finish();
    drop(p);
    let _ = std::fs::remove_file(&stale);
    assert_eq!(got, vec![1], "served on the reclaimed path");
}

// ---------------------------------------------------------------------------------------------
// 11. Listeners after a graceful stop.

fn refused(addr: SocketAddr) -> Result<(), String> {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => Err(format!("connect failed with {e}, not ECONNREFUSED")),
        Ok(s) => {
            abort_close(s);
            Err("connect succeeded: the port still listens".into())
        }
    }
}

/// After a graceful stop (once the backlog was drained) the listening socket is closed while the
/// `Primary` lives: new clients are refused at once, and the port can be bound again. Today the
/// listener only leaves epoll: clients connect and hang, and a new bind gets `EADDRINUSE`.
fn graceful_stop_closes_the_listening_port() {
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(2)
        .start(serve)
        .unwrap();
    wait_ready(&mut p, 2);
    let addr = tcp_addr(&p);
    p.stop(true);
    pump(&mut p, Duration::from_secs(5), |_, e| {
        matches!(e, E::Stopping(true))
    });
    let at_stop = refused(addr);
    pump(&mut p, Duration::from_secs(10), |_, e| matches!(e, E::Done));
    let when_done = refused(addr);
    let rebind = TcpListener::bind(addr).map(drop).map_err(|e| e.to_string());
    drop(p);
    assert!(
        at_stop.is_ok() && when_done.is_ok() && rebind.is_ok(),
        "after a graceful stop: at Stopping {at_stop:?}; once every worker is gone \
         {when_done:?}; bind of the same port {rebind:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 12. Settings that overflow.

fn bad_frame_worker(mut w: Worker) -> i32 {
    loop {
        let bad = match w.next() {
            Ok(Some(Next::Message(m))) => m.payload == b"bad",
            Ok(Some(Next::Connection(_))) => false,
            _ => return 0,
        };
        if bad {
            misbehave(channel_of(&w), Misbehave::Garbage);
            sleep_forever();
        }
    }
}

/// `fast_timeout(Duration::MAX)` and a worker's bad frame: the kill deadline saturates
/// instead of panicking (`Instant + Duration::MAX`). Today `next_event` panics.
fn huge_fast_timeout_and_a_bad_frame_do_not_panic() {
    let mut p = Cluster::builder()
        .workers(2)
        .respawn(false)
        .fast_timeout(Duration::MAX)
        .start(bad_frame_worker)
        .unwrap();
    wait_ready(&mut p, 2);
    p.send(1, b"bad").unwrap();
    pump(&mut p, Duration::from_secs(5), |_, e| {
        matches!(e, E::WorkerError(1, _))
    });
    let _ = window(&mut p, Duration::from_millis(500));
}

/// `fast_timeout(Duration::MAX)` and a fast stop (SIGINT's path). Today `stop` panics.
fn huge_fast_timeout_and_a_fast_stop_do_not_panic() {
    let mut p = Cluster::builder()
        .workers(1)
        .fast_timeout(Duration::MAX)
        .start(idle_worker)
        .unwrap();
    wait_ready(&mut p, 1);
    p.stop(false);
    let _ = window(&mut p, Duration::from_millis(500));
}

/// `graceful_timeout(Duration::MAX)` and a disconnect. Today `disconnect` panics.
fn huge_graceful_timeout_and_a_disconnect_do_not_panic() {
    let mut p = Cluster::builder()
        .workers(2)
        .graceful_timeout(Duration::MAX)
        .start(idle_worker)
        .unwrap();
    wait_ready(&mut p, 2);
    p.disconnect(1).unwrap();
    pump(&mut p, Duration::from_secs(5), |_, e| {
        matches!(e, E::Exit { id: 1, .. })
    });
}

/// `backoff(Duration::MAX, ..)`: a worker killed while serving (respawn after the minimum
/// delay) and a worker that dies before it is ready (the doubling delay): both respawn times
/// saturate (never). Today `next_event` panics at the first.
fn huge_backoff_and_a_crash_do_not_panic() {
    let mut p = Cluster::builder()
        .workers(2)
        .backoff(Duration::MAX, Duration::MAX, Duration::from_secs(10))
        .start(|w: Worker| -> i32 {
            if w.id() == 3 {
                return 1;
            }
            idle_worker(w)
        })
        .unwrap();
    let forks = wait_ready(&mut p, 2);
    let _ = window(&mut p, Duration::from_millis(200));
    // Ready (in its loop) and young: killed while serving.
    kill(pid_of(&forks, 1), libc::SIGKILL);
    pump(&mut p, Duration::from_secs(5), |_, e| {
        matches!(e, E::Exit { id: 1, .. })
    });
    let _ = window(&mut p, Duration::from_millis(300));
    // Dies before it is ready: a start-up crash.
    p.fork().unwrap();
    pump(&mut p, Duration::from_secs(5), |_, e| {
        matches!(e, E::Exit { id: 3, .. })
    });
    let _ = window(&mut p, Duration::from_millis(300));
}

/// `max_requests(n, u64::MAX)` (jitter `% (max + 1)`) and `max_requests(u64::MAX, 2^62)`
/// (`n + jitter`): `start` works (or refuses), never panics. Today both panic in `start`.
fn extreme_max_requests_do_not_panic() {
    let mut panics = Vec::new();
    for (n, jitter) in [(10, u64::MAX), (u64::MAX, 1u64 << 62)] {
        let r = std::panic::catch_unwind(|| {
            Cluster::builder()
                .workers(2)
                .max_requests(n, jitter)
                .start(idle_worker)
                .map(drop)
        });
        if r.is_err() {
            panics.push((n, jitter));
        }
    }
    assert!(
        panics.is_empty(),
        "start panicked with max_requests {panics:?}"
    );
}

/// `max_workers` beyond the epoll token's 24-bit slot field is refused by `start` with an
/// error, before anything is allocated for it. Run in a child under `RLIMIT_AS` 4 GiB, since
/// today's `start` tries to allocate tables for that many workers.
fn max_workers_beyond_the_token_field_is_refused() {
    let mut outcomes = Vec::new();
    for max in [(1usize << 24) + 1, usize::MAX] {
        let pid = util::fork_child(move || {
            let lim = libc::rlimit {
                rlim_cur: 4 << 30,
                rlim_max: 4 << 30,
            };
            unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) };
            match Cluster::builder()
                .workers(1)
                .max_workers(max)
                .start(idle_worker)
            {
                Err(Error::Invalid(_)) | Err(Error::Capacity(_)) => 0,
                Err(e) => {
                    println!("    max_workers({max}): unexpected error {e}");
                    let _ = std::io::stdout().flush();
                    2
                }
                Ok(p) => {
                    drop(p);
                    3
                }
            }
        });
        let st = util::wait_child(pid, Duration::from_secs(15));
        let how = if libc::WIFEXITED(st) {
            match libc::WEXITSTATUS(st) {
                0 => "refused".to_string(),
                3 => "started".to_string(),
                101 => "panicked".to_string(),
                c => format!("exit {c}"),
            }
        } else {
            format!("killed by signal {}", libc::WTERMSIG(st))
        };
        outcomes.push((max, how));
    }
    assert!(
        outcomes.iter().all(|(_, how)| how == "refused"),
        "start with a max_workers beyond 2^24 must be refused: {outcomes:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 13. Smaller ones.

/// Touches `kb` KiB of stack, so that the pages are mapped before `RLIMIT_AS` is lowered.
#[inline(never)]
fn grow_stack(kb: usize) {
    let mut a = [0u8; 1024];
    std::hint::black_box(&mut a);
    if kb > 1 {
        grow_stack(kb - 1);
    }
}

fn vm_size() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let l = s.lines().find(|l| l.starts_with("VmSize:")).unwrap();
    let kb: u64 = l.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb << 10
}

/// `start` fails after it blocked the cluster's signals and bound a Unix socket: here the
/// `mmap` of the shared page fails (`RLIMIT_AS` leaves no address space for a new mapping,
/// while a pre-grown heap and stack serve every other allocation). The signal mask must be as
/// before, and the socket file gone. Today the signals stay blocked and the file stays. Runs
/// in a child (the limits are for good).
fn failed_start_restores_the_signal_mask_and_removes_the_socket_file() {
    let path = sock_path("failed-start");
    let _ = std::fs::remove_file(&path);
    let pid = util::fork_child({
        let path = path.clone();
        move || {
            // Every allocation from the brk heap, which keeps what is freed: no new mapping is
            // needed for anything but the shared page.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
                libc::mallopt(libc::M_TOP_PAD, 64 << 20);
            }
            drop(std::hint::black_box(vec![0u8; 1 << 20]));
            grow_stack(512);
            let before = blocked_signals();
            let lim = libc::rlimit {
                rlim_cur: (vm_size() + (16 << 10)) as libc::rlim_t,
                rlim_max: libc::RLIM_INFINITY,
            };
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) }, 0);
            let r = Cluster::builder()
                .listen_unix(&path)
                .max_workers(4096)
                .workers(1)
                .start(serve);
            let after = blocked_signals();
            let left = path.exists();
            match r {
                Ok(p) => {
                    drop(p);
                    println!("    setup: start did not fail");
                    3
                }
                Err(e) => {
                    println!(
                        "    start failed as arranged ({e}): blocked signals {before:#x} -> \
                         {after:#x}; socket file left: {left}"
                    );
                    let _ = std::io::stdout().flush();
                    if after == before && !left {
                        0
                    } else {
                        1
                    }
                }
            }
        }
    });
    let st = util::wait_child(pid, Duration::from_secs(10));
    let _ = std::fs::remove_file(&path);
    if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 3 && util::under_qemu() {
        // Under qemu-user RLIMIT_AS fails no guest mmap (seen with qemu 7.2 on aarch64 and arm
        // guests: qemu places them in address space it holds already), so nothing fails.
        println!("    skipped under qemu-user: RLIMIT_AS does not make the guest's mmap fail");
        return;
    }
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "after a failed start the signal mask was not restored or the socket file was left \
         (or the setup failed: wait status {st:#x})"
    );
}

/// Both workers stop reading for 3 s with their queues at the in-flight bound, 40 connections
/// are accepted (the primary holds those that do not fit), and the cluster stops gracefully.
/// Every accepted connection must be answered (they were accepted: the workers serve them once
/// they read again, before they leave). Today `stop` sleeps up to 1 s inside the call for room
/// in a queue, then drops the connections it still holds: their clients get end of file.
fn graceful_stop_with_full_queues_answers_every_accepted_connection() {
    const N: usize = 40;
    let mut p = Cluster::builder()
        .listen(lo0())
        .workers(2)
        .max_in_flight(1)
        .start(serve)
        .unwrap();
    wait_ready(&mut p, 2);
    p.send(1, b"pause 3000").unwrap();
    p.send(2, b"pause 3000").unwrap();
    let mut paused = 0;
    pump(&mut p, Duration::from_secs(5), |_, e| {
        paused += usize::from(is_msg(e, 1, b"paused") || is_msg(e, 2, b"paused"));
        paused == 2
    });
    let mut client = replies_client(tcp_addr(&p), N, 15);
    let end = Instant::now() + Duration::from_secs(5);
    while client.out.is_empty() {
        assert!(Instant::now() < end, "client did not connect");
        client.done();
        let _ = ev(&mut p, Duration::from_millis(5));
    }
    let _ = window(&mut p, Duration::from_millis(300));
    let dispatched = p.stats().connections;
    assert!(
        dispatched < N as u64,
        "setup: all {dispatched} connections fit in the queues; none is held by the primary"
    );
    let t0 = Instant::now();
    p.stop(true);
    let took = t0.elapsed();
    let mut log = Vec::new();
    client.run(&mut p, Duration::from_secs(25), |_, e| {
        if !matches!(e, E::Idle) {
            log.push(e)
        }
    });
    let (ids, lost) = answered(&client.finish());
    println!(
        "    {dispatched} in the queues at stop, stop() took {:.0} ms, {lost} of {N} lost",
        took.as_secs_f64() * 1e3
    );
    assert_eq!(
        lost, 0,
        "{lost} of {N} accepted connections were dropped by the graceful stop ({dispatched} \
         were in the workers' queues; stop() took {took:?}): {ids:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 14. The shared schedule: a worker shuts the listener down for everyone.

/// One connection: the id that answered, or why not.
fn try_fetch(addr: SocketAddr) -> Result<u32, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut b = Vec::new();
    let r = s.read_to_end(&mut b);
    abort_close(s);
    r.map_err(|e| format!("read: {e}"))?;
    parse_reply(&b).ok_or_else(|| format!("bad reply {b:?}"))
}

/// A free TCP port on 127.0.0.1 (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind(lo0())
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Worker 1 calls `shutdown(SHUT_RD)` on the listener every worker shares: the socket stops
/// listening for all. The primary must notice and re-create the listener on the same address:
/// clients are served again within 5 s. Today nobody notices: every connect is refused.
fn shared_listener_shut_down_by_a_worker_is_recreated() {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut p = Cluster::builder()
        .listen(addr)
        .schedule(Schedule::Shared)
        .workers(2)
        .start(|mut w: Worker| -> i32 {
            let r = reply(w.id());
            loop {
                let shut = match w.next() {
                    Ok(Some(Next::Connection(mut c))) => {
                        let _ = c.write_all(&r);
                        false
                    }
                    Ok(Some(Next::Message(m))) => m.payload == b"shut",
                    _ => return 0,
                };
                if shut {
                    let ls = sockets_of_type(libc::SOCK_STREAM, true);
                    for &fd in &ls {
                        unsafe { libc::shutdown(fd, libc::SHUT_RD) };
                    }
                    let _ = w.send(format!("shut {}", ls.len()).as_bytes());
                }
            }
        })
        .unwrap();
    wait_ready(&mut p, 2);
    assert!(try_fetch(addr).is_ok(), "served before the attack");
    p.send(1, b"shut").unwrap();
    let log = pump(&mut p, Duration::from_secs(5), |_, e| {
        matches!(e, E::Message { id: 1, .. })
    });
    assert!(
        !matches!(log.last(), Some(E::Message { payload, .. }) if payload == b"shut 0"),
        "setup: worker 1 found no listener"
    );
    let end = Instant::now() + Duration::from_secs(5);
    let mut last = Err(String::new());
    while Instant::now() < end {
        let _ = window(&mut p, Duration::from_millis(50));
        last = try_fetch(addr);
        if last.is_ok() {
            break;
        }
    }
    assert!(
        last.is_ok(),
        "5 s after a worker shut the shared listener down, clients still fail: {last:?}"
    );
}
