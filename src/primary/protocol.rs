//! Frames from a worker: read them (a bounded number per wakeup), check each against what a
//! worker may send in its state, and turn it into an event, a state change or a protocol error.
//!
//! Fairness: at most [`FRAME_BUDGET`] frames of one worker, an fd counting as a frame, are
//! handled per `epoll_wait` round, messages included (each returned to the application
//! counts), before the listeners, the
//! signalfd, the ticks and the other workers get their turn. One worker flooding its channel
//! therefore delays the others by at most that many frames per round.
//!
//! Nothing a worker sends is trusted: a frame that does not decode, carries fds it should not,
//! names a listener that does not exist or is of a kind only the primary sends is a protocol
//! error; the worker's channel is closed and the supervisor kills it.

use std::os::fd::OwnedFd;
use std::time::Instant;

use arrayvec::ArrayVec;

use super::events::Ev;
use super::table::State;
use super::Primary;
use crate::channel::{Received, Taken};
use crate::error::Error;
use crate::frame::{self, Kind, MAX_FDS};

/// Frames (and fds: each counts as one) read from one worker per `epoll_wait` round before the
/// loop looks at other fds.
const FRAME_BUDGET: usize = 32;

/// What one frame from a worker means, given what the primary knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// `Online`.
    Online,
    /// `Listening` for listener `i`.
    Listening(usize),
    /// `Listening(NO_LISTENER)` in a cluster without listeners: the worker reached its loop.
    Looping,
    /// A message for the application.
    Message,
    /// A connection handed back (refused): it goes to another worker.
    Refused(u16),
    /// Optional frames (acknowledgements, stats): nothing to do.
    Ignore,
    /// The worker closes its channel.
    Close,
    /// A protocol violation.
    Violation(&'static str),
}

/// The bit of [`W::announced`](super::table::W) for `Online` and for `Listening(NO_LISTENER)`.
pub(crate) const SAID_ONLINE: u32 = 1 << 31;
pub(crate) const SAID_LOOPING: u32 = 1 << 30;

/// Judges a decoded frame: its kind, the listener index it names (if any), in a cluster of
/// `listeners` listeners, from a worker that already announced `said` (bits: listener
/// indexes, [`SAID_ONLINE`], [`SAID_LOOPING`]). Each announcement comes once; a second one is a
/// violation, so that a worker cannot make the primary queue events at its will. Pure: the fuzz
/// target and the tests call it directly.
pub(crate) fn judge(kind: Kind, listener: Option<u16>, listeners: usize, said: u32) -> Verdict {
    match kind {
        Kind::Message => Verdict::Message,
        Kind::Online if said & SAID_ONLINE != 0 => Verdict::Violation("Online sent twice"),
        Kind::Online => Verdict::Online,
        Kind::Listening => {
            let li = listener.unwrap_or(u16::MAX) as usize;
            if li == frame::NO_LISTENER as usize && listeners == 0 {
                if said & SAID_LOOPING != 0 {
                    Verdict::Violation("Listening sent twice")
                } else {
                    Verdict::Looping
                }
            } else if li >= listeners {
                Verdict::Violation("Listening for a listener that does not exist")
            } else if said & (1 << li) != 0 {
                Verdict::Violation("Listening sent twice")
            } else {
                Verdict::Listening(li)
            }
        }
        // Acknowledgements are optional on the wire (see `frame`); counters live in shared
        // memory.
        Kind::Ack | Kind::Stats => Verdict::Ignore,
        Kind::Close => Verdict::Close,
        // A connection handed back (`Worker::refuse`): the frame the primary sent, returned.
        Kind::Connection => match listener {
            Some(li) if (li as usize) < listeners => Verdict::Refused(li),
            _ => Verdict::Violation("a connection handed back for a listener that does not exist"),
        },
        Kind::Disconnect => Verdict::Violation("a worker sent a primary-only frame kind"),
    }
}

impl Verdict {
    /// The announcement bit this verdict records.
    fn said(self) -> Option<u32> {
        match self {
            Verdict::Online => Some(SAID_ONLINE),
            Verdict::Looping => Some(SAID_LOOPING),
            Verdict::Listening(i) => Some(1 << i),
            _ => None,
        }
    }
}

impl Primary {
    /// A worker's channel is readable: handle its frames, up to the budget. A message is
    /// returned to the caller (it borrows the receive buffer) and the loop comes back to this
    /// channel for the frames behind it.
    pub(super) fn on_channel(
        &mut self,
        slot: usize,
        gen: u32,
    ) -> Option<(u32, usize, ArrayVec<OwnedFd, MAX_FDS>)> {
        while self.frames < FRAME_BUDGET {
            // Events queued by the frames read so far go out first, and the loop comes back
            // for the rest: a message must not overtake the `Online` or `Listening` before it.
            if !self.events.queue.is_empty() {
                self.come_back();
                return None;
            }
            self.frames += 1;
            let w = self.table.get_gen(slot, gen)?;
            let chan = w.chan.as_ref()?;
            let id = w.id;
            let said = w.announced;
            let got = chan.try_recv(&mut self.rbuf).map(|r| r.map(Received::take));
            let Taken {
                kind,
                listener,
                len,
                fds,
            } = match got {
                Ok(Some(t)) => {
                    // An fd costs the primary about what a frame does (installing it, and the
                    // application closing it): each counts against the budget.
                    self.frames += t.fds.len();
                    t
                }
                Ok(None) => {
                    // A dead worker's channel is closed once everything it sent was read.
                    if self.table.get(slot).is_some_and(|w| w.status.is_some()) {
                        self.channel_closed(slot);
                    }
                    return None;
                }
                Err(Error::Closed) => {
                    self.worker_closed(slot, false);
                    return None;
                }
                Err(e) => {
                    self.worker_error(slot, e);
                    return None;
                }
            };
            let verdict = judge(kind, listener, self.dispatch.listeners.len(), said);
            if let (Some(w), Some(bit)) = (self.table.get_mut(slot), verdict.said()) {
                w.announced |= bit;
            }
            match verdict {
                Verdict::Message => {
                    // Come back to this channel for the frames behind this one, while its
                    // budget lasts.
                    if self.frames < FRAME_BUDGET {
                        self.come_back();
                    }
                    return Some((id, len, fds));
                }
                Verdict::Online => {
                    let w = self.table.get_mut(slot)?;
                    if w.state == State::Forked {
                        w.state = State::Online;
                    }
                    self.events.push(Ev::Online(id));
                }
                Verdict::Looping => {
                    if self.sup.ready(slot, Instant::now()) {
                        self.apply();
                    }
                }
                Verdict::Listening(li) => {
                    self.events.push(Ev::Listening(id, li));
                    let w = self.table.get_mut(slot)?;
                    if matches!(w.state, State::Forked | State::Online) {
                        w.state = State::Listening;
                        self.make_ready(slot);
                        self.drain_pending();
                        self.sup.ready(slot, Instant::now());
                        self.apply();
                    }
                }
                Verdict::Refused(li) => {
                    let mut fds = fds;
                    if let Some(fd) = fds.pop() {
                        self.refused(slot, fd, li);
                    }
                }
                Verdict::Ignore => {}
                Verdict::Close => {
                    self.worker_closed(slot, true);
                    return None;
                }
                Verdict::Violation(what) => {
                    self.worker_error(slot, Error::Invalid(what));
                    return None;
                }
            }
        }
        // Budget used up: the other ready fds, signals and ticks come first; the channel is
        // still readable (level-triggered), so the next `epoll_wait` returns it again.
        None
    }

    /// Steps the loop back to the ready fd it is handling, for the next call.
    fn come_back(&mut self) {
        self.ev_pos -= 1;
        self.again = true;
    }

    /// The worker broke the protocol: report it, close its channel; the supervisor kills it.
    pub(super) fn worker_error(&mut self, slot: usize, error: Error) {
        let Some(w) = self.table.get(slot) else {
            return;
        };
        self.events.push(Ev::WorkerError(w.id, error));
        self.sup.broke_protocol(slot);
        self.apply();
        self.channel_closed(slot);
    }

    /// The worker closed its channel (`Close`, or end of file): if it is alive, it is
    /// disconnecting, on its own (`Worker::disconnect`, Node's `worker.disconnect()` from the
    /// worker's side) or answering the primary's `Disconnect`. Either way `Disconnect` is
    /// reported now, while it may still finish what it holds, and its exit counts as one after
    /// a disconnect. What waits in its queue stays there: it reads that until end of file,
    /// and what it leaves unread is recovered when it is reaped.
    ///
    /// A `Close` (`frame`) read after the worker was reaped is still its disconnect (it sent
    /// it and exited at once: Node's `worker.kill()` in a worker); end of file after the reap
    /// is only its death.
    fn worker_closed(&mut self, slot: usize, frame: bool) {
        if let Some(w) = self.table.get_mut(slot) {
            let alive = w.status.is_none();
            if alive || frame {
                w.closed_itself = true;
            }
            if alive {
                self.sup.closed_itself(slot, Instant::now());
                self.apply();
            }
        }
        self.channel_closed(slot);
    }
}
