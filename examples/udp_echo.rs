//! `udp_echo`: a UDP echo server served by every worker (Node's clustered `dgram`).
//!
//! ```sh
//! cargo run --example udp_echo -- --listen 127.0.0.1:5300 --workers 2
//! echo hi | nc -u -w1 127.0.0.1 5300        # worker 2: hi
//! ```
//!
//! The primary binds one UDP socket and never reads it; every worker holds it
//! ([`Worker::udp_socket`]) and the kernel gives each datagram to one of them. Each worker runs
//! its own poll loop over the socket and its [`Worker`] fd, so that a disconnect (SIGTERM to
//! the primary, a rolling restart with SIGHUP) ends it cleanly.

use std::io::ErrorKind;

use forkcluster::{Cluster, Event, Next, Worker};
use rustix::event::{poll, PollFd, PollFlags};

fn serve(mut worker: Worker) -> forkcluster::Result<()> {
    let id = worker.id();
    // One open socket for every worker: each of them makes it nonblocking (none of them reads
    // it blocking).
    worker
        .udp_socket(0)
        .ok_or(forkcluster::Error::Invalid("listener 0 is not UDP"))?
        .set_nonblocking(true)?;
    let prefix = format!("worker {id}: ");
    let mut buf = [0u8; 2048];
    let mut out = Vec::with_capacity(prefix.len() + buf.len());
    loop {
        // The primary's messages and disconnect (and, once at start, the Listening event).
        while let Some(next) = worker.try_next()? {
            match next {
                Next::Disconnect => return Ok(()),
                Next::Message(_) | Next::Connection(_) => {}
            }
        }
        let Some(sock) = worker.udp_socket(0) else {
            return Ok(());
        };
        loop {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    out.clear();
                    out.extend_from_slice(prefix.as_bytes());
                    out.extend_from_slice(&buf[..n]);
                    let _ = sock.send_to(&out, from);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let mut fds = [
            PollFd::new(&worker, PollFlags::IN),
            PollFd::new(sock, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn main() -> forkcluster::Result<()> {
    let mut listen = "127.0.0.1:5300".to_string();
    let mut workers = 2;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--listen", Some(v)) => listen = v,
            ("--workers", Some(v)) => workers = v.parse().unwrap_or(2),
            _ => {
                eprintln!("usage: udp_echo [--listen ADDR] [--workers N]");
                std::process::exit(2);
            }
        }
    }
    let addr = listen
        .parse()
        .map_err(|_| forkcluster::Error::Invalid("--listen: not an IP address and port"))?;
    let mut primary = Cluster::builder()
        .listen_udp(addr)
        .workers(workers)
        .start(serve)?;
    while let Some(event) = primary.next_event()? {
        if let Event::Listening { id, addr, .. } = &event {
            eprintln!("worker {id} serves {addr}");
        } else {
            eprintln!("{event}");
        }
    }
    Ok(())
}
