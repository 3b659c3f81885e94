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

/// The ready set of least-connections and sticky: every worker that can take work, in an
/// array with O(1) insertion, removal and random access (a position per slot).
pub(crate) struct Dense {
    items: Vec<(u32, u32)>,
    pos: Vec<u32>,
    /// The round-robin cursor (the first of the two choices, and Unix connections in sticky).
    cursor: usize,
    rng: u64,
}

const ABSENT: u32 = u32::MAX;

/// A worker of the set: (slot, generation).
pub(crate) type Pick = (usize, u32);

impl Dense {
    /// Room for `max` workers; nothing allocates after this.
    pub(crate) fn new(max: usize, seed: u64) -> Dense {
        Dense {
            items: Vec::with_capacity(max),
            pos: vec![ABSENT; max].into_boxed_slice().into_vec(),
            cursor: 0,
            rng: seed | 1,
        }
    }

    /// The worker (slot, generation) can take work.
    #[inline]
    pub(crate) fn insert(&mut self, slot: usize, gen: u32) -> bool {
        let Some(p) = self.pos.get_mut(slot) else {
            return false;
        };
        if *p == ABSENT {
            *p = self.items.len() as u32;
            self.items.push((slot as u32, gen));
        }
        true
    }

    /// The worker in `slot` cannot take work any more.
    #[inline]
    pub(crate) fn remove(&mut self, slot: usize) {
        let Some(&p) = self.pos.get(slot) else {
            return;
        };
        if p == ABSENT {
            return;
        }
        self.items.swap_remove(p as usize);
        if let Some(&(moved, _)) = self.items.get(p as usize) {
            self.pos[moved as usize] = p;
        }
        self.pos[slot] = ABSENT;
    }

    /// Whether the worker in `slot` is in the set.
    #[inline]
    pub(crate) fn contains(&self, slot: usize) -> bool {
        self.pos.get(slot).is_some_and(|&p| p != ABSENT)
    }

    /// The next worker in round-robin order.
    #[inline]
    pub(crate) fn next_rr(&mut self) -> Option<(usize, u32)> {
        let n = self.items.len();
        if n == 0 {
            return None;
        }
        self.cursor = (self.cursor + 1) % n;
        let (s, g) = self.items[self.cursor];
        Some((s as usize, g))
    }

    /// Two choices: the next in round-robin order and, when there are two or more, another
    /// one at random. The caller takes the one with fewer open connections (the first on a
    /// tie, so that an even load stays round-robin).
    #[inline]
    pub(crate) fn two(&mut self) -> Option<(Pick, Option<Pick>)> {
        let a = self.next_rr()?;
        let n = self.items.len();
        if n < 2 {
            return Some((a, None));
        }
        // xorshift64: cheap, and good enough to pick among workers.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let mut j = (self.rng % n as u64) as usize;
        if j == self.cursor {
            j = (j + 1) % n;
        }
        let (s, g) = self.items[j];
        Some((a, Some((s as usize, g))))
    }
}

#[cfg(test)]
mod tests {
    use super::Dense;

    #[test]
    fn dense_set_keeps_positions_right() {
        let mut d = Dense::new(16, 7);
        for s in 0..10 {
            d.insert(s, 0);
        }
        d.remove(3);
        d.remove(9);
        d.remove(0);
        d.insert(3, 1);
        for s in 0..16 {
            assert_eq!(d.contains(s), (1..=8).contains(&s), "{s}");
        }
        let mut seen = [0; 16];
        for _ in 0..800 {
            let (a, b) = d.two().unwrap();
            seen[a.0] += 1;
            let b = b.unwrap();
            assert_ne!(a.0, b.0, "the two choices are different workers");
            assert!(d.contains(b.0));
        }
        assert!(seen
            .iter()
            .enumerate()
            .all(|(s, &n)| (n == 100) == d.contains(s)));
    }
}
