//! The supervision policy under a fake clock: no fork, no signal, no socket.

use std::time::{Duration, Instant};

use rustix::process::Signal;

use super::{Action, Probe, Replace, Supervisor};
use crate::error::Error;
use crate::primary::events::Ev;
use crate::settings::Supervision;

const MS: Duration = Duration::from_millis(1);

/// Drives a supervisor the way the primary does: forks get the next free slot and id.
struct Sim {
    sup: Supervisor,
    t0: Instant,
    next_id: u32,
    /// The id in each slot.
    slots: Vec<Option<u32>>,
}

impl Sim {
    fn new(cfg: Supervision, n: usize) -> Sim {
        let mut s = Sim {
            sup: Supervisor::new(cfg, false, n, 16, 0x1234_5678),
            t0: Instant::now(),
            next_id: 1,
            slots: vec![None; 16],
        };
        for _ in 0..n {
            s.fork(0, None, false);
        }
        s
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + MS * ms as u32
    }

    fn fork(&mut self, ms: u64, replaces: Option<Replace>, asked: bool) -> (usize, u32) {
        let slot = self.slots.iter().position(Option::is_none).unwrap();
        let id = self.next_id;
        self.next_id += 1;
        self.slots[slot] = Some(id);
        self.sup.forked(slot, id, self.at(ms), replaces, asked);
        (slot, id)
    }

    /// Carries out the pending actions at time `ms` and returns them (forks done).
    fn run(&mut self, ms: u64) -> Vec<Action> {
        let mut done = Vec::new();
        while let Some(a) = self.sup.next_action() {
            if let Action::Fork { replaces } = a {
                self.fork(ms, replaces, true);
            }
            done.push(a);
        }
        done
    }

    fn slot_of(&self, id: u32) -> usize {
        self.slots.iter().position(|s| *s == Some(id)).unwrap()
    }

    /// The worker `id` exits with `raw` at `ms` (reaped, channel drained, `Exit` reported).
    fn exit(&mut self, id: u32, raw: i32, ms: u64) -> Vec<Action> {
        let slot = self.slot_of(id);
        self.sup.reaped(slot, self.at(ms), false);
        self.slots[slot] = None;
        self.sup.exited(slot, raw, self.at(ms));
        self.run(ms)
    }

    fn tick(&mut self, ms: u64, probe: impl FnMut(usize) -> Probe) -> Vec<Action> {
        self.sup.tick(self.at(ms), probe);
        self.run(ms)
    }
}

fn forks(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Fork { .. }))
        .count()
}

fn backoffs(actions: &[Action]) -> Vec<Duration> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Event(Ev::Backoff(d)) => Some(*d),
            _ => None,
        })
        .collect()
}

const KILLED: i32 = libc::SIGKILL;
const CODE_1: i32 = 1 << 8;

#[test]
fn start_up_crashes_back_off_doubling_up_to_the_cap() {
    let cfg = Supervision {
        backoff_min: MS * 100,
        backoff_max: MS * 1000,
        healthy_uptime: Duration::from_secs(10),
        ..Supervision::default()
    };
    let mut s = Sim::new(cfg, 1);
    let mut seen = Vec::new();
    let mut t = 0;
    let mut id = 1;
    for _ in 0..6 {
        // It dies before it was ready: a start-up crash.
        t += 10;
        let a = s.exit(id, CODE_1, t);
        assert_eq!(forks(&a), 0, "no fork before the backoff passed");
        let d = backoffs(&a);
        assert_eq!(d.len(), 1);
        seen.push(d[0].as_millis() as u64);
        // Nothing is forked a moment before the delay ends; exactly one fork after it.
        t += d[0].as_millis() as u64;
        assert_eq!(forks(&s.tick(t - 1, |_| Probe::default())), 0);
        assert_eq!(forks(&s.tick(t, |_| Probe::default())), 1);
        id = s.next_id - 1;
    }
    assert_eq!(seen, [100, 200, 400, 800, 1000, 1000]);
}

#[test]
fn the_backoff_resets_once_a_respawned_worker_stays_up_for_the_healthy_uptime() {
    let cfg = Supervision {
        backoff_min: MS * 100,
        backoff_max: MS * 10_000,
        healthy_uptime: MS * 1000,
        ..Supervision::default()
    };
    let mut s = Sim::new(cfg, 2);
    // Worker 1 crashes at start three times: 100, 200, 400.
    let mut t = 10;
    let mut id = 1;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let a = s.exit(id, CODE_1, t);
        let d = backoffs(&a)[0];
        seen.push(d.as_millis());
        t += d.as_millis() as u64;
        assert_eq!(forks(&s.tick(t, |_| Probe::default())), 1);
        id = s.next_id - 1;
        t += 10;
    }
    assert_eq!(seen, [100, 200, 400]);
    // The last respawn (forked after the last crash) stays up past the healthy uptime. Then
    // a new worker (scaled up) crashes young: a healthy worker forked after the last crash
    // means that crash loop is over, so the new streak starts at the minimum, not at 800 ms.
    t += 1500;
    s.sup.scale(3, s.at(t));
    assert_eq!(forks(&s.run(t)), 1);
    let young = s.next_id - 1;
    t += 10;
    let a = s.exit(young, CODE_1, t);
    assert_eq!(backoffs(&a), [MS * 100], "the streak started over");
    // Without a healthy worker since, the streak goes on: 200 ms.
    t += 100;
    assert_eq!(forks(&s.tick(t, |_| Probe::default())), 1);
    let again = s.next_id - 1;
    t += 10;
    assert_eq!(backoffs(&s.exit(again, CODE_1, t)), [MS * 200]);
}

#[test]
fn a_worker_killed_while_serving_respawns_after_the_minimum_only() {
    let cfg = Supervision {
        backoff_min: MS * 100,
        healthy_uptime: Duration::from_secs(10),
        ..Supervision::default()
    };
    let mut s = Sim::new(cfg, 1);
    let mut id = 1;
    let mut t = 0;
    for _ in 0..5 {
        s.sup.ready(s.slot_of(id), s.at(t + 5));
        t += 20;
        let a = s.exit(id, KILLED, t);
        assert_eq!(
            backoffs(&a),
            [MS * 100],
            "no growth for a worker that was ready"
        );
        t += 100;
        assert_eq!(forks(&s.tick(t, |_| Probe::default())), 1);
        id = s.next_id - 1;
    }
}

#[test]
fn the_fatal_exit_code_is_reported_and_not_respawned() {
    let cfg = Supervision {
        fatal_exit_code: Some(2),
        ..Supervision::default()
    };
    let mut s = Sim::new(cfg, 2);
    let a = s.exit(1, 2 << 8, 500);
    assert!(a.contains(&Action::Event(Ev::Fatal(1, 2))), "{a:?}");
    assert_eq!(forks(&a), 0);
    assert_eq!(s.sup.desired(), 1);
    assert_eq!(forks(&s.tick(5000, |_| Probe::default())), 0);
    // Another code is a crash and is respawned.
    let a = s.exit(2, 3 << 8, 5000);
    assert!(!a.iter().any(|x| matches!(x, Action::Event(Ev::Fatal(..)))));
    assert_eq!(forks(&a) + forks(&s.tick(6000, |_| Probe::default())), 1);
}

#[test]
fn a_rolling_restart_replaces_batch_by_batch_old_leaves_once_new_is_ready() {
    let cfg = Supervision {
        restart_batch: 2,
        ..Supervision::default()
    };
    let mut s = Sim::new(cfg, 4);
    for id in 1..=4 {
        s.sup.ready(s.slot_of(id), s.at(1));
    }
    s.sup.restart();
    let a = s.run(10);
    let reps: Vec<u32> = a
        .iter()
        .filter_map(|x| match x {
            Action::Fork { replaces: Some(r) } => Some(r.id),
            _ => None,
        })
        .collect();
    assert_eq!(reps, [1, 2], "the first batch replaces the oldest two");
    // The replacement of 1 (id 5) is ready: 1 is disconnected, then 3 is replaced.
    s.sup.ready(s.slot_of(5), s.at(20));
    let a = s.run(20);
    let slot1 = s.slot_of(1);
    assert_eq!(a[0], Action::Disconnect { slot: slot1 });
    assert!(a.contains(&Action::Event(Ev::Restart(1, 5, 2))), "{a:?}");
    assert!(a
        .iter()
        .any(|x| matches!(x, Action::Fork { replaces: Some(r) } if r.id == 3 && r.restart)));
    // A replacement that dies before it is ready puts its old worker back at the head.
    let a = s.exit(6, KILLED, 25);
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::Fork { replaces: Some(r) } if r.id == 2)),
        "worker 2 is tried again: {a:?}"
    );
    // The rest get ready in turn; RestartDone comes once, after the last.
    let mut done = 0;
    for _ in 0..4 {
        let pending: Vec<u32> = (1..s.next_id)
            .filter(|&id| s.slots.contains(&Some(id)) && id > 4)
            .collect();
        for id in pending {
            s.sup.ready(s.slot_of(id), s.at(30));
            let a = s.run(30);
            done += a
                .iter()
                .filter(|x| matches!(x, Action::Event(Ev::RestartDone)))
                .count();
        }
    }
    assert_eq!(done, 1);
}

#[test]
fn recycle_limits_stay_within_the_jitter_and_never_overflow() {
    let cfg = Supervision {
        max_requests: Some((1000, 50)),
        ..Supervision::default()
    };
    let mut sup = Supervisor::new(cfg, false, 1, 4, 99);
    let now = Instant::now();
    let mut seen = std::collections::HashSet::new();
    for i in 0..2000 {
        let n = sup.forked(0, i + 1, now, None, false);
        assert!((1000..=1050).contains(&n), "{n}");
        seen.insert(n);
    }
    assert!(
        seen.len() > 40,
        "the jitter spreads the limits: {}",
        seen.len()
    );
    for (n, j) in [(u64::MAX, 10), (5, u64::MAX), (u64::MAX, u64::MAX)] {
        let cfg = Supervision {
            max_requests: Some((n, j)),
            ..Supervision::default()
        };
        let mut sup = Supervisor::new(cfg, false, 1, 4, 7);
        let got = sup.forked(0, 1, now, None, false);
        assert!(got >= n, "{got} < {n}");
    }
}

#[test]
fn a_busy_worker_whose_heartbeat_stops_is_hung_an_idle_one_never() {
    let cfg = Supervision {
        hang_timeout: Some(MS * 1000),
        ..Supervision::default()
    };
    let mut s = Sim::new(cfg, 2);
    let (busy, idle) = (s.slot_of(1), s.slot_of(2));
    // Both beat once, then stop: worker 1 busy (low bit clear), worker 2 idle (low bit set).
    let probe = |slot: usize| Probe {
        beat: if slot == busy { 8 } else { 9 },
        conns: 0,
        queued: false,
    };
    assert!(s.tick(100, probe).is_empty());
    assert!(s.tick(1100, probe).is_empty(), "not yet past the limit");
    let a = s.tick(1101, probe);
    assert_eq!(
        a,
        [
            Action::Signal {
                slot: busy,
                sig: Signal::ABORT
            },
            Action::Event(Ev::Hung(1)),
            Action::Unready { slot: busy },
        ]
    );
    assert!(s.tick(2000, probe).is_empty());
    assert_eq!(
        s.tick(2101, probe),
        [Action::Signal {
            slot: busy,
            sig: Signal::KILL
        }]
    );
    assert!(
        s.tick(60_000, probe).is_empty(),
        "worker {idle} waits idle: never hung"
    );
}

#[test]
fn leaving_workers_are_killed_when_their_timeout_passes() {
    let cfg = Supervision {
        graceful_timeout: MS * 500,
        fast_timeout: MS * 200,
        ..Supervision::default()
    };
    let mut s = Sim::new(cfg.clone(), 2);
    s.sup.disconnect(s.slot_of(1), s.at(0));
    let a = s.run(0);
    assert_eq!(a[0], Action::Disconnect { slot: 0 });
    assert_eq!(s.sup.desired(), 1, "a disconnected worker is not replaced");
    assert_eq!(forks(&a), 0);
    assert!(s.tick(499, |_| Probe::default()).is_empty());
    assert_eq!(
        s.tick(500, |_| Probe::default()),
        [Action::Signal {
            slot: 0,
            sig: Signal::KILL
        }]
    );
    // Fast stop: retire, SIGTERM at once, SIGKILL after the fast timeout; nothing respawns.
    let mut s = Sim::new(cfg, 2);
    s.sup.stop(false, s.at(0));
    let a = s.run(0);
    assert!(a.contains(&Action::Event(Ev::Stopping(false))));
    assert!(a.contains(&Action::StopAccepting));
    for slot in 0..2 {
        assert!(a.contains(&Action::Retire { slot }));
        assert!(a.contains(&Action::Signal {
            slot,
            sig: Signal::TERM
        }));
    }
    let a = s.tick(200, |_| Probe::default());
    assert_eq!(
        a.iter()
            .filter(|x| matches!(
                x,
                Action::Signal {
                    sig: Signal::KILL,
                    ..
                }
            ))
            .count(),
        2
    );
    assert_eq!(forks(&s.exit(1, KILLED, 210)), 0);
}

#[test]
fn a_failed_fork_is_an_event_and_a_backoff_not_a_loop() {
    let cfg = Supervision {
        backoff_min: MS * 100,
        ..Supervision::default()
    };
    let mut s = Sim::new(cfg, 1);
    s.sup.ready(0, s.at(1));
    s.sup.reaped(0, s.at(2000), false);
    s.slots[0] = None;
    s.sup.exited(0, KILLED, s.at(2000));
    // The primary tries the fork and it fails (EMFILE).
    let Some(Action::Fork { replaces }) = s.sup.next_action() else {
        panic!("a respawn is asked for")
    };
    s.sup
        .fork_failed(replaces, Error::Capacity("worker table full"), s.at(2000));
    let a = s.run(2000);
    assert_eq!(
        a[0],
        Action::Event(Ev::SpawnFailed(Error::Capacity("worker table full")))
    );
    assert_eq!(forks(&a), 0);
    for t in [2001, 2050, 2099] {
        assert_eq!(forks(&s.tick(t, |_| Probe::default())), 0, "at {t}");
    }
    assert_eq!(forks(&s.tick(2100, |_| Probe::default())), 1);
}

#[test]
fn signals_scale_and_stop() {
    let mut s = Sim::new(Supervision::default(), 2);
    s.sup.on_signal(libc::SIGTTIN, s.at(0));
    let a = s.run(0);
    assert!(a.contains(&Action::Event(Ev::Scale(3))));
    assert_eq!(forks(&a), 1);
    s.sup.on_signal(libc::SIGTTOU, s.at(1));
    let a = s.run(1);
    // The newest worker (id 3, in slot 2) leaves.
    assert!(a.contains(&Action::Disconnect { slot: 2 }), "{a:?}");
    for _ in 0..5 {
        s.sup.on_signal(libc::SIGTTOU, s.at(2));
    }
    assert_eq!(s.sup.desired(), 1, "never below one worker");
    s.sup.on_signal(libc::SIGTERM, s.at(3));
    let a = s.run(3);
    assert!(a.contains(&Action::Event(Ev::Stopping(true))));
    assert!(!s.sup.running());
    s.sup.on_signal(libc::SIGTTIN, s.at(4));
    assert!(s.run(4).is_empty(), "no scaling while stopping");
}

#[test]
fn an_idle_looking_worker_with_hand_offs_waiting_too_long_is_hung() {
    let cfg = Supervision {
        hang_timeout: Some(MS * 1000),
        ..Supervision::default()
    };
    let mut s = Sim::new(cfg, 1);
    let idle = |queued| {
        move |_| Probe {
            beat: 9,
            conns: 0,
            queued,
        }
    };
    assert!(s.tick(100, idle(false)).is_empty());
    // Frames wait from 5 s on; the heartbeat still says "idle, waiting".
    assert!(s.tick(5000, idle(true)).is_empty());
    assert!(
        s.tick(6000, idle(true)).is_empty(),
        "not yet past the limit"
    );
    // The queue drained in between: the clock starts again.
    assert!(s.tick(6100, idle(false)).is_empty());
    assert!(s.tick(6200, idle(true)).is_empty());
    assert!(s.tick(7200, idle(true)).is_empty());
    let a = s.tick(7201, idle(true));
    assert!(a.contains(&Action::Event(Ev::Hung(1))), "{a:?}");
}

// ----- disconnects: the channel closes before the exit (Node's disconnect model) --------------

/// The signals among `actions`, as `(slot, signal)`.
fn signals(actions: &[Action]) -> Vec<(usize, Signal)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Signal { slot, sig } => Some((*slot, *sig)),
            _ => None,
        })
        .collect()
}

/// The channel of worker `id` closes at `ms` while it lives: it sent `Close` (its own
/// `Worker::disconnect`, or its answer to a `Disconnect`), as the primary reports it.
fn closes(s: &mut Sim, id: u32, ms: u64) -> Vec<Action> {
    let slot = s.slot_of(id);
    s.sup.closed_itself(slot, s.at(ms));
    s.sup.channel_closed(slot, s.at(ms));
    s.run(ms)
}

#[test]
fn a_worker_that_disconnects_itself_is_replaced_only_once_gone() {
    let cfg = Supervision {
        backoff_min: MS * 100,
        healthy_uptime: MS * 1000,
        graceful_timeout: MS * 500,
        ..Supervision::default()
    };
    let mut s = Sim::new(cfg, 2);
    for id in [1, 2] {
        s.sup.ready(s.slot_of(id), s.at(5));
    }
    let _ = s.run(5);
    // Worker 1 disconnects itself at 2000 ms and finishes a connection: it still counts.
    let a = closes(&mut s, 1, 2000);
    assert_eq!(forks(&a), 0, "no replacement while it is alive: {a:?}");
    assert!(a.contains(&Action::Wake(s.at(2500))), "{a:?}");
    assert_eq!(s.sup.desired(), 2);
    for t in [2100, 2300, 2499] {
        let a = s.tick(t, |_| Probe::default());
        assert_eq!(forks(&a), 0, "still not replaced at {t} ms: {a:?}");
        assert!(signals(&a).is_empty(), "{a:?}");
    }
    // It exits by itself before its timeout: replaced then, by the rules of a crash (it was
    // old and healthy, so at once).
    let a = s.exit(1, 0, 2400);
    assert_eq!(forks(&a), 1, "replaced once gone: {a:?}");
    assert!(backoffs(&a).is_empty(), "{a:?}");

    // A young one (it disconnects itself right after start) backs off like a crash loop.
    let young = s.next_id - 1;
    s.sup.ready(s.slot_of(young), s.at(2410));
    assert_eq!(forks(&closes(&mut s, young, 2420)), 0);
    let a = s.exit(young, 0, 2430);
    assert_eq!(forks(&a), 0, "no fork before the backoff: {a:?}");
    assert_eq!(backoffs(&a), [MS * 100]);
    assert_eq!(forks(&s.tick(2530, |_| Probe::default())), 1);
}

#[test]
fn a_worker_that_disconnects_itself_and_lingers_is_killed_after_the_graceful_timeout() {
    let cfg = Supervision {
        graceful_timeout: MS * 500,
        ..Supervision::default()
    };
    let mut s = Sim::new(cfg, 1);
    s.sup.ready(0, s.at(5));
    let _ = s.run(5);
    let _ = closes(&mut s, 1, 100);
    assert!(s.tick(599, |_| Probe::default()).is_empty());
    let a = s.tick(600, |_| Probe::default());
    assert_eq!(signals(&a), [(0, Signal::KILL)]);
    assert_eq!(forks(&a), 0, "still there until it is reaped");
    // A second `Close` (or end of file) does not move the timer later.
    let _ = closes(&mut s, 1, 700);
    assert!(signals(&s.tick(1100, |_| Probe::default())).is_empty());
    // Reaped: replaced (after the minimum backoff, as a worker killed while serving).
    let a = s.exit(1, KILLED, 610);
    assert_eq!(backoffs(&a), [Supervision::default().backoff_min]);
}

#[test]
fn the_answer_to_a_disconnect_keeps_the_timeout_of_the_request() {
    let cfg = Supervision {
        graceful_timeout: MS * 500,
        ..Supervision::default()
    };
    let mut s = Sim::new(cfg, 2);
    s.sup.disconnect(s.slot_of(1), s.at(0));
    let a = s.run(0);
    assert_eq!(a[0], Action::Disconnect { slot: 0 });
    assert_eq!(s.sup.desired(), 1);
    // It answers at 300 ms (its `Close`: the primary reports `Disconnect` now) and finishes.
    let a = closes(&mut s, 1, 300);
    assert_eq!(forks(&a), 0, "{a:?}");
    assert!(s.tick(499, |_| Probe::default()).is_empty());
    assert_eq!(
        signals(&s.tick(500, |_| Probe::default())),
        [(0, Signal::KILL)],
        "the graceful timeout counts from the request, not from the answer"
    );
    assert_eq!(
        forks(&s.exit(1, KILLED, 510)),
        0,
        "asked to leave: not respawned"
    );
    assert_eq!(s.sup.desired(), 1);
}

#[test]
fn disconnecting_a_worker_that_disconnected_itself_retires_it_without_an_early_fork() {
    let mut s = Sim::new(Supervision::default(), 2);
    for id in [1, 2] {
        s.sup.ready(s.slot_of(id), s.at(5));
    }
    let _ = s.run(5);
    assert_eq!(forks(&closes(&mut s, 1, 2000)), 0);
    // The application, seeing its `Disconnect`, asks it to leave: one worker fewer, and its
    // replacement is not forked (not now, while it lives, nor when it is gone).
    s.sup.disconnect(s.slot_of(1), s.at(2010));
    let a = s.run(2010);
    assert_eq!(forks(&a), 0, "{a:?}");
    assert_eq!(s.sup.desired(), 1);
    assert_eq!(forks(&s.exit(1, 0, 2100)), 0);
    assert_eq!(forks(&s.tick(5000, |_| Probe::default())), 0);
}

#[test]
fn a_rolling_restart_step_whose_old_worker_answers_early_forks_nothing_more() {
    let mut s = Sim::new(Supervision::default(), 2);
    for id in [1, 2] {
        s.sup.ready(s.slot_of(id), s.at(5));
    }
    let _ = s.run(5);
    s.sup.restart();
    assert_eq!(forks(&s.run(10)), 1);
    let new = s.next_id - 1;
    // The replacement is ready: worker 1 is asked to leave (and the next step forks worker
    // 2's replacement), and answers at once.
    s.sup.ready(s.slot_of(new), s.at(20));
    let a = s.run(20);
    assert!(a.contains(&Action::Disconnect { slot: 0 }), "{a:?}");
    assert_eq!(forks(&a), 1, "the next step: {a:?}");
    assert_eq!(forks(&closes(&mut s, 1, 25)), 0);
    // Worker 1 still finishes; its exit is planned: nothing more is forked for it.
    assert_eq!(forks(&s.tick(100, |_| Probe::default())), 0);
    assert_eq!(forks(&s.exit(1, 0, 200)), 0);
    assert_eq!(s.sup.desired(), 2);
    assert!(s.sup.restarting(), "worker 2 is still to be replaced");
}
