//! Seats: the places of the cluster's workers, which outlive the workers in them.
//!
//! Every worker sits in a seat, numbered from 0. A worker forked to replace another (a
//! rolling-restart step, a recycle) shares the seat of the one it replaces until that one
//! leaves; a worker forked after a death takes the lowest vacant seat, which is the dead
//! worker's when one died. So a seat keeps its identity across respawns, and two schedules
//! build on that:
//!
//! * [`Schedule::ReusePort`](crate::Schedule::ReusePort): a seat owns one `SO_REUSEPORT`
//!   socket per TCP listener, made by the primary and kept open by it. The seat's worker
//!   accepts on it; while no worker takes the seat (its worker died, hung, or is leaving) the
//!   primary polls the socket itself and hands what arrives to the other workers, so nothing
//!   waits for a respawn and nothing in the backlog is reset. A seat no longer wanted (scale
//!   down) is drained into the hand-off queue and closed once its last worker is gone.
//! * [`Schedule::Sticky`](crate::Schedule::Sticky): a client address is hashed to a seat
//!   (rendezvous hashing: the seat with the highest `hash(addr, seat)` among those whose
//!   worker can take work), so a worker's death moves only its own clients, and its
//!   replacement in the same seat gets them back.
//!
//! Tables are made for the cluster's maximum at start; nothing allocates per connection.

use std::os::fd::OwnedFd;

use arrayvec::ArrayVec;
use rustix::event::epoll;
use rustix::io::Errno;

use super::dispatch::seat_token;
use super::Primary;
use crate::error::{Call, Result};

/// The workers (slot, generation) sitting in one seat: one, or two while a replacement and
/// the worker it replaces overlap.
type Sitters = ArrayVec<(u32, u32), 2>;

/// Every seat's state.
pub(crate) struct Seats {
    /// Reuseport sockets per listener index (`nl` per seat; `None` for Unix listeners, which
    /// stay shared, and for a closed seat).
    socks: Vec<Option<OwnedFd>>,
    /// Listeners per seat in `socks` (0 unless reuseport).
    pub(crate) nl: usize,
    /// Which listener indexes are stream listeners (the primary accepts on a stream seat
    /// socket nobody takes; a UDP one keeps its datagrams for the seat's next worker).
    stream: ArrayVec<bool, 16>,
    /// Workers in each seat that take its work (not leaving, not hung), newest last.
    takers: Vec<Sitters>,
    /// Workers in each seat still alive (leaving ones included).
    alive: Vec<u8>,
    /// The seat's sockets are open (reuseport).
    open: Vec<bool>,
    /// The primary polls the seat's sockets (nobody takes it).
    pub(crate) polled: Vec<bool>,
}

impl Seats {
    /// Seats for at most `max` workers, with a reuseport socket for each of `stream`'s
    /// listeners (true: a stream listener; empty: no sockets).
    pub(crate) fn new(max: usize, stream: &[bool]) -> Seats {
        let nl = stream.len().min(16);
        Seats {
            stream: stream.iter().copied().take(16).collect(),
            socks: Vec::with_capacity(max * nl),
            nl,
            takers: Vec::with_capacity(max),
            alive: Vec::with_capacity(max),
            open: Vec::with_capacity(max),
            polled: Vec::with_capacity(max),
        }
    }

    /// The number of seats there have been (seats are `0..len`).
    pub(crate) fn len(&self) -> usize {
        self.takers.len()
    }

    /// The seat a new worker takes: `share` (the seat of the worker it replaces), else the
    /// lowest seat whose work nobody takes (its worker died, hung or is leaving), else a new
    /// one. The second value: its sockets must be made.
    pub(crate) fn pick(&mut self, share: Option<u32>) -> (u32, bool) {
        if let Some(s) = share.filter(|&s| (s as usize) < self.len()) {
            return (s, self.nl > 0 && !self.open[s as usize]);
        }
        // Nobody takes its work (a worker still finishing there may be leaving).
        let vacant = (0..self.len()).find(|&s| self.takers[s].is_empty());
        let s = match vacant {
            Some(s) => s,
            None => {
                self.takers.push(Sitters::new());
                self.alive.push(0);
                self.open.push(false);
                self.polled.push(false);
                for _ in 0..self.nl {
                    self.socks.push(None);
                }
                self.len() - 1
            }
        };
        (s as u32, self.nl > 0 && !self.open[s])
    }

    /// The seat's sockets were made: `fds` by listener index.
    pub(crate) fn opened(&mut self, seat: u32, fds: ArrayVec<Option<OwnedFd>, 16>) {
        let s = seat as usize;
        for (i, fd) in fds.into_iter().enumerate().take(self.nl) {
            self.socks[s * self.nl + i] = fd;
        }
        self.open[s] = true;
    }

    /// The seat's socket for listener `li` (reuseport, TCP), if open.
    pub(crate) fn sock(&self, seat: u32, li: usize) -> Option<&OwnedFd> {
        if li >= self.nl {
            return None;
        }
        self.socks.get(seat as usize * self.nl + li)?.as_ref()
    }

    /// A worker sat down in `seat`. True when the primary polled the seat until now.
    pub(crate) fn sit(&mut self, seat: u32, slot: usize, gen: u32) -> bool {
        let s = seat as usize;
        self.alive[s] = self.alive[s].saturating_add(1);
        if self.takers[s].is_full() {
            self.takers[s].remove(0);
        }
        self.takers[s].push((slot as u32, gen));
        core::mem::take(&mut self.polled[s])
    }

    /// The worker no longer takes the seat's work. True when nobody does now (the primary
    /// should poll the seat).
    pub(crate) fn stand(&mut self, seat: u32, slot: usize, gen: u32) -> bool {
        let Some(t) = self.takers.get_mut(seat as usize) else {
            return false;
        };
        let before = t.len();
        t.retain(|&mut w| w != (slot as u32, gen));
        before > 0 && t.is_empty()
    }

    /// The worker is gone. True when the seat is empty now.
    pub(crate) fn leave(&mut self, seat: u32) -> bool {
        let s = seat as usize;
        let Some(a) = self.alive.get_mut(s) else {
            return false;
        };
        *a = a.saturating_sub(1);
        *a == 0 && self.takers[s].is_empty()
    }

    /// The workers taking the seat's work, oldest first.
    #[inline]
    pub(crate) fn takers(&self, seat: usize) -> &[(u32, u32)] {
        self.takers.get(seat).map_or(&[], |t| t.as_slice())
    }

    /// Whether a seat is empty and open (its sockets would be closed by a trim).
    pub(crate) fn idle_open(&self, seat: usize) -> bool {
        self.open[seat] && self.alive[seat] == 0 && self.takers[seat].is_empty()
    }

    /// Seats with a worker in them.
    pub(crate) fn occupied(&self) -> usize {
        (0..self.len())
            .filter(|&s| self.alive[s] > 0 || !self.takers[s].is_empty())
            .count()
    }

    /// Closes the seat's sockets (the caller drained them first).
    pub(crate) fn close(&mut self, seat: usize) {
        for i in 0..self.nl {
            self.socks[seat * self.nl + i] = None;
        }
        self.open[seat] = false;
        self.polled[seat] = false;
    }

    /// In a forked worker: takes its own seat's sockets and closes every other.
    pub(crate) fn keep_only(&mut self, seat: u32) -> ArrayVec<Option<OwnedFd>, 16> {
        let mut mine = ArrayVec::new();
        let start = seat as usize * self.nl;
        for (i, fd) in self.socks.iter_mut().enumerate() {
            let fd = fd.take();
            if i >= start && i < start + self.nl {
                mine.push(fd);
            }
        }
        mine
    }

    /// Every open seat.
    pub(crate) fn open_seats(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.len()).filter(|&s| self.open[s])
    }

    /// The stream sockets of one seat (what the primary accepts on, checks and drains):
    /// ((seat, listener), fd).
    pub(crate) fn socks_of(&self, seat: usize) -> impl Iterator<Item = ((u32, usize), &OwnedFd)> {
        let nl = self.nl;
        let stream = &self.stream;
        self.socks[seat * nl..(seat + 1) * nl]
            .iter()
            .enumerate()
            .filter(move |(li, _)| stream[*li])
            .filter_map(move |(li, fd)| fd.as_ref().map(|fd| ((seat as u32, li), fd)))
    }

    /// The sockets of every seat the primary polls.
    pub(crate) fn polled_socks(&self) -> impl Iterator<Item = ((u32, usize), &OwnedFd)> {
        (0..self.len())
            .filter(|&s| self.polled[s])
            .flat_map(|s| self.socks_of(s))
    }
}

impl Primary {
    /// Makes the reuseport sockets of `seat`: seat 0 shares the cluster's own listeners
    /// (bound with `SO_REUSEPORT`), every other seat binds one more socket per TCP listener.
    pub(super) fn open_seat(&mut self, seat: u32) -> Result<()> {
        let mut fds: ArrayVec<Option<OwnedFd>, 16> = ArrayVec::new();
        for l in &self.dispatch.listeners {
            let fd = if seat == 0 {
                match (&l.fd, l.family) {
                    (Some(fd), crate::listener::Family::Tcp | crate::listener::Family::Udp)
                        if rustix::net::sockopt::socket_reuseport(fd).unwrap_or(false) =>
                    {
                        Some(fd.try_clone().call("fcntl(F_DUPFD_CLOEXEC)")?)
                    }
                    _ => None,
                }
            } else {
                crate::listener::seat_socket(l, self.settings.bind)?
            };
            fds.push(fd);
        }
        self.seats.opened(seat, fds);
        // Polled until its worker sits down (right after the fork), so that nothing waits in
        // it if the fork fails.
        self.poll_seat(seat);
        Ok(())
    }

    /// Nobody takes `seat`'s work now: the primary polls its sockets and hands their
    /// connections to the other workers (reuseport, while the cluster runs).
    pub(super) fn poll_seat(&mut self, seat: u32) {
        let s = seat as usize;
        if self.seats.nl == 0 || !self.sup.running() || self.seats.polled[s] {
            return;
        }
        self.seats.polled[s] = true;
        let Some(ep) = &self.epoll else { return };
        let flags = if self.dispatch_armed() {
            epoll::EventFlags::IN
        } else {
            epoll::EventFlags::empty()
        };
        for ((seat, li), fd) in self.seats.socks_of(s) {
            let _ = epoll::add(ep, fd, seat_token(seat, li), flags);
        }
    }

    /// A worker took `seat` again: the primary stops polling it.
    pub(super) fn unpoll_seat(&mut self, seat: u32) {
        let Some(ep) = &self.epoll else { return };
        for (_, fd) in self.seats.socks_of(seat as usize) {
            let _ = epoll::delete(ep, fd);
        }
    }

    /// The worker in `slot` no longer takes its seat's work (leaving, hung, gone).
    pub(super) fn stand_up(&mut self, slot: usize) {
        let gen = self.table.gen(slot);
        let Some(w) = self.table.get_mut(slot) else {
            return;
        };
        if !core::mem::take(&mut w.sitting) {
            return;
        }
        let seat = w.seat;
        if self.seats.stand(seat, slot, gen) {
            self.poll_seat(seat);
        }
    }

    /// The worker that sat in `seat` is gone: a seat nobody sits in that no respawn will
    /// take (scale down) is drained and closed.
    pub(super) fn left_seat(&mut self, seat: u32) {
        if self.seats.leave(seat) {
            self.trim_seats();
        }
    }

    /// Closes the empty reuseport seats beyond what the wanted workers need (the highest
    /// first), after taking what waits in their backlog. A connection that reaches such a
    /// socket between the last `accept` and the `close` is reset by the kernel, unless
    /// `net.ipv4.tcp_migrate_req` is 1 (Linux 5.14): then the kernel moves it to another
    /// socket of the group.
    pub(super) fn trim_seats(&mut self) {
        if self.seats.nl == 0 || !self.sup.running() {
            return;
        }
        let need = self.sup.desired().saturating_sub(self.seats.occupied());
        let mut idle = (0..self.seats.len())
            .filter(|&s| self.seats.idle_open(s))
            .count();
        let mut s = self.seats.len();
        // Seat 0 shares the cluster's own listeners: it stays (polled while empty).
        while idle > need && s > 1 {
            s -= 1;
            if !self.seats.idle_open(s) {
                continue;
            }
            self.drain_seat(s);
            self.unpoll_seat(s as u32);
            self.seats.close(s);
            idle -= 1;
        }
        self.drain_pending();
    }

    /// Takes what waits in a seat's backlogs into the hand-off queue (at most `PENDING_MAX`
    /// per socket: a connect flood cannot hold the caller up).
    pub(super) fn drain_seat(&mut self, seat: usize) {
        let flags = self.dispatch.accept_flags();
        for li in 0..self.seats.nl {
            if !self.seats.stream[li] {
                continue;
            }
            let Some(fd) = self.seats.sock(seat as u32, li) else {
                continue;
            };
            for _ in 0..super::dispatch::PENDING_MAX {
                match rustix::net::accept_with(fd, flags) {
                    Ok(c) => self.dispatch.pending.push_back((c, li as u16, 0)),
                    Err(Errno::INTR) | Err(Errno::CONNABORTED) => continue,
                    Err(_) => break,
                }
            }
        }
    }

    /// Reuseport: a worker can `shutdown(SHUT_RD)` its seat's socket, which takes that socket
    /// (only) out of the group: at each tick the primary has it listen again.
    pub(super) fn check_seats(&mut self) {
        if self.seats.nl == 0 || !self.sup.running() {
            return;
        }
        let backlog = self.settings.backlog;
        let mut restored = 0;
        for s in self.seats.open_seats() {
            for (_, fd) in self.seats.socks_of(s) {
                if !rustix::net::sockopt::socket_acceptconn(fd).unwrap_or(true)
                    && rustix::net::listen(fd, backlog).is_ok()
                {
                    restored += 1;
                }
            }
        }
        self.events.stats.listeners_restored += restored;
    }
}

/// Rendezvous hashing: the score of `seat` for client address `key` (splitmix64's finalizer
/// over both): the seat with the highest score among those that can take work wins.
#[inline]
pub(crate) fn score(key: u64, seat: u32) -> u64 {
    let mut z = key ^ (u64::from(seat) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replacement_shares_and_a_respawn_takes_the_lowest_vacant_seat() {
        let mut s = Seats::new(8, &[]);
        for i in 0..3 {
            let (seat, _) = s.pick(None);
            assert_eq!(seat, i);
            s.sit(seat, i as usize, 0);
        }
        // Seat 1's worker dies: the next worker takes seat 1, not a new one.
        assert!(s.stand(1, 1, 0));
        assert!(s.leave(1));
        assert_eq!(s.pick(None).0, 1);
        s.sit(1, 5, 0);
        // A replacement shares seat 2 with its old worker.
        assert_eq!(s.pick(Some(2)).0, 2);
        s.sit(2, 6, 0);
        assert_eq!(s.takers(2), &[(2, 0), (6, 0)]);
        assert!(!s.stand(2, 2, 0), "the replacement still takes seat 2");
        assert!(!s.leave(2));
        assert_eq!(s.occupied(), 3);
        assert_eq!(s.pick(None).0, 3, "no seat is vacant");
    }

    #[test]
    fn rendezvous_moves_only_the_lost_seats_clients() {
        let best = |key: u64, up: &dyn Fn(u32) -> bool| {
            (0..8u32)
                .filter(|&s| up(s))
                .max_by_key(|&s| score(key, s))
                .unwrap()
        };
        let mut share = [0usize; 8];
        let mut moved = 0;
        for ip in 0..8000u64 {
            let key = 0x7f00_0000 + ip;
            let before = best(key, &|_| true);
            share[before as usize] += 1;
            let after = best(key, &|s| s != 3);
            if before != 3 {
                assert_eq!(before, after, "a client of a live seat moved");
            } else {
                moved += 1;
            }
        }
        assert_eq!(moved, share[3]);
        for n in share {
            assert!((800..1200).contains(&n), "uneven shares: {share:?}");
        }
    }
}
