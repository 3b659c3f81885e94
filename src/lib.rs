//! forkcluster brings the Node.js [`cluster`](https://nodejs.org/api/cluster.html) model to
//! systems programs: one primary process forks a pool of workers, the workers share one server
//! port, and the primary supervises them.
//!
//! # Overview
//!
//! * [`Cluster::builder`] binds the listeners and [`Builder::start`] forks the workers. Each
//!   worker runs the function given to `start` in its own process and exits with what it
//!   returns; `start` returns only in the primary, with the [`Primary`].
//! * Connections reach workers by a [`Schedule`]: **round-robin** (the default: the primary
//!   accepts each connection and passes its fd to the next ready worker), **least
//!   connections** (the same hand-off, to the less loaded of two workers), **sticky** (the
//!   client's IP picks the worker's seat), **shared** (every worker accepts on the listener it
//!   inherited; the kernel picks) or **reuseport** (one `SO_REUSEPORT` socket per worker seat,
//!   kept by the primary across the worker's deaths and restarts, so no backlog is lost).
//!   [`Builder::max_connections_per_worker`] and [`Worker::refuse`] send connections a worker
//!   cannot take to another worker.
//! * UDP sockets ([`Builder::listen_udp`]) are shared by every worker in every schedule, as
//!   Node's clustered `dgram`: the primary binds them, the workers read them
//!   ([`Worker::udp_socket`]). Where workers accept, [`Worker::tcp_listener`] and
//!   [`Worker::unix_listener`] lend out their listeners, so that a server that takes a
//!   `TcpListener` runs in each worker ([`Builder::app_accepts`]).
//! * The primary reads lifecycle [`Event`]s from one loop ([`Primary::next_event`]): fork, online,
//!   listening, message, disconnect, exit (code or signal), and the supervisor's own (backoff,
//!   hung worker, rolling restart, ...). No callbacks, no threads, no allocation per event.
//! * Disconnecting is Node's: [`Event::Disconnect`] comes when a worker's channel closes (it
//!   called [`Worker::disconnect`], or took [`Primary::disconnect`], a stop or a restart), while
//!   it may still be finishing the connections it holds; [`Event::Exit`] follows when it exits,
//!   with `exited_after_disconnect`. A crash or a kill gives both at the exit.
//! * A worker may also be another program: with [`Builder::exec`] and
//!   [`Builder::start_exec`] each forked child `execve`s it, and the program takes its
//!   [`Worker`] with [`Worker::from_env`] (Node's `setupPrimary({ exec, args, cwd })`).
//! * Primary and workers exchange messages of up to [`frame::MAX_PAYLOAD`] bytes with up to
//!   [`frame::MAX_FDS`] file descriptors ([`Primary::send`], [`Worker::send`]).
//! * What Node leaves to every application ships here: respawn with crash-loop backoff, graceful
//!   and fast stop, zero-drop rolling restart, scaling, hung-worker detection, max requests, and
//!   the signals nginx, gunicorn and unicorn users know (TERM graceful, INT fast, HUP restart,
//!   TTIN/TTOU scale).
//!
//! # Example
//!
//! A server whose workers all answer on one port:
//!
//! ```no_run
//! use forkcluster::{Cluster, Next};
//! use std::io::{Read, Write};
//!
//! fn main() -> forkcluster::Result<()> {
//!     let mut primary = Cluster::builder()
//!         .listen("127.0.0.1:8080".parse().unwrap())
//!         .start(|mut worker| -> forkcluster::Result<()> {
//!             while let Some(next) = worker.next()? {
//!                 match next {
//!                     Next::Connection(mut conn) => {
//!                         let mut req = [0u8; 1024];
//!                         let _ = conn.read(&mut req);
//!                         let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nhi\n");
//!                     }
//!                     Next::Message(msg) => eprintln!("message: {:?}", msg.payload),
//!                     Next::Disconnect => break,
//!                 }
//!             }
//!             Ok(())
//!         })?;
//!     while let Some(event) = primary.next_event()? {
//!         eprintln!("{event}");
//!     }
//!     Ok(())
//! }
//! ```
//!
//! A pool of job workers without a listener uses the same machinery: the primary sends jobs with
//! [`Primary::send`], workers answer with [`Worker::send`], results arrive as
//! [`Event::Message`].
//!
//! # Why fork, and why no threads
//!
//! A process per worker is what makes a supervisor worth having: a worker that crashes, leaks or
//! hangs is killed and replaced without touching the others, and memory is returned to the system
//! when it exits. forkcluster is thread-free and has no async runtime: the primary is one `epoll`
//! loop and each worker is whatever the application makes it (a blocking loop on
//! [`Worker::next`], or its own poll loop around [`Worker`]'s fd). `fork` is only sound in a
//! single-threaded process, so [`Builder::start`] refuses to run when the process has other
//! threads: start the cluster first.
//!
//! # Anatomy
//!
//! | module | what it does |
//! |---|---|
//! | [`frame`] | the wire format: a fixed, versioned 16-byte header and a bounded payload; pure, never panics (fuzzed) |
//! | [`channel`] | one end of a `SOCK_SEQPACKET` socketpair: a frame and its fds per datagram (`sendmsg`/`recvmsg`, `SCM_RIGHTS`) |
//! | `listener` | listening sockets: binding what the builder asked for, their addresses |
//! | `heartbeat` | the page of 32-bit counters each worker shares with the primary (one page per worker) |
//! | `deploy` | the workers' user and groups (privilege separation), CPU affinity, process names, `RLIMIT_NOFILE`: resolved in the primary, applied in each worker before the worker function |
//! | `settings` | [`Schedule`], the supervisor's settings, the limits |
//! | `worker` | the worker side: the next connection, message or disconnect request |
//! | `primary` | the loop: epoll over listeners, channels and a `signalfd`, routing each ready fd to its room |
//! | `primary::table` | worker slots, ids, generations, epoll tokens |
//! | `primary::dispatch`, `primary::schedule` | accept, hand-off, the in-flight bound, recovery; which worker is next |
//! | `primary::protocol` | frames from workers, judged and turned into events |
//! | `primary::lifecycle`, `primary::spawn` | reaping, channel close, `Exit`; forking a worker |
//! | `primary::supervisor` | the supervision policy as a state machine without system calls: backoff, restarts, recycling, hung workers, kill timers |
//! | `primary::events` | [`Event`], [`ClusterStats`] |
//! | `cluster` | the builder |
//! | `exec` | exec'd workers: the `execve` a forked child makes instead of the worker function ([`Builder::exec`]), and [`Worker::from_env`] in the program it runs |
//! | [`systemd`] | socket activation (`LISTEN_FDS`) and `sd_notify` (`NOTIFY_SOCKET`, watchdog), without libsystemd |
//! | `sys` | the only `unsafe` (a folder: `creds` for users, groups and the privilege drop, `exec` for exec'd workers): `fork`, signal masks and `signalfd`, the shared pages, `_exit` |
//!
//! Round-robin hand-off never loses a connection to a dying worker: the primary keeps a
//! duplicate of each worker's end of its channel, so connection frames a worker had not read yet
//! when it died are read back by the primary and handed to another worker. The primary's own copy
//! of each connection is closed as soon as the frame is queued, as in a plain C prefork server,
//! and no acknowledgement travels back: per connection the primary makes exactly `accept4`,
//! `sendmsg` and `close`. The send buffer of the primary's end bounds how many hand-offs wait in
//! a worker's queue, so a stuck worker stops getting work while the others keep serving.
//!
//! # Safety
//!
//! `unsafe` lives in one private module (`sys`), each block with a `// SAFETY:` comment; the rest
//! of the crate is `#![deny(unsafe_code)]` and goes through `rustix` and `std`. File descriptors
//! are `OwnedFd`/`BorrowedFd` everywhere. The frame decoder is fuzzed (`fuzz/`) and rejects
//! anything that is not exactly a valid frame; the primary treats every byte and fd from a worker
//! as untrusted (see `SECURITY.md`).
//!
//! # Limitations
//!
//! * Linux only (`SOCK_SEQPACKET`, `signalfd`, `epoll`, `PR_SET_PDEATHSIG`).
//! * The process must be single-threaded when the cluster starts, and the primary blocks the
//!   signals it handles (SIGCHLD always; TERM, INT, QUIT, HUP, TTIN, TTOU unless
//!   [`Builder::handle_signals`] is off) and reads them from a `signalfd`.
//! * Workers keep the signal dispositions the process had when the cluster started, other than
//!   those the primary uses, and an empty signal mask. Rust's runtime ignores SIGPIPE, so workers
//!   do too.
//! * Messages are bounded ([`frame::MAX_PAYLOAD`]); larger data travels as a file descriptor.
//! * The single-thread check counts the entries of `/proc/self/task`. A user-mode emulator shows
//!   its own threads there too (qemu-user runs a helper thread in every process), so when the
//!   count is above one, [`Builder::start`] compares it with what a child forked at that moment
//!   counts: fork copies only the calling thread, so on a real kernel that child always sees
//!   one and the check stays exactly "one thread"; under qemu the child has the emulator's
//!   threads too, and only threads beyond those refuse the start. If that child cannot be
//!   forked (no processes left), the plain count decides.
//! * Under qemu-user, a datagram carrying more than [`frame::MAX_FDS`] fds leaves the surplus
//!   open in the receiving process: qemu hands the kernel a larger control buffer than the
//!   program's and does not close the fds that do not fit back. A real kernel never installs
//!   them, and the channel closes every fd it does not return.
#![deny(unsafe_code, missing_docs)]

pub mod channel;
mod cluster;
mod deploy;
mod error;
mod exec;
pub mod frame;
mod heartbeat;
mod listener;
mod primary;
mod settings;
mod sys;
pub mod systemd;
mod worker;

pub use cluster::{Builder, Cluster, ExitCode};
pub use deploy::{Affinity, Groups, NameOrId, DEFAULT_WORKER_NAME, EXIT_PRIVSEP_FAILED};
pub use error::{Error, Result};
pub use exec::{EXEC_CHANNEL_FD, EXIT_EXEC_FAILED};
pub use listener::ListenAddr;
pub use primary::{ClusterStats, Event, Primary, State, WorkerInfo};
pub use rustix::process::Signal;
pub use settings::{Schedule, MAX_IN_FLIGHT, MAX_LISTENERS};
pub use worker::{Connection, Message, Next, Stream, Worker};
