//! Who gets the next connection: the one seam of dispatch that a schedule changes.
//!
//! Dispatch tells the schedule which workers can take work ([`Ready::push`]) and which can no
//! longer ([`Ready::remove`]), and asks it for the next one ([`Ready::pop`]); a worker it was
//! given goes back with `push` once the hand-off succeeded. Entries carry the slot's
//! generation, so an entry for a worker that is gone is skipped by dispatch. Round-robin is a
//! ring: the worker that took the last connection goes to the back.

use std::collections::VecDeque;

/// The ready set of the round-robin schedule.
pub(crate) struct Ready {
    ring: VecDeque<(u32, u32)>,
}

impl Ready {
    /// Room for `max` workers; nothing allocates after this.
    pub(crate) fn new(max: usize) -> Ready {
        Ready {
            ring: VecDeque::with_capacity(max),
        }
    }

    /// The worker (slot, generation) can take work.
    #[inline]
    pub(crate) fn push(&mut self, slot: usize, gen: u32) {
        self.ring.push_back((slot as u32, gen));
    }

    /// The next worker to try.
    #[inline]
    pub(crate) fn pop(&mut self) -> Option<(usize, u32)> {
        self.ring.pop_front().map(|(s, g)| (s as usize, g))
    }

    /// The worker in `slot` can take no more work.
    pub(crate) fn remove(&mut self, slot: usize) {
        self.ring.retain(|&(s, _)| s as usize != slot);
    }
}
