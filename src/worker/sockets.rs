//! The sockets a worker holds (accepting schedules, and UDP in all): lent out to the
//! application, accepted on by [`Worker::next`], paused after `EMFILE`.

use std::net::{TcpListener, UdpSocket};
use std::os::unix::net::UnixListener;

use rustix::event::epoll;
use rustix::io::Errno;
use rustix::net::SocketFlags;

use super::{Connection, Worker, ACCEPT_PAUSE};
use crate::error::{Call, Error, Result};
use crate::listener::Sock;

impl Worker {
    /// This worker's TCP listener `i` (index as in [`listen_addrs`](Self::listen_addrs)), in
    /// the accepting schedules ([`Schedule::Shared`](crate::Schedule::Shared), [`Schedule::ReusePort`](crate::Schedule::ReusePort)), so that a
    /// server that takes a [`TcpListener`] (a library's, or the application's own accept loop)
    /// runs in each worker unchanged. `None` when listener `i` is not TCP, in the hand-off
    /// schedules (the primary holds the listener and the worker none), and once the worker is
    /// disconnecting ([`Next::Disconnect`](crate::Next::Disconnect): the worker closes its listeners then).
    ///
    /// The socket is one open file shared by the primary and every worker: its blocking mode
    /// is one for all of them. By default it is nonblocking, because [`next`](Self::next)
    /// accepts on it too; an application that serves the listener itself sets
    /// [`Builder::app_accepts`](crate::Builder::app_accepts) (shared schedule), which leaves the listeners
    /// blocking (a plain `incoming()` loop works) and makes `next` return only messages and
    /// the disconnect. A library that wants the listener by value gets a duplicate with
    /// [`TcpListener::try_clone`] (one more fd, the same socket). A worker announces its
    /// listeners ([`Event::Listening`](crate::Event::Listening)) at its first
    /// [`next`](Self::next) or [`try_next`](Self::try_next): call one of them before serving.
    ///
    /// ```no_run
    /// use forkcluster::{Cluster, Schedule};
    /// use std::io::Write;
    ///
    /// let primary = Cluster::builder()
    ///     .listen("127.0.0.1:8080".parse()?)
    ///     .schedule(Schedule::Shared)
    ///     .app_accepts(true)
    ///     .start(|mut worker| -> forkcluster::Result<()> {
    ///         // Once before serving: the worker announces its listeners (Event::Listening).
    ///         while worker.try_next()?.is_some() {}
    ///         let listener = worker.tcp_listener(0).expect("shared: every worker holds it");
    ///         for conn in listener.incoming() {
    ///             let _ = conn?.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nhi\n");
    ///         }
    ///         Ok(())
    ///     })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn tcp_listener(&self, i: usize) -> Option<&TcpListener> {
        match self.listeners.get(i)?.fd.as_ref()? {
            Sock::Tcp(l) => Some(l),
            _ => None,
        }
    }

    /// This worker's Unix listener `i`: as [`tcp_listener`](Self::tcp_listener), for a Unix
    /// stream listener.
    ///
    /// ```no_run
    /// use forkcluster::{Cluster, Schedule};
    ///
    /// let primary = Cluster::builder()
    ///     .listen_unix("/run/app.sock")
    ///     .schedule(Schedule::Shared)
    ///     .app_accepts(true)
    ///     .start(|worker| -> forkcluster::Result<()> {
    ///         let listener = worker.unix_listener(0).expect("listener 0 is a Unix socket");
    ///         for conn in listener.incoming() {
    ///             drop(conn?);
    ///         }
    ///         Ok(())
    ///     })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn unix_listener(&self, i: usize) -> Option<&UnixListener> {
        match self.listeners.get(i)?.fd.as_ref()? {
            Sock::Unix(l) => Some(l),
            _ => None,
        }
    }

    /// This worker's UDP socket `i` ([`Builder::listen_udp`](crate::Builder::listen_udp)), in
    /// every schedule: every worker holds every UDP socket, and the kernel gives each datagram
    /// to one of the workers that read it. `None` when listener `i` is not UDP, and once the
    /// worker is disconnecting ([`Next::Disconnect`](crate::Next::Disconnect): it closes the socket then, and the others
    /// keep serving it). [`next`](Self::next) never reads it: the worker reads it in its own
    /// loop (a thread of its own, or its poll set next to this worker's [`as_fd`](std::os::fd::AsFd::as_fd)).
    ///
    /// The socket is one open file shared by the primary and every worker, so its mode is one
    /// for all: blocking, as [`UdpSocket::bind`] makes it (each datagram wakes one blocked
    /// reader). Workers with a poll loop call `set_nonblocking(true)` on it, each of them (or
    /// none: a blocking reader that another worker beats to a datagram waits for the next).
    ///
    /// ```no_run
    /// use forkcluster::Cluster;
    ///
    /// let primary = Cluster::builder()
    ///     .listen_udp("127.0.0.1:5353".parse()?)
    ///     .start(|worker| -> forkcluster::Result<()> {
    ///         let sock = worker.udp_socket(0).expect("listener 0 is UDP");
    ///         let mut buf = [0u8; 1500];
    ///         loop {
    ///             let (n, from) = sock.recv_from(&mut buf)?;
    ///             sock.send_to(&buf[..n], from)?;
    ///         }
    ///     })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn udp_socket(&self, i: usize) -> Option<&UdpSocket> {
        match self.listeners.get(i)?.fd.as_ref()? {
            Sock::Udp(s) => Some(s),
            _ => None,
        }
    }

    pub(super) fn stop_accepting(&mut self) {
        // Closing the timer also takes it out of epoll: no wakeup is left pending.
        self.pause_timer = None;
        for l in self.listeners.iter_mut() {
            if let Some(fd) = l.fd.take() {
                if let Some(ep) = &self.epoll {
                    let _ = epoll::delete(ep, &fd);
                }
            }
        }
    }

    /// Shared schedule: accepts one connection from any listener, if one is waiting.
    pub(super) fn accept_one(&mut self) -> Result<Option<Connection>> {
        let n = self.listeners.len();
        let flags = if self.nonblocking {
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK
        } else {
            SocketFlags::CLOEXEC
        };
        for k in 0..n {
            let i = (self.next_listener + k) % n;
            let Some(fd) = self.listeners[i].acceptor(self.app_accepts) else {
                continue;
            };
            loop {
                match rustix::net::accept_with(fd, flags) {
                    Ok(s) => {
                        self.next_listener = (i + 1) % n;
                        self.page.count_conn();
                        return Ok(Some(self.stream(s, i)));
                    }
                    Err(Errno::INTR) | Err(Errno::CONNABORTED) | Err(Errno::PROTO) => continue,
                    Err(Errno::AGAIN) => break,
                    // Out of fds or memory: failing would drop every connection this worker
                    // serves, and retrying would spin. Pause (the connections wait in the
                    // backlog or go to other workers) and try again after a moment.
                    // (EINVAL: the socket was shut down and does not listen now; under
                    // reuseport the primary has it listen again within a second.)
                    Err(Errno::MFILE) | Err(Errno::NFILE) | Err(Errno::NOBUFS)
                    | Err(Errno::NOMEM) | Err(Errno::INVAL) => {
                        self.pause_accepting()?;
                        return Ok(None);
                    }
                    Err(e) => return Err(Error::os("accept4", e)),
                }
            }
        }
        Ok(None)
    }

    /// Takes the listeners out of epoll and arms the pause timer.
    pub(super) fn pause_accepting(&mut self) -> Result<()> {
        let (Some(ep), Some(timer)) = (&self.epoll, &self.pause_timer) else {
            return Ok(());
        };
        for l in &self.listeners {
            if let Some(fd) = l.acceptor(self.app_accepts) {
                // EPOLLEXCLUSIVE registrations cannot be modified, only removed.
                let _ = epoll::delete(ep, fd);
            }
        }
        let zero = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let when = rustix::time::Itimerspec {
            it_interval: zero,
            it_value: ACCEPT_PAUSE,
        };
        rustix::time::timerfd_settime(timer, rustix::time::TimerfdTimerFlags::empty(), &when)
            .call("timerfd_settime")?;
        self.paused = true;
        Ok(())
    }

    /// Ends a pause once its timer has fired: the listeners go back into epoll.
    pub(super) fn resume_accepting(&mut self) -> Result<()> {
        let (Some(ep), Some(timer)) = (&self.epoll, &self.pause_timer) else {
            return Ok(());
        };
        let mut ticks = [0u8; 8];
        match rustix::io::read(timer, &mut ticks) {
            Ok(_) => {}
            Err(Errno::AGAIN) => return Ok(()),
            Err(e) => return Err(Error::os("read(timerfd)", e)),
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if let Some(fd) = l.acceptor(self.app_accepts) {
                epoll::add(
                    ep,
                    fd,
                    epoll::EventData::new_u64(i as u64),
                    epoll::EventFlags::IN | epoll::EventFlags::EXCLUSIVE,
                )
                .call("epoll_ctl")?;
            }
        }
        self.paused = false;
        Ok(())
    }
}
