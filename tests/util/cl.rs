//! Cluster helpers shared by the integration tests: owned events, pumping the primary's loop,
//! the standard serving worker and its reply, clients in forked children.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forkcluster::{Error, Event, ListenAddr, Next, Primary, Worker};

// ---------------------------------------------------------------------------------------------
// Events, owned (so that the primary can be used again while one is looked at).

#[derive(Debug)]
pub enum E {
    Fork {
        id: u32,
        pid: u32,
    },
    Online(u32),
    Listening {
        id: u32,
        listener: usize,
        addr: ListenAddr,
    },
    Message {
        id: u32,
        payload: Vec<u8>,
        fds: Vec<OwnedFd>,
    },
    Disconnect(u32),
    Exit {
        id: u32,
        pid: u32,
        code: Option<i32>,
        signal: Option<i32>,
        after: bool,
    },
    WorkerError {
        id: u32,
        error: Error,
    },
    Other(#[allow(dead_code)] String),
    Idle,
    /// `next_event` returned `None`: the cluster stopped and every worker is gone.
    Done,
}

impl E {
    /// The worker id the event is about, if any.
    pub fn id(&self) -> Option<u32> {
        match self {
            E::Fork { id, .. }
            | E::Online(id)
            | E::Listening { id, .. }
            | E::Message { id, .. }
            | E::Disconnect(id)
            | E::Exit { id, .. }
            | E::WorkerError { id, .. } => Some(*id),
            _ => None,
        }
    }

    /// A short name of the kind, for order checks.
    pub fn kind(&self) -> &'static str {
        match self {
            E::Fork { .. } => "fork",
            E::Online(_) => "online",
            E::Listening { .. } => "listening",
            E::Message { .. } => "message",
            E::Disconnect(_) => "disconnect",
            E::Exit { .. } => "exit",
            E::WorkerError { .. } => "error",
            E::Other(_) => "other",
            E::Idle => "idle",
            E::Done => "done",
        }
    }
}

pub fn own(e: Event<'_>) -> E {
    match e {
        Event::Fork { id, pid } => E::Fork { id, pid },
        Event::Online { id } => E::Online(id),
        Event::Listening { id, listener, addr } => E::Listening {
            id,
            listener,
            addr: addr.clone(),
        },
        Event::Message { id, payload, fds } => E::Message {
            id,
            payload: payload.to_vec(),
            fds: fds.into_iter().collect(),
        },
        Event::Disconnect { id } => E::Disconnect(id),
        Event::Exit {
            id,
            pid,
            status,
            exited_after_disconnect,
        } => E::Exit {
            id,
            pid,
            code: status.code(),
            signal: status.signal(),
            after: exited_after_disconnect,
        },
        Event::WorkerError { id, error } => E::WorkerError { id, error },
        Event::Idle => E::Idle,
        other => E::Other(other.to_string()),
    }
}

pub const STEP: Duration = Duration::from_millis(20);

/// The next event (or `Idle` after `d`); panics on an error of the primary.
pub fn ev(p: &mut Primary, d: Duration) -> E {
    match p.next_event_timeout(d) {
        Ok(Some(e)) => own(e),
        Ok(None) => E::Done,
        Err(e) => panic!("next_event failed: {e}"),
    }
}

/// Pumps events (`Idle` included, every [`STEP`]) into `f` until it returns true; panics after
/// `limit`, or when the cluster ends and `f` did not expect it.
pub fn pump(p: &mut Primary, limit: Duration, mut f: impl FnMut(&mut Primary, E) -> bool) {
    let end = Instant::now() + limit;
    loop {
        assert!(
            Instant::now() < end,
            "timed out after {limit:?} waiting for events"
        );
        let e = ev(p, STEP);
        let done = matches!(e, E::Done);
        if f(p, e) {
            return;
        }
        assert!(!done, "the cluster ended while events were awaited");
    }
}

/// Pumps until `n` workers are listening on every one of the cluster's listeners (or, without
/// listeners, online). Returns `(id, pid)` of each, in fork order, and every event seen.
pub fn wait_ready(p: &mut Primary, n: usize) -> (Vec<(u32, u32)>, Vec<E>) {
    let listeners = p.listen_addrs().count();
    let mut forks = Vec::new();
    let mut ready: BTreeMap<u32, usize> = BTreeMap::new();
    let mut log = Vec::new();
    pump(p, Duration::from_secs(10), |_, e| {
        match &e {
            E::Fork { id, pid } => forks.push((*id, *pid)),
            E::Online(id) if listeners == 0 => *ready.entry(*id).or_default() += 1,
            E::Listening { id, .. } => *ready.entry(*id).or_default() += 1,
            E::Exit { id, .. } => panic!("worker {id} exited during start-up: {e:?}"),
            _ => {}
        }
        log.push(e);
        ready.values().filter(|&&k| k == listeners.max(1)).count() >= n
    });
    (forks, log)
}

/// Pumps until `cond` holds for an event, keeping the others; returns them all, that one last.
pub fn until(p: &mut Primary, limit: Duration, mut cond: impl FnMut(&E) -> bool) -> Vec<E> {
    let mut log = Vec::new();
    pump(p, limit, |_, e| {
        let hit = cond(&e);
        if !matches!(e, E::Idle) {
            log.push(e);
        }
        hit
    });
    log
}

/// Pumps for `d`, returning every event but `Idle`.
pub fn settle(p: &mut Primary, d: Duration) -> Vec<E> {
    let end = Instant::now() + d;
    let mut log = Vec::new();
    while Instant::now() < end {
        match ev(p, STEP) {
            E::Idle => {}
            E::Done => {
                log.push(E::Done);
                break;
            }
            e => log.push(e),
        }
    }
    log
}

pub fn lo0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub fn tcp_addr(p: &Primary, i: usize) -> SocketAddr {
    match p.listen_addrs().nth(i) {
        Some(ListenAddr::Tcp(a)) => *a,
        other => panic!("listener {i} is not TCP: {other:?}"),
    }
}

pub fn me() -> i32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

pub fn kill(pid: u32, sig: i32) {
    // SAFETY: kill has no memory preconditions; the pid is one this test started.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

/// Drops the primary and checks that every worker it had was killed and reaped.
pub fn finish(p: Primary) {
    drop(p);
    let left = super::children_of(me());
    assert!(
        left.is_empty(),
        "children left after the primary was dropped: {left:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Workers and clients.

pub const REPLY_LEN: usize = 512;

/// What a serving worker writes on every connection: its id and the listener's index, padded to
/// [`REPLY_LEN`] bytes so that a short read shows.
pub fn reply(id: u32, listener: usize) -> Vec<u8> {
    let mut r = format!("id={id:05} listener={listener:02} ").into_bytes();
    r.resize(REPLY_LEN - 1, b'.');
    r.push(b'\n');
    r
}

/// `(id, listener)` from a full reply; `None` for anything else.
pub fn parse_reply(b: &[u8]) -> Option<(u32, usize)> {
    if b.len() != REPLY_LEN || !b.starts_with(b"id=") || b[REPLY_LEN - 1] != b'\n' {
        return None;
    }
    let s = std::str::from_utf8(&b[..22]).ok()?;
    let id = s.get(3..8)?.parse().ok()?;
    let l = s.get(18..20)?.parse().ok()?;
    (reply(id, l) == b).then_some((id, l))
}

/// The standard worker: answers every connection with [`reply`], returns 0 on disconnect.
pub fn serve(mut w: Worker) -> i32 {
    let id = w.id();
    let replies: Vec<Vec<u8>> = (0..8).map(|l| reply(id, l)).collect();
    while let Some(n) = w.next().expect("worker: next") {
        match n {
            Next::Connection(mut c) => {
                let _ = c.write_all(&replies[c.listener.min(7)]);
            }
            Next::Message(_) => {}
            Next::Disconnect => break,
        }
    }
    0
}

/// Closes the socket with a reset instead of a FIN (`SO_LINGER` 0): no TIME_WAIT left behind,
/// however many connections a test makes.
pub fn abort_close(s: TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a pointer to a live `linger` of the size given.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            core::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Connects, reads the reply to end of file, closes. `Err` for a reset or a timeout.
pub fn fetch(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
    let mut s = connect(addr);
    let mut b = Vec::with_capacity(REPLY_LEN);
    s.read_to_end(&mut b)?;
    abort_close(s);
    Ok(b)
}

/// [`fetch`] from the local address `src` (any of 127.0.0.0/8).
pub fn fetch_from(addr: SocketAddr, src: [u8; 4]) -> std::io::Result<Vec<u8>> {
    let fd = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::STREAM,
        None,
    )?;
    let local = SocketAddr::from((src, 0));
    rustix::net::bind(&fd, &local)?;
    rustix::net::connect(&fd, &addr)?;
    let mut s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut b = Vec::with_capacity(REPLY_LEN);
    s.read_to_end(&mut b)?;
    abort_close(s);
    Ok(b)
}

pub fn fetch_unix(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut b = Vec::new();
    s.read_to_end(&mut b)?;
    Ok(b)
}

pub fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap()
}

/// Closes every fd of this process but `keep` (in a forked client, so that it holds nothing of
/// the primary's: channels, listeners, epoll).
pub fn close_all_but(keep: &[RawFd]) {
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if !keep.contains(&fd) {
            // SAFETY: the child never uses the Rust objects that own these fds again (it
            // leaves with `_exit`).
            unsafe { libc::close(fd) };
        }
    }
}

/// Runs `f` in a forked child process (a client; it closes every inherited fd but stdio first)
/// while the primary pumps its events into `on`; returns the bytes `f` returned. Fails if the
/// child fails or takes longer than `limit`.
pub fn client(
    p: &mut Primary,
    limit: Duration,
    f: impl FnOnce() -> Vec<u8>,
    mut on: impl FnMut(&mut Primary, E),
) -> Vec<u8> {
    let (r, w) = pipe();
    let wfd = w.as_raw_fd();
    let pid = super::fork_child(move || {
        close_all_but(&[0, 1, 2, wfd]);
        let out = f();
        let mut file = File::from(w);
        file.write_all(&out).unwrap();
        0
    });
    let _guard = super::KillOnDrop(pid);
    rustix::io::ioctl_fionbio(&r, true).unwrap();
    let mut file = File::from(r);
    let mut out = Vec::new();
    let end = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        assert!(
            Instant::now() < end,
            "client did not finish within {limit:?}"
        );
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("reading the client's pipe: {e}"),
        }
        let e = ev(p, Duration::from_millis(5));
        on(p, e);
    }
    let st = super::wait_child(pid, Duration::from_secs(5));
    std::mem::forget(_guard);
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "client failed (wait status {st:#x})"
    );
    out
}

/// `client` that ignores events, except that it fails on any exit.
pub fn client_quiet(p: &mut Primary, limit: Duration, f: impl FnOnce() -> Vec<u8>) -> Vec<u8> {
    client(p, limit, f, |_, e| {
        assert!(!matches!(e, E::Exit { .. } | E::Done), "unexpected {e:?}");
    })
}

/// `n` sequential fetches from `addr`; the ids that answered (as u32 LE), panics on a bad reply.
pub fn fetch_ids(addr: SocketAddr, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        let b = fetch(addr).unwrap_or_else(|e| panic!("fetch {i}: {e}"));
        let (id, _) = parse_reply(&b).unwrap_or_else(|| panic!("fetch {i}: bad reply {b:?}"));
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

pub fn u32s(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// A path for a Unix socket, unique to this test process.
pub fn sock_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("forkcluster-test-{}-{tag}.sock", me()))
}
