//! The worker table: one slot per live worker, ids (from 1, never reused), slot generations,
//! the epoll token that names a worker's channel, and lookup by id and by pid in O(1).

use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::event::epoll;
use rustix::process::{Pid, Signal};

use crate::channel::Channel;

/// A worker's lifecycle state, as the primary sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Forked; not yet running the worker function.
    Forked,
    /// Running (sent `Online`).
    Online,
    /// Taking connections (sent `Listening`).
    Listening,
    /// Asked to disconnect, or its channel closed (it disconnected itself, or took the
    /// request); finishing.
    Disconnecting,
}

/// A row of the worker table.
#[derive(Debug, Clone, Copy)]
pub struct WorkerInfo {
    /// Id, from 1, never reused while the primary lives.
    pub id: u32,
    /// Process id.
    pub pid: u32,
    /// Lifecycle state.
    pub state: State,
    /// Whether its channel is open: false from its [`Event::Disconnect`](crate::Event::Disconnect)
    /// on, while it may still be finishing its connections (Node's `worker.isConnected()`).
    pub connected: bool,
    /// Whether its exit will be one after a disconnect (Node's `exitedAfterDisconnect`): it was
    /// asked to leave (disconnect, restart, stop, scale down, recycle) or disconnected itself.
    pub exited_after_disconnect: bool,
    /// Time since fork.
    pub uptime: Duration,
    /// Connections it took (handed to it by the primary, and, shared and reuseport, those it
    /// accepted itself).
    pub connections: u64,
    /// Connections it holds open now: those it took, less the [`Connection`](crate::Connection)s
    /// it dropped (or took the stream out of). Read from its shared page, no system call.
    pub open_connections: u64,
    /// Its seat: the place it holds among the workers, kept by its replacements (see
    /// [`Worker::seat`](crate::Worker::seat)).
    pub seat: u32,
    /// Messages it received from the primary.
    pub messages: u64,
    /// Bytes of frames queued for it that it has not read yet (connection hand-offs are 18
    /// bytes each).
    pub queued_bytes: usize,
    /// Time since its heartbeat last moved.
    pub since_heartbeat: Duration,
}

/// What the primary holds of one worker: its process, its channel, and its place in dispatch.
/// (The supervisor keeps its own record of the same worker: timers, readiness, replacement.)
pub(crate) struct W {
    pub(crate) id: u32,
    pub(crate) pid: Pid,
    pub(crate) chan: Option<Channel>,
    pub(crate) state: State,
    /// A duplicate of the worker's end of the channel. Connections handed over but not yet
    /// received stay in that end's queue; if the worker dies, the primary reads them back from
    /// it and hands them to another worker. Holding it also keeps the channel from reporting
    /// end of file: the primary learns of a worker's death from SIGCHLD.
    pub(crate) peer: Option<Channel>,
    /// It is in the schedule's ready set, with this stamp (moved on when it leaves the set).
    pub(crate) in_ready: bool,
    pub(crate) ready_stamp: u32,
    /// Its queue is full (`EAGAIN`): it gets more when the channel is writable again.
    pub(crate) blocked: bool,
    /// A `Disconnect` waits for room in its queue.
    pub(crate) disconnect_pending: bool,
    /// It was asked to leave (Node's `exitedAfterDisconnect`).
    pub(crate) leaving: bool,
    /// Its wait status, once reaped.
    pub(crate) status: Option<i32>,
    /// Connections handed to it.
    pub(crate) dispatched: u64,
    /// Recycle it after this many connections.
    pub(crate) max_conns: u64,
    /// What it announced so far (see `protocol::judge`).
    pub(crate) announced: u32,
    /// It closed its channel itself while alive (disconnecting).
    pub(crate) closed_itself: bool,
    /// Its seat (see `seats`).
    pub(crate) seat: u32,
    /// Out of the ready set until a tick (at its connection limit, or it refused one).
    pub(crate) held_back: bool,
    /// It takes its seat's work (not leaving, not hung, not dead).
    pub(crate) sitting: bool,
}

impl W {
    /// Signals the worker, unless it was reaped already: after `waitpid` its pid may belong to
    /// another process, so a reaped worker is never signalled (before, its zombie holds the pid).
    pub(crate) fn signal(&self, sig: Signal) -> rustix::io::Result<()> {
        match self.status {
            None => rustix::process::kill_process(self.pid, sig),
            Some(_) => Ok(()),
        }
    }

    /// The pid as a plain number.
    pub(crate) fn pid_u32(&self) -> u32 {
        self.pid.as_raw_nonzero().get() as u32
    }
}

struct Slot {
    gen: u32,
    w: Option<W>,
}

/// The epoll token's tag, in its top byte: what kind of fd woke the loop.
pub(crate) const TAG_MASK: u64 = 0xff << 56;
pub(crate) const TAG_LISTENER: u64 = 1 << 56;
pub(crate) const TAG_SIGNAL: u64 = 2 << 56;
pub(crate) const TAG_WORKER: u64 = 3 << 56;
/// A reuseport seat's socket the primary polls: the seat in bits 8.., the listener in 0..8.
pub(crate) const TAG_SEAT: u64 = 4 << 56;
/// The slot field of a worker token: 24 bits.
pub(crate) const MAX_SLOTS: usize = 1 << 24;

/// The epoll token of a worker's channel: its slot, and the slot's generation so that an event
/// for a worker that is gone never reaches the slot's next worker.
pub(crate) fn worker_token(slot: usize, gen: u32) -> epoll::EventData {
    debug_assert!(slot < MAX_SLOTS && super::MAX_WORKERS <= MAX_SLOTS);
    epoll::EventData::new_u64(TAG_WORKER | (gen as u64) << 24 | slot as u64)
}

/// The slot and generation of a worker token.
pub(crate) fn worker_of(token: u64) -> (usize, u32) {
    (
        (token & 0xff_ffff) as usize,
        ((token >> 24) & 0xffff_ffff) as u32,
    )
}

/// Watches a worker's channel for readability, and for writability while its queue is full.
pub(crate) fn watch(ep: Option<&OwnedFd>, chan: &Channel, slot: usize, gen: u32, writable: bool) {
    let flags = if writable {
        epoll::EventFlags::IN | epoll::EventFlags::OUT
    } else {
        epoll::EventFlags::IN
    };
    if let Some(ep) = ep {
        let _ = epoll::modify(ep, chan, worker_token(slot, gen), flags);
    }
}

/// The table: slots, the next id, and the two indexes.
pub(crate) struct Table {
    slots: Vec<Slot>,
    max: usize,
    next_id: u32,
    by_id: Index,
    by_pid: Index,
}

impl Table {
    /// A table of at most `max` workers; nothing allocates after this.
    pub(crate) fn new(max: usize) -> Table {
        Table {
            slots: Vec::with_capacity(max),
            max,
            next_id: 1,
            by_id: Index::new(max),
            by_pid: Index::new(max),
        }
    }

    /// The number of slots in use or used before (slots are `0..len`).
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// The id the next worker gets.
    pub(crate) fn next_id(&self) -> u32 {
        self.next_id
    }

    /// A free slot for a new worker (the table grows up to its maximum), and its generation.
    pub(crate) fn free_slot(&mut self) -> Option<(usize, u32)> {
        if let Some(i) = self.slots.iter().position(|s| s.w.is_none()) {
            return Some((i, self.slots[i].gen));
        }
        if self.slots.len() < self.max {
            self.slots.push(Slot { gen: 0, w: None });
            return Some((self.slots.len() - 1, 0));
        }
        None
    }

    /// Puts a new worker (with the id [`next_id`](Self::next_id) gave) into `slot`.
    pub(crate) fn insert(&mut self, slot: usize, w: W) {
        self.next_id += 1;
        self.by_id.insert(w.id, slot as u32);
        self.by_pid.insert(w.pid_u32(), slot as u32);
        self.slots[slot].w = Some(w);
    }

    /// Frees a slot; its generation moves on, so stale epoll events for it are ignored.
    pub(crate) fn remove(&mut self, slot: usize) -> Option<W> {
        let s = self.slots.get_mut(slot)?;
        let w = s.w.take()?;
        s.gen = s.gen.wrapping_add(1);
        self.by_id.remove(w.id);
        self.by_pid.remove(w.pid_u32());
        Some(w)
    }

    /// The slot's current generation.
    pub(crate) fn gen(&self, slot: usize) -> u32 {
        self.slots.get(slot).map_or(0, |s| s.gen)
    }

    /// The worker in `slot`.
    pub(crate) fn get(&self, slot: usize) -> Option<&W> {
        self.slots.get(slot).and_then(|s| s.w.as_ref())
    }

    /// The worker in `slot`.
    pub(crate) fn get_mut(&mut self, slot: usize) -> Option<&mut W> {
        self.slots.get_mut(slot).and_then(|s| s.w.as_mut())
    }

    /// The worker in `slot` if the slot is still at generation `gen`.
    pub(crate) fn get_gen(&mut self, slot: usize, gen: u32) -> Option<&mut W> {
        self.slots
            .get_mut(slot)
            .filter(|s| s.gen == gen)
            .and_then(|s| s.w.as_mut())
    }

    /// The slot of the worker with this id.
    pub(crate) fn find(&self, id: u32) -> Option<usize> {
        self.by_id.get(id).map(|s| s as usize)
    }

    /// The slot of the worker with this pid.
    pub(crate) fn find_pid(&self, pid: u32) -> Option<usize> {
        self.by_pid.get(pid).map(|s| s as usize)
    }

    /// Every live worker, with its slot.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, &W)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.w.as_ref().map(|w| (i, w)))
    }

    /// Every live worker, with its slot.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (usize, &mut W)> + '_ {
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(|(i, s)| s.w.as_mut().map(|w| (i, w)))
    }
}

/// A fixed-size open-addressing map from a nonzero `u32` key (an id or a pid) to a slot:
/// Fibonacci hashing, linear probing, deletion by backward shift. It holds at most the table's
/// maximum and never allocates after it is made.
struct Index {
    keys: Box<[u32]>,
    vals: Box<[u32]>,
    shift: u32,
}

impl Index {
    fn new(max: usize) -> Index {
        let cap = (max.max(1) * 2).next_power_of_two();
        Index {
            keys: vec![0; cap].into_boxed_slice(),
            vals: vec![0; cap].into_boxed_slice(),
            shift: 32 - cap.trailing_zeros(),
        }
    }

    fn home(&self, key: u32) -> usize {
        (key.wrapping_mul(0x9E37_79B9) >> self.shift) as usize & (self.keys.len() - 1)
    }

    fn get(&self, key: u32) -> Option<u32> {
        let mask = self.keys.len() - 1;
        let mut i = self.home(key);
        loop {
            match self.keys[i] {
                0 => return None,
                k if k == key => return Some(self.vals[i]),
                _ => i = (i + 1) & mask,
            }
        }
    }

    fn insert(&mut self, key: u32, val: u32) {
        let mask = self.keys.len() - 1;
        let mut i = self.home(key);
        while self.keys[i] != 0 && self.keys[i] != key {
            i = (i + 1) & mask;
        }
        self.keys[i] = key;
        self.vals[i] = val;
    }

    fn remove(&mut self, key: u32) {
        let mask = self.keys.len() - 1;
        let mut i = self.home(key);
        loop {
            match self.keys[i] {
                0 => return,
                k if k == key => break,
                _ => i = (i + 1) & mask,
            }
        }
        // Backward shift: pull later entries of the run into the hole when their home allows.
        let mut hole = i;
        let mut j = (i + 1) & mask;
        while self.keys[j] != 0 {
            let home = self.home(self.keys[j]);
            // Move j into the hole unless its home lies cyclically in (hole, j].
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.keys[hole] = self.keys[j];
                self.vals[hole] = self.vals[j];
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.keys[hole] = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::Index;

    #[test]
    fn index_matches_a_reference_map() {
        let mut idx = Index::new(64);
        let mut reference = std::collections::HashMap::new();
        let mut x: u32 = 12345;
        for step in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let key = (x % 200) + 1;
            if reference.len() < 64 && x & 1 == 0 {
                idx.insert(key, step);
                reference.insert(key, step);
            } else {
                idx.remove(key);
                reference.remove(&key);
            }
            for k in 1..=200 {
                assert_eq!(
                    idx.get(k),
                    reference.get(&k).copied(),
                    "key {k} at step {step}"
                );
            }
        }
    }
}
