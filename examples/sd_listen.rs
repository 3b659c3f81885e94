//! `sd_listen`: systemd socket activation and `sd_notify`, without libsystemd.
//!
//! ```text
//! systemd-socket-activate -l 127.0.0.1:8080 --fdname=web -l 127.0.0.1:8081 --fdname=admin \
//!     target/debug/examples/sd_listen
//! systemd-socket-activate -l 127.0.0.1:8080 target/debug/examples/sd_listen --cluster 2
//! ```
//!
//! Without arguments it prints one line per socket it was passed
//! (`fd=3 name=web family=inet kind=stream addr=127.0.0.1:8080 cloexec=yes`) and whether the
//! activation variables are still in its environment, then answers one HTTP request on each
//! stream socket, in order, with `200` and the socket's name, and exits 0. An invalid fd is one
//! line `sd_listen: socket activation: fd 3 is not a socket` (and so on) on stderr and exit 1.
//!
//! With `--cluster N` it runs a cluster of N workers on the passed sockets
//! (`Builder::systemd_listeners`) that answer `200` with `hello from worker <id> env=clean`
//! (`env=` lists the systemd variables a worker inherited: none), and drives
//! `NOTIFY_SOCKET` from its event loop: `STATUS=` as workers come and go, `READY=1` once all
//! listen, `RELOADING=1` during a rolling restart (SIGHUP) and `READY=1` after it,
//! `STOPPING=1` on SIGTERM, and `WATCHDOG=1` at half of `WATCHDOG_USEC`. Every event is one
//! line on stderr.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::time::Instant;

use forkcluster::systemd::{
    listen_fds, ActivatedFd, Lifecycle, Notifier, SocketFamily, SocketKind,
};
use forkcluster::{Cluster, Event, Next, State, Worker};

/// The variables of socket activation and `sd_notify`.
const SD_VARS: [&str; 6] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        None => plain(),
        Some("--cluster") => {
            let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
            cluster(n)
        }
        Some(other) => {
            eprintln!("usage: sd_listen [--cluster N] (unknown argument {other})");
            std::process::exit(2)
        }
    };
    if let Err(e) = r {
        eprintln!("sd_listen: {e}");
        std::process::exit(1);
    }
}

fn plain() -> forkcluster::Result<()> {
    let passed = listen_fds(true)?;
    let mut out = std::io::stdout().lock();
    for s in &passed {
        let cloexec = rustix::io::fcntl_getfd(&s.fd)
            .map(|f| f.contains(rustix::io::FdFlags::CLOEXEC))
            .unwrap_or(false);
        let _ = writeln!(
            out,
            "fd={} name={} family={} kind={} addr={} cloexec={}",
            std::os::fd::AsRawFd::as_raw_fd(&s.fd),
            s.name,
            match s.family {
                SocketFamily::Inet => "inet",
                SocketFamily::Inet6 => "inet6",
                SocketFamily::Unix => "unix",
            },
            match s.kind {
                SocketKind::Stream => "stream",
                SocketKind::Datagram => "datagram",
            },
            s.local_addr()?,
            if cloexec { "yes" } else { "no" },
        );
    }
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        let state = if std::env::var_os(var).is_some() {
            "set"
        } else {
            "unset"
        };
        let _ = writeln!(out, "{var}={state}");
    }
    let _ = writeln!(out, "count={}", passed.len());
    let _ = out.flush();
    drop(out);
    for s in passed {
        if s.kind == SocketKind::Stream {
            serve_one(s)?;
        }
    }
    Ok(())
}

/// Accepts one connection on `s`, reads its request head and answers `200` with the name.
fn serve_one(s: ActivatedFd) -> forkcluster::Result<()> {
    let (name, family) = (s.name.clone(), s.family);
    let fd = OwnedFd::from(s);
    let body = format!("{name}\n");
    let resp = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut conn: Box<dyn ReadWrite> = if family == SocketFamily::Unix {
        Box::new(UnixListener::from(fd).accept()?.0)
    } else {
        Box::new(TcpListener::from(fd).accept()?.0)
    };
    read_head(&mut *conn);
    conn.write_all(resp.as_bytes())?;
    Ok(())
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Reads until the end of a request head (or 4 KiB, or the peer stops).
fn read_head(conn: &mut dyn ReadWrite) {
    let mut buf = [0u8; 4096];
    let mut len = 0;
    while len < buf.len() {
        match conn.read(&mut buf[len..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => len += n,
        }
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            return;
        }
    }
}

fn cluster(n: usize) -> forkcluster::Result<()> {
    // The notifier and `systemd_listeners` read (and unset) their variables before the first
    // fork; Lifecycle turns the cluster's events into notifications, in systemd's order.
    let mut sd = Notifier::from_env(true)?.map(Lifecycle::new);
    let mut primary = Cluster::builder()
        .systemd_listeners()?
        .workers(n)
        .start(work)?;
    for (i, a) in primary.listen_addrs().enumerate() {
        eprintln!("listener {i}: {a}");
    }
    loop {
        let next = match sd.as_ref().and_then(Lifecycle::deadline) {
            Some(at) => primary.next_event_until(at)?,
            None => primary.next_event()?,
        };
        let Some(event) = next else { break };
        let (restart, done, stop) = (
            matches!(event, Event::Restart { .. }),
            matches!(event, Event::RestartDone),
            matches!(event, Event::Stopping { .. }),
        );
        if !matches!(event, Event::Idle) {
            eprintln!("{event}");
        }
        drop(event);
        let Some(sd) = sd.as_mut() else { continue };
        sd.tick(Instant::now());
        if restart {
            sd.reloading();
        }
        if done {
            sd.reloaded();
        }
        if stop {
            sd.stopping();
        }
        let listening = primary
            .workers()
            .filter(|w| w.state == State::Listening && !w.exited_after_disconnect)
            .count();
        sd.workers(listening, primary.wanted_workers());
    }
    Ok(())
}

fn work(mut worker: Worker) -> forkcluster::Result<()> {
    // Which of systemd's variables this worker inherited: none, when the primary unset them.
    let inherited: Vec<&str> = SD_VARS
        .into_iter()
        .filter(|v| std::env::var_os(v).is_some())
        .collect();
    let env = if inherited.is_empty() {
        "clean".to_string()
    } else {
        inherited.join(",")
    };
    let body = format!("hello from worker {} env={env}\n", worker.id());
    let resp = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    while let Some(next) = worker.next()? {
        match next {
            Next::Connection(mut conn) => {
                read_head(&mut conn);
                let _ = conn.write_all(resp.as_bytes());
            }
            Next::Message(_) => {}
            Next::Disconnect => break,
        }
    }
    Ok(())
}
