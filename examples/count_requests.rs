//! `count_requests`: the primary counts the HTTP requests its workers serve.
//!
//! The Rust form of the message example in Node's cluster documentation: each worker answers
//! `hello world` and tells the primary with a `notifyRequest` message; the primary prints
//! `numReqs = N` on stdout every second. The primary has no timer thread: it waits for events
//! with [`Primary::next_event_until`](forkcluster::Primary::next_event_until), which returns
//! [`Event::Idle`] at the deadline.
//!
//! ```text
//! cargo run --example count_requests -- [--listen ADDR] [--workers N] [--seconds N]
//! curl http://127.0.0.1:8000/
//! ```
//!
//! Defaults: `127.0.0.1:8000`, one worker per CPU. It serves until SIGTERM (graceful) or SIGINT
//! (fast), or for `--seconds N` if given, then prints the final count and exits 0. Lifecycle
//! events go to stderr.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use forkcluster::{Cluster, Event, Next, Worker};

const NOTIFY: &[u8] = b"notifyRequest";
const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\nhello world\n";

fn usage(msg: &str) -> ! {
    eprintln!("count_requests: {msg}");
    eprintln!("usage: count_requests [--listen ADDR] [--workers N] [--seconds N]");
    std::process::exit(2)
}

fn main() -> forkcluster::Result<()> {
    let mut listen: SocketAddr = ([127, 0, 0, 1], 8000).into();
    let mut workers = None;
    let mut seconds = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let val = args
            .next()
            .unwrap_or_else(|| usage(&format!("{a} needs a value")));
        match a.as_str() {
            "--listen" => listen = val.parse().unwrap_or_else(|_| usage("bad --listen")),
            "--workers" => workers = Some(val.parse().unwrap_or_else(|_| usage("bad --workers"))),
            "--seconds" => seconds = Some(val.parse().unwrap_or_else(|_| usage("bad --seconds"))),
            _ => usage(&format!("unknown argument {a}")),
        }
    }

    let mut builder = Cluster::builder().listen(listen);
    if let Some(n) = workers {
        builder = builder.workers(n);
    }
    let mut primary = builder.start(serve)?;
    let stop_at = seconds.map(|s| Instant::now() + Duration::from_secs(s));

    let mut num_reqs = 0u64;
    let mut tick = Instant::now() + Duration::from_secs(1);
    loop {
        match primary.next_event_until(tick)? {
            None => break,
            Some(Event::Message { payload, .. }) if payload == NOTIFY => num_reqs += 1,
            Some(Event::Idle) => {}
            Some(event) => eprintln!("{event}"),
        }
        if Instant::now() >= tick {
            println!("numReqs = {num_reqs}");
            tick += Duration::from_secs(1);
        }
        if stop_at.is_some_and(|t| Instant::now() >= t) && !primary.is_stopping() {
            primary.stop(true);
        }
    }
    // Every worker has exited and everything they sent was read: this count is exact.
    println!("numReqs = {num_reqs} (final)");
    Ok(())
}

/// The worker: one connection at a time, one request per connection.
fn serve(mut worker: Worker) -> forkcluster::Result<()> {
    while let Some(next) = worker.next()? {
        match next {
            Next::Connection(conn) => {
                let Some(stream) = conn.into_tcp() else {
                    continue;
                };
                if answer(stream).is_ok() {
                    // Notify the primary about the request.
                    worker.send(NOTIFY)?;
                }
            }
            Next::Message(_) => {}
            Next::Disconnect => break,
        }
    }
    Ok(())
}

/// Reads a request head and answers `hello world`.
fn answer(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [0u8; 4096];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf[len..])? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => len += n,
        }
        if len == buf.len() {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    }
    stream.write_all(RESPONSE)
}
