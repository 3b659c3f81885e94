//! The wire format: one fixed, versioned binary frame per datagram.
//!
//! This module is pure: it encodes a frame header into a caller's buffer and decodes a frame from
//! a byte slice. It does no I/O, never allocates and never panics, whatever the input (the fuzz
//! targets `frame_decode` and `frame_roundtrip` hold it to that).
//!
//! # Layout
//!
//! Every frame is a 16-byte header followed by `len` payload bytes. All integers are
//! little-endian. One frame travels in one `SOCK_SEQPACKET` datagram, so the datagram's length
//! is always `16 + len`.
//!
//! | offset | size | field      | meaning | valid values |
//! |-------:|-----:|------------|---------|--------------|
//! | 0      | 2    | `magic`    | identifies the protocol | `0x46 0x43` (`"FC"`) |
//! | 2      | 1    | `version`  | wire format version | [`VERSION`] (1) |
//! | 3      | 1    | `kind`     | what the frame means | a [`Kind`] value, 1..=8 |
//! | 4      | 1    | `flags`    | kind-specific bits | only bits the kind defines ([`Kind::allowed_flags`]); 0 otherwise |
//! | 5      | 1    | `fds`      | file descriptors attached with `SCM_RIGHTS` | as the kind requires ([`Kind::fd_range`]), at most [`MAX_FDS`] |
//! | 6      | 2    | `reserved` | room for later versions | 0 |
//! | 8      | 4    | `seq`      | the sender's frame counter (wraps) | any |
//! | 12     | 4    | `len`      | payload length in bytes | as the kind requires ([`Kind::payload_range`]), at most [`MAX_PAYLOAD`]; equals datagram length − 16 |
//! | 16     | len  | payload    | kind-specific | see [`Kind`] |
//!
//! # Kinds and their payloads
//!
//! | kind | value | direction | payload | fds | flags |
//! |------|------:|-----------|---------|-----|-------|
//! | [`Online`](Kind::Online) | 1 | worker → primary | empty | 0 | 0 |
//! | [`Listening`](Kind::Listening) | 2 | worker → primary | listener index, `u16`; [`NO_LISTENER`] when the cluster has none (the worker reached its loop) | 0 | 0 |
//! | [`Connection`](Kind::Connection) | 3 | primary → worker | listener index, `u16` | 1: the accepted socket | 0 |
//! | [`Ack`](Kind::Ack) | 4 | worker → primary | count of connections, `u32` ≥ 1 (optional, see below) | 0 | bit 0 [`ACK_REFUSED`] |
//! | [`Message`](Kind::Message) | 5 | both | application bytes | 0..=[`MAX_FDS`] | 0 |
//! | [`Disconnect`](Kind::Disconnect) | 6 | primary → worker | empty | 0 | 0 |
//! | [`Stats`](Kind::Stats) | 7 | worker → primary | connections handled `u64`, messages handled `u64` | 0 | 0 |
//! | [`Close`](Kind::Close) | 8 | both | empty | 0 | 0 |
//!
//! # Disconnecting
//!
//! A channel is closed on purpose with [`Close`](Kind::Close), which either side may send and
//! after which it sends nothing more. The two ways it goes, Node's disconnect model:
//!
//! * **The worker disconnects itself** (`Worker::disconnect`): it stops taking new work and
//!   sends `Close`. The primary reports `Event::Disconnect` when it reads it, stops handing
//!   the worker connections and closes its end; whatever the worker sent after the `Close` is
//!   dropped. The worker reads what was already queued for it (connections handed over,
//!   messages) until end of file, finishes what it holds and exits; the primary reports `Exit`
//!   then, as one after a disconnect, and kills a worker still alive after the graceful
//!   timeout. What it leaves unread is read back by the primary once it is gone, and each
//!   connection goes to another worker.
//! * **The primary asks** ([`Disconnect`](Kind::Disconnect): `Primary::disconnect`, a stop, a
//!   rolling restart, scaling down, a recycle): it sends no connection after it. The worker
//!   answers with `Close` as soon as it takes the request (forkcluster's worker does when its
//!   `next` returns `Next::Disconnect`), and from there on it is the first case: the primary
//!   reports `Event::Disconnect` when it reads the answer, while the worker may still be
//!   finishing its connections, and `Exit` when it exits.
//!
//! This is the format of version 1 unchanged: `Close` from a worker was always valid, and
//! nothing else is new. A worker that does not answer (one written against the wire alone
//! before, or one that never reads its channel again) is reported disconnected when it exits,
//! right before its `Exit`; a primary that predates the answer reads it as what it is, the
//! worker closing its channel while it finishes.
//!
//! # Acknowledgements are optional
//!
//! `Ack` is part of the format so that a worker written against the wire alone can report the
//! connections it took, but forkcluster's own worker never sends it and the primary only checks
//! and ignores it. Hand-off safety does not need it: the primary keeps a duplicate of each
//! worker's end of the socketpair, so connection frames a dead worker never read are read back
//! and handed to another worker, and the send buffer bounds what waits in a worker's queue.
//! That saves a `sendmsg`, a `recvmsg` and a primary wakeup per connection compared with Node's
//! acknowledged hand-off.
//!
//! # Why a 4 KiB bound
//!
//! [`MAX_FRAME`] is 4096 bytes: one page. A receive buffer is one page that lives in the
//! primary's or worker's state (never a per-call stack array that needs stack probes), a frame
//! always fits in the default `AF_UNIX` socket buffer many times over, and a hostile peer can make
//! the receiver read at most one page per call. Larger data travels as a file descriptor (a
//! `memfd` or pipe) attached to a [`Message`](Kind::Message).
//!
//! # Example
//!
//! ```
//! use forkcluster::frame::{Frame, Kind, HEADER_LEN};
//!
//! let frame = Frame::new(Kind::Message, 7, b"ping");
//! let mut buf = [0u8; 64];
//! let n = frame.encode(&mut buf).unwrap();
//! assert_eq!(n, HEADER_LEN + 4);
//! let back = Frame::decode(&buf[..n]).unwrap();
//! assert_eq!(back, frame);
//! assert_eq!(back.payload(), b"ping");
//! ```

use core::fmt;

/// The two magic bytes that start every frame: `"FC"`.
pub const MAGIC: [u8; 2] = *b"FC";
/// The wire format version this crate speaks.
pub const VERSION: u8 = 1;
/// Size of the fixed header in bytes.
pub const HEADER_LEN: usize = 16;
/// The largest datagram: header plus payload.
pub const MAX_FRAME: usize = 4096;
/// The largest payload of one frame.
pub const MAX_PAYLOAD: usize = MAX_FRAME - HEADER_LEN;
/// The most file descriptors one frame may carry.
pub const MAX_FDS: usize = 8;
/// The listener index a [`Listening`](Kind::Listening) frame carries when the cluster has no
/// listener: the worker is ready for work (messages).
pub const NO_LISTENER: u16 = u16::MAX;
/// [`Ack`](Kind::Ack) flag: the worker did not take these connections and closed its copies;
/// the primary hands them to another worker.
pub const ACK_REFUSED: u8 = 0x01;

/// What a frame means. See the [module docs](self) for the payload of each kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// The worker is running (sent once, first).
    Online = 1,
    /// The worker takes connections for the listener whose index is the payload.
    Listening = 2,
    /// An accepted connection for the worker; the socket is the one attached fd.
    Connection = 3,
    /// The worker took (or, with [`ACK_REFUSED`], refused) the next `count` connections.
    /// Optional: see the [module docs](self).
    Ack = 4,
    /// Application bytes, with up to [`MAX_FDS`] fds.
    Message = 5,
    /// The primary asks the worker to stop taking work, finish and exit; the worker answers
    /// with [`Close`](Kind::Close) (see [Disconnecting](self#disconnecting)).
    Disconnect = 6,
    /// Counters from the worker.
    Stats = 7,
    /// The sender closes the channel on purpose: from a worker, its own disconnect or its
    /// answer to [`Disconnect`](Kind::Disconnect) (see [Disconnecting](self#disconnecting)).
    Close = 8,
}

impl Kind {
    /// All kinds, in wire order.
    pub const ALL: [Kind; 8] = [
        Kind::Online,
        Kind::Listening,
        Kind::Connection,
        Kind::Ack,
        Kind::Message,
        Kind::Disconnect,
        Kind::Stats,
        Kind::Close,
    ];

    /// The kind with this wire value.
    pub const fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Online,
            2 => Kind::Listening,
            3 => Kind::Connection,
            4 => Kind::Ack,
            5 => Kind::Message,
            6 => Kind::Disconnect,
            7 => Kind::Stats,
            8 => Kind::Close,
            _ => return None,
        })
    }

    /// The smallest and largest payload length this kind allows.
    pub const fn payload_range(self) -> (usize, usize) {
        match self {
            Kind::Online | Kind::Disconnect | Kind::Close => (0, 0),
            Kind::Listening | Kind::Connection => (2, 2),
            Kind::Ack => (4, 4),
            Kind::Stats => (16, 16),
            Kind::Message => (0, MAX_PAYLOAD),
        }
    }

    /// The smallest and largest number of attached fds this kind allows.
    pub const fn fd_range(self) -> (usize, usize) {
        match self {
            Kind::Connection => (1, 1),
            Kind::Message => (0, MAX_FDS),
            _ => (0, 0),
        }
    }

    /// The flag bits this kind defines.
    pub const fn allowed_flags(self) -> u8 {
        match self {
            Kind::Ack => ACK_REFUSED,
            _ => 0,
        }
    }
}

/// Why a byte slice is not a valid frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// Fewer than [`HEADER_LEN`] bytes.
    Short {
        /// Bytes present.
        len: usize,
    },
    /// The first two bytes are not [`MAGIC`].
    Magic([u8; 2]),
    /// A version this crate does not speak.
    Version(u8),
    /// A kind value that is not defined.
    Kind(u8),
    /// Flag bits the kind does not define.
    Flags {
        /// The frame's kind.
        kind: Kind,
        /// The flags byte.
        flags: u8,
    },
    /// The reserved field is not zero.
    Reserved(u16),
    /// The header's payload length disagrees with the bytes that follow it.
    Length {
        /// The length in the header.
        header: u32,
        /// The payload bytes present.
        actual: usize,
    },
    /// A payload length the kind does not allow.
    PayloadLength {
        /// The frame's kind.
        kind: Kind,
        /// The payload length.
        len: usize,
    },
    /// An fd count the kind does not allow.
    FdCount {
        /// The frame's kind.
        kind: Kind,
        /// The count in the header.
        fds: u8,
    },
    /// The kind's payload value is invalid (an `Ack` count of zero).
    Value(Kind),
    /// The output buffer is too small to encode into.
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Short { len } => {
                write!(f, "{len} bytes is shorter than the 16-byte header")
            }
            FrameError::Magic(m) => write!(f, "bad magic {:#04x} {:#04x}", m[0], m[1]),
            FrameError::Version(v) => write!(f, "unsupported version {v}"),
            FrameError::Kind(k) => write!(f, "unknown kind {k}"),
            FrameError::Flags { kind, flags } => {
                write!(f, "flags {flags:#04x} not defined for {kind:?}")
            }
            FrameError::Reserved(r) => write!(f, "reserved field is {r:#06x}, not 0"),
            FrameError::Length { header, actual } => {
                write!(
                    f,
                    "header says {header} payload bytes, datagram has {actual}"
                )
            }
            FrameError::PayloadLength { kind, len } => {
                write!(f, "{kind:?} cannot carry {len} payload bytes")
            }
            FrameError::FdCount { kind, fds } => write!(f, "{kind:?} cannot carry {fds} fds"),
            FrameError::Value(kind) => write!(f, "invalid {kind:?} payload value"),
            FrameError::BufferTooSmall { needed } => {
                write!(f, "output buffer needs {needed} bytes")
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// A frame: a borrowed, validated view of one datagram (or one to be sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    kind: Kind,
    flags: u8,
    fds: u8,
    seq: u32,
    payload: &'a [u8],
}

impl<'a> Frame<'a> {
    /// A frame of `kind` with no flags and the fd count the kind requires at least
    /// (1 for [`Connection`](Kind::Connection), else 0). Use [`with_fds`](Self::with_fds) and
    /// [`with_flags`](Self::with_flags) to change them; [`validate`](Self::validate) checks it.
    pub const fn new(kind: Kind, seq: u32, payload: &'a [u8]) -> Self {
        Frame {
            kind,
            flags: 0,
            fds: kind.fd_range().0 as u8,
            seq,
            payload,
        }
    }

    /// The same frame announcing `n` attached fds.
    pub const fn with_fds(mut self, n: u8) -> Self {
        self.fds = n;
        self
    }

    /// The same frame with `flags`.
    pub const fn with_flags(mut self, flags: u8) -> Self {
        self.flags = flags;
        self
    }

    /// The kind.
    pub const fn kind(&self) -> Kind {
        self.kind
    }
    /// The flags byte.
    pub const fn flags(&self) -> u8 {
        self.flags
    }
    /// The number of fds the header announces.
    pub const fn fds(&self) -> u8 {
        self.fds
    }
    /// The sender's sequence number.
    pub const fn seq(&self) -> u32 {
        self.seq
    }
    /// The payload bytes.
    pub const fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// The listener index of a [`Listening`](Kind::Listening) or [`Connection`](Kind::Connection)
    /// frame.
    pub fn listener(&self) -> Option<u16> {
        match (self.kind, self.payload) {
            (Kind::Listening | Kind::Connection, [a, b]) => Some(u16::from_le_bytes([*a, *b])),
            _ => None,
        }
    }

    /// The count of an [`Ack`](Kind::Ack) frame.
    pub fn ack_count(&self) -> Option<u32> {
        match (self.kind, self.payload) {
            (Kind::Ack, [a, b, c, d]) => Some(u32::from_le_bytes([*a, *b, *c, *d])),
            _ => None,
        }
    }

    /// The two counters of a [`Stats`](Kind::Stats) frame.
    pub fn stats(&self) -> Option<(u64, u64)> {
        if self.kind != Kind::Stats || self.payload.len() != 16 {
            return None;
        }
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        a.copy_from_slice(&self.payload[..8]);
        b.copy_from_slice(&self.payload[8..16]);
        Some((u64::from_le_bytes(a), u64::from_le_bytes(b)))
    }

    /// Checks everything the decoder checks, except the datagram length.
    pub fn validate(&self) -> Result<(), FrameError> {
        let kind = self.kind;
        if self.flags & !kind.allowed_flags() != 0 {
            return Err(FrameError::Flags {
                kind,
                flags: self.flags,
            });
        }
        let (lo, hi) = kind.payload_range();
        let len = self.payload.len();
        if len < lo || len > hi {
            return Err(FrameError::PayloadLength { kind, len });
        }
        let (flo, fhi) = kind.fd_range();
        if (self.fds as usize) < flo || (self.fds as usize) > fhi {
            return Err(FrameError::FdCount {
                kind,
                fds: self.fds,
            });
        }
        if kind == Kind::Ack && self.ack_count() == Some(0) {
            return Err(FrameError::Value(kind));
        }
        Ok(())
    }

    /// The 16 header bytes of this frame, after [`validate`](Self::validate).
    pub fn header(&self) -> Result<[u8; HEADER_LEN], FrameError> {
        self.validate()?;
        let mut h = [0u8; HEADER_LEN];
        h[0..2].copy_from_slice(&MAGIC);
        h[2] = VERSION;
        h[3] = self.kind as u8;
        h[4] = self.flags;
        h[5] = self.fds;
        // h[6..8] reserved = 0
        h[8..12].copy_from_slice(&self.seq.to_le_bytes());
        // validate() bounded the length by MAX_PAYLOAD, so it fits in u32.
        h[12..16].copy_from_slice(&(self.payload.len() as u32).to_le_bytes());
        Ok(h)
    }

    /// Encodes header and payload into `out`; returns the bytes written.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, FrameError> {
        let h = self.header()?;
        let n = HEADER_LEN + self.payload.len();
        let Some(dst) = out.get_mut(..n) else {
            return Err(FrameError::BufferTooSmall { needed: n });
        };
        dst[..HEADER_LEN].copy_from_slice(&h);
        dst[HEADER_LEN..].copy_from_slice(self.payload);
        Ok(n)
    }

    /// Decodes one whole datagram. Rejects, in this order: a short buffer, bad magic, an
    /// unsupported version, an unknown kind, non-zero reserved bits, a payload length that
    /// disagrees with the datagram or exceeds [`MAX_PAYLOAD`], flags, payload length or fd count
    /// the kind does not allow, and an `Ack` count of zero.
    pub fn decode(buf: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        let Some((h, payload)) = buf.split_first_chunk::<HEADER_LEN>() else {
            return Err(FrameError::Short { len: buf.len() });
        };
        if h[0..2] != MAGIC {
            return Err(FrameError::Magic([h[0], h[1]]));
        }
        if h[2] != VERSION {
            return Err(FrameError::Version(h[2]));
        }
        let kind = Kind::from_u8(h[3]).ok_or(FrameError::Kind(h[3]))?;
        let reserved = u16::from_le_bytes([h[6], h[7]]);
        if reserved != 0 {
            return Err(FrameError::Reserved(reserved));
        }
        let len = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        if len as usize != payload.len() || payload.len() > MAX_PAYLOAD {
            return Err(FrameError::Length {
                header: len,
                actual: payload.len(),
            });
        }
        let frame = Frame {
            kind,
            flags: h[4],
            fds: h[5],
            seq: u32::from_le_bytes([h[8], h[9], h[10], h[11]]),
            payload,
        };
        frame.validate()?;
        Ok(frame)
    }
}
