//! The page of counters each worker shares with the primary: its heartbeat, and the connections
//! and messages it took. Each worker slot has a page of its own, and a forked worker unmaps
//! every page but its own, so a worker can write only its own counters. Workers write with
//! relaxed stores (no system call); the primary only reads.
//!
//! | word | written by the worker | read by the primary for |
//! |---|---|---|
//! | `BEAT` | every [`Worker::next`](crate::Worker::next), `try_next`, `heartbeat`: a count shifted left by one, the low bit set while it waits idle | hung-worker detection |
//! | `CONNS` | every connection it accepted itself (shared schedule) | `max_requests` and [`WorkerInfo`](crate::WorkerInfo) |
//! | `MSGS` | every message from the primary it received | [`WorkerInfo`](crate::WorkerInfo) |
//! | `CLOSED` | every [`Connection`](crate::Connection) it dropped (or took the stream out of) | open connections: least-connections, [`WorkerInfo`](crate::WorkerInfo) |
//!
//! The words are `AtomicU32`, so the crate runs on CPUs without 64-bit atomics (32-bit
//! PowerPC, MIPS, ARMv5). They wrap: the heartbeat is only compared for change, and the
//! primary folds the two counters into 64-bit totals each time it reads them, and at least
//! every [`FOLD_EVERY`] (fewer than 2^32 increments fit in that time at any real rate).

use core::cell::Cell;
use core::sync::atomic::{AtomicU32, Ordering};
use std::rc::Rc;
use std::time::Duration;

use crate::error::Result;
use crate::sys::SharedPages;

const BEAT: usize = 0;
const CONNS: usize = 1;
const MSGS: usize = 2;
const CLOSED: usize = 3;

/// The primary reads (folds) every counter at least this often.
pub(crate) const FOLD_EVERY: Duration = Duration::from_secs(60);

/// The primary's 64-bit view of one wrapping 32-bit counter: the last value read and the
/// total so far.
#[derive(Debug, Clone, Copy, Default)]
struct Fold {
    last: u32,
    total: u64,
}

/// The counters of every worker slot, mapped shared before the first fork.
pub(crate) struct Board {
    map: SharedPages,
    /// Primary side only: conns and msgs of each slot.
    folds: Box<[Cell<Fold>]>,
}

impl Board {
    /// Maps zeroed counters for `slots` workers.
    pub(crate) fn new(slots: usize) -> Result<Board> {
        Ok(Board {
            map: SharedPages::new(slots)?,
            folds: vec![Cell::new(Fold::default()); slots * 2].into_boxed_slice(),
        })
    }

    fn word(&self, slot: usize, w: usize) -> Option<&AtomicU32> {
        self.map.page(slot).get(w)
    }

    fn load(&self, slot: usize, w: usize) -> u32 {
        self.word(slot, w).map_or(0, |a| a.load(Ordering::Relaxed))
    }

    /// Zeroes a slot's counters for its next worker.
    pub(crate) fn clear(&self, slot: usize) {
        for w in [BEAT, CONNS, MSGS, CLOSED] {
            if let Some(a) = self.word(slot, w) {
                a.store(0, Ordering::Relaxed);
            }
        }
        for k in 0..2 {
            if let Some(f) = self.folds.get(slot * 2 + k) {
                f.set(Fold::default());
            }
        }
    }

    /// In a forked worker: keep only this slot's page mapped.
    pub(crate) fn keep_only(&self, slot: usize) {
        self.map.keep_only(slot);
    }

    /// The slot's heartbeat word: it moves while the worker makes progress; the low bit is set
    /// while it waits for work.
    pub(crate) fn beat(&self, slot: usize) -> u32 {
        self.load(slot, BEAT)
    }

    fn fold(&self, slot: usize, w: usize, k: usize) -> u64 {
        let now = self.load(slot, w);
        let Some(cell) = self.folds.get(slot * 2 + k) else {
            return u64::from(now);
        };
        let mut f = cell.get();
        f.total = f.total.wrapping_add(u64::from(now.wrapping_sub(f.last)));
        f.last = now;
        cell.set(f);
        f.total
    }

    /// Connections the slot's worker accepted itself (shared schedule), as a 64-bit total.
    pub(crate) fn conns(&self, slot: usize) -> u64 {
        self.fold(slot, CONNS, 0)
    }

    /// Messages the slot's worker received, as a 64-bit total.
    pub(crate) fn msgs(&self, slot: usize) -> u64 {
        self.fold(slot, MSGS, 1)
    }

    /// The slot's count of closed connections, as the worker's 32-bit word (it wraps: compare
    /// it with a count of opened connections by `wrapping_sub`).
    #[inline]
    pub(crate) fn closed(&self, slot: usize) -> u32 {
        self.load(slot, CLOSED)
    }

    /// Reads every counter of the first `slots` slots, so that none wraps unseen.
    pub(crate) fn fold_all(&self, slots: usize) {
        for s in 0..slots {
            self.conns(s);
            self.msgs(s);
        }
    }
}

/// A worker's handle on its own slot's words.
pub(crate) struct Own {
    board: Rc<Board>,
    slot: usize,
    beats: u32,
}

impl Own {
    pub(crate) fn new(board: Rc<Board>, slot: usize) -> Own {
        Own {
            board,
            slot,
            beats: 0,
        }
    }

    fn add(&self, w: usize) {
        if let Some(a) = self.board.word(self.slot, w) {
            a.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One beat: progress, and whether the worker is about to wait idle.
    #[inline]
    pub(crate) fn beat(&mut self, idle: bool) {
        self.beats = self.beats.wrapping_add(1);
        if let Some(a) = self.board.word(self.slot, BEAT) {
            a.store(self.beats << 1 | idle as u32, Ordering::Relaxed);
        }
    }

    /// Counts a connection the worker accepted itself.
    #[inline]
    pub(crate) fn count_conn(&self) {
        self.add(CONNS);
    }

    /// The word a [`Connection`](crate::Connection) raises when it is dropped. `'static`: the
    /// worker never unmaps its own page (its board is leaked here, once per worker, so that a
    /// connection that outlives the [`Worker`](crate::Worker) still writes mapped memory).
    pub(crate) fn closed_word(&self) -> Option<&'static AtomicU32> {
        let board: &'static Board = Box::leak(Box::new(self.board.clone()));
        board.word(self.slot, CLOSED)
    }

    /// Counts a message from the primary.
    #[inline]
    pub(crate) fn count_msg(&self) {
        self.add(MSGS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_fold_across_the_32_bit_wrap() {
        let b = Board::new(2).unwrap();
        let w = b.word(1, CONNS).unwrap();
        w.store(u32::MAX - 5, Ordering::Relaxed);
        assert_eq!(b.conns(1), u64::from(u32::MAX - 5));
        w.fetch_add(10, Ordering::Relaxed); // wraps to 4
        assert_eq!(b.conns(1), u64::from(u32::MAX) + 5);
        b.clear(1);
        assert_eq!(b.conns(1), 0);
        assert_eq!(b.msgs(0), 0);
    }

    #[test]
    fn the_heartbeat_wraps_and_keeps_its_idle_bit() {
        let b = Rc::new(Board::new(1).unwrap());
        let mut own = Own::new(b.clone(), 0);
        own.beats = u32::MAX;
        own.beat(true);
        assert_eq!(b.beat(0), 1, "count 0 after the wrap, idle bit set");
        own.beat(false);
        assert_eq!(b.beat(0), 2);
    }
}
