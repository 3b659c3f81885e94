//! Who gets the next connection: the one seam of dispatch that a schedule changes.
//!
//! Dispatch tells the schedule which workers can take work ([`Ready::push`]) and which can no
//! longer ([`Ready::remove`]), and asks it for the next one ([`Ready::pop`]); a worker it was
//! given goes back with `push` once the hand-off succeeded. Entries carry the slot's
//! generation, so an entry for a worker that is gone is skipped by dispatch. Round-robin is a
//! ring: the worker that took the last connection goes to the back.
//!
//! Removal is O(1): each entry carries the worker's ready stamp, and taking a worker out only
//! moves its stamp on, so its entry is skipped when it comes up. Stale entries are dropped
//! when the ring is full ([`Ready::compact`]), so the ring never grows past its capacity.

use std::collections::VecDeque;

/// The ready set of the round-robin schedule.
pub(crate) struct Ready {
    ring: VecDeque<(u32, u32, u32)>,
}

impl Ready {
    /// Room for `max` workers; nothing allocates after this.
    pub(crate) fn new(max: usize) -> Ready {
        Ready {
            ring: VecDeque::with_capacity(max),
        }
    }

    /// The worker (slot, generation, ready stamp) can take work. False when the ring is full
    /// (of stale entries: [`compact`](Self::compact) it).
    #[inline]
    pub(crate) fn push(&mut self, slot: usize, gen: u32, stamp: u32) -> bool {
        if self.ring.len() == self.ring.capacity() {
            return false;
        }
        self.ring.push_back((slot as u32, gen, stamp));
        true
    }

    /// The next worker to try: (slot, generation, stamp); the caller skips an entry whose
    /// stamp is not the worker's current one.
    #[inline]
    pub(crate) fn pop(&mut self) -> Option<(usize, u32, u32)> {
        self.ring.pop_front().map(|(s, g, t)| (s as usize, g, t))
    }

    /// Drops the entries `live` says are stale.
    pub(crate) fn compact(&mut self, mut live: impl FnMut(usize, u32, u32) -> bool) {
        self.ring.retain(|&(s, g, t)| live(s as usize, g, t));
    }
}
