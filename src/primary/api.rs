//! The primary's public controls: the event loop's entry points, sending to workers, killing,
//! disconnecting, stopping, restarting, scaling, and reading the worker table and counters.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use rustix::process::Signal;

use super::events::{ClusterStats, Event};
use super::table::{WorkerInfo, W};
use super::Primary;
use crate::error::{Call, Error, Result};
use crate::frame::{Frame, Kind, MAX_FDS, MAX_PAYLOAD};
use crate::listener::ListenAddr;

impl Primary {
    /// The next event, waiting for one. `None` once the cluster has stopped and every worker
    /// has exited.
    pub fn next_event(&mut self) -> Result<Option<Event<'_>>> {
        self.wait(None)
    }

    /// Like [`next_event`](Self::next_event), but returns [`Event::Idle`] when `timeout` passes
    /// first (for a primary that does its own periodic work without a thread).
    pub fn next_event_timeout(&mut self, timeout: Duration) -> Result<Option<Event<'_>>> {
        self.wait(Some(Instant::now() + timeout))
    }

    /// Like [`next_event_timeout`](Self::next_event_timeout) with an absolute deadline.
    pub fn next_event_until(&mut self, deadline: Instant) -> Result<Option<Event<'_>>> {
        self.wait(Some(deadline))
    }

    /// Forks one more worker (the wanted count grows by one). Returns its id.
    pub fn fork(&mut self) -> Result<u32> {
        self.fork_with_env(&[])
    }

    /// Forks one more worker with extra environment variables (Node's `cluster.fork(env)`).
    pub fn fork_with_env(&mut self, env: &[(&str, &str)]) -> Result<u32> {
        if !self.sup.running() {
            return Err(Error::Invalid("the cluster is stopping"));
        }
        let id = self.spawn(env, None, false)?;
        self.sup.added();
        Ok(id)
    }

    /// Sends bytes to one worker (a [`Next::Message`](crate::Next::Message) there). Never
    /// blocks: a worker whose channel is full gives an error with
    /// [`Error::is_would_block`]. A worker that is disconnected (its
    /// [`Event::Disconnect`] came) but has not exited yet gives [`Error::Closed`]; one that
    /// is gone, [`Error::NoSuchWorker`].
    pub fn send(&mut self, id: u32, payload: &[u8]) -> Result<()> {
        self.send_with_fds(id, payload, &[])
    }

    /// Sends bytes and fds to one worker.
    pub fn send_with_fds(&mut self, id: u32, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::Capacity("message payload larger than MAX_PAYLOAD"));
        }
        if fds.len() > MAX_FDS {
            return Err(Error::Capacity("more than MAX_FDS fds"));
        }
        let slot = self.table.find(id).ok_or(Error::NoSuchWorker(id))?;
        self.seq = self.seq.wrapping_add(1);
        let frame = Frame::new(Kind::Message, self.seq, payload).with_fds(fds.len() as u8);
        let w = self.table.get(slot).ok_or(Error::NoSuchWorker(id))?;
        // Disconnected (its `Event::Disconnect` came) but not yet exited.
        let chan = w.chan.as_ref().ok_or(Error::Closed)?;
        chan.try_send(&frame, fds)
    }

    /// Sends bytes to every connected worker; returns how many it reached.
    pub fn broadcast(&mut self, payload: &[u8]) -> Result<usize> {
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::Capacity("message payload larger than MAX_PAYLOAD"));
        }
        self.seq = self.seq.wrapping_add(1);
        let frame = Frame::new(Kind::Message, self.seq, payload);
        let mut n = 0;
        for (_, w) in self.table.iter() {
            if let Some(chan) = w.chan.as_ref() {
                if chan.try_send(&frame, &[]).is_ok() {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Sends `signal` to a worker (Node's `worker.kill`). As in Node, its exit is not a planned
    /// one (`exited_after_disconnect` is false) and, with respawn on, it is replaced; to retire a
    /// worker for good use [`disconnect`](Self::disconnect) or [`scale`](Self::scale).
    pub fn kill(&mut self, id: u32, signal: Signal) -> Result<()> {
        let slot = self.table.find(id).ok_or(Error::NoSuchWorker(id))?;
        let w = self.table.get(slot).ok_or(Error::NoSuchWorker(id))?;
        w.signal(signal).call("kill")
    }

    /// Asks a worker to stop taking work, finish and exit (Node's `worker.disconnect`). It is
    /// killed if it is still alive after the graceful timeout, and not replaced: one worker
    /// fewer is wanted.
    ///
    /// The primary stops handing it connections at once and sends it a `Disconnect` frame.
    /// The worker takes it at its next [`Worker::next`](crate::Worker::next) (which returns
    /// [`Next::Disconnect`](crate::Next::Disconnect)) and answers that it closes its channel:
    /// [`Event::Disconnect`] comes then, while it may still be finishing the connections it
    /// holds, with [`WorkerInfo::connected`] false from then on; [`Event::Exit`] follows when
    /// it exits, with `exited_after_disconnect: true`. A worker that never reads its channel
    /// again gets both at its exit.
    ///
    /// ```no_run
    /// use forkcluster::{Cluster, Event, Next};
    ///
    /// let mut primary = Cluster::builder()
    ///     .listen("127.0.0.1:8080".parse().unwrap())
    ///     .workers(2)
    ///     .start(|mut worker| -> forkcluster::Result<()> {
    ///         while let Some(next) = worker.next()? {
    ///             if let Next::Disconnect = next {
    ///                 break; // finish what this worker holds, then return
    ///             }
    ///         }
    ///         Ok(())
    ///     })?;
    /// primary.disconnect(1)?;
    /// let mut disconnected = false;
    /// loop {
    ///     // An event borrows the primary: take what is needed out of it first.
    ///     let exit = match primary.next_event()? {
    ///         None => break,
    ///         Some(Event::Disconnect { id: 1 }) => {
    ///             disconnected = true;
    ///             None
    ///         }
    ///         Some(Event::Exit { id: 1, exited_after_disconnect, .. }) => Some(exited_after_disconnect),
    ///         Some(_) => None,
    ///     };
    ///     if let Some(after) = exit {
    ///         assert!(disconnected && after);
    ///         break;
    ///     }
    ///     if disconnected {
    ///         // Worker 1 took the request and may still be finishing what it holds.
    ///         assert!(!primary.worker(1).is_some_and(|w| w.connected));
    ///     }
    /// }
    /// # Ok::<(), forkcluster::Error>(())
    /// ```
    pub fn disconnect(&mut self, id: u32) -> Result<()> {
        let slot = self.table.find(id).ok_or(Error::NoSuchWorker(id))?;
        // Asked to leave, so not replaced (respawn is for exits nobody asked for): one worker
        // fewer is wanted, as with `scale`.
        self.sup.disconnect(slot, Instant::now());
        self.apply();
        Ok(())
    }

    /// Disconnects every worker and stops the cluster gracefully (Node's
    /// `cluster.disconnect()`). [`next_event`](Self::next_event) returns `None` when all are
    /// gone.
    pub fn disconnect_all(&mut self) {
        self.stop(true);
    }

    /// Stops the cluster: graceful (stop accepting, disconnect every worker, SIGKILL after the
    /// graceful timeout) or fast (SIGTERM, then SIGKILL after the fast timeout). A graceful stop
    /// while one is under way turns fast.
    pub fn stop(&mut self, graceful: bool) {
        self.sup.stop(graceful, Instant::now());
        self.apply();
    }

    /// Replaces every worker, `restart_batch` at a time: the new one is listening before the old
    /// one is disconnected, so no connection is refused or dropped.
    pub fn restart(&mut self) {
        self.sup.restart();
        self.apply();
    }

    /// Sets the wanted number of workers (at least 1): forks or disconnects the difference.
    pub fn scale(&mut self, n: usize) -> Result<()> {
        if !self.sup.running() {
            return Err(Error::Invalid("the cluster is stopping"));
        }
        self.sup.scale(n, Instant::now());
        self.apply();
        Ok(())
    }

    /// The wanted number of workers.
    pub fn wanted_workers(&self) -> usize {
        self.sup.desired()
    }

    /// The worker table: every worker alive (not yet reported by `Exit`).
    pub fn workers(&self) -> impl Iterator<Item = WorkerInfo> + '_ {
        let now = Instant::now();
        self.table.iter().map(move |(i, w)| self.info(i, w, now))
    }

    /// One worker's row, if it is alive.
    pub fn worker(&self, id: u32) -> Option<WorkerInfo> {
        let slot = self.table.find(id)?;
        self.table
            .get(slot)
            .map(|w| self.info(slot, w, Instant::now()))
    }

    /// The listeners' addresses, by index (the real port when the builder asked for port 0).
    pub fn listen_addrs(&self) -> impl Iterator<Item = &ListenAddr> {
        self.dispatch.listeners.iter().map(|l| &l.addr)
    }

    /// The soft `RLIMIT_NOFILE` of the primary, and so of every worker, as set when the cluster
    /// started: what [`Builder::nofile_limit`](crate::Builder::nofile_limit) got (capped at the
    /// hard limit), or the inherited limit when it was not asked for. `None` means unlimited.
    ///
    /// ```no_run
    /// let primary = forkcluster::Cluster::builder()
    ///     .nofile_limit(65536)
    ///     .start(|_worker| {})?;
    /// eprintln!("open files: up to {:?} per process", primary.nofile_limit());
    /// # Ok::<(), forkcluster::Error>(())
    /// ```
    pub fn nofile_limit(&self) -> Option<u64> {
        self.settings.deploy.nofile
    }

    /// Counters of the whole cluster: forks, exits, crashes, backoffs, hung and recycled workers,
    /// restarts, protocol errors, connections handed out. Per-worker counters are in
    /// [`workers`](Self::workers). Neither allocates.
    pub fn stats(&self) -> ClusterStats {
        self.events.stats
    }

    /// Whether a stop is under way.
    pub fn is_stopping(&self) -> bool {
        !self.sup.running()
    }

    // ----- internals: the loop ----------------------------------------------------------------

    fn info(&self, slot: usize, w: &W, now: Instant) -> WorkerInfo {
        // Handed over by the primary, and (shared, reuseport) accepted by the worker itself.
        let connections = w.dispatched + self.board.conns(slot);
        let open_connections =
            u64::from((connections as u32).wrapping_sub(self.board.closed(slot)));
        let (started, beat_seen) = self.sup.times(slot).unwrap_or((now, now));
        WorkerInfo {
            id: w.id,
            pid: w.pid_u32(),
            state: w.state,
            connected: w.chan.is_some(),
            exited_after_disconnect: w.leaving || w.closed_itself,
            uptime: now.saturating_duration_since(started),
            connections,
            open_connections,
            seat: w.seat,
            messages: self.board.msgs(slot),
            queued_bytes: w
                .peer
                .as_ref()
                .map_or(0, |p| rustix::io::ioctl_fionread(p).unwrap_or(0) as usize),
            since_heartbeat: now.saturating_duration_since(beat_seen),
        }
    }
}
