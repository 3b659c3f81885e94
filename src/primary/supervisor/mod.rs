//! The supervision policy as a plain state machine: no system call, no clock of its own.
//!
//! Inputs are what happened, with the time it happened: a worker was forked, became ready, had
//! its channel closed, was reaped, exited (and was reported); a tick; a signal; a command from
//! the application (stop, restart, scale, disconnect). Outputs are [`Action`]s, read with
//! [`Supervisor::next_action`]: fork one, signal this slot, disconnect it, stop handing it
//! work, report this event, wake me at `t`. The primary carries them out in order and reports
//! back what its system calls did ([`Supervisor::forked`], [`Supervisor::fork_failed`]).
//! The unit tests drive it with a fake clock.
//!
//! The rules (gunicorn's arbiter reads the same way: reap, murder the timed out, manage the
//! count):
//! * **Respawn.** Workers that count towards the wanted number are those not asked to leave
//!   (until they exit: a worker that closed its channel or broke the protocol is replaced once
//!   it is gone, by the same backoff rules as a crash, never before); whenever fewer are there,
//!   it forks the difference, unless a backoff runs.
//! * **Protocol violations** are answered with SIGKILL at once. A worker that closes its channel
//!   itself is disconnecting: it has the graceful timeout to finish, then SIGKILL.
//! * **Crash-loop backoff.** A worker that dies before it was ready and before `healthy_uptime`
//!   is a start-up crash: the next fork waits `backoff_min`, doubling with every crash of the
//!   streak up to `backoff_max`. The streak ends when a worker forked after the last crash has
//!   stayed up for `healthy_uptime`. A worker that dies young after it was ready (killed while
//!   serving) is respawned after `backoff_min`: one fork per `backoff_min` at most, and no
//!   growing gap in service.
//! * **Fatal exit code.** Reported, not respawned; one worker fewer is wanted.
//! * **Rolling restart.** `restart_batch` replacements at a time; each old worker is
//!   disconnected once its replacement is ready; a replacement that dies first puts its old
//!   worker back at the head of the queue.
//! * **Recycle.** After `max_requests` connections plus a jitter in `0..=jitter`, a replacement
//!   is forked and the old worker leaves once it is ready.
//! * **Hung workers.** A busy worker whose heartbeat has not moved for `hang_timeout` gets
//!   SIGABRT, SIGKILL a second later, and no more work.
//! * **Kill timers.** A worker asked to leave is SIGKILLed when its timeout passes; a signal
//!   other than SIGKILL is followed by SIGKILL a second later.

use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use rustix::process::Signal;

use super::events::Ev;
use crate::error::Error;
use crate::settings::Supervision;

/// How often the supervisor wants a tick while anything it watches is pending.
pub(crate) const TICK: Duration = Duration::from_millis(100);
/// From a signal that is not SIGKILL (or from being reaped with the channel still open) to the
/// next step.
const GRACE: Duration = Duration::from_secs(1);

/// The worker a new one replaces once ready: its slot and id, and whether that is a step of a
/// rolling restart (else a recycle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Replace {
    pub(crate) slot: usize,
    pub(crate) id: u32,
    pub(crate) restart: bool,
}

/// What the primary is asked to do.
#[derive(Debug, PartialEq)]
pub(crate) enum Action {
    /// Fork one worker; report [`Supervisor::forked`] or [`Supervisor::fork_failed`].
    Fork { replaces: Option<Replace> },
    /// Send `sig` to the worker in `slot` (unless it was reaped already).
    Signal { slot: usize, sig: Signal },
    /// Ask the worker in `slot` to finish and exit: no more work, a `Disconnect` frame.
    Disconnect { slot: usize },
    /// No more work for the worker in `slot`: it is leaving (fast stop).
    Retire { slot: usize },
    /// No more work for the worker in `slot` (hung); its exit is still a crash.
    Unready { slot: usize },
    /// Close the channel of the worker in `slot`: it was reaped a while ago, and something it
    /// forked holds the other end.
    CloseChannel { slot: usize },
    /// Stop accepting and hand out what is queued (the cluster is stopping).
    StopAccepting,
    /// Report an event.
    Event(Ev),
    /// Call [`Supervisor::tick`] at this time (or earlier).
    Wake(Instant),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Running,
    Stopping { graceful: bool },
}

/// The supervisor's record of one worker.
#[derive(Debug)]
struct Member {
    id: u32,
    started: Instant,
    /// It became ready (listening; or in its loop, without listeners) at least once.
    ready: bool,
    /// Asked to leave (disconnect, stop, replaced): its exit is planned, no respawn.
    leaving: bool,
    connected: bool,
    reaped_at: Option<Instant>,
    kill_at: Option<(Instant, Signal)>,
    replaces: Option<Replace>,
    /// A replacement for it is under way.
    replaced: bool,
    beat: u32,
    beat_seen: Instant,
    /// Since when frames have waited in its queue while its heartbeat did not move.
    queued_since: Option<Instant>,
    hung: bool,
    max_conns: u64,
}

/// What the supervisor reads of a worker at each tick (from the shared page).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Probe {
    /// The heartbeat word: moves with progress; low bit set while idle.
    pub(crate) beat: u32,
    /// Connections it accepted itself (shared schedule).
    pub(crate) conns: u64,
    /// Frames wait in its queue (hand-offs it has not received): read only with a
    /// `hang_timeout`.
    pub(crate) queued: bool,
}

/// The policy and its state.
pub(crate) struct Supervisor {
    cfg: Supervision,
    /// Workers count their own connections (shared schedule): `max_requests` is checked at
    /// ticks.
    self_counted: bool,
    members: Vec<Option<Member>>,
    run: Run,
    desired: usize,
    /// Forks asked for whose result has not been reported yet.
    forking: usize,
    /// Members not asked to leave (kept as a count: O(1) per decision).
    staying: usize,
    crash_streak: u32,
    /// When the last worker died young (a crash of the streak).
    last_crash: Option<Instant>,
    respawn_at: Option<Instant>,
    restart_queue: VecDeque<(usize, u32)>,
    restart_active: usize,
    rng: u64,
    out: VecDeque<Action>,
}

impl Supervisor {
    /// A supervisor for a table of `max` slots that wants `desired` workers.
    pub(crate) fn new(
        cfg: Supervision,
        self_counted: bool,
        desired: usize,
        max: usize,
        seed: u64,
    ) -> Supervisor {
        let mut members = Vec::with_capacity(max);
        members.resize_with(max, || None);
        Supervisor {
            cfg,
            self_counted,
            members,
            run: Run::Running,
            desired,
            forking: 0,
            staying: 0,
            crash_streak: 0,
            last_crash: None,
            respawn_at: None,
            restart_queue: VecDeque::with_capacity(max),
            restart_active: 0,
            rng: seed | 1,
            out: VecDeque::with_capacity(4 * max + 16),
        }
    }

    /// The next thing to do, in order.
    pub(crate) fn next_action(&mut self) -> Option<Action> {
        self.out.pop_front()
    }

    // ----- what the primary reports ---------------------------------------------------------

    /// A worker was forked into `slot` (by an [`Action::Fork`], or directly at start and by
    /// `Primary::fork`). Returns the number of connections after which it is recycled.
    pub(crate) fn forked(
        &mut self,
        slot: usize,
        id: u32,
        now: Instant,
        replaces: Option<Replace>,
        asked: bool,
    ) -> u64 {
        if asked {
            self.forking = self.forking.saturating_sub(1);
        }
        let max_conns = match self.cfg.max_requests {
            Some((n, j)) => n.saturating_add(self.jitter(j)),
            None => u64::MAX,
        };
        if let Some(m) = self.members.get_mut(slot) {
            if m.as_ref().is_some_and(|o| !o.leaving) {
                self.staying -= 1;
            }
            self.staying += 1;
            *m = Some(Member {
                id,
                started: now,
                ready: false,
                leaving: false,
                connected: true,
                reaped_at: None,
                kill_at: None,
                replaces,
                replaced: false,
                beat: 0,
                beat_seen: now,
                queued_since: None,
                hung: false,
                max_conns,
            });
        }
        max_conns
    }

    /// An [`Action::Fork`] failed (no slot, no fds, no memory): the supervisor tries again
    /// after the minimum backoff, and a rolling restart or recycle step waits for it.
    pub(crate) fn fork_failed(&mut self, replaces: Option<Replace>, error: Error, now: Instant) {
        self.forking = self.forking.saturating_sub(1);
        if let Some(r) = replaces {
            if let Some(o) = self.member_mut(r.slot, r.id) {
                o.replaced = false;
            }
            if r.restart {
                self.restart_active = self.restart_active.saturating_sub(1);
                self.restart_queue.push_front((r.slot, r.id));
            }
        }
        self.out.push_back(Action::Event(Ev::SpawnFailed(error)));
        let at = after(now, self.cfg.backoff_min);
        if self.respawn_at.map_or(true, |t| t < at) {
            self.respawn_at = Some(at);
        }
        self.out.push_back(Action::Wake(at));
    }

    /// The worker in `slot` is ready to serve (its first `Listening`, or, without listeners,
    /// its loop started): if it replaces another, that one now leaves. Returns false when it
    /// was ready before.
    pub(crate) fn ready(&mut self, slot: usize, now: Instant) -> bool {
        let Some(m) = self.members.get_mut(slot).and_then(Option::as_mut) else {
            return false;
        };
        if m.ready {
            return false;
        }
        m.ready = true;
        m.beat_seen = now;
        let new = m.id;
        let Some(r) = m.replaces.take() else {
            return true;
        };
        if self.member(r.slot, r.id).is_some() {
            self.disconnect_slot(r.slot, self.cfg.graceful_timeout, now);
        }
        if r.restart {
            self.restart_active = self.restart_active.saturating_sub(1);
            self.out.push_back(Action::Event(Ev::Restart(
                r.id,
                new,
                self.restart_queue.len(),
            )));
            self.step_restart();
            if self.restart_active == 0 && self.restart_queue.is_empty() {
                self.out.push_back(Action::Event(Ev::RestartDone));
            }
        }
        true
    }

    /// The worker in `slot` broke the protocol: SIGKILL now (its channel is closed next). It
    /// is replaced once it is gone, by the rules of a crash.
    pub(crate) fn broke_protocol(&mut self, slot: usize) {
        if self.members.get(slot).is_some_and(Option::is_some) {
            self.out.push_back(Action::Signal {
                slot,
                sig: Signal::KILL,
            });
        }
    }

    /// The worker in `slot` closed its channel while it lives (a `Close` frame, or end of file):
    /// it is disconnecting, and has the graceful timeout to finish and exit. A worker that
    /// disconnects on its own (`Worker::disconnect`) still counts towards the wanted number
    /// until it is gone, so nothing is forked for it before its exit. A worker asked to leave
    /// answers its `Disconnect` this way: the timer of the request stands (the earlier one
    /// wins).
    pub(crate) fn closed_itself(&mut self, slot: usize, now: Instant) {
        let at = after(now, self.cfg.graceful_timeout);
        let Some(m) = self.members.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if m.kill_at.map_or(true, |(t, _)| t > at) {
            m.kill_at = Some((at, Signal::KILL));
        }
        self.out.push_back(Action::Wake(at));
    }

    /// The primary's end of the worker's channel was closed.
    pub(crate) fn channel_closed(&mut self, slot: usize, now: Instant) {
        if let Some(m) = self.members.get_mut(slot).and_then(Option::as_mut) {
            m.connected = false;
        }
        self.manage(now);
    }

    /// The worker in `slot` was reaped (its exit is reported once its channel is drained).
    pub(crate) fn reaped(&mut self, slot: usize, now: Instant, channel_open: bool) {
        if let Some(m) = self.members.get_mut(slot).and_then(Option::as_mut) {
            m.reaped_at = Some(now);
        }
        if channel_open {
            self.out.push_back(Action::Wake(now + GRACE));
        }
    }

    /// The worker in `slot` exited with wait status `raw`, and its `Exit` was reported: respawn
    /// (or not) by the rules.
    pub(crate) fn exited(&mut self, slot: usize, raw: i32, now: Instant) {
        let Some(m) = self.members.get_mut(slot).and_then(Option::take) else {
            return;
        };
        if !m.leaving {
            self.staying -= 1;
        }
        if let Some(r) = m.replaces {
            // A replacement died before it was ready: the old worker stays and is tried again.
            if let Some(o) = self.member_mut(r.slot, r.id) {
                o.replaced = false;
                if r.restart {
                    self.restart_active = self.restart_active.saturating_sub(1);
                    self.restart_queue.push_front((r.slot, r.id));
                }
            }
        }
        if self.run != Run::Running {
            return;
        }
        let status = ExitStatus::from_raw(raw);
        if !m.leaving {
            if self.cfg.fatal_exit_code.is_some() && status.code() == self.cfg.fatal_exit_code {
                self.out
                    .push_back(Action::Event(Ev::Fatal(m.id, status.code().unwrap_or(0))));
                self.desired = self.desired.saturating_sub(1);
            } else if self.cfg.respawn {
                let healthy = self.cfg.healthy_uptime;
                let young = now.saturating_duration_since(m.started) < healthy;
                if young && m.ready {
                    // It was serving when it died (killed from outside, or a crash while
                    // handling work): not a start-up crash loop. Respawn after the minimum
                    // delay only, which still bounds forks to one per `backoff_min`.
                    self.back_off(self.cfg.backoff_min, now);
                } else if young {
                    // A worker forked after the last crash has stayed up for the healthy
                    // uptime: that crash loop is over, this crash starts a new streak.
                    let over = self.last_crash.is_some_and(|t| {
                        self.members.iter().flatten().any(|o| {
                            o.started > t
                                && o.reaped_at.is_none()
                                && now.saturating_duration_since(o.started) >= healthy
                        })
                    });
                    if over {
                        self.crash_streak = 0;
                    }
                    self.last_crash = Some(now);
                    self.crash_streak = self.crash_streak.saturating_add(1);
                    let shift = (self.crash_streak - 1).min(16);
                    let delay = self
                        .cfg
                        .backoff_min
                        .saturating_mul(1 << shift)
                        .min(self.cfg.backoff_max);
                    self.back_off(delay, now);
                } else {
                    self.crash_streak = 0;
                }
            }
        }
        self.step_restart();
        self.manage(now);
    }

    /// A tick: kill timers, hung workers, channels left open by grandchildren, `max_requests`
    /// counted by the workers, and the respawn the backoff held back. `probe` reads a slot's
    /// shared counters.
    pub(crate) fn tick(&mut self, now: Instant, mut probe: impl FnMut(usize) -> Probe) {
        let hang = self.cfg.hang_timeout;
        let check_conns = self.cfg.max_requests.is_some() && self.self_counted;
        for slot in 0..self.members.len() {
            let Some(m) = self.members[slot].as_mut() else {
                continue;
            };
            let p = probe(slot);
            if let Some((t, sig)) = m.kill_at {
                if t <= now {
                    self.out.push_back(Action::Signal { slot, sig });
                    m.kill_at = if sig == Signal::KILL {
                        None
                    } else {
                        Some((now + GRACE, Signal::KILL))
                    };
                }
            }
            let force_close = m.connected
                && m.reaped_at
                    .is_some_and(|t| now.saturating_duration_since(t) >= GRACE);
            let mut hung = false;
            if p.beat != m.beat {
                m.beat = p.beat;
                m.beat_seen = now;
                m.queued_since = None;
            } else if let Some(limit) = hang {
                // Busy without progress; or "idle" while hand-offs wait in its queue (a
                // stopped or wedged worker whose last beat said idle).
                let busy = p.beat & 1 == 0;
                let waiting = if p.queued {
                    *m.queued_since.get_or_insert(now)
                } else {
                    m.queued_since = None;
                    now
                };
                let stuck = (busy && now.saturating_duration_since(m.beat_seen) > limit)
                    || now.saturating_duration_since(waiting) > limit;
                if stuck && !m.hung && m.reaped_at.is_none() {
                    m.hung = true;
                    hung = true;
                    m.kill_at = Some((now + GRACE, Signal::KILL));
                }
            }
            let recycle = check_conns && p.conns >= m.max_conns && !m.replaced && !m.leaving;
            if hung {
                let id = m.id;
                self.out.push_back(Action::Signal {
                    slot,
                    sig: Signal::ABORT,
                });
                self.out.push_back(Action::Event(Ev::Hung(id)));
                // No more work for it; what it holds is recovered when it is reaped.
                self.out.push_back(Action::Unready { slot });
            }
            if recycle {
                self.recycle(slot);
            }
            if force_close {
                self.out.push_back(Action::CloseChannel { slot });
            }
        }
        self.manage(now);
    }

    /// Whether anything is pending that needs periodic ticks.
    pub(crate) fn needs_tick(&self) -> bool {
        self.cfg.hang_timeout.is_some()
            || (self.cfg.max_requests.is_some() && self.self_counted)
            || self.respawn_at.is_some()
            || self.run != Run::Running
            || self
                .members
                .iter()
                .flatten()
                .any(|m| m.kill_at.is_some() || m.reaped_at.is_some())
    }

    /// Forks what is missing, unless a backoff runs (after workers were reaped).
    pub(crate) fn respawn(&mut self, now: Instant) {
        self.manage(now);
    }

    /// The worker in `slot` reached its connection limit: fork its replacement.
    pub(crate) fn recycle(&mut self, slot: usize) {
        if self.run != Run::Running {
            return;
        }
        let Some(m) = self.members.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if m.replaced || m.leaving {
            return;
        }
        m.replaced = true;
        let id = m.id;
        self.out.push_back(Action::Event(Ev::Recycle(id)));
        self.fork(Some(Replace {
            slot,
            id,
            restart: false,
        }));
    }

    // ----- what the primary reads -------------------------------------------------------------

    /// The wanted number of workers.
    pub(crate) fn desired(&self) -> usize {
        self.desired
    }

    /// Whether the cluster is running (not stopping).
    pub(crate) fn running(&self) -> bool {
        self.run == Run::Running
    }

    /// Whether a rolling restart is under way.
    pub(crate) fn restarting(&self) -> bool {
        self.restart_active > 0 || !self.restart_queue.is_empty()
    }

    /// When the worker in `slot` was forked and when its heartbeat last moved.
    pub(crate) fn times(&self, slot: usize) -> Option<(Instant, Instant)> {
        let m = self.members.get(slot)?.as_ref()?;
        Some((m.started, m.beat_seen))
    }

    // ----- internals --------------------------------------------------------------------------

    fn member(&self, slot: usize, id: u32) -> Option<&Member> {
        self.members
            .get(slot)
            .and_then(Option::as_ref)
            .filter(|m| m.id == id)
    }

    fn member_mut(&mut self, slot: usize, id: u32) -> Option<&mut Member> {
        self.members
            .get_mut(slot)
            .and_then(Option::as_mut)
            .filter(|m| m.id == id)
    }

    /// Workers that count towards the wanted number: those not asked to leave, and the forks
    /// under way. A worker counts until its `Exit` is reported (also after its channel
    /// closed), so that its respawn (and backoff) is decided once, in order, when it is gone.
    fn active(&self) -> usize {
        self.forking + self.staying
    }

    fn set_leaving(&mut self, slot: usize) {
        if let Some(m) = self.members.get_mut(slot).and_then(Option::as_mut) {
            if !m.leaving {
                m.leaving = true;
                self.staying -= 1;
            }
        }
    }

    fn fork(&mut self, replaces: Option<Replace>) {
        self.forking += 1;
        self.out.push_back(Action::Fork { replaces });
    }

    fn back_off(&mut self, delay: Duration, now: Instant) {
        let at = after(now, delay);
        if self.respawn_at.map_or(true, |t| t < at) {
            self.respawn_at = Some(at);
        }
        self.out.push_back(Action::Event(Ev::Backoff(delay)));
        self.out.push_back(Action::Wake(at));
    }

    /// Forks until as many are active as wanted (respawn), unless backing off.
    fn manage(&mut self, now: Instant) {
        if self.run != Run::Running || !self.cfg.respawn {
            return;
        }
        if let Some(t) = self.respawn_at {
            if t > now {
                return;
            }
            self.respawn_at = None;
        }
        while self.active() < self.desired {
            self.fork(None);
        }
    }

    fn step_restart(&mut self) {
        if self.run != Run::Running {
            return;
        }
        while self.restart_active < self.cfg.restart_batch {
            let Some((slot, id)) = self.restart_queue.pop_front() else {
                break;
            };
            let Some(m) = self.member_mut(slot, id) else {
                continue;
            };
            if m.leaving || m.replaced {
                continue;
            }
            m.replaced = true;
            self.restart_active += 1;
            self.fork(Some(Replace {
                slot,
                id,
                restart: true,
            }));
        }
    }

    fn disconnect_slot(&mut self, slot: usize, timeout: Duration, now: Instant) {
        let at = after(now, timeout);
        self.set_leaving(slot);
        let Some(m) = self.members.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if m.kill_at.map_or(true, |(t, _)| t > at) {
            m.kill_at = Some((at, Signal::KILL));
        }
        self.out.push_back(Action::Disconnect { slot });
        self.out.push_back(Action::Wake(at));
    }

    fn jitter(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        match max.checked_add(1) {
            Some(m) => self.rng % m,
            None => self.rng,
        }
    }
}

/// `now + d`, saturating at a year from now (a setting of `Duration::MAX` means "never").
pub(crate) fn after(now: Instant, d: Duration) -> Instant {
    const YEAR: Duration = Duration::from_secs(365 * 86_400);
    now.checked_add(d.min(YEAR)).unwrap_or(now)
}

mod commands;
#[cfg(test)]
mod tests;
