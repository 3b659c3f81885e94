//! The primary's handling of worker frames, end to end: a real cluster per run (real `fork`,
//! real `SOCK_SEQPACKET` socketpairs, real `SCM_RIGHTS`), whose 1 to 3 workers each play a
//! script decoded from the input: raw datagrams (valid frames or not, with 0..=10 fds), valid
//! frames of every kind, floods, sleeps, `shutdown(SHUT_WR)` and exits, all sent with `sendmsg`
//! straight onto the worker's channel. The fuzz process is the primary; it pumps
//! `next_event_timeout` until every worker is done or gone, stops the cluster, drains it to
//! `None`, and checks each worker's events against an oracle computed from its script alone.
//!
//! # Properties
//!
//! * The primary never panics and `next_event_timeout` never fails.
//! * No fd leaks: the set of open fd numbers (`/proc/self/fd`) is the same before the cluster
//!   starts and after it is dropped (every fd received in an `Event::Message` dropped); the
//!   signal mask is restored; no child is left: no worker zombie (`waitid(P_ALL, WNOHANG |
//!   WNOWAIT)`), and every worker pid is reaped (`waitpid(pid, WNOHANG)` says `ECHILD`).
//!   Other children are libFuzzer's (its symbolizer) and are left alone.
//! * A worker's fds reach the application only in that worker's `Event::Message`, only for a
//!   message that worker sent, as many as it attached, in order: every attached fd is the read
//!   end of a fresh pipe holding an 8-byte tag (run, worker, step, fd index), which the primary
//!   side reads back. Workers exit with code 77 if the primary sends them anything but
//!   `Disconnect` or a `Connection` (no client connects: a connection is one a sibling handed
//!   back, which the primary passes on to a worker, as it should).
//! * Each worker's events are exactly, in order: `Fork`, `Online`, the `Listening` and
//!   `Message` events its frames call for, `WorkerError` (with the expected error) if and only
//!   if it broke the protocol, `Disconnect`, `Exit` with the expected status: a worker that broke
//!   the protocol is SIGKILLed, the others exit as their script says (and
//!   `exited_after_disconnect` is false for a worker that exited by itself, true for one the
//!   stop asked to leave).
//!
//! # Oracle
//!
//! Each worker sends `Online` (from `Worker::new`) and then its script; it never calls
//! `Worker::next`, so the library sends nothing else for it. The primary reads its frames in
//! order and stops at the first *terminal* one. For each datagram, mirroring `Channel::try_recv`
//! and `protocol::judge` (documented in `src/frame.rs`, `src/channel.rs`,
//! `src/primary/protocol.rs`):
//!
//! | datagram | verdict |
//! |---|---|
//! | more than `MAX_FDS` (8) fds | violation, `ControlTruncated` |
//! | more than `MAX_FRAME` (4096) bytes | violation, `Truncated` |
//! | `Frame::decode` fails | violation, `Frame(e)` (an empty datagram: see below) |
//! | header's fd count differs from the fds attached | violation, `FdMismatch` |
//! | `Message` | an `Event::Message` with that payload and those fds |
//! | `Online` | violation (`Worker::new` sent one already: each announcement comes once) |
//! | `Listening(NO_LISTENER)` without listeners | nothing the first time, violation the second |
//! | `Listening(i)`, `i` < listeners | `Event::Listening(i)` the first time, violation the second |
//! | `Listening(i)` otherwise | violation |
//! | `Ack`, `Stats` | nothing |
//! | `Close` | terminal, not a violation: the worker disconnects itself |
//! | `Connection(i)`, `i` < listeners | nothing: a connection handed back (refused), which the primary gives to another worker |
//! | `Connection(i)` otherwise | violation |
//! | `Disconnect` | violation (primary-only kind) |
//!
//! A violation is terminal: `WorkerError`, SIGKILL, channel closed. `shutdown(SHUT_WR)` is
//! terminal (end of file: the worker disconnects itself). An exit is terminal once everything
//! sent before it was read (the primary reads a dead worker's channel to the end). A script
//! that ends without a terminal step sends a last `Message` ("done") and waits for
//! `Disconnect` or end of file, then exits 0.
//!
//! Exit status: a violation gives SIGKILL; if the script exits (code `c`) after the violating
//! datagram, the worker may be gone before the primary reads it, so SIGKILL or `c`. A worker
//! that closed its channel (`Close`, `SHUT_WR`) runs the rest of its script and exits with its
//! exit step's code, or 0 when it sees end of file. Done workers exit 0 on `Disconnect`
//! (graceful stop) or die of SIGTERM (fast stop, chosen by the input; a worker that closed its
//! channel may also be caught by that SIGTERM). With short timeouts, see Ticks below.
//!
//! One rule is timing: a zero-byte datagram with no fds is end of file, not a malformed frame,
//! when the peer is gone or shut down and nothing else is queued (`Channel::at_eof`; `FIONREAD`
//! counts bytes, so zero-byte datagrams behind it do not count). So if such a datagram is
//! followed only by zero-byte datagrams and then by an exit or `SHUT_WR`, whether the primary
//! reads it before or after the worker is gone decides: either a `Short` violation
//! (`WorkerError`, SIGKILL or the exit code) or end of file (no error). The oracle accepts both
//! there and nowhere else.
//!
//! # Input format (hand-rolled, so that `fuzz/gen_seeds.py` can write seeds)
//!
//! Byte 0: bits 0-1 workers (`1 + v % 3`), bits 2-3 TCP listeners on 127.0.0.1:0 (`v % 3`),
//! bit 4 fast stop (`stop(false)`) instead of `disconnect_all` at the end, bit 5 short timeouts
//! (graceful and fast: 30 ms instead of 2.5 s), bit 6 the shared schedule instead of
//! round-robin (the worker then finds its channel among its fds), bit 7 the other schedule of
//! the family (reuseport instead of shared, least-connections instead of round-robin). Then
//! records: a head
//! byte (bits 0-4 the op `% 16`, bits 5-7 the worker `% workers`) and the op's operands (missing
//! bytes read as 0). `len` is two bytes little-endian. See `Op` for the ops.
//!
//! Ticks: the primary's first tick comes when its earliest timer is due (a kill timer: the
//! graceful timeout of a worker that closed its channel, or of a stop; a second after a reap
//! with the channel still open), then every 100 ms while timers are pending. With short
//! timeouts (config bit 5) the kill timers, and the ticks that run them, fall inside the run;
//! one sleep of 110 ms per run (`Sleep` with operand 0xFF) keeps a worker's frames coming across
//! ticks. A worker that closed its channel itself may then die of its kill timer (SIGKILL), and
//! so may a worker slow to act on the stop; the oracle accepts SIGKILL for those in that mode.
#![no_main]

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use forkcluster::channel::{Channel, RecvBuf};
use forkcluster::frame::{
    Frame, Kind, HEADER_LEN, MAGIC, MAX_FDS, MAX_FRAME, MAX_PAYLOAD, NO_LISTENER, VERSION,
};
use forkcluster::{Cluster, Error, Event, Schedule, Worker};
use libfuzzer_sys::fuzz_target;
use rustix::io::Errno;
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

/// At most this many fds are attached to one datagram (more than a frame may carry).
const MAX_ATTACH: usize = 10;
/// Raw datagrams are cut to this size (past `MAX_FRAME`, well under the socket buffer).
const MAX_RAW: usize = 3 * MAX_FRAME;
/// Datagrams per worker, floods included.
const MAX_SENDS: usize = 1024;
/// Sleep per worker, in all.
const MAX_SLEEP_US: u32 = 10_000;
/// Graceful and fast timeouts when the config asks for short ones.
const SHORT_TIMEOUT: Duration = Duration::from_millis(30);
/// The one long sleep of a run (`Sleep` with operand 0xFF): past the primary's 100 ms tick.
const TICK_SLEEP_US: u32 = 110_000;
/// What a worker whose script did not end sends last.
const DONE: &[u8] = b"forkcluster-fuzz: script done";
/// Worker exit codes that are not from a script (scripts exit with 0..64).
const CODE_GOT_WORK: i32 = 77;
const CODE_WAIT_TIMEOUT: i32 = 78;
const CODE_SEND_FAILED: i32 = 79;
const CODE_RECV_FAILED: i32 = 80;
const CODE_NO_SCRIPT: i32 = 81;
const CODE_PIPE_FAILED: i32 = 82;
const CODE_NO_CHANNEL: i32 = 83;
/// How long the primary side waits for each phase; far above a normal run.
const PHASE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// The script.

#[derive(Debug, Clone)]
enum Act {
    /// One datagram, with `fds` tagged pipe read ends attached.
    Send {
        bytes: Vec<u8>,
        fds: usize,
    },
    Sleep(u32),
    Exit(i32),
    ShutWr,
}

#[derive(Debug, Clone)]
struct Plan {
    listeners: usize,
    fast_stop: bool,
    /// Graceful and fast timeouts of [`SHORT_TIMEOUT`] instead of seconds: kill timers (and
    /// the ticks that run them) fire inside the run.
    short: bool,
    /// The shared schedule (workers accept on the listeners themselves) instead of
    /// round-robin.
    shared: bool,
    /// Reuseport instead of shared, least-connections instead of round-robin.
    other: bool,
    workers: Vec<Vec<Act>>,
}

/// The ops of a record (the low 5 bits of its head byte, `% 16`).
#[repr(u8)]
enum Op {
    /// `[fds][len]` bytes: any datagram, `fds % 11` attached.
    Raw = 0,
    /// `[kind][flags][hdr_fds][fds][len]` payload: a header with the right magic, version,
    /// reserved and length, and any kind, flags and fd count; `fds % 11` attached.
    Frame = 1,
    /// `[fds][len]` payload: a valid `Message` (`len % (MAX_PAYLOAD + 1)`, `fds % 9`).
    Message = 2,
    Online = 3,
    /// `[b]`: `Listening(NO_LISTENER)` if `b >= 0x80`, else `Listening(b % 4)`.
    Listening = 4,
    /// `[flags][count: 4]`: `Ack` (`flags & 1` is `ACK_REFUSED`; a count of 0 is invalid).
    Ack = 5,
    /// `[16 bytes]`: `Stats`.
    Stats = 6,
    Close = 7,
    /// `[index: 2]`: a `Connection` frame with one fd (a connection handed back).
    Connection = 8,
    /// Primary-only.
    Disconnect = 9,
    /// `[code]`: the worker exits with `code % 64`.
    Exit = 10,
    /// `[x]`: sleep `(x % 21) * 100` µs (10 ms per worker in all); `x = 0xFF`: 110 ms, once
    /// per run, so that a tick of the primary (every 100 ms while a timer is pending) falls
    /// inside the run.
    Sleep = 11,
    /// `shutdown(SHUT_WR)` on the channel.
    ShutWr = 12,
    /// `[n]`: `n` small valid messages in a row.
    Flood = 13,
    /// `[n][k]`: `n % 33` valid messages with `k % 9` fds each.
    FdFlood = 14,
    /// A zero-byte datagram without fds.
    Empty = 15,
}

struct Reader<'a> {
    data: &'a [u8],
}

impl Reader<'_> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a.to_vec()
    }
    fn padded<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        for b in a.iter_mut() {
            *b = self.byte();
        }
        a
    }
}

/// A frame's bytes with any header fields: the right magic, version, reserved and length.
fn frame_bytes(kind: u8, flags: u8, fds: u8, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_LEN + payload.len());
    b.extend_from_slice(&MAGIC);
    b.push(VERSION);
    b.push(kind);
    b.push(flags);
    b.push(fds);
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(payload);
    b
}

fn decode_plan(data: &[u8]) -> Plan {
    let mut r = Reader { data };
    let cfg = r.byte();
    let n = 1 + (cfg & 3) as usize % 3;
    let listeners = ((cfg >> 2) & 3) as usize % 3;
    let fast_stop = cfg & 0x10 != 0;
    let short = cfg & 0x20 != 0;
    let shared = cfg & 0x40 != 0;
    let other = cfg & 0x80 != 0;
    let mut workers: Vec<Vec<Act>> = vec![Vec::new(); n];
    let mut sends = vec![0usize; n];
    let mut slept = vec![0u32; n];
    let mut ended = vec![false; n];
    let mut long_sleep = false;
    while !r.data.is_empty() {
        let head = r.byte();
        let w = (head >> 5) as usize % n;
        let op = head & 0x1f;
        let seq = workers[w].len() as u32;
        let mut acts: Vec<Act> = Vec::new();
        macro_rules! send {
            ($bytes:expr, $fds:expr $(,)?) => {
                acts.push(Act::Send {
                    bytes: $bytes,
                    fds: $fds,
                })
            };
        }
        match op % 16 {
            x if x == Op::Raw as u8 => {
                let fds = r.byte() as usize % (MAX_ATTACH + 1);
                let len = r.u16() as usize % (MAX_RAW + 1);
                send!(r.bytes(len), fds);
            }
            x if x == Op::Frame as u8 => {
                let (kind, flags, hdr_fds) = (r.byte(), r.byte(), r.byte());
                let fds = r.byte() as usize % (MAX_ATTACH + 1);
                let len = r.u16() as usize % (MAX_FRAME + 1);
                let payload = r.bytes(len);
                send!(frame_bytes(kind, flags, hdr_fds, seq, &payload), fds);
            }
            x if x == Op::Message as u8 => {
                let fds = r.byte() as usize % (MAX_FDS + 1);
                let len = r.u16() as usize % (MAX_PAYLOAD + 1);
                let payload = r.bytes(len);
                send!(
                    frame_bytes(Kind::Message as u8, 0, fds as u8, seq, &payload),
                    fds,
                );
            }
            x if x == Op::Online as u8 => send!(frame_bytes(Kind::Online as u8, 0, 0, seq, &[]), 0),
            x if x == Op::Listening as u8 => {
                let b = r.byte();
                let li = if b >= 0x80 {
                    NO_LISTENER
                } else {
                    (b % 4) as u16
                };
                send!(
                    frame_bytes(Kind::Listening as u8, 0, 0, seq, &li.to_le_bytes()),
                    0,
                );
            }
            x if x == Op::Ack as u8 => {
                let flags = r.byte() & 1;
                let count: [u8; 4] = r.padded();
                send!(frame_bytes(Kind::Ack as u8, flags, 0, seq, &count), 0);
            }
            x if x == Op::Stats as u8 => {
                let p: [u8; 16] = r.padded();
                send!(frame_bytes(Kind::Stats as u8, 0, 0, seq, &p), 0);
            }
            x if x == Op::Close as u8 => send!(frame_bytes(Kind::Close as u8, 0, 0, seq, &[]), 0),
            x if x == Op::Connection as u8 => {
                let idx: [u8; 2] = r.padded();
                send!(frame_bytes(Kind::Connection as u8, 0, 1, seq, &idx), 1);
            }
            x if x == Op::Disconnect as u8 => {
                send!(frame_bytes(Kind::Disconnect as u8, 0, 0, seq, &[]), 0)
            }
            x if x == Op::Exit as u8 => acts.push(Act::Exit((r.byte() % 64) as i32)),
            x if x == Op::Sleep as u8 => {
                let x = r.byte();
                if x == 0xFF && !long_sleep {
                    // One per run: long enough for a tick of the primary to fall inside.
                    long_sleep = true;
                    acts.push(Act::Sleep(TICK_SLEEP_US));
                }
                let us = (x % 21) as u32 * 100;
                if x != 0xFF && slept[w] + us <= MAX_SLEEP_US {
                    slept[w] += us;
                    acts.push(Act::Sleep(us));
                }
            }
            x if x == Op::ShutWr as u8 => acts.push(Act::ShutWr),
            x if x == Op::Flood as u8 => {
                let count = r.byte();
                for i in 0..count {
                    let payload = [b'F', w as u8, i];
                    send!(
                        frame_bytes(Kind::Message as u8, 0, 0, seq + i as u32, &payload),
                        0,
                    );
                }
            }
            x if x == Op::FdFlood as u8 => {
                let count = r.byte() % 33;
                let k = r.byte() as usize % (MAX_FDS + 1);
                for i in 0..count {
                    let payload = [b'D', w as u8, i];
                    send!(
                        frame_bytes(Kind::Message as u8, 0, k as u8, seq + i as u32, &payload),
                        k,
                    );
                }
            }
            x if x == Op::Empty as u8 => send!(Vec::new(), 0),
            _ => unreachable!("op % 16"),
        }
        if ended[w] {
            continue;
        }
        for a in acts {
            if let Act::Send { .. } = a {
                if sends[w] >= MAX_SENDS {
                    continue;
                }
                sends[w] += 1;
            }
            if let Act::Exit(_) = a {
                // Nothing after an exit would run.
                ended[w] = true;
                workers[w].push(a);
                break;
            }
            workers[w].push(a);
        }
    }
    Plan {
        listeners,
        fast_stop,
        short,
        shared,
        other,
        workers,
    }
}

/// The tag in the pipe behind fd `i` of step `step` of worker `w`, in run `run`.
fn tag(run: u8, w: usize, step: usize, i: usize) -> u64 {
    0xFC | (w as u64) << 8 | (step as u64 & 0xffff) << 16 | (i as u64) << 32 | (run as u64) << 40
}

// ---------------------------------------------------------------------------------------------
// The oracle.

/// A per-worker event the oracle expects between `Online` and the end.
#[derive(Debug, Clone, PartialEq)]
enum Exp {
    Listening(usize),
    /// A message: its payload, the step that sent it (its fds carry that step's tags) and the
    /// number of fds.
    Message {
        payload: Vec<u8>,
        step: usize,
        fds: usize,
    },
}

/// What one worker's run must look like.
#[derive(Debug)]
struct Expect {
    events: Vec<Exp>,
    /// The `WorkerError` it must get (`None`: none).
    error: Option<Error>,
    /// The `WorkerError` is optional (the zero-byte datagram race, see the module docs).
    error_optional: bool,
    /// The worker sends the "done" message last: it is still in its script's end when the
    /// primary side stops the cluster.
    done: bool,
    /// Exit statuses allowed: `Ok(code)` or `Err(signal)`.
    statuses: Vec<Result<i32, i32>>,
    /// `Exit`'s `exited_after_disconnect`, where it is not timing: false for a worker that
    /// exited by itself (nobody asked it to leave, it did not close its channel), true for one
    /// that was still in its script's end when the cluster stopped.
    after: Option<bool>,
    /// Why (for the failure report).
    why: String,
}

impl Expect {
    /// How many `Message` events it must get.
    fn messages(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, Exp::Message { .. }))
            .count()
    }
}

enum Verdict {
    Message,
    Listening(usize),
    Nothing,
    Close,
    Violation(Error),
}

const SAID_ONLINE: u32 = 1 << 31;
const SAID_LOOPING: u32 = 1 << 30;

/// What the primary makes of one datagram from a worker that announced `said` (mirrors
/// `Channel::try_recv` and `protocol::judge`).
fn verdict(bytes: &[u8], nfds: usize, listeners: usize, said: &mut u32) -> Verdict {
    if nfds > MAX_FDS {
        return Verdict::Violation(Error::ControlTruncated);
    }
    if bytes.len() > MAX_FRAME {
        return Verdict::Violation(Error::Truncated);
    }
    let frame = match Frame::decode(bytes) {
        Ok(f) => f,
        Err(e) => return Verdict::Violation(Error::Frame(e)),
    };
    if frame.fds() as usize != nfds {
        return Verdict::Violation(Error::FdMismatch {
            header: frame.fds(),
            received: nfds as u8,
        });
    }
    let invalid = |what| Verdict::Violation(Error::Invalid(what));
    match frame.kind() {
        Kind::Message => Verdict::Message,
        Kind::Online => invalid("Online sent twice"),
        Kind::Listening => {
            let li = frame.listener().unwrap_or(NO_LISTENER);
            if li == NO_LISTENER && listeners == 0 {
                if *said & SAID_LOOPING != 0 {
                    return invalid("Listening sent twice");
                }
                *said |= SAID_LOOPING;
                Verdict::Nothing
            } else if li as usize >= listeners {
                invalid("Listening for a listener that does not exist")
            } else if *said & (1 << li) != 0 {
                invalid("Listening sent twice")
            } else {
                *said |= 1 << li;
                Verdict::Listening(li as usize)
            }
        }
        Kind::Ack | Kind::Stats => Verdict::Nothing,
        Kind::Close => Verdict::Close,
        Kind::Connection => match frame.listener() {
            Some(li) if (li as usize) < listeners => Verdict::Nothing,
            _ => invalid("a connection handed back for a listener that does not exist"),
        },
        Kind::Disconnect => invalid("a worker sent a primary-only frame kind"),
    }
}

/// The first exit code among `acts`, if any.
fn later_exit(acts: &[Act]) -> Option<i32> {
    acts.iter().find_map(|a| match a {
        Act::Exit(c) => Some(*c),
        _ => None,
    })
}

/// Whether what follows a zero-byte datagram lets the primary read it as end of file: only
/// zero-byte datagrams (and sleeps) until an exit or `SHUT_WR`.
fn eof_possible(rest: &[Act]) -> bool {
    for a in rest {
        match a {
            Act::Sleep(_) => {}
            Act::Send { bytes, .. } if bytes.is_empty() => {}
            Act::Send { .. } => return false,
            Act::Exit(_) | Act::ShutWr => return true,
        }
    }
    false
}

fn expect(acts: &[Act], listeners: usize, fast_stop: bool, short: bool) -> Expect {
    let mut said = SAID_ONLINE;
    let mut events = Vec::new();
    // Where the worker's own life ends once the primary stopped reading it: its next exit
    // step, or 0 when it sees end of file (or SIGTERM in a fast stop).
    let after = |rest: &[Act], why: &str, events: Vec<Exp>| {
        let mut statuses = vec![Ok(later_exit(rest).unwrap_or(0))];
        if fast_stop {
            statuses.push(Err(libc::SIGTERM));
        }
        if short {
            // Disconnecting itself: killed when the graceful timeout passes.
            statuses.push(Err(libc::SIGKILL));
        }
        Expect {
            events,
            error: None,
            error_optional: false,
            done: false,
            statuses,
            after: None,
            why: why.to_string(),
        }
    };
    for (i, a) in acts.iter().enumerate() {
        let rest = &acts[i + 1..];
        match a {
            Act::Sleep(_) => {}
            Act::Exit(c) => {
                return Expect {
                    events,
                    error: None,
                    error_optional: false,
                    done: false,
                    statuses: vec![Ok(*c)],
                    after: Some(false),
                    why: format!("exits with {c} at step {i}"),
                }
            }
            Act::ShutWr => return after(rest, &format!("SHUT_WR at step {i}"), events),
            Act::Send { bytes, fds } => match verdict(bytes, *fds, listeners, &mut said) {
                Verdict::Message => events.push(Exp::Message {
                    payload: bytes[HEADER_LEN..].to_vec(),
                    step: i,
                    fds: *fds,
                }),
                Verdict::Listening(li) => events.push(Exp::Listening(li)),
                Verdict::Nothing => {}
                Verdict::Close => return after(rest, &format!("Close at step {i}"), events),
                Verdict::Violation(e) => {
                    let racy = bytes.is_empty() && *fds == 0 && eof_possible(rest);
                    let mut statuses = vec![Err(libc::SIGKILL)];
                    if let Some(c) = later_exit(rest) {
                        statuses.push(Ok(c));
                    } else if racy {
                        // Read as end of file after SHUT_WR: the worker lives on, exits 0.
                        statuses.push(Ok(0));
                    }
                    if racy && fast_stop {
                        statuses.push(Err(libc::SIGTERM));
                    }
                    return Expect {
                        events,
                        error: Some(e),
                        error_optional: racy,
                        done: false,
                        statuses,
                        after: None,
                        why: format!(
                            "violation at step {i} ({e:?}){}",
                            if racy { ", or end of file" } else { "" }
                        ),
                    };
                }
            },
        }
    }
    events.push(Exp::Message {
        payload: DONE.to_vec(),
        step: usize::MAX,
        fds: 0,
    });
    Expect {
        events,
        error: None,
        error_optional: false,
        done: true,
        after: Some(true),
        statuses: match (fast_stop, short) {
            (false, false) => vec![Ok(0)],
            (true, false) => vec![Err(libc::SIGTERM)],
            // A worker slow to act on the stop is killed when its timeout passes.
            (false, true) => vec![Ok(0), Err(libc::SIGKILL)],
            (true, true) => vec![Err(libc::SIGTERM), Err(libc::SIGKILL)],
        },
        why: "well-behaved to the end".to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// The worker side (in the forked child). It must not panic: the panic hook aborts, and the
// oracle would report SIGABRT.

fn send_raw(
    chan: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> rustix::io::Result<usize> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_ATTACH))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(Errno::NOBUFS);
    }
    let until = Instant::now() + PHASE;
    loop {
        match rustix::net::sendmsg(
            chan,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Err(Errno::INTR) => continue,
            // Without CAP_SYS_RESOURCE the kernel bounds the fds in flight per user by
            // RLIMIT_NOFILE: an fd flood waits for the primary to read some.
            Err(Errno::TOOMANYREFS) if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(1))
            }
            other => return other,
        }
    }
}

/// A pipe's read end holding the 8-byte `tag` (the write end is closed: reading gives the tag,
/// then end of file).
fn tagged_pipe(tag: u64) -> Option<OwnedFd> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).ok()?;
    match rustix::io::write(&w, &tag.to_le_bytes()) {
        Ok(8) => Some(r),
        _ => None,
    }
}

/// The worker's channel: `Worker::as_fd()` in round-robin; in the shared schedule that is the
/// worker's epoll set, and the channel is the one `SOCK_SEQPACKET` socket the worker holds.
fn channel_of(w: &Worker) -> Option<BorrowedFd<'_>> {
    use rustix::net::{sockopt::socket_type, SocketType};
    let fd = w.as_fd();
    if socket_type(fd).is_ok_and(|t| t == SocketType::SEQPACKET) {
        return Some(fd);
    }
    let mut found = None;
    for raw in 0..1024 {
        // SAFETY: F_GETFD only tests whether `raw` is open; the fd is borrowed only while the
        // worker (which owns its channel) lives.
        if unsafe { libc::fcntl(raw, libc::F_GETFD) } == -1 {
            continue;
        }
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        if socket_type(fd).is_ok_and(|t| t == SocketType::SEQPACKET) {
            if found.is_some() {
                return None;
            }
            found = Some(fd);
        }
    }
    found
}

fn worker_main(w: Worker, plan: &Plan, run: u8) -> i32 {
    let idx = (w.id() as usize).wrapping_sub(1);
    let Some(acts) = plan.workers.get(idx) else {
        return CODE_NO_SCRIPT;
    };
    let Some(chan) = channel_of(&w) else {
        return CODE_NO_CHANNEL;
    };
    for (step, a) in acts.iter().enumerate() {
        match a {
            Act::Send { bytes, fds } => {
                let mut owned: Vec<OwnedFd> = Vec::with_capacity(*fds);
                for i in 0..*fds {
                    match tagged_pipe(tag(run, idx, step, i)) {
                        Some(fd) => owned.push(fd),
                        None => return CODE_PIPE_FAILED,
                    }
                }
                let borrowed: Vec<BorrowedFd<'_>> = owned.iter().map(|f| f.as_fd()).collect();
                match send_raw(chan, bytes, &borrowed) {
                    Ok(n) if n == bytes.len() => {}
                    // The primary closed the channel (a violation, `Close`) or this worker shut
                    // down its writing side: the rest goes nowhere, and the oracle knows it.
                    Err(Errno::PIPE) | Err(Errno::CONNRESET) => {}
                    _ => return CODE_SEND_FAILED,
                }
            }
            Act::Sleep(us) => std::thread::sleep(Duration::from_micros(*us as u64)),
            Act::Exit(c) => return *c,
            Act::ShutWr => {
                let _ = rustix::net::shutdown(chan, rustix::net::Shutdown::Write);
            }
        }
    }
    let done = frame_bytes(Kind::Message as u8, 0, 0, u32::MAX, DONE);
    match send_raw(chan, &done, &[]) {
        Ok(_) | Err(Errno::PIPE) | Err(Errno::CONNRESET) => {}
        Err(_) => return CODE_SEND_FAILED,
    }
    // Wait for `Disconnect` or end of file; anything else from the primary is work this worker
    // never asked for.
    let Ok(dup) = chan.try_clone_to_owned() else {
        return CODE_RECV_FAILED;
    };
    let rx = Channel::from_fd(dup);
    let mut buf = Box::new(RecvBuf::new());
    let until = Instant::now() + 2 * PHASE;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return CODE_WAIT_TIMEOUT;
        }
        let mut pfd = [rustix::event::PollFd::new(
            &rx,
            rustix::event::PollFlags::IN,
        )];
        let ts = rustix::time::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: left.subsec_nanos() as i64,
        };
        match rustix::event::poll(&mut pfd, Some(&ts)) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(_) => return CODE_RECV_FAILED,
        }
        match rx.try_recv(&mut buf) {
            Ok(Some(got)) if got.frame.kind() == Kind::Disconnect => return 0,
            // A connection a sibling handed back (its scripted `Connection` frame): the primary
            // gives it to another worker, maybe this one. Its fd is closed here.
            Ok(Some(got)) if got.frame.kind() == Kind::Connection => {}
            Ok(Some(_)) => return CODE_GOT_WORK,
            Ok(None) => {}
            Err(Error::Closed) => return 0,
            Err(_) => return CODE_RECV_FAILED,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The primary side.

/// What the primary reported about one worker.
#[derive(Debug, PartialEq)]
enum Obs {
    Fork,
    Online,
    Listening(usize),
    /// Payload, and each fd's tag as read back (`Err`: what was wrong with the fd).
    Message(Vec<u8>, Vec<Result<u64, String>>),
    WorkerError(Error),
    Disconnect,
    /// `Ok(code)` or `Err(signal)`, and `exited_after_disconnect`.
    Exit(Result<i32, i32>, bool),
}

fn read_tag(fd: &OwnedFd) -> Result<u64, String> {
    // SAFETY: fstat writes into a zeroed stat buffer for a live fd.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err("fstat failed".into());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return Err(format!("not a pipe (mode {:o})", st.st_mode));
    }
    rustix::io::ioctl_fionbio(fd, true).map_err(|e| format!("FIONBIO: {e}"))?;
    let mut b = [0u8; 16];
    let n = rustix::io::read(fd, &mut b).map_err(|e| format!("read: {e}"))?;
    if n != 8 {
        return Err(format!("{n} bytes in the pipe"));
    }
    match rustix::io::read(fd, &mut b[8..]) {
        Ok(0) => {}
        other => return Err(format!("pipe not at end of file after the tag: {other:?}")),
    }
    Ok(u64::from_le_bytes(b[..8].try_into().unwrap()))
}

fn open_fds() -> Vec<RawFd> {
    let mut v: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

fn describe_fd(fd: RawFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}")).map_or_else(
        |e| format!("{fd}: {e}"),
        |p| format!("{fd} -> {}", p.display()),
    )
}

fn blocked_signals() -> Vec<u8> {
    // SAFETY: sigprocmask with a null new set only reads the mask into `set`.
    let mut set: libc::sigset_t = unsafe { core::mem::zeroed() };
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, core::ptr::null(), &mut set) };
    (1..65)
        .map(|s| unsafe { libc::sigismember(&set, s) } as u8)
        .collect()
}

/// The pid of an exited, unreaped child of this process (a zombie), if there is one.
/// `WNOWAIT` leaves it as it is. (Not "no child at all": libFuzzer's symbolizer, started to
/// print `NEW_FUNC`, is a live child of the fuzz process.)
fn zombie() -> Option<i32> {
    // SAFETY: a zeroed siginfo_t is a valid out-value; WNOWAIT leaves any child as it is.
    let mut info: libc::siginfo_t = unsafe { core::mem::zeroed() };
    let rc = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    let pid = unsafe { info.si_pid() };
    (rc == 0 && pid != 0).then_some(pid)
}

/// Whether `pid` is still a child of this process, alive or not reaped (`waitpid(WNOHANG)`
/// does not say `ECHILD`).
fn still_child(pid: u32) -> bool {
    let mut status = 0;
    // SAFETY: waitpid(WNOHANG) on one pid writes `status` only.
    // A worker pid that is still our child would be reaped here, which is fine: the run failed.
    let rc = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
    !(rc == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD))
}

fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Workers that die of SIGABRT must not write core files.
        let core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit reads a valid rlimit.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &core) };
        let threads = std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count());
        assert!(
            threads == 1,
            "primary_protocol forks: the fuzz process must be single-threaded, but it has \
             {threads} threads (libFuzzer's RSS thread: run with -rss_limit_mb=0, no -jobs)"
        );
    });
}

/// Joins `items`, writing a run of equal ones once with its count.
fn runs(items: impl Iterator<Item = String>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut last: Option<(String, usize)> = None;
    for it in items {
        match &mut last {
            Some((l, n)) if *l == it => *n += 1,
            _ => {
                if let Some((l, n)) = last.take() {
                    out.push(if n > 1 { format!("{l} x{n}") } else { l });
                }
                last = Some((it, 1));
            }
        }
    }
    if let Some((l, n)) = last {
        out.push(if n > 1 { format!("{l} x{n}") } else { l });
    }
    format!("[{}]", out.join(", "))
}

fn show_act(a: &Act) -> String {
    match a {
        Act::Send { bytes, fds } => match Frame::decode(bytes) {
            Ok(f) => format!("{:?}({}b,{fds}fd)", f.kind(), f.payload().len()),
            Err(e) => format!("bad({}b,{fds}fd: {e:?})", bytes.len()),
        },
        Act::Sleep(us) => format!("sleep {us}us"),
        Act::Exit(c) => format!("exit {c}"),
        Act::ShutWr => "SHUT_WR".into(),
    }
}

fn show_tag(t: &Result<u64, String>) -> String {
    match t {
        Ok(t) => format!(
            "run{} w{} s{} i{}",
            t >> 40,
            (t >> 8) & 0xff,
            (t >> 16) & 0xffff,
            (t >> 32) & 0xff
        ),
        Err(e) => format!("bad fd: {e}"),
    }
}

fn show_exp(e: &Exp) -> String {
    match e {
        Exp::Listening(i) => format!("Listening({i})"),
        Exp::Message { payload, step, fds } if *step == usize::MAX => {
            format!("done({}b,{fds}fd)", payload.len())
        }
        Exp::Message { payload, step, fds } => {
            format!("Message(step {step},{}b,{fds}fd)", payload.len())
        }
    }
}

fn show_obs(o: &Obs) -> String {
    match o {
        Obs::Message(p, tags) if p == DONE && tags.is_empty() => "done".into(),
        Obs::Message(p, tags) => format!(
            "Message({}b,{} fds: {})",
            p.len(),
            tags.len(),
            runs(tags.iter().map(show_tag))
        ),
        other => format!("{other:?}"),
    }
}

fn schedule_of(plan: &Plan) -> Schedule {
    match (plan.shared, plan.other) {
        (true, false) => Schedule::Shared,
        (true, true) => Schedule::ReusePort,
        (false, false) => Schedule::RoundRobin,
        (false, true) => Schedule::LeastConnections,
    }
}

fn show_plan(plan: &Plan) -> String {
    let mut s = format!(
        "{}, {} listeners, {} stop, {} timeouts",
        schedule_of(plan).name(),
        plan.listeners,
        if plan.fast_stop { "fast" } else { "graceful" },
        if plan.short { "short" } else { "long" }
    );
    for (w, acts) in plan.workers.iter().enumerate() {
        s += &format!("\n  worker {w}: {}", runs(acts.iter().map(show_act)));
    }
    s
}

fn show_all(exp: &[Expect], obs: &[Vec<Obs>]) -> String {
    let mut s = String::new();
    for (w, (e, o)) in exp.iter().zip(obs).enumerate() {
        s += &format!(
            "\n  worker {w} expected ({}): {} error {:?}{} exit {:?}\n  worker {w} observed: {}",
            e.why,
            runs(e.events.iter().map(show_exp)),
            e.error,
            if e.error_optional { " (optional)" } else { "" },
            e.statuses,
            runs(o.iter().map(show_obs))
        );
    }
    s
}

fn check(run: u8, exp: &[Expect], obs: &[Vec<Obs>], extra: &[String]) -> Result<(), String> {
    if !extra.is_empty() {
        return Err(format!("events for no worker of this run: {extra:?}"));
    }
    for (w, (e, o)) in exp.iter().zip(obs).enumerate() {
        let fail = |what: String| Err(format!("worker {w} (id {}): {what}", w + 1));
        let mut it = o.iter().peekable();
        if it.next() != Some(&Obs::Fork) || it.next() != Some(&Obs::Online) {
            return fail("does not start with Fork, Online".into());
        }
        for (k, x) in e.events.iter().enumerate() {
            let got = it.next();
            let ok = match (x, got) {
                (Exp::Listening(a), Some(Obs::Listening(b))) => a == b,
                (Exp::Message { payload, step, fds }, Some(Obs::Message(p, tags))) => {
                    p == payload
                        && tags.len() == *fds
                        && tags
                            .iter()
                            .enumerate()
                            .all(|(i, t)| t.as_ref().is_ok_and(|&t| t == tag(run, w, *step, i)))
                }
                _ => false,
            };
            if !ok {
                return fail(format!(
                    "event {k}: expected {}, got {}",
                    show_exp(x),
                    got.map_or("nothing".into(), show_obs)
                ));
            }
        }
        match (e.error, it.peek()) {
            (Some(err), Some(Obs::WorkerError(got))) => {
                let same = match (err, got) {
                    // The reason string is the judge's; the kind of error is the rule.
                    (Error::Invalid(_), Error::Invalid(_)) => true,
                    (a, b) => a == *b,
                };
                if !same {
                    return fail(format!("WorkerError {got:?}, expected {err:?}"));
                }
                it.next();
            }
            (Some(_), _) if e.error_optional => {}
            (Some(err), got) => return fail(format!("no WorkerError ({err:?}): got {got:?}")),
            (None, _) => {}
        }
        match it.next() {
            Some(Obs::Disconnect) => {}
            got => return fail(format!("expected Disconnect, got {got:?}")),
        }
        match it.next() {
            Some(Obs::Exit(st, after))
                if e.statuses.contains(st) && e.after.is_none_or(|a| a == *after) => {}
            got => {
                return fail(format!(
                    "expected Exit with one of {:?} (Ok: code, Err: signal), after \
                     disconnect {:?}, got {got:?}",
                    e.statuses, e.after
                ))
            }
        }
        if let Some(more) = it.next() {
            return fail(format!("more after Exit: {more:?}"));
        }
    }
    Ok(())
}

static RUN: AtomicU8 = AtomicU8::new(0);

fn run(data: &[u8]) {
    setup();
    let plan = decode_plan(data);
    let n = plan.workers.len();
    let exp: Vec<Expect> = plan
        .workers
        .iter()
        .map(|acts| expect(acts, plan.listeners, plan.fast_stop, plan.short))
        .collect();
    let run = RUN.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
    let fds_before = open_fds();
    let mask_before = blocked_signals();

    let timeout = if plan.short { SHORT_TIMEOUT } else { PHASE / 2 };
    let mut b = Cluster::builder()
        .workers(n)
        .max_workers(n)
        .respawn(false)
        .handle_signals(false)
        .schedule(schedule_of(&plan))
        .graceful_timeout(timeout)
        .fast_timeout(timeout);
    for _ in 0..plan.listeners {
        b = b.listen("127.0.0.1:0".parse().unwrap());
    }
    let script = plan.clone();
    let mut p = b
        .start(move |w| worker_main(w, &script, run))
        .expect("the cluster starts");

    let mut obs: Vec<Vec<Obs>> = (0..n).map(|_| Vec::new()).collect();
    let mut extra: Vec<String> = Vec::new();
    let mut received = vec![0usize; n];
    let mut pids: Vec<u32> = Vec::new();
    let mut resolved = vec![false; n];
    let mut stopped = false;
    let mut deadline = Instant::now() + PHASE;
    loop {
        if !stopped && resolved.iter().all(|&r| r) {
            if plan.fast_stop {
                p.stop(false);
            } else {
                p.disconnect_all();
            }
            stopped = true;
            deadline = Instant::now() + PHASE;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = match p.next_event_timeout(left) {
            Ok(Some(ev)) => ev,
            Ok(None) => break,
            Err(e) => panic!("next_event_timeout failed: {e:?}"),
        };
        let slot = |id: u32| (id as usize).checked_sub(1).filter(|&i| i < n);
        let (id, o) = match ev {
            Event::Idle => {
                if Instant::now() >= deadline {
                    panic!(
                        "the cluster did not {} within {PHASE:?}\nplan: {}{}",
                        if stopped { "stop" } else { "settle" },
                        show_plan(&plan),
                        show_all(&exp, &obs)
                    );
                }
                continue;
            }
            Event::Stopping { .. } => continue,
            Event::Fork { id, pid } => {
                pids.push(pid);
                (id, Obs::Fork)
            }
            Event::Online { id } => (id, Obs::Online),
            Event::Listening { id, listener, .. } => (id, Obs::Listening(listener)),
            Event::Message { id, payload, fds } => {
                let tags = fds.iter().map(read_tag).collect();
                drop(fds);
                (id, Obs::Message(payload.to_vec(), tags))
            }
            Event::WorkerError { id, error } => (id, Obs::WorkerError(error)),
            Event::Disconnect { id } => (id, Obs::Disconnect),
            Event::Exit {
                id,
                status,
                exited_after_disconnect,
                ..
            } => {
                let st = match (status.code(), status.signal()) {
                    (Some(c), _) => Ok(c),
                    (None, Some(s)) => Err(s),
                    _ => Err(-1),
                };
                (id, Obs::Exit(st, exited_after_disconnect))
            }
            other => {
                extra.push(other.to_string());
                continue;
            }
        };
        let Some(w) = slot(id) else {
            extra.push(format!("worker id {id}: {o:?}"));
            continue;
        };
        match &o {
            Obs::Disconnect => resolved[w] = true,
            Obs::Message(..) => {
                received[w] += 1;
                if exp[w].done && received[w] == exp[w].messages() {
                    resolved[w] = true;
                }
            }
            _ => {}
        }
        obs[w].push(o);
    }
    drop(p);

    if let Err(why) = check(run, &exp, &obs, &extra) {
        panic!("{why}\nplan: {}{}", show_plan(&plan), show_all(&exp, &obs));
    }
    let fds_after = open_fds();
    if fds_after != fds_before {
        let gained: Vec<String> = fds_after
            .iter()
            .filter(|f| !fds_before.contains(f))
            .map(|&f| describe_fd(f))
            .collect();
        let lost: Vec<RawFd> = fds_before
            .iter()
            .copied()
            .filter(|f| !fds_after.contains(f))
            .collect();
        panic!(
            "fd leak: open after the run {gained:?}, closed by it {lost:?}\nplan: {}",
            show_plan(&plan)
        );
    }
    assert_eq!(
        blocked_signals(),
        mask_before,
        "the signal mask was not restored"
    );
    // (A zombie that is not a worker is libFuzzer's: its symbolizer is a child of this process.)
    if let Some(pid) = zombie().filter(|&pid| pids.contains(&(pid as u32))) {
        panic!("worker pid {pid} is left a zombie after the cluster is gone");
    }
    if let Some(pid) = pids.iter().copied().find(|&pid| still_child(pid)) {
        panic!("worker pid {pid} is still a child after the cluster is gone");
    }
}

fuzz_target!(|data: &[u8]| run(data));
