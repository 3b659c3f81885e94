//! The end of a worker's life as the primary's system calls see it: signals read from the
//! `signalfd`, reaping, the channel closing, the `Disconnect` request going out, and the final
//! `Exit`. What each of these means for the cluster is the supervisor's to decide.
//!
//! Node's model: `Event::Disconnect` is reported when the worker's channel closes, `Exit` when
//! the worker is gone (after it, exactly once). Path by path:
//!
//! | path | when the channel closes (`Disconnect`) | `Exit` |
//! |---|---|---|
//! | `Worker::disconnect` | the primary reads the worker's `Close`: the worker may still be finishing connections | at its exit, `exited_after_disconnect` |
//! | `Primary::disconnect`, graceful stop, rolling restart, scale down, recycle | the worker took the `Disconnect` frame (its `next` returned `Next::Disconnect`) and answered with `Close` | at its exit, `exited_after_disconnect` |
//! | a worker that is asked but never reads its channel again (or speaks the wire without answering) | at its exit, just before `Exit` | `exited_after_disconnect` |
//! | `Primary::kill`, fast stop, a crash, the worker function returning | at its exit, just before `Exit` (everything it sent is read first) | not after a disconnect, unless it was asked to leave |
//! | a protocol violation | at once (the primary closes it; SIGKILL) | a crash |

use std::time::Instant;

use rustix::io::Errno;
use rustix::process::{Signal, WaitOptions};

use super::events::Ev;
use super::table::{watch, State};
use super::Primary;
use crate::error::{Error, Result};
use crate::frame::{Frame, Kind};
use crate::sys;

impl Primary {
    /// The signalfd is readable: SIGCHLD reaps; the others are the supervisor's.
    pub(super) fn on_signal(&mut self) -> Result<()> {
        let mut buf = [0u8; 128 * 8];
        let mut chld = false;
        loop {
            let Some(fd) = self.sigfd.as_ref() else {
                return Ok(());
            };
            match rustix::io::read(fd, &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    for info in buf[..n].chunks_exact(128) {
                        // struct signalfd_siginfo: ssi_signo at 0, ssi_pid at 12.
                        let word = |at: usize| {
                            u32::from_ne_bytes([info[at], info[at + 1], info[at + 2], info[at + 3]])
                        };
                        let (signo, sender) = (word(0) as i32, word(12));
                        if signo == libc::SIGCHLD {
                            chld = true;
                        } else if self.table.find_pid(sender).is_some() {
                            // A control signal from one of our own workers: a worker may be
                            // compromised, and stopping, restarting or scaling the cluster is
                            // not its decision.
                            self.events.stats.ignored_signals += 1;
                        } else {
                            self.sup.on_signal(signo, Instant::now());
                            self.apply();
                        }
                    }
                }
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => break,
                Err(e) => return Err(Error::os("read(signalfd)", e)),
            }
        }
        if chld {
            self.reap();
        }
        Ok(())
    }

    /// Reaps what exited. A peek (`waitid(WNOWAIT)`) names the next child that exited
    /// without reaping it: a worker is reaped with `waitpid(pid)` (O(1) per exit). Any other
    /// child is reaped only when the primary is PID 1 or a child subreaper (orphans are then
    /// reparented to it and nobody else would reap them); otherwise it is the application's,
    /// its status stays for the application's own `waitpid`, and the primary falls back to a
    /// `waitpid(pid, WNOHANG)` per worker. It never calls `waitpid(-1)`, which could steal an
    /// application child's status.
    fn reap(&mut self) {
        let now = Instant::now();
        let mut sweep = false;
        while let Some(pid) = sys::peek_exited_child() {
            match self.table.find_pid(pid) {
                Some(slot) if self.table.get(slot).is_some_and(|w| w.status.is_none()) => {
                    if !self.reap_slot(slot, now) {
                        sweep = true;
                        break;
                    }
                }
                _ if self.reap_orphans => {
                    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                        let _ = rustix::process::waitpid(Some(p), WaitOptions::NOHANG);
                        self.events.stats.orphans_reaped += 1;
                    }
                }
                _ => {
                    sweep = true;
                    break;
                }
            }
        }
        if sweep {
            for slot in 0..self.table.len() {
                if self.table.get(slot).is_some_and(|w| w.status.is_none()) {
                    self.reap_slot(slot, now);
                }
            }
        }
        self.sup.respawn(now);
        self.apply();
    }

    /// `waitpid(pid, WNOHANG)` for the worker in `slot`; true when it was reaped.
    fn reap_slot(&mut self, slot: usize, now: Instant) -> bool {
        let Some(w) = self.table.get_mut(slot) else {
            return false;
        };
        let r = loop {
            match rustix::process::waitpid(Some(w.pid), WaitOptions::NOHANG) {
                Err(Errno::INTR) => continue,
                other => break other,
            }
        };
        match r {
            Ok(Some((_, st))) => w.status = Some(raw_status(st)),
            Ok(None) => return false,
            // ECHILD: not our child any more (reaped elsewhere). Report it as killed.
            Err(_) => w.status = Some(libc::SIGKILL),
        }
        self.after_reap(slot, now);
        true
    }

    /// A worker was reaped: take back the connections it never received; once everything it
    /// sent was read (its channel reports end of file, now that the primary's duplicate of the
    /// worker's end is closed) it is finished. A channel kept open by a grandchild that
    /// inherited it is closed after a second.
    fn after_reap(&mut self, slot: usize, now: Instant) {
        self.recover(slot);
        let open = self.table.get(slot).is_some_and(|w| w.chan.is_some());
        self.sup.reaped(slot, now, open);
        self.apply();
        if !open {
            self.finish(slot);
        }
        self.drain_pending();
    }

    /// The primary's end of a worker's channel is done with: the worker exited (and all it sent
    /// was read), sent `Close` (its own disconnect, or its answer to the primary's), or broke
    /// the protocol. `Disconnect` is reported here, and `Exit` too once it was reaped.
    pub(super) fn channel_closed(&mut self, slot: usize) {
        self.unready(slot);
        let Some(w) = self.table.get_mut(slot) else {
            return;
        };
        let reaped = w.status.is_some();
        if let Some(chan) = w.chan.take() {
            if let Some(ep) = &self.epoll {
                let _ = epoll_delete(ep, &chan);
            }
            drop(chan);
            w.state = State::Disconnecting;
            let id = w.id;
            self.events.push(Ev::Disconnect(id));
        }
        if reaped {
            // Exit, and what the supervisor makes of it (the slot may hold a new worker
            // afterwards).
            self.finish(slot);
        } else {
            self.sup.channel_closed(slot, Instant::now());
            self.apply();
        }
        self.drain_pending();
    }

    /// The worker's channel is closed and it was reaped: report `Exit`, free the slot, and let
    /// the supervisor decide about a respawn.
    fn finish(&mut self, slot: usize) {
        self.recover(slot);
        let Some(w) = self.table.remove(slot) else {
            return;
        };
        self.alive -= 1;
        let raw = w.status.unwrap_or(0);
        self.events.push(Ev::Exit(
            w.id,
            w.pid_u32(),
            raw,
            w.leaving || w.closed_itself,
        ));
        self.sup.exited(slot, raw, Instant::now());
        self.apply();
        self.left_seat(w.seat);
    }

    /// Carries out the supervisor's `Disconnect`: no more work, and a `Disconnect` frame (after
    /// what is queued, if the queue is full; SIGTERM if the channel is broken).
    pub(super) fn send_disconnect(&mut self, slot: usize) {
        if self.hold_disconnect() {
            // Stopping, and accepted connections still wait: this worker takes its share of
            // them first; the `Disconnect` follows once none waits.
            if let Some(w) = self.table.get_mut(slot) {
                if w.chan.is_some() && !w.disconnect_pending {
                    w.leaving = true;
                    w.disconnect_pending = true;
                    self.dispatch.held += 1;
                    self.make_ready(slot);
                    return;
                }
            }
        }
        self.retire(slot);
        let gen = self.table.gen(slot);
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let Some(w) = self.table.get_mut(slot) else {
            return;
        };
        if let Some(chan) = &w.chan {
            match chan.try_send(&Frame::new(Kind::Disconnect, seq, &[]), &[]) {
                Ok(()) => {}
                // Its queue is full: the request goes out, after what is queued, as soon as
                // the channel is writable.
                Err(e) if e.is_would_block() => {
                    w.disconnect_pending = true;
                    w.blocked = true;
                    watch(self.epoll.as_ref(), chan, slot, gen, true);
                }
                Err(_) => {
                    let _ = w.signal(Signal::TERM);
                }
            }
        }
        w.state = State::Disconnecting;
    }

    /// Marks a worker as leaving on purpose and stops handing it work.
    pub(super) fn retire(&mut self, slot: usize) {
        self.unready(slot);
        if let Some(w) = self.table.get_mut(slot) {
            w.leaving = true;
        }
    }
}

fn epoll_delete(ep: &std::os::fd::OwnedFd, chan: &crate::channel::Channel) -> Result<()> {
    rustix::event::epoll::delete(ep, chan).map_err(|e| Error::os("epoll_ctl", e))
}

/// A wait status as `waitpid` gives it, for `ExitStatus::from_raw`.
fn raw_status(st: rustix::process::WaitStatus) -> i32 {
    if let Some(code) = st.exit_status() {
        (code & 0xff) << 8
    } else if let Some(sig) = st.terminating_signal() {
        sig & 0x7f
    } else {
        0
    }
}
