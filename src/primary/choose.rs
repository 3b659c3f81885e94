//! Choosing a worker by its load and its client: least connections, sticky, the connection
//! limit (`max_connections_per_worker`) and connections handed back (`Worker::refuse`).
//!
//! Both schedules choose from the dense ready set ([`Dense`](super::schedule::Dense)); a
//! worker that cannot take the connection (its queue is full, its channel broken, or it is at
//! its limit) leaves the set, and the choice is made again. A worker's open connections are
//! what the primary handed it (plus, where workers accept, what it accepted) less what it
//! closed: the last two are words of its shared page, read with no system call.

use std::os::fd::OwnedFd;
use std::time::Instant;

use super::dispatch::Queued;
use super::Primary;
use crate::settings::Schedule;

impl Primary {
    /// `Builder::max_connections_per_worker`, for the checks before each hand-off.
    pub(super) fn set_max_open(&mut self, n: Option<u32>) {
        self.dispatch.max_open = n;
    }

    /// The worker in `slot` holds its most connections (`max_connections_per_worker`): read
    /// from its shared page.
    #[inline]
    pub(super) fn at_limit(&self, slot: usize, dispatched: u64) -> bool {
        self.dispatch.max_open.is_some_and(|n| {
            (dispatched as u32)
                .wrapping_add(self.board.conns(slot) as u32)
                .wrapping_sub(self.board.closed(slot))
                >= n
        })
    }

    /// A worker handed a connection back: another worker gets it (first in line), and this
    /// one gets nothing until the next tick finds it below its limit.
    pub(super) fn refused(&mut self, slot: usize, fd: OwnedFd, li: u16) {
        self.events.stats.refused += 1;
        self.hold_back(slot);
        self.dispatch.pending.push_front((fd, li, 0));
        self.drain_pending();
    }

    /// Takes the worker in `slot` out of the ready set until a tick looks at it again.
    pub(super) fn hold_back(&mut self, slot: usize) {
        let gen = self.table.gen(slot);
        let Some(w) = self.table.get_mut(slot) else {
            return;
        };
        if w.held_back {
            return;
        }
        w.held_back = true;
        if w.in_ready {
            w.in_ready = false;
            w.ready_stamp = w.ready_stamp.wrapping_add(1);
            self.dispatch.dense.remove(slot);
        }
        self.dispatch.full.push((slot, gen));
        self.arm_tick(Instant::now() + super::supervisor::TICK);
    }

    /// At a tick: workers held back that are below their limit take work again.
    pub(super) fn recheck_full(&mut self) {
        let mut i = 0;
        while i < self.dispatch.full.len() {
            let (slot, gen) = self.dispatch.full[i];
            let Some(w) = self.table.get_gen(slot, gen) else {
                self.dispatch.full.swap_remove(i);
                continue;
            };
            let dispatched = w.dispatched;
            if self.at_limit(slot, dispatched) {
                i += 1;
                continue;
            }
            self.dispatch.full.swap_remove(i);
            if let Some(w) = self.table.get_mut(slot) {
                w.held_back = false;
            }
            self.make_ready(slot);
        }
    }

    /// Least connections and sticky: the schedule chooses among the ready set; a worker that
    /// cannot take the connection leaves the set and the choice is made again.
    pub(super) fn dispatch_chosen(
        &mut self,
        mut fd: OwnedFd,
        li: u16,
        key: u64,
    ) -> core::result::Result<(), Queued> {
        loop {
            let pick = if self.settings.schedule == Schedule::Sticky && key != 0 {
                self.pick_sticky(key)
            } else {
                self.pick_least()
            };
            let Some((slot, gen)) = pick else {
                return Err((fd, li, key));
            };
            let Some(w) = self.table.get_gen(slot, gen) else {
                self.dispatch.dense.remove(slot);
                continue;
            };
            let dispatched = w.dispatched;
            if self.dispatch.max_open.is_some() && self.at_limit(slot, dispatched) {
                self.hold_back(slot);
                continue;
            }
            match self.hand_over(slot, gen, fd, li) {
                Ok(()) => return Ok(()),
                Err(back) => {
                    fd = back;
                    if let Some(w) = self.table.get_mut(slot) {
                        w.in_ready = false;
                    }
                    self.dispatch.dense.remove(slot);
                }
            }
        }
    }

    /// Of two ready workers (the next in round-robin order, one at random), the one with
    /// fewer open connections: handed over by the primary, less closed by the worker (its
    /// shared page, no system call).
    #[inline]
    fn pick_least(&mut self) -> Option<(usize, u32)> {
        let (a, b) = self.dispatch.dense.two()?;
        let Some(b) = b else { return Some(a) };
        let open = |(slot, _): (usize, u32)| {
            self.table.get(slot).map_or(u32::MAX, |w| {
                (w.dispatched as u32).wrapping_sub(self.board.closed(slot))
            })
        };
        Some(if open(b) < open(a) { b } else { a })
    }

    /// The seat with the highest rendezvous score for the client's address among the seats
    /// whose worker can take work (the newest of a seat's workers first).
    fn pick_sticky(&mut self, key: u64) -> Option<(usize, u32)> {
        let mut best: Option<(u64, (usize, u32))> = None;
        for seat in 0..self.seats.len() {
            let Some(&(slot, gen)) = self
                .seats
                .takers(seat)
                .iter()
                .rev()
                .find(|&&(s, _)| self.dispatch.dense.contains(s as usize))
            else {
                continue;
            };
            let score = super::seats::score(key, seat as u32);
            if best.map_or(true, |(b, _)| score > b) {
                best = Some((score, (slot as usize, gen)));
            }
        }
        best.map(|(_, w)| w)
    }
}
