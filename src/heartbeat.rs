//! The page of counters each worker shares with the primary: its heartbeat, and the connections
//! and messages it took. Workers write their own words with relaxed stores (no system call); the
//! primary only reads them.
//!
//! | word | written by the worker | read by the primary for |
//! |---|---|---|
//! | `BEAT` | every [`Worker::next`](crate::Worker::next), `try_next`, `heartbeat`: a count shifted left by one, the low bit set while it waits idle | hung-worker detection |
//! | `CONNS` | every connection it accepted itself (shared schedule) | `max_requests` and [`WorkerInfo`](crate::WorkerInfo) |
//! | `MSGS` | every message from the primary it received | [`WorkerInfo`](crate::WorkerInfo) |

use core::sync::atomic::{AtomicU64, Ordering};
use std::rc::Rc;

use crate::error::Result;
use crate::sys::SharedSlots;

/// Words per worker slot.
const WORDS: usize = 4;
const BEAT: usize = 0;
const CONNS: usize = 1;
const MSGS: usize = 2;

/// The counters of every worker slot, mapped shared before the first fork.
pub(crate) struct Board {
    map: SharedSlots,
}

impl Board {
    /// Maps zeroed counters for `slots` workers.
    pub(crate) fn new(slots: usize) -> Result<Board> {
        Ok(Board {
            map: SharedSlots::new(slots * WORDS)?,
        })
    }

    fn word(&self, slot: usize, w: usize) -> &AtomicU64 {
        &self.map.slots()[slot * WORDS + w]
    }

    /// Zeroes a slot's counters for its next worker.
    pub(crate) fn clear(&self, slot: usize) {
        for w in 0..WORDS {
            self.word(slot, w).store(0, Ordering::Relaxed);
        }
    }

    /// The slot's heartbeat word: it moves while the worker makes progress; the low bit is set
    /// while it waits for work.
    pub(crate) fn beat(&self, slot: usize) -> u64 {
        self.word(slot, BEAT).load(Ordering::Relaxed)
    }

    /// Connections the slot's worker accepted itself (shared schedule).
    pub(crate) fn conns(&self, slot: usize) -> u64 {
        self.word(slot, CONNS).load(Ordering::Relaxed)
    }

    /// Messages the slot's worker received.
    pub(crate) fn msgs(&self, slot: usize) -> u64 {
        self.word(slot, MSGS).load(Ordering::Relaxed)
    }
}

/// A worker's handle on its own slot's words.
pub(crate) struct Own {
    board: Rc<Board>,
    slot: usize,
    beats: u64,
}

impl Own {
    pub(crate) fn new(board: Rc<Board>, slot: usize) -> Own {
        Own {
            board,
            slot,
            beats: 0,
        }
    }

    /// One beat: progress, and whether the worker is about to wait idle.
    #[inline]
    pub(crate) fn beat(&mut self, idle: bool) {
        self.beats += 1;
        self.board
            .word(self.slot, BEAT)
            .store(self.beats << 1 | idle as u64, Ordering::Relaxed);
    }

    /// Counts a connection the worker accepted itself.
    #[inline]
    pub(crate) fn count_conn(&self) {
        self.board
            .word(self.slot, CONNS)
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a message from the primary.
    #[inline]
    pub(crate) fn count_msg(&self) {
        self.board
            .word(self.slot, MSGS)
            .fetch_add(1, Ordering::Relaxed);
    }
}
