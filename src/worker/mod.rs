//! The worker side: the next connection, message or disconnect request; sending to the primary.

use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};

use arrayvec::ArrayVec;
use rustix::event::epoll;
use rustix::io::Errno;

use crate::channel::{Channel, Received, RecvBuf, Taken};
use crate::error::{Call, Error, Result};
use crate::frame::{Frame, Kind, MAX_FDS, MAX_PAYLOAD};
use crate::heartbeat::{Board, Own};
use crate::listener::{Family, ListenAddr, Sock};
use crate::settings::{Schedule, MAX_LISTENERS};

mod connection;
mod sockets;

use connection::Tally;
pub use connection::{Connection, Stream};

/// Shared schedule: how long a worker stops accepting after `EMFILE` and the like.
const ACCEPT_PAUSE: rustix::time::Timespec = rustix::time::Timespec {
    tv_sec: 0,
    tv_nsec: 100_000_000,
};

/// The worker function, as the primary keeps it: it runs in each forked worker and returns its
/// exit code.
pub(crate) type WorkerFn = Box<dyn FnMut(Worker) -> i32>;

/// A message from the primary: its bytes (borrowing the worker's receive buffer) and fds.
#[derive(Debug)]
pub struct Message<'a> {
    /// The payload, at most [`MAX_PAYLOAD`] bytes.
    pub payload: &'a [u8],
    /// The fds that came with it (close-on-exec; dropping closes them).
    pub fds: ArrayVec<OwnedFd, MAX_FDS>,
}

/// What a worker gets next.
#[derive(Debug)]
pub enum Next<'a> {
    /// A connection to serve.
    Connection(Connection),
    /// A message from the primary.
    Message(Message<'a>),
    /// The primary asks this worker to stop taking work, finish what it has and return (or the
    /// primary is gone). Returned once. The worker has answered already: it told the primary
    /// it closes its channel (a `Close` frame), and the primary reports
    /// [`Event::Disconnect`](crate::Event::Disconnect) then, while this process finishes the
    /// connections it holds; its [`Event::Exit`](crate::Event::Exit) follows when it exits.
    /// Afterwards [`Worker::next`] returns what is still queued (messages the primary sent
    /// before it read the answer) and then `None`.
    Disconnect,
}

struct WListener {
    /// The socket this worker holds for the listener: the stream listeners where workers
    /// accept, the UDP sockets always; `None` once the worker is disconnecting.
    fd: Option<Sock>,
    family: Family,
    addr: ListenAddr,
}

impl WListener {
    /// The socket `next` accepts on, if this worker does (not UDP, not the application's).
    fn acceptor(&self, app_accepts: bool) -> Option<&Sock> {
        self.fd
            .as_ref()
            .filter(|_| self.family.accepts() && !app_accepts)
    }
}

/// A worker's handle: its id, its channel to the primary, and the sockets it holds: the
/// stream listeners it accepts on (accepting schedules) and every UDP socket (all schedules).
///
/// A worker that serves one thing at a time loops on [`next`](Self::next). A worker with its own
/// poll loop registers [`as_fd`](AsFd::as_fd) for readability and, whenever it is readable (and
/// once at start), calls [`try_next`](Self::try_next) until it returns `None`.
pub struct Worker {
    id: u32,
    chan: Channel,
    rbuf: Box<RecvBuf>,
    listeners: ArrayVec<WListener, MAX_LISTENERS>,
    schedule: Schedule,
    nonblocking: bool,
    /// [`Builder::app_accepts`](crate::Builder::app_accepts): `next` never accepts.
    app_accepts: bool,
    epoll: Option<OwnedFd>,
    /// Shared schedule: a timer in `epoll` that ends a pause in accepting (`EMFILE`...); the
    /// listeners are out of `epoll` while `paused`.
    pause_timer: Option<OwnedFd>,
    paused: bool,
    seq: u32,
    listening_sent: bool,
    /// Shared schedule: the current drain of the listeners took a connection.
    accepted: bool,
    disconnecting: bool,
    closed: bool,
    /// The `Close` that tells the primary this worker disconnects is owed (could not be sent
    /// yet: the channel was full) or sent.
    close_owed: bool,
    close_sent: bool,
    next_listener: usize,
    page: Own,
    /// The page's count of closed connections (see [`Connection`]).
    closed_word: Option<&'static AtomicU32>,
    /// The worker's seat (see [`seat`](Self::seat)).
    seat: u32,
    /// `Builder::max_connections_per_worker`.
    max_open: Option<u32>,
    /// Connections made into [`Connection`]s (wraps, as the closed count does).
    taken: u32,
    /// A spare fd, so that a frame's fds always have room (see `step`).
    reserve: Option<OwnedFd>,
}

/// What the primary hands a new worker (in the child, after fork).
pub(crate) struct WorkerInit {
    pub(crate) id: u32,
    pub(crate) chan: Channel,
    pub(crate) listeners: Vec<(Option<OwnedFd>, Family, ListenAddr)>,
    pub(crate) schedule: Schedule,
    pub(crate) nonblocking: bool,
    pub(crate) max_open: Option<u32>,
    pub(crate) app_accepts: bool,
    pub(crate) board: Rc<Board>,
    pub(crate) slot: usize,
    pub(crate) seat: u32,
}

impl Worker {
    pub(crate) fn new(init: WorkerInit) -> Result<Worker> {
        let mut listeners = ArrayVec::new();
        for (fd, family, addr) in init.listeners {
            let fd = fd.map(|fd| Sock::new(fd, family));
            listeners.push(WListener { fd, family, addr });
        }
        let app_accepts = init.app_accepts;
        let accepts = listeners.iter().any(|l| l.acceptor(app_accepts).is_some());
        let (epoll, pause_timer) = if init.schedule.workers_accept() && accepts {
            let ep = epoll::create(epoll::CreateFlags::CLOEXEC).call("epoll_create1")?;
            epoll::add(
                &ep,
                &init.chan,
                epoll::EventData::new_u64(u64::MAX),
                epoll::EventFlags::IN,
            )
            .call("epoll_ctl")?;
            for (i, l) in listeners.iter().enumerate() {
                if let Some(fd) = l.acceptor(app_accepts) {
                    epoll::add(
                        &ep,
                        fd,
                        epoll::EventData::new_u64(i as u64),
                        epoll::EventFlags::IN | epoll::EventFlags::EXCLUSIVE,
                    )
                    .call("epoll_ctl")?;
                }
            }
            // Made now: when it is needed, the worker may have no fd to spare.
            use rustix::time::{TimerfdClockId, TimerfdFlags};
            let timer = rustix::time::timerfd_create(
                TimerfdClockId::Monotonic,
                TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK,
            )
            .call("timerfd_create")?;
            epoll::add(
                &ep,
                &timer,
                epoll::EventData::new_u64(u64::MAX - 1),
                epoll::EventFlags::IN,
            )
            .call("epoll_ctl")?;
            (Some(ep), Some(timer))
        } else {
            (None, None)
        };
        let w = Worker {
            id: init.id,
            chan: init.chan,
            rbuf: Box::new(RecvBuf::new()),
            listeners,
            schedule: init.schedule,
            nonblocking: init.nonblocking,
            app_accepts,
            epoll,
            pause_timer,
            paused: false,
            seq: 0,
            listening_sent: false,
            accepted: false,
            disconnecting: false,
            closed: false,
            close_owed: false,
            close_sent: false,
            next_listener: 0,
            closed_word: None,
            seat: init.seat,
            max_open: init.max_open,
            taken: 0,
            page: Own::new(init.board, init.slot),
            // Made now, so that the worker's fds are the same from its first frame on.
            reserve: rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).ok(),
        };
        let mut w = w;
        w.closed_word = w.page.closed_word();
        w.send_frame(&Frame::new(Kind::Online, 0, &[]), &[])?;
        Ok(w)
    }

    /// This worker's id: 1 for the first worker, never reused while the primary lives.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// This worker's seat: its place among the cluster's workers, from 0. A worker that
    /// replaces another (a respawn after a crash, a recycle, a rolling restart) takes the seat
    /// of the one it replaces; under [`Schedule::ReusePort`](crate::Schedule::ReusePort) the
    /// seat owns the worker's listening sockets, and under
    /// [`Schedule::Sticky`](crate::Schedule::Sticky) the seat is what a client address maps to.
    pub fn seat(&self) -> u32 {
        self.seat
    }

    /// This worker's process id.
    pub fn pid(&self) -> u32 {
        std::process::id()
    }

    /// The addresses of the cluster's listeners, by index.
    pub fn listen_addrs(&self) -> impl Iterator<Item = &ListenAddr> {
        self.listeners.iter().map(|l| &l.addr)
    }

    /// True once this worker is disconnecting: the primary asked it to (or is gone), or it
    /// called [`disconnect`](Self::disconnect).
    pub fn is_disconnecting(&self) -> bool {
        self.disconnecting
    }

    /// Disconnects this worker from the primary (Node's `worker.disconnect()` in a worker): it
    /// takes no new connections, tells the primary that it closes its channel (a `Close`
    /// frame, waiting for room in the channel like [`send`](Self::send)), and goes on
    /// finishing the connections it holds. Calling it again does nothing.
    ///
    /// In the primary, [`Event::Disconnect`](crate::Event::Disconnect) comes as soon as that
    /// frame is read, while this process is still alive; its
    /// [`WorkerInfo::connected`](crate::WorkerInfo::connected) is false from then on, and the
    /// [`Event::Exit`](crate::Event::Exit) that follows when it exits has
    /// `exited_after_disconnect: true`. The primary gives it the graceful timeout
    /// ([`Builder::graceful_timeout`](crate::Builder::graceful_timeout)) to finish and exit,
    /// then kills it; with respawn on, it is replaced once it is gone (by the crash-loop
    /// backoff's rules), never before.
    ///
    /// Afterwards [`next`](Self::next) returns what the primary sent before it read the
    /// `Close` (connections already handed to this worker, messages) and then `None`, so a
    /// loop on `next` ends by itself; [`Next::Disconnect`] is not returned. A worker that
    /// returns without reading them loses no connection: the primary reads them back when it
    /// is gone and hands them to another worker. [`send`](Self::send) fails with
    /// [`Error::Closed`] from here on.
    ///
    /// ```no_run
    /// use forkcluster::{Cluster, Next};
    /// use std::io::{Read, Write};
    ///
    /// let mut primary = Cluster::builder()
    ///     .listen("127.0.0.1:8080".parse().unwrap())
    ///     .start(|mut worker| -> forkcluster::Result<()> {
    ///         let mut served = 0;
    ///         while let Some(next) = worker.next()? {
    ///             if let Next::Connection(mut conn) = next {
    ///                 let mut req = [0u8; 1024];
    ///                 let _ = conn.read(&mut req);
    ///                 let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nhi\n");
    ///                 served += 1;
    ///                 if served == 10_000 {
    ///                     // Leave: `next` returns what was handed over already, then `None`.
    ///                     worker.disconnect()?;
    ///                 }
    ///             }
    ///         }
    ///         Ok(())
    ///     })?;
    /// while let Some(event) = primary.next_event()? {
    ///     eprintln!("{event}"); // ... worker 3 disconnected, worker 3 (pid ...) exited: exit status: 0
    /// }
    /// # Ok::<(), forkcluster::Error>(())
    /// ```
    pub fn disconnect(&mut self) -> Result<()> {
        if self.disconnecting && (self.close_sent || self.closed) {
            return Ok(());
        }
        self.disconnecting = true;
        self.stop_accepting();
        if !self.close_sent && !self.closed {
            self.close_owed = true;
            self.send_close(true);
        }
        Ok(())
    }

    /// Sends the owed `Close` (waiting for room when `wait`): the answer to the primary's
    /// `Disconnect`, or this worker's own [`disconnect`](Self::disconnect). A channel the
    /// primary closed already needs none; any other failure leaves the primary to learn of the
    /// disconnect at exit, as it would from a worker that never answers.
    fn send_close(&mut self, wait: bool) {
        self.seq = self.seq.wrapping_add(1);
        let f = Frame::new(Kind::Close, self.seq, &[]);
        let sent = if wait {
            self.chan.send(&f, &[])
        } else {
            self.chan.try_send(&f, &[])
        };
        match sent {
            Err(e) if e.is_would_block() => {}
            Ok(()) => {
                self.close_owed = false;
                self.close_sent = true;
            }
            Err(_) => self.close_owed = false,
        }
    }

    /// Tells the primary this worker is alive and making progress. [`next`](Self::next) and
    /// [`try_next`](Self::try_next) do it; call it from long jobs and from poll loops that wake
    /// on a timeout, when the cluster has a [`hang_timeout`](crate::Builder::hang_timeout).
    /// It is one store to shared memory: no system call.
    #[inline]
    pub fn heartbeat(&mut self) {
        self.beat(false);
    }

    #[inline]
    fn beat(&mut self, idle: bool) {
        self.page.beat(idle);
    }

    /// Sends bytes to the primary (an [`Event::Message`](crate::Event::Message) there). Waits
    /// while the channel is full.
    pub fn send(&mut self, payload: &[u8]) -> Result<()> {
        self.send_with_fds(payload, &[])
    }

    /// Sends bytes and up to [`MAX_FDS`] fds to the primary.
    pub fn send_with_fds(&mut self, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::Capacity("message payload larger than MAX_PAYLOAD"));
        }
        if fds.len() > MAX_FDS {
            return Err(Error::Capacity("more than MAX_FDS fds"));
        }
        if self.close_sent || self.close_owed {
            // Disconnected: the primary closes its end when it reads the `Close`, and drops
            // whatever came after it.
            return Err(Error::Closed);
        }
        self.seq = self.seq.wrapping_add(1);
        let f = Frame::new(Kind::Message, self.seq, payload).with_fds(fds.len() as u8);
        self.chan.send(&f, fds)
    }

    fn send_frame(&self, f: &Frame<'_>, fds: &[BorrowedFd<'_>]) -> Result<()> {
        self.chan.send(f, fds)
    }

    fn announce(&mut self) -> Result<()> {
        self.listening_sent = true;
        if self.listeners.is_empty() {
            let idx = crate::frame::NO_LISTENER.to_le_bytes();
            return self.send_frame(&Frame::new(Kind::Listening, 0, &idx), &[]);
        }
        for i in 0..self.listeners.len() {
            let idx = (i as u16).to_le_bytes();
            self.send_frame(&Frame::new(Kind::Listening, 0, &idx), &[])?;
        }
        Ok(())
    }

    /// Connections this worker holds open: made, less dropped.
    pub fn open_connections(&self) -> u32 {
        let closed = self.closed_word.map_or(0, |w| w.load(Ordering::Relaxed));
        self.taken.wrapping_sub(closed)
    }

    /// Hands a connection back to the primary, which gives it to another worker (and, in the
    /// hand-off schedules, gives this one no new connection for a moment, about 100 ms). For a
    /// worker that cannot serve it now: overloaded, draining, or at
    /// [`max_connections_per_worker`](crate::Builder::max_connections_per_worker) (then
    /// [`next`](Self::next) does it itself). Nothing is read from or written to the
    /// connection; the client sees nothing of it. Waits while the channel is full.
    ///
    /// ```no_run
    /// # fn f(mut w: forkcluster::Worker) -> forkcluster::Result<()> {
    /// while let Some(n) = w.next()? {
    ///     if let forkcluster::Next::Connection(c) = n {
    ///         if w.open_connections() > 1000 {
    ///             w.refuse(c)?;
    ///             continue;
    ///         }
    ///         // serve c
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn refuse(&mut self, c: Connection) -> Result<()> {
        let idx = (c.listener as u16).to_le_bytes();
        self.seq = self.seq.wrapping_add(1);
        let f = Frame::new(Kind::Connection, self.seq, &idx).with_fds(1);
        self.chan.send(&f, &[c.as_fd()])
    }

    /// A new connection, unless it is one more than `max_open` allows: then it is refused.
    fn admit(&mut self, c: Connection) -> Result<Option<Connection>> {
        match self.max_open {
            Some(n) if self.open_connections() > n => {
                self.refuse(c)?;
                Ok(None)
            }
            _ => Ok(Some(c)),
        }
    }

    fn stream(&mut self, fd: OwnedFd, listener: usize) -> Connection {
        self.taken = self.taken.wrapping_add(1);
        let family = self
            .listeners
            .get(listener)
            .map_or(Family::Tcp, |l| l.family);
        let stream = match family {
            // The primary hands off stream connections only (never for a UDP index).
            Family::Tcp | Family::Udp => Stream::Tcp(TcpStream::from(fd)),
            Family::Unix => Stream::Unix(UnixStream::from(fd)),
        };
        Connection {
            listener,
            stream,
            _open: Tally(self.closed_word),
        }
    }

    /// The next connection, message or disconnect request, waiting for one. `None` once the
    /// channel to the primary is closed and nothing is left.
    ///
    /// Connections come from the primary (hand-off schedules) or from this worker's accepting
    /// on its stream listeners (accepting schedules, unless
    /// [`Builder::app_accepts`](crate::Builder::app_accepts): then only messages and the
    /// disconnect). It never reads a UDP socket ([`udp_socket`](Self::udp_socket)).
    // A lending iterator (a message borrows the worker's buffer), so not `Iterator::next`.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Next<'_>>> {
        self.step(true)
    }

    /// The next item if one is ready now; `None` if nothing is. Never blocks. Once this worker
    /// is disconnecting ([`Next::Disconnect`] was returned, or [`disconnect`](Self::disconnect)
    /// was called) and the channel closed, fails with [`Error::Closed`]: the fd stays readable
    /// (end of file) and is to be taken out of the poll set.
    pub fn try_next(&mut self) -> Result<Option<Next<'_>>> {
        if self.closed && self.disconnecting {
            return Err(Error::Closed);
        }
        self.step(false)
    }

    fn step(&mut self, wait: bool) -> Result<Option<Next<'_>>> {
        self.beat(false);
        if !self.listening_sent && !self.disconnecting {
            self.announce()?;
        }
        if self.close_owed {
            self.send_close(wait);
        }
        loop {
            if self.closed {
                return Ok(None);
            }
            if self.paused && !self.disconnecting {
                self.resume_accepting()?;
            }
            if self.epoll.is_some() && !self.disconnecting && !self.paused {
                if let Some(c) = self.accept_one()? {
                    self.accepted = true;
                    match self.admit(c)? {
                        Some(c) => return Ok(Some(Next::Connection(c))),
                        None => continue,
                    }
                }
                // The listeners are drained. If that drain took connections, the channel is
                // left for the next round: a waiting frame keeps the worker's fd readable, so it
                // is read on the next wakeup, and a busy worker saves a `recvmsg` per wakeup.
                if self.accepted && !wait {
                    self.accepted = false;
                    return Ok(None);
                }
                self.accepted = false;
            }
            // Take what is needed out of the frame so that the borrow of the buffer ends here;
            // a message's payload is borrowed again from the buffer when it is returned.
            // A hand-off must never be lost to EMFILE: the kernel drops an fd it cannot install
            // (MSG_CTRUNC). So a frame is read only with a spare fd in hand, closed just before
            // the read; when no spare can be made (out of fds), the frame stays queued and
            // `next` fails with EMFILE: the application frees fds and calls it again.
            if self.reserve.is_none() {
                self.reserve = Some(self.spare()?);
            }
            self.reserve = None;
            let got = self
                .chan
                .try_recv(&mut self.rbuf)
                .map(|r| r.map(Received::take));
            self.reserve = self.spare().ok();
            match got {
                Ok(Some(Taken {
                    kind,
                    listener,
                    len,
                    mut fds,
                })) => match kind {
                    Kind::Connection => {
                        // No shared-memory count here: in round-robin the primary counts the
                        // hand-offs itself, so that would be dead work per connection.
                        let Some(fd) = fds.pop() else { continue };
                        let c = self.stream(fd, listener.unwrap_or(0) as usize);
                        match self.admit(c)? {
                            Some(c) => return Ok(Some(Next::Connection(c))),
                            None => continue,
                        }
                    }
                    Kind::Message => {
                        self.page.count_msg();
                        return Ok(Some(Next::Message(Message {
                            payload: self.rbuf.payload(len),
                            fds,
                        })));
                    }
                    Kind::Disconnect | Kind::Close => {
                        if self.disconnecting {
                            continue;
                        }
                        self.disconnecting = true;
                        self.stop_accepting();
                        // The answer (see `frame`): this worker took the request and closes its
                        // channel. The primary reports `Disconnect` when it reads it, and what
                        // it sent before that is still read here.
                        if kind == Kind::Disconnect {
                            self.close_owed = true;
                            self.send_close(wait);
                        }
                        return Ok(Some(Next::Disconnect));
                    }
                    _ => return Err(Error::Invalid("unexpected frame kind from the primary")),
                },
                Ok(None) => {
                    if !wait {
                        return Ok(None);
                    }
                    self.beat(true);
                    self.wait_readable()?;
                    self.beat(false);
                }
                Err(Error::Closed) => {
                    self.closed = true;
                    self.stop_accepting();
                    if self.disconnecting {
                        return Ok(None);
                    }
                    self.disconnecting = true;
                    return Ok(Some(Next::Disconnect));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A spare fd: an eventfd, which needs no file system and is never mistaken for the
    /// channel.
    fn spare(&self) -> Result<OwnedFd> {
        rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).call("eventfd")
    }

    fn wait_readable(&mut self) -> Result<()> {
        match &self.epoll {
            Some(ep) if !self.disconnecting => {
                let mut evs = [epoll::Event {
                    flags: epoll::EventFlags::empty(),
                    data: epoll::EventData::new_u64(0),
                }; 4];
                loop {
                    match epoll::wait(ep, &mut evs, None) {
                        Ok(_) => return Ok(()),
                        Err(Errno::INTR) => continue,
                        Err(e) => return Err(Error::os("epoll_wait", e)),
                    }
                }
            }
            _ => {
                let mut pfd = [rustix::event::PollFd::new(
                    &self.chan,
                    rustix::event::PollFlags::IN,
                )];
                loop {
                    match rustix::event::poll(&mut pfd, None) {
                        Ok(_) => return Ok(()),
                        Err(Errno::INTR) => continue,
                        Err(e) => return Err(Error::os("poll", e)),
                    }
                }
            }
        }
    }
}

impl AsFd for Worker {
    /// The fd to poll for readability: the channel (round-robin, no listener) or the worker's
    /// own epoll set of channel and listeners (shared schedule).
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.epoll {
            Some(ep) => ep.as_fd(),
            None => self.chan.as_fd(),
        }
    }
}

impl core::fmt::Debug for Worker {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id)
            .field("schedule", &self.schedule)
            .finish_non_exhaustive()
    }
}
