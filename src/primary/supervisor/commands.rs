//! The supervisor's commands: what a signal to the primary means, and stop, restart, scale and
//! disconnect as the application asks for them.

use std::time::Instant;

use rustix::process::Signal;

use super::{after, Action, Ev, Run, Supervisor};

impl Supervisor {
    /// What a signal to the primary means (with `handle_signals` on): TERM and QUIT stop
    /// gracefully, INT fast, HUP restarts, TTIN and TTOU scale by one.
    pub(crate) fn on_signal(&mut self, signo: i32, now: Instant) {
        match signo {
            libc::SIGTERM | libc::SIGQUIT => self.stop(true, now),
            libc::SIGINT => self.stop(false, now),
            libc::SIGHUP => self.restart(),
            libc::SIGTTIN => {
                let n = self.desired + 1;
                self.scale(n, now);
            }
            libc::SIGTTOU => {
                let n = self.desired.saturating_sub(1).max(1);
                self.scale(n, now);
            }
            _ => {}
        }
    }

    /// Stops the cluster: graceful (disconnect every worker, SIGKILL after the graceful
    /// timeout) or fast (SIGTERM, SIGKILL after the fast timeout). A graceful stop while one is
    /// under way turns fast.
    pub(crate) fn stop(&mut self, graceful: bool, now: Instant) {
        let graceful = graceful && self.run == Run::Running;
        if self.run == (Run::Stopping { graceful: false }) {
            return;
        }
        self.run = Run::Stopping { graceful };
        self.out.push_back(Action::Event(Ev::Stopping(graceful)));
        self.restart_queue.clear();
        self.respawn_at = None;
        self.out.push_back(Action::StopAccepting);
        for slot in 0..self.members.len() {
            if self.members[slot].is_none() {
                continue;
            }
            if graceful {
                self.disconnect_slot(slot, self.cfg.graceful_timeout, now);
            } else {
                let at = after(now, self.cfg.fast_timeout);
                self.set_leaving(slot);
                if let Some(m) = self.members[slot].as_mut() {
                    m.kill_at = Some((at, Signal::KILL));
                }
                self.out.push_back(Action::Retire { slot });
                self.out.push_back(Action::Signal {
                    slot,
                    sig: Signal::TERM,
                });
                self.out.push_back(Action::Wake(at));
            }
        }
    }

    /// Replaces every worker, `restart_batch` at a time.
    pub(crate) fn restart(&mut self) {
        if self.run != Run::Running {
            return;
        }
        self.restart_queue.clear();
        for (slot, m) in self.members.iter().enumerate() {
            if let Some(m) = m {
                if !m.leaving {
                    self.restart_queue.push_back((slot, m.id));
                }
            }
        }
        self.step_restart();
    }

    /// Sets the wanted number of workers (1 to the table's size): the newest workers leave
    /// first; missing ones are forked.
    pub(crate) fn scale(&mut self, n: usize, now: Instant) {
        if self.run != Run::Running {
            return;
        }
        let n = n.clamp(1, self.members.len().max(1));
        self.desired = n;
        self.out.push_back(Action::Event(Ev::Scale(n)));
        while self.active() > n {
            let newest = self
                .members
                .iter()
                .enumerate()
                .filter_map(|(s, m)| m.as_ref().filter(|m| !m.leaving).map(|m| (s, m.id)))
                .max_by_key(|&(_, id)| id);
            let Some((slot, _)) = newest else { break };
            self.disconnect_slot(slot, self.cfg.graceful_timeout, now);
        }
        self.manage(now);
    }

    /// The application asked one worker to leave: one worker fewer is wanted (it is not
    /// replaced), unless it was leaving or being replaced already. That holds too for a worker
    /// that disconnected itself and is still finishing: it was to be replaced once gone, and
    /// now is not (marking it as leaving without one worker fewer wanted would fork its
    /// replacement at once, before it is gone).
    pub(crate) fn disconnect(&mut self, slot: usize, now: Instant) {
        if self
            .members
            .get(slot)
            .and_then(Option::as_ref)
            .is_some_and(|m| !m.leaving && !m.replaced)
        {
            self.desired = self.desired.saturating_sub(1);
        }
        self.disconnect_slot(slot, self.cfg.graceful_timeout, now);
    }

    /// The application forked one more worker itself: it counts towards the wanted number.
    pub(crate) fn added(&mut self) {
        self.desired = self.desired.max(self.active());
    }
}
