//! `exec_worker`: the worker program of `exec_primary`, a binary of its own.
//!
//! A forkcluster primary with [`Builder::exec`](forkcluster::Builder::exec) forks and execs it;
//! it takes its worker handle with `Worker::from_env()` and from then on is a worker like any
//! other: it serves HTTP (every request gets `200` and `hello from exec'd worker <id>`, then
//! the connection closes) and answers the primary's messages:
//!
//! | message | answer |
//! |---|---|
//! | `ping` | `pong <id>` |
//! | `exit <code>` | none: the worker exits with `<code>` at once |
//! | `env <NAME>` | `<NAME>=<value>`, or `<NAME> unset` |
//! | `args` | its arguments after `argv[0]`, space-separated |
//! | `cwd` | its working directory |
//! | `udp <i>` | waits (5 s at most) for one datagram on its UDP listener `i`, answers it with `udp <id> <the datagram>` to its sender, and replies `udp ok`, or `udp none` when `i` is not a UDP listener |
//! | anything else | `echo <the message>` |
//!
//! Run by hand, outside a cluster, it says why it cannot start and exits with 2.

use std::io::{Read, Write};

use forkcluster::{Next, Worker};

fn main() {
    let mut worker = match Worker::from_env() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("exec_worker: {e}");
            std::process::exit(2);
        }
    };
    let id = worker.id();
    // The HTTP reply is made once: nothing is allocated per request.
    let mut body = [0u8; 64];
    let body_len = {
        let mut c = std::io::Cursor::new(&mut body[..]);
        let _ = writeln!(c, "hello from exec'd worker {id}");
        c.position() as usize
    };
    let mut resp = [0u8; 160];
    let resp_len = {
        let mut c = std::io::Cursor::new(&mut resp[..]);
        let _ = write!(
            c,
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {body_len}\r\nconnection: close\r\n\r\n"
        );
        let _ = c.write_all(&body[..body_len]);
        c.position() as usize
    };
    let mut reply = [0u8; 128];
    loop {
        let next = match worker.next() {
            Ok(Some(n)) => n,
            Ok(None) => break,
            Err(e) => {
                eprintln!("exec_worker {id}: {e}");
                std::process::exit(1);
            }
        };
        let answer = match next {
            Next::Connection(mut conn) => {
                let mut req = [0u8; 2048];
                let _ = conn.read(&mut req);
                let _ = conn.write_all(&resp[..resp_len]);
                continue;
            }
            Next::Disconnect => break,
            Next::Message(m) => {
                let mut c = std::io::Cursor::new(&mut reply[..]);
                if m.payload == b"ping" {
                    let _ = write!(c, "pong {id}");
                } else if let Some(code) = m.payload.strip_prefix(b"exit ") {
                    let code = std::str::from_utf8(code)
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                        .unwrap_or(1);
                    std::process::exit(code);
                } else if let Some(name) = m.payload.strip_prefix(b"env ") {
                    let name = String::from_utf8_lossy(name).into_owned();
                    match std::env::var(&name) {
                        Ok(v) => {
                            let _ = write!(c, "{name}={v}");
                        }
                        Err(_) => {
                            let _ = write!(c, "{name} unset");
                        }
                    }
                } else if m.payload == b"args" {
                    let args: Vec<String> = std::env::args().skip(1).collect();
                    let _ = write!(c, "{}", args.join(" "));
                } else if let Some(i) = m.payload.strip_prefix(b"udp ") {
                    let i = std::str::from_utf8(i)
                        .ok()
                        .and_then(|s| s.trim().parse::<usize>().ok())
                        .unwrap_or(usize::MAX);
                    match worker.udp_socket(i) {
                        Some(sock) => {
                            let _ = sock.set_read_timeout(Some(std::time::Duration::from_secs(5)));
                            let mut d = [0u8; 64];
                            match sock.recv_from(&mut d[..]) {
                                Ok((n, from)) => {
                                    let mut out = Vec::with_capacity(n + 16);
                                    let _ = write!(out, "udp {id} ");
                                    out.extend_from_slice(&d[..n]);
                                    let _ = sock.send_to(&out, from);
                                    let _ = write!(c, "udp ok");
                                }
                                Err(e) => {
                                    let _ = write!(c, "udp error {e}");
                                }
                            }
                        }
                        None => {
                            let _ = write!(c, "udp none");
                        }
                    }
                } else if m.payload == b"cwd" {
                    let dir = std::env::current_dir().unwrap_or_default();
                    let _ = write!(c, "{}", dir.display());
                } else {
                    let _ = c.write_all(b"echo ");
                    let _ = c.write_all(m.payload);
                }
                c.position() as usize
            }
        };
        if let Err(e) = worker.send(&reply[..answer]) {
            eprintln!("exec_worker {id}: send: {e}");
        }
    }
}
