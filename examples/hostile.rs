//! `hostile`: an HTTP server whose cluster has one misbehaving worker, for the figures of issue
//! 9 (`bench/hostile.sh`). Not an example to copy: its attacker is what the primary must
//! withstand.
//!
//! ```text
//! cargo run --release --example hostile -- [--listen ADDR] [--workers N] [--attack KIND]
//!                                           [--for SECS] [--flood-secs SECS] [--flood-after SECS]
//!                                           [--sndbuf-mib N]
//!                                           [--max-workers N] [--hang-timeout SECS] [-v]
//! ```
//!
//! `N` workers (default 2) answer every request with `200` and `Connection: close`. The attack:
//!
//! | `--attack` | what |
//! |---|---|
//! | `none` | no attacker (the baseline) |
//! | `flood` | one extra worker that never takes connections floods `Message` frames |
//! | `flood-online` | the same with raw `Online` frames |
//! | `flood-fds` | the same with 8 fds per message |
//! | `garbage` | every worker sends a malformed frame at start and sleeps (a crash loop) |
//! | `close` | every worker sends `Close` at start and sleeps |
//! | `shutwr` | every worker shuts its channel's writing side at start and sleeps |
//! | `ttin` | one extra worker sends the primary SIGTTIN 30 times, then serves |
//!
//! A flood starts `--flood-after` seconds after the worker started (default 0) and lasts
//! `--flood-secs` (default 10; bounded, since an unfair primary cannot even stop
//! the flooder), with the channel's send buffer forced to `--sndbuf-mib` MiB (`SO_SNDBUFFORCE`,
//! root; 0, the default, keeps the kernel's).
//!
//! With `--for SECS` the primary stops (gracefully) after that long. On exit it prints one line
//! on stdout: `hostile attack=KIND secs=S forks=F exits=E errors=X workers_max=W hung=H`
//! (`errors`: `next_event` calls that failed; the loop goes on after each). Lifecycle events go
//! to stderr with `-v`.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use forkcluster::frame::{Frame, Kind, HEADER_LEN};
use forkcluster::{Cluster, Event, Next, Worker};

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Attack {
    None,
    Flood,
    FloodOnline,
    FloodFds,
    Garbage,
    Close,
    ShutWr,
    Ttin,
}

fn usage(msg: &str) -> ! {
    eprintln!("hostile: {msg}");
    eprintln!(
        "usage: hostile [--listen ADDR] [--workers N] [--attack none|flood|flood-online|flood-fds|garbage|close|shutwr|ttin] [--for SECS] [--flood-secs SECS] [--flood-after SECS] [--sndbuf-mib N] [--max-workers N] [--hang-timeout SECS] [-v]"
    );
    std::process::exit(2)
}

fn main() {
    let mut listen: std::net::SocketAddr = ([127, 0, 0, 1], 8090).into();
    let mut workers = 2usize;
    let mut attack = Attack::None;
    let mut name = "none".to_string();
    let mut secs: Option<f64> = None;
    let mut max_workers = 64usize;
    let mut hang: Option<u64> = None;
    let mut verbose = false;
    let mut flood_secs = 10.0f64;
    let mut sndbuf_mib = 0i32;
    let mut flood_after = 0.0f64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--listen" => listen = val().parse().unwrap_or_else(|_| usage("bad --listen")),
            "--workers" => workers = val().parse().unwrap_or_else(|_| usage("bad --workers")),
            "--for" => secs = Some(val().parse().unwrap_or_else(|_| usage("bad --for"))),
            "--max-workers" => {
                max_workers = val().parse().unwrap_or_else(|_| usage("bad --max-workers"))
            }
            "--hang-timeout" => {
                hang = Some(
                    val()
                        .parse()
                        .unwrap_or_else(|_| usage("bad --hang-timeout")),
                )
            }
            "--attack" => {
                name = val();
                attack = match name.as_str() {
                    "none" => Attack::None,
                    "flood" => Attack::Flood,
                    "flood-online" => Attack::FloodOnline,
                    "flood-fds" => Attack::FloodFds,
                    "garbage" => Attack::Garbage,
                    "close" => Attack::Close,
                    "shutwr" => Attack::ShutWr,
                    "ttin" => Attack::Ttin,
                    _ => usage("unknown --attack"),
                }
            }
            "--flood-secs" => {
                flood_secs = val().parse().unwrap_or_else(|_| usage("bad --flood-secs"))
            }
            "--flood-after" => {
                flood_after = val().parse().unwrap_or_else(|_| usage("bad --flood-after"))
            }
            "--sndbuf-mib" => {
                sndbuf_mib = val().parse().unwrap_or_else(|_| usage("bad --sndbuf-mib"))
            }
            "-v" => verbose = true,
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    // Flood and signal attacks come from one extra worker: the last of the first forks.
    let extra = matches!(
        attack,
        Attack::Flood | Attack::FloodOnline | Attack::FloodFds | Attack::Ttin
    );
    let attacker = if extra { workers as u32 + 1 } else { 0 };
    let mut b = Cluster::builder()
        .listen(listen)
        .workers(workers + usize::from(extra))
        .max_workers(max_workers)
        .graceful_timeout(Duration::from_secs(2));
    if let Some(h) = hang {
        b = b.hang_timeout(Duration::from_secs(h));
    }
    let flood = Flooding {
        after: flood_after,
        secs: flood_secs,
        sndbuf: sndbuf_mib << 20,
    };
    let mut p = match b.start(move |w: Worker| worker(w, attack, attacker, flood)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("hostile: start: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("hostile {} attack={name} on {listen}", std::process::id());
    let t0 = Instant::now();
    let until = secs.map(|s| t0 + Duration::from_secs_f64(s));
    let (mut errors, mut hung, mut workers_max) = (0u64, 0u64, 0usize);
    loop {
        if until.is_some_and(|t| Instant::now() >= t) && !p.is_stopping() {
            p.stop(true);
        }
        let r = match until {
            Some(t) if !p.is_stopping() => p.next_event_until(t),
            _ => p.next_event(),
        };
        match r {
            Ok(Some(Event::Message { .. })) | Ok(Some(Event::Idle)) => {}
            Ok(Some(e)) => {
                if let Event::Hung { .. } = e {
                    hung += 1;
                }
                if verbose {
                    eprintln!("{e}");
                }
            }
            Ok(None) => break,
            Err(e) => {
                errors += 1;
                if verbose && errors < 4 {
                    eprintln!("next_event: {e}");
                }
                // An application that retries, not one that exits: bounded by --for.
                if until.is_none() && errors > 10_000_000 {
                    break;
                }
            }
        }
        workers_max = workers_max.max(p.workers().count());
    }
    let st = p.stats();
    println!(
        "hostile attack={name} secs={:.2} forks={} exits={} errors={errors} workers_max={workers_max} hung={hung}",
        t0.elapsed().as_secs_f64(),
        st.forks,
        st.exits
    );
}

#[derive(Clone, Copy)]
struct Flooding {
    after: f64,
    secs: f64,
    sndbuf: i32,
}

fn worker(mut w: Worker, attack: Attack, attacker: u32, how: Flooding) -> i32 {
    let chan = w.as_fd().as_raw_fd();
    match attack {
        Attack::Garbage => {
            let _ = raw_send(chan, b"XXXXXXXXXXXXXXXXXXXXXXXX", &[]);
            sleep_forever()
        }
        Attack::Close => {
            let _ = raw_send(chan, &frame(Kind::Close, b"", 0), &[]);
            sleep_forever()
        }
        Attack::ShutWr => {
            unsafe { libc::shutdown(chan, libc::SHUT_WR) };
            sleep_forever()
        }
        Attack::Flood | Attack::FloodOnline | Attack::FloodFds if w.id() == attacker => {
            flood(chan, attack, how)
        }
        Attack::Ttin if w.id() == attacker => {
            for _ in 0..30 {
                unsafe { libc::kill(libc::getppid(), libc::SIGTTIN) };
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        _ => {}
    }
    serve(&mut w)
}

fn sleep_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

fn frame(kind: Kind, payload: &[u8], fds: u8) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_LEN + payload.len()];
    let n = Frame::new(kind, 1, payload)
        .with_fds(fds)
        .encode(&mut b)
        .unwrap_or(0);
    b.truncate(n);
    b
}

/// One blocking `sendmsg` with `fds` attached.
fn raw_send(chan: i32, bytes: &[u8], fds: &[i32]) -> std::io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let mut cmsg = [0u64; 16];
    let mut msg: libc::msghdr = unsafe { core::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let len = core::mem::size_of_val(fds) as u32;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(len) } as usize;
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(len) as usize;
            core::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
        }
    }
    loop {
        let n = unsafe { libc::sendmsg(chan, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Floods the channel for `how.secs`, or until the primary closes it (or kills this worker).
fn flood(chan: i32, attack: Attack, how: Flooding) {
    std::thread::sleep(Duration::from_secs_f64(how.after));
    if how.sndbuf > 0 {
        // The kernel doubles it.
        let size = how.sndbuf / 2;
        unsafe {
            libc::setsockopt(
                chan,
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                (&size as *const i32).cast(),
                4,
            )
        };
    }
    let end = Instant::now() + Duration::from_secs_f64(how.secs);
    let pipes: Vec<OwnedFd> = (0..if attack == Attack::FloodFds { 8 } else { 0 })
        .filter_map(|_| rustix::pipe::pipe().ok().map(|p| p.0))
        .collect();
    let fds: Vec<i32> = pipes.iter().map(|p| p.as_raw_fd()).collect();
    let bytes = match attack {
        Attack::FloodOnline => frame(Kind::Online, b"", 0),
        _ => frame(Kind::Message, b"flood", fds.len() as u8),
    };
    let mut n = 0u32;
    while raw_send(chan, &bytes, &fds).is_ok() {
        n = n.wrapping_add(1);
        if n % 1024 == 0 && Instant::now() >= end {
            break;
        }
    }
}

/// One request per connection, answered at once.
fn serve(w: &mut Worker) -> i32 {
    let mut buf = [0u8; 2048];
    loop {
        match w.next() {
            Ok(Some(Next::Connection(mut c))) => {
                let mut len = 0;
                while len < buf.len() {
                    match c.read(&mut buf[len..]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => len += n,
                    }
                    if buf[..len].windows(4).any(|x| x == b"\r\n\r\n") {
                        let _ = c.write_all(RESPONSE);
                        break;
                    }
                }
            }
            Ok(Some(Next::Message(_))) => {}
            Ok(Some(Next::Disconnect)) | Ok(None) => return 0,
            Err(_) => return 1,
        }
    }
}
