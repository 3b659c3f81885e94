//! The wire, end to end: `frame` checked against a naive reference decoder and at every boundary,
//! `channel` across a real fork with real fds, under hostile datagrams sent raw, and its
//! nonblocking and `EINTR` behaviour.
//!
//! Runs under the fork-per-test runner of `tests/util` (`harness = false`): every test is its own
//! process, so fd counts (`/proc/self/fd`) and signal handlers belong to that test alone.
//!
//! Random inputs come from a xorshift generator seeded with a fixed value, or with `WIRE_SEED`
//! from the environment; a failing test prints the seed it used.

mod util;

use std::io::{IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::time::Duration;

use forkcluster::channel::{Channel, RecvBuf};
use forkcluster::frame::{
    Frame, FrameError, Kind, ACK_REFUSED, HEADER_LEN, MAGIC, MAX_FDS, MAX_FRAME, MAX_PAYLOAD,
    VERSION,
};
use forkcluster::Error;
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

fn main() {
    util::run(tests![
        decode_matches_reference,
        roundtrip_every_kind_and_boundary,
        roundtrip_over_channel_at_boundaries,
        prop_roundtrip_random_frames,
        prop_decoded_frames_reencode_identically,
        fds_across_fork,
        hostile_empty_datagram_is_not_eof,
        hostile_truncations,
        hostile_header_bit_flips,
        hostile_oversized_datagrams,
        hostile_length_fields,
        hostile_fd_count_mismatches,
        hostile_too_many_fds,
        hostile_random_datagrams,
        fuzz_regressions,
        peer_closes_mid_stream,
        peer_closes_while_receiver_blocks,
        try_recv_on_empty_channel_is_none,
        try_send_on_full_channel_would_block,
        recv_survives_eintr,
        send_survives_eintr,
    ])
}

// ---------------------------------------------------------------------------------------------
// Randomness: a tiny xorshift64*, no crate.

struct Rng(u64);

impl Rng {
    /// A generator seeded from `WIRE_SEED` if set, else from `default`; prints the seed.
    fn from_env(default: u64) -> Rng {
        let seed = std::env::var("WIRE_SEED")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(default);
        println!("    (WIRE_SEED={seed})");
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.byte();
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.fill(&mut v);
        v
    }
}

// ---------------------------------------------------------------------------------------------
// The naive reference: the documented layout, written out again byte by byte, independent of
// `forkcluster::frame` (it only borrows its error type to say what it expects).

/// The documented kind table: (value, payload min, payload max, fds min, fds max, flag bits).
const TABLE: [(u8, usize, usize, u8, u8, u8); 8] = [
    (1, 0, 0, 0, 0, 0),    // Online
    (2, 2, 2, 0, 0, 0),    // Listening
    (3, 2, 2, 1, 1, 0),    // Connection
    (4, 4, 4, 0, 0, 1),    // Ack
    (5, 0, 4080, 0, 8, 0), // Message
    (6, 0, 0, 0, 0, 0),    // Disconnect
    (7, 16, 16, 0, 0, 0),  // Stats
    (8, 0, 0, 0, 0, 0),    // Close
];

/// The crate's `Kind` for a documented value (to build the error the reference expects).
fn ref_kind(v: u8) -> Kind {
    match v {
        1 => Kind::Online,
        2 => Kind::Listening,
        3 => Kind::Connection,
        4 => Kind::Ack,
        5 => Kind::Message,
        6 => Kind::Disconnect,
        7 => Kind::Stats,
        8 => Kind::Close,
        _ => unreachable!("not a kind: {v}"),
    }
}

/// What the reference decoder accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RefFrame {
    kind: u8,
    flags: u8,
    fds: u8,
    seq: u32,
    len: usize,
}

fn le32(b: &[u8]) -> u32 {
    b[0] as u32 | (b[1] as u32) << 8 | (b[2] as u32) << 16 | (b[3] as u32) << 24
}

/// The documented decoder, check by check in the documented order.
fn ref_decode(b: &[u8]) -> Result<RefFrame, FrameError> {
    if b.len() < 16 {
        return Err(FrameError::Short { len: b.len() });
    }
    if b[0] != b'F' || b[1] != b'C' {
        return Err(FrameError::Magic([b[0], b[1]]));
    }
    if b[2] != 1 {
        return Err(FrameError::Version(b[2]));
    }
    let k = b[3];
    if k == 0 || k > 8 {
        return Err(FrameError::Kind(k));
    }
    if b[6] != 0 || b[7] != 0 {
        return Err(FrameError::Reserved(b[6] as u16 | (b[7] as u16) << 8));
    }
    let header = le32(&b[12..16]);
    let actual = b.len() - 16;
    if header as u64 != actual as u64 || actual > 4080 {
        return Err(FrameError::Length { header, actual });
    }
    let (_, pmin, pmax, fmin, fmax, flag_bits) = TABLE[k as usize - 1];
    let kind = ref_kind(k);
    let flags = b[4];
    if flags & !flag_bits != 0 {
        return Err(FrameError::Flags { kind, flags });
    }
    if actual < pmin || actual > pmax {
        return Err(FrameError::PayloadLength { kind, len: actual });
    }
    let fds = b[5];
    if fds < fmin || fds > fmax {
        return Err(FrameError::FdCount { kind, fds });
    }
    if k == 4 && b[16] == 0 && b[17] == 0 && b[18] == 0 && b[19] == 0 {
        return Err(FrameError::Value(kind));
    }
    Ok(RefFrame {
        kind: k,
        flags,
        fds,
        seq: le32(&b[8..12]),
        len: actual,
    })
}

/// The documented encoder.
fn ref_encode(kind: u8, flags: u8, fds: u8, seq: u32, payload: &[u8]) -> Vec<u8> {
    let n = payload.len() as u32;
    let mut v = vec![
        b'F',
        b'C',
        1,
        kind,
        flags,
        fds,
        0,
        0,
        seq as u8,
        (seq >> 8) as u8,
        (seq >> 16) as u8,
        (seq >> 24) as u8,
        n as u8,
        (n >> 8) as u8,
        (n >> 16) as u8,
        (n >> 24) as u8,
    ];
    v.extend_from_slice(payload);
    v
}

fn hex(b: &[u8]) -> String {
    let mut s = String::new();
    for x in b.iter().take(40) {
        s.push_str(&format!("{x:02x}"));
    }
    if b.len() > 40 {
        s.push_str("..");
    }
    format!("[{} bytes: {s}]", b.len())
}

/// Which outcomes a run of checks has seen, so a test can insist that it reached them all.
#[derive(Default)]
struct Outcomes {
    counts: std::collections::BTreeMap<&'static str, usize>,
}

impl Outcomes {
    fn name(r: &Result<RefFrame, FrameError>) -> &'static str {
        match r {
            Ok(_) => "ok",
            Err(FrameError::Short { .. }) => "short",
            Err(FrameError::Magic(_)) => "magic",
            Err(FrameError::Version(_)) => "version",
            Err(FrameError::Kind(_)) => "kind",
            Err(FrameError::Reserved(_)) => "reserved",
            Err(FrameError::Length { .. }) => "length",
            Err(FrameError::Flags { .. }) => "flags",
            Err(FrameError::PayloadLength { .. }) => "payload-length",
            Err(FrameError::FdCount { .. }) => "fd-count",
            Err(FrameError::Value(_)) => "value",
            Err(_) => "other",
        }
    }

    /// Decodes `b` with the crate and the reference and insists they agree.
    fn check(&mut self, b: &[u8]) {
        let got = Frame::decode(b);
        let want = ref_decode(b);
        match (&got, &want) {
            (Ok(f), Ok(r)) => {
                assert_eq!(
                    (
                        f.kind() as u8,
                        f.flags(),
                        f.fds(),
                        f.seq(),
                        f.payload().len()
                    ),
                    (r.kind, r.flags, r.fds, r.seq, r.len),
                    "fields differ for {}",
                    hex(b)
                );
                assert_eq!(
                    f.payload().as_ptr(),
                    b[16..].as_ptr(),
                    "payload is not the bytes after the header"
                );
            }
            (Err(e), Err(w)) => assert_eq!(e, w, "different rejection for {}", hex(b)),
            _ => panic!(
                "decode gave {got:?}, the reference {want:?}, for {}",
                hex(b)
            ),
        }
        *self.counts.entry(Self::name(&want)).or_default() += 1;
    }

    fn assert_saw(&self, names: &[&str]) {
        for n in names {
            assert!(
                self.counts.get(n).copied().unwrap_or(0) > 0,
                "never reached outcome {n}: {:?}",
                self.counts
            );
        }
        println!("    outcomes: {:?}", self.counts);
    }
}

const ALL_OUTCOMES: [&str; 11] = [
    "ok",
    "short",
    "magic",
    "version",
    "kind",
    "reserved",
    "length",
    "flags",
    "payload-length",
    "fd-count",
    "value",
];

/// A payload for `kind` of length `len` whose value is valid (an `Ack` count is never zero).
fn payload_for(kind: u8, len: usize, rng: &mut Rng) -> Vec<u8> {
    let mut p = rng.bytes(len);
    if kind == 4 && len >= 1 {
        p[0] |= 1;
    }
    p
}

/// Valid frames of every kind: every flag value and fd count allowed, payloads at and between
/// the bounds, built by the reference encoder.
fn valid_frames(rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for &(k, pmin, pmax, fmin, fmax, flag_bits) in &TABLE {
        let lens: Vec<usize> = if k == 5 {
            vec![0, 1, 2, 3, 15, 16, 17, 100, 255, 256, 1000, 4079, 4080]
        } else {
            vec![pmin, pmax]
        };
        let flag_values: Vec<u8> = if flag_bits == 0 { vec![0] } else { vec![0, 1] };
        for &len in &lens {
            for fds in fmin..=fmax {
                for &flags in &flag_values {
                    let seq = match rng.below(4) {
                        0 => 0,
                        1 => u32::MAX,
                        _ => rng.next() as u32,
                    };
                    let p = payload_for(k, len, rng);
                    out.push(ref_encode(k, flags, fds, seq, &p));
                }
            }
        }
    }
    // Special values: an Ack count of 1 and of u32::MAX, listener indexes 0 and 0xffff.
    out.push(ref_encode(4, 0, 0, 1, &1u32.to_le_bytes()));
    out.push(ref_encode(4, 1, 0, 2, &u32::MAX.to_le_bytes()));
    out.push(ref_encode(2, 0, 0, 3, &[0, 0]));
    out.push(ref_encode(3, 0, 1, 4, &[0xff, 0xff]));
    out.push(ref_encode(7, 0, 0, 5, &[0; 16]));
    out
}

// ---------------------------------------------------------------------------------------------
// 1. Decode against the reference.

fn decode_matches_reference() {
    let mut rng = Rng::from_env(1);
    let mut seen = Outcomes::default();
    let valid = valid_frames(&mut rng);
    assert!(valid.len() > 100, "only {} valid frames", valid.len());
    for f in &valid {
        assert!(ref_decode(f).is_ok(), "reference rejects {}", hex(f));
        seen.check(f);
    }
    // Every value of every header byte, on every valid frame.
    for f in &valid {
        let mut m = f.clone();
        for i in 0..HEADER_LEN {
            let orig = m[i];
            for v in 0..=255u8 {
                m[i] = v;
                seen.check(&m);
            }
            m[i] = orig;
        }
        // The Ack count bytes too (a zero count is the only payload value the wire rejects).
        if f[3] == 4 {
            for i in 16..20 {
                let orig = m[i];
                for v in 0..=255u8 {
                    m[i] = v;
                    seen.check(&m);
                }
                m[i] = orig;
            }
        }
    }
    // Every truncation, and a few bytes more (with and without the length fixed up).
    for f in &valid {
        for n in 0..f.len() {
            seen.check(&f[..n]);
        }
        for extra in 1..=3 {
            let mut m = f.clone();
            m.extend(rng.bytes(extra));
            seen.check(&m);
            let n = (m.len() - 16) as u32;
            m[12..16].copy_from_slice(&n.to_le_bytes());
            seen.check(&m);
        }
    }
    // Random mutations of valid frames.
    for _ in 0..100_000 {
        let mut m = valid[rng.below(valid.len())].clone();
        for _ in 0..1 + rng.below(4) {
            match rng.below(7) {
                0 => {
                    let i = rng.below(m.len().max(1));
                    if let Some(b) = m.get_mut(i) {
                        *b ^= 1 << rng.below(8);
                    }
                }
                1 => {
                    let i = rng.below(HEADER_LEN.min(m.len()).max(1));
                    if let Some(b) = m.get_mut(i) {
                        *b = rng.byte();
                    }
                }
                2 => {
                    let v: u32 = match rng.below(5) {
                        0 => 0,
                        1 => u32::MAX,
                        2 => 4080 + rng.below(3) as u32,
                        3 => (m.len().saturating_sub(16) as u32).wrapping_add(1),
                        _ => rng.next() as u32,
                    };
                    if m.len() >= 16 {
                        m[12..16].copy_from_slice(&v.to_le_bytes());
                    }
                }
                3 => {
                    let n = rng.below(m.len() + 1);
                    m.truncate(n);
                }
                4 => {
                    let extra = rng.below(40);
                    m.extend(rng.bytes(extra));
                }
                5 => {
                    if m.len() >= 16 {
                        let n = (m.len() - 16) as u32;
                        m[12..16].copy_from_slice(&n.to_le_bytes());
                    }
                }
                _ => {
                    if m.len() >= 6 {
                        m[5] = rng.below(12) as u8;
                    }
                }
            }
        }
        seen.check(&m);
    }
    // Random byte strings: raw, and with a plausible header so checks past the magic are hit.
    for _ in 0..100_000 {
        let len = if rng.chance(2) {
            rng.below(41)
        } else {
            rng.below(4200)
        };
        let mut m = rng.bytes(len);
        if m.len() >= 16 && !rng.chance(4) {
            m[0..2].copy_from_slice(b"FC");
            if !rng.chance(8) {
                m[2] = 1;
            }
            if !rng.chance(4) {
                m[3] = 1 + rng.below(8) as u8;
            }
            if !rng.chance(4) {
                m[6] = 0;
                m[7] = 0;
            }
            if !rng.chance(4) {
                let n = (m.len() - 16) as u32;
                m[12..16].copy_from_slice(&n.to_le_bytes());
            }
            if rng.chance(2) {
                m[4] = rng.below(2) as u8;
            }
            if rng.chance(2) {
                m[5] = rng.below(3) as u8;
            }
        }
        seen.check(&m);
    }
    seen.assert_saw(&ALL_OUTCOMES);
}

// ---------------------------------------------------------------------------------------------
// 2. Round trips at every boundary.

/// Encodes `f`, checks the bytes against the reference encoder, decodes them back.
fn roundtrip_ok(f: &Frame<'_>) {
    let mut buf = vec![0u8; MAX_FRAME + 32];
    let n = f
        .encode(&mut buf)
        .unwrap_or_else(|e| panic!("encode {f:?}: {e}"));
    assert_eq!(n, HEADER_LEN + f.payload().len());
    let want = ref_encode(f.kind() as u8, f.flags(), f.fds(), f.seq(), f.payload());
    assert_eq!(&buf[..n], &want[..], "encoding of {f:?}");
    assert_eq!(&f.header().unwrap()[..], &want[..HEADER_LEN]);
    assert_eq!(f.validate(), Ok(()));
    let back = Frame::decode(&buf[..n]).unwrap_or_else(|e| panic!("decode {f:?}: {e}"));
    assert_eq!(back, *f);
    assert_eq!(back.payload(), f.payload());
}

/// Checks that `f` is rejected with `err` by validate, header and encode, and that its
/// hand-built bytes are rejected by decode with `decode_err`.
fn roundtrip_rejected(f: &Frame<'_>, err: FrameError, decode_err: FrameError) {
    let mut buf = vec![0u8; MAX_FRAME + 32];
    assert_eq!(f.validate(), Err(err), "validate {f:?}");
    assert_eq!(f.header(), Err(err), "header {f:?}");
    assert_eq!(f.encode(&mut buf), Err(err), "encode {f:?}");
    let bytes = ref_encode(f.kind() as u8, f.flags(), f.fds(), f.seq(), f.payload());
    assert_eq!(
        Frame::decode(&bytes),
        Err(decode_err),
        "decode {}",
        hex(&bytes)
    );
}

fn roundtrip_every_kind_and_boundary() {
    // The documented constants.
    assert_eq!(MAGIC, *b"FC");
    assert_eq!(VERSION, 1);
    assert_eq!(HEADER_LEN, 16);
    assert_eq!(MAX_FRAME, 4096);
    assert_eq!(MAX_PAYLOAD, 4080);
    assert_eq!(MAX_FDS, 8);
    assert_eq!(ACK_REFUSED, 1);
    // Kind values and the table.
    for v in 0..=255u8 {
        match Kind::from_u8(v) {
            Some(k) => {
                assert!((1..=8).contains(&v));
                assert_eq!(k as u8, v);
            }
            None => assert!(!(1..=8).contains(&v), "kind {v} missing"),
        }
    }
    for (i, k) in Kind::ALL.iter().enumerate() {
        assert_eq!(*k as u8, i as u8 + 1);
        let (v, pmin, pmax, fmin, fmax, flag_bits) = TABLE[i];
        assert_eq!(*k as u8, v);
        assert_eq!(k.payload_range(), (pmin, pmax), "{k:?}");
        assert_eq!(k.fd_range(), (fmin as usize, fmax as usize), "{k:?}");
        assert_eq!(k.allowed_flags(), flag_bits, "{k:?}");
    }

    let mut rng = Rng::from_env(2);
    let mut accepted = 0;
    let mut rejected = 0;
    for &(v, pmin, pmax, fmin, fmax, flag_bits) in &TABLE {
        let kind = ref_kind(v);
        // Payload lengths: 0, 1, just inside and just outside each bound, the maxima.
        let mut lens = vec![0, 1, pmin, pmin + 1, pmax, pmax + 1, MAX_PAYLOAD - 1];
        lens.extend([MAX_PAYLOAD, MAX_PAYLOAD + 1, MAX_PAYLOAD + 2]);
        lens.extend(pmin.checked_sub(1));
        lens.extend(pmax.checked_sub(1));
        lens.sort();
        lens.dedup();
        for len in lens {
            let payload = payload_for(v, len, &mut rng);
            let f = Frame::new(kind, rng.next() as u32, &payload);
            assert_eq!(f.fds(), fmin, "Frame::new takes the kind's least fd count");
            assert_eq!(f.flags(), 0);
            if (pmin..=pmax).contains(&len) {
                roundtrip_ok(&f);
                accepted += 1;
            } else {
                let err = FrameError::PayloadLength { kind, len };
                let derr = if len > MAX_PAYLOAD {
                    FrameError::Length {
                        header: len as u32,
                        actual: len,
                    }
                } else {
                    err
                };
                roundtrip_rejected(&f, err, derr);
                rejected += 1;
            }
        }
        let payload = payload_for(v, pmin, &mut rng);
        // Every flags byte.
        for flags in 0..=255u8 {
            let f = Frame::new(kind, 7, &payload).with_flags(flags);
            if flags & !flag_bits == 0 {
                roundtrip_ok(&f);
                accepted += 1;
            } else {
                let err = FrameError::Flags { kind, flags };
                roundtrip_rejected(&f, err, err);
                rejected += 1;
            }
        }
        // Every fd count.
        for fds in 0..=255u8 {
            let f = Frame::new(kind, 8, &payload).with_fds(fds);
            if (fmin..=fmax).contains(&fds) {
                roundtrip_ok(&f);
                accepted += 1;
            } else {
                let err = FrameError::FdCount { kind, fds };
                roundtrip_rejected(&f, err, err);
                rejected += 1;
            }
        }
        // Sequence numbers at the edges of u32.
        for seq in [0, 1, 0x7fff_ffff, 0x8000_0000, u32::MAX - 1, u32::MAX] {
            roundtrip_ok(&Frame::new(kind, seq, &payload));
        }
        // The output buffer: one byte short fails, exact fits, and nothing past the frame is
        // written.
        let f = Frame::new(kind, 9, &payload);
        let n = HEADER_LEN + payload.len();
        let mut small = vec![0u8; n - 1];
        assert_eq!(
            f.encode(&mut small),
            Err(FrameError::BufferTooSmall { needed: n })
        );
        let mut exact = vec![0u8; n];
        assert_eq!(f.encode(&mut exact), Ok(n));
        let mut big = vec![0xAAu8; n + 64];
        assert_eq!(f.encode(&mut big), Ok(n));
        assert!(big[n..].iter().all(|&b| b == 0xAA), "wrote past the frame");
        assert_eq!(&big[..n], &exact[..]);
    }
    assert!(accepted > 30 && rejected > 1000, "{accepted} {rejected}");

    // Kind-specific payload values.
    for count in [1u32, 2, 0x100, u32::MAX] {
        for flags in [0, ACK_REFUSED] {
            let p = count.to_le_bytes();
            let f = Frame::new(Kind::Ack, 1, &p).with_flags(flags);
            roundtrip_ok(&f);
            assert_eq!(f.ack_count(), Some(count));
            assert_eq!(f.listener(), None);
        }
    }
    let zero = 0u32.to_le_bytes();
    let f = Frame::new(Kind::Ack, 1, &zero);
    roundtrip_rejected(
        &f,
        FrameError::Value(Kind::Ack),
        FrameError::Value(Kind::Ack),
    );
    for idx in [0u16, 1, 0x1234, u16::MAX] {
        let p = idx.to_le_bytes();
        for kind in [Kind::Listening, Kind::Connection] {
            let f = Frame::new(kind, 2, &p);
            roundtrip_ok(&f);
            assert_eq!(f.listener(), Some(idx));
            assert_eq!(f.ack_count(), None);
            assert_eq!(f.stats(), None);
        }
    }
    for (a, b) in [(0u64, 0u64), (1, u64::MAX), (u64::MAX, 42)] {
        let mut p = [0u8; 16];
        p[..8].copy_from_slice(&a.to_le_bytes());
        p[8..].copy_from_slice(&b.to_le_bytes());
        let f = Frame::new(Kind::Stats, 3, &p);
        roundtrip_ok(&f);
        assert_eq!(f.stats(), Some((a, b)));
    }
    assert_eq!(Frame::new(Kind::Message, 0, b"").stats(), None);
    assert_eq!(Frame::new(Kind::Message, 0, b"ab").listener(), None);
}

fn dev_null() -> OwnedFd {
    std::fs::File::open("/dev/null").unwrap().into()
}

/// What `/proc/self/fd/N` links to: the open file an fd refers to (`pipe:[1234]`, ...).
fn fd_target(fd: BorrowedFd<'_>) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn roundtrip_over_channel_at_boundaries() {
    let mut rng = Rng::from_env(3);
    let (a, b) = Channel::pair().unwrap();
    let (_pr, pw) = rustix::pipe::pipe().unwrap();
    let originals: Vec<OwnedFd> = (0..MAX_FDS).map(|_| pw.try_clone().unwrap()).collect();
    let target = fd_target(pw.as_fd());
    let mut buf = RecvBuf::new();
    let before = util::fd_count();
    let mut frames = 0;
    for &(v, pmin, pmax, fmin, fmax, flag_bits) in &TABLE {
        let kind = ref_kind(v);
        let mut lens = vec![pmin, pmax, pmin + 1, pmax.saturating_sub(1)];
        lens.retain(|l| (pmin..=pmax).contains(l));
        lens.dedup();
        for &len in &lens {
            for fds in fmin..=fmax {
                for flags in 0..=flag_bits {
                    let payload = payload_for(v, len, &mut rng);
                    let seq = rng.next() as u32;
                    let f = Frame::new(kind, seq, &payload)
                        .with_fds(fds)
                        .with_flags(flags);
                    let send: Vec<BorrowedFd<'_>> = originals[..fds as usize]
                        .iter()
                        .map(|f| f.as_fd())
                        .collect();
                    a.send(&f, &send).unwrap();
                    let got = b.recv(&mut buf).unwrap();
                    assert_eq!(got.frame, f);
                    assert_eq!(got.frame.payload(), &payload[..]);
                    assert_eq!(got.fds.len(), fds as usize);
                    for fd in &got.fds {
                        assert_eq!(fd_target(fd.as_fd()), target, "not the pipe that was sent");
                        assert!(util::is_cloexec(fd), "received fd without FD_CLOEXEC");
                        assert!(originals.iter().all(|o| o.as_raw_fd() != fd.as_raw_fd()));
                    }
                    frames += 1;
                }
            }
        }
        // Just past the bounds: send refuses, and nothing reaches the peer.
        let fds_ok: Vec<BorrowedFd<'_>> = originals[..fmin as usize]
            .iter()
            .map(|f| f.as_fd())
            .collect();
        let long = vec![1u8; pmax + 1];
        assert_eq!(
            a.send(&Frame::new(kind, 1, &long), &fds_ok),
            Err(Error::Frame(FrameError::PayloadLength {
                kind,
                len: pmax + 1
            }))
        );
        if pmin > 0 {
            let short = vec![1u8; pmin - 1];
            assert_eq!(
                a.send(&Frame::new(kind, 1, &short), &fds_ok),
                Err(Error::Frame(FrameError::PayloadLength {
                    kind,
                    len: pmin - 1
                }))
            );
        }
        let payload = payload_for(v, pmin, &mut rng);
        let too_many = fmax as usize + 1;
        let fds_many: Vec<BorrowedFd<'_>> = std::iter::repeat(pw.as_fd()).take(too_many).collect();
        assert_eq!(
            a.send(
                &Frame::new(kind, 1, &payload).with_fds(too_many as u8),
                &fds_many
            ),
            Err(Error::Frame(FrameError::FdCount {
                kind,
                fds: too_many as u8
            }))
        );
        if fmin > 0 {
            assert_eq!(
                a.send(&Frame::new(kind, 1, &payload).with_fds(fmin - 1), &[]),
                Err(Error::Frame(FrameError::FdCount {
                    kind,
                    fds: fmin - 1
                }))
            );
        }
        // fds that differ from the header's count.
        let one_more: Vec<BorrowedFd<'_>> = std::iter::repeat(pw.as_fd())
            .take(fmin as usize + 1)
            .collect();
        assert!(matches!(
            a.send(&Frame::new(kind, 1, &payload), &one_more),
            Err(Error::Invalid(_))
        ));
        assert!(
            b.try_recv(&mut buf).unwrap().is_none(),
            "a refused frame was sent"
        );
    }
    assert!(frames > 20, "{frames}");
    assert_eq!(util::fd_count(), before, "fds leaked");
}

// ---------------------------------------------------------------------------------------------
// Property tests: random frames round-trip; whatever decodes re-encodes to the same bytes.

/// A random frame's parts, biased towards the interesting edges.
fn random_parts(rng: &mut Rng) -> (Kind, u8, u8, u32, Vec<u8>) {
    let kind = Kind::ALL[rng.below(8)];
    let (pmin, pmax) = kind.payload_range();
    let (fmin, fmax) = kind.fd_range();
    let flags = match rng.below(4) {
        0 => rng.byte(),
        1 => kind.allowed_flags(),
        _ => 0,
    };
    let fds = match rng.below(4) {
        0 => rng.byte(),
        1 => rng.below(MAX_FDS + 3) as u8,
        _ => (fmin + rng.below(fmax - fmin + 1)) as u8,
    };
    let seq = rng.next() as u32;
    let len = match rng.below(6) {
        0 => rng.below(MAX_PAYLOAD + 3),
        1 => [0, 1, 2, 4, 16, MAX_PAYLOAD, MAX_PAYLOAD + 1][rng.below(7)],
        _ => pmin + rng.below((pmax - pmin).min(300) + 1),
    };
    let mut payload = rng.bytes(len);
    if kind == Kind::Ack && len == 4 && rng.chance(4) {
        payload.fill(0);
    }
    (kind, flags, fds, seq, payload)
}

/// The reference's verdict on a frame's parts (`None`: valid).
fn ref_validate(kind: Kind, flags: u8, fds: u8, payload: &[u8]) -> Option<FrameError> {
    let (_, pmin, pmax, fmin, fmax, flag_bits) = TABLE[kind as usize - 1];
    if flags & !flag_bits != 0 {
        Some(FrameError::Flags { kind, flags })
    } else if payload.len() < pmin || payload.len() > pmax {
        Some(FrameError::PayloadLength {
            kind,
            len: payload.len(),
        })
    } else if fds < fmin || fds > fmax {
        Some(FrameError::FdCount { kind, fds })
    } else if kind == Kind::Ack && payload == [0, 0, 0, 0] {
        Some(FrameError::Value(kind))
    } else {
        None
    }
}

fn prop_roundtrip_random_frames() {
    let mut rng = Rng::from_env(4);
    let mut buf = vec![0u8; MAX_FRAME];
    let (mut valid, mut invalid) = (0, 0);
    for _ in 0..100_000 {
        let (kind, flags, fds, seq, payload) = random_parts(&mut rng);
        let f = Frame::new(kind, seq, &payload)
            .with_flags(flags)
            .with_fds(fds);
        let want = ref_validate(kind, flags, fds, &payload);
        assert_eq!(f.validate().err(), want, "{f:?}");
        match want {
            None => {
                let n = f.encode(&mut buf).unwrap();
                assert_eq!(
                    &buf[..n],
                    &ref_encode(kind as u8, flags, fds, seq, &payload)[..]
                );
                let back = Frame::decode(&buf[..n]).unwrap();
                assert_eq!(back, f);
                let mut again = vec![0u8; n];
                assert_eq!(back.encode(&mut again), Ok(n));
                assert_eq!(again, &buf[..n]);
                valid += 1;
            }
            Some(e) => {
                assert_eq!(f.encode(&mut buf), Err(e));
                assert_eq!(f.header(), Err(e));
                let bytes = ref_encode(kind as u8, flags, fds, seq, &payload);
                let derr = if payload.len() > MAX_PAYLOAD {
                    FrameError::Length {
                        header: payload.len() as u32,
                        actual: payload.len(),
                    }
                } else {
                    e
                };
                assert_eq!(Frame::decode(&bytes), Err(derr));
                invalid += 1;
            }
        }
    }
    println!("    {valid} valid, {invalid} invalid");
    assert!(valid > 10_000 && invalid > 10_000, "{valid} {invalid}");
}

fn prop_decoded_frames_reencode_identically() {
    let mut rng = Rng::from_env(5);
    let valid = valid_frames(&mut rng);
    let mut out = vec![0u8; MAX_FRAME];
    let mut decoded = 0;
    for _ in 0..200_000 {
        let mut m = valid[rng.below(valid.len())].clone();
        // One random change in the header or the first payload bytes.
        let i = rng.below(m.len().min(HEADER_LEN + 4));
        m[i] ^= 1 << rng.below(8);
        if let Ok(f) = Frame::decode(&m) {
            let n = f.encode(&mut out).unwrap();
            assert_eq!(&out[..n], &m[..], "re-encoding differs");
            decoded += 1;
        }
    }
    assert!(decoded > 10_000, "{decoded}");
}

// ---------------------------------------------------------------------------------------------
// 3. Real fds across a real fork.

/// Exits with 0 when `pid` did.
fn join(child: util::KillOnDrop) {
    let st = util::wait_child(child.0, Duration::from_secs(15));
    std::mem::forget(child);
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "child failed: wait status {st:#x}"
    );
}

fn fds_across_fork() {
    const ROUNDS: u32 = 10_000;
    let (ours, theirs) = Channel::pair().unwrap();
    // Without CLOEXEC on the sender's side: the receiver's flag must come from the receive.
    let (pr, pw) = rustix::pipe::pipe().unwrap();
    let (qr, qw) = rustix::pipe::pipe().unwrap();
    let efd = rustix::event::eventfd(0, rustix::event::EventfdFlags::empty()).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    assert!(!util::is_cloexec(&pw) && !util::is_cloexec(&efd));

    let child = util::KillOnDrop(util::fork_child(|| {
        let (cr, cw) = rustix::pipe::pipe().unwrap();
        let mut cw = std::fs::File::from(cw);
        let mut buf = RecvBuf::new();
        let before = util::fd_count();
        for i in 0..ROUNDS {
            let got = theirs.recv(&mut buf).unwrap();
            assert_eq!(got.frame.seq(), i);
            for fd in &got.fds {
                assert!(util::is_cloexec(fd), "round {i}: fd without FD_CLOEXEC");
            }
            let mut fds = got.fds.into_iter();
            let mut take = || fds.next().expect("fd missing");
            match (i % 4, got.frame.kind()) {
                (0, Kind::Message) => {
                    std::fs::File::from(take()).write_all(&[i as u8]).unwrap();
                }
                (1, Kind::Message) => {
                    let mut e = std::fs::File::from(take());
                    let mut v = [0u8; 8];
                    e.read_exact(&mut v).unwrap();
                    assert_eq!(u64::from_ne_bytes(v), i as u64 + 1);
                    e.write_all(&(i as u64 + 2).to_ne_bytes()).unwrap();
                }
                (2, Kind::Connection) => {
                    assert_eq!(got.frame.listener(), Some(i as u16));
                    let mut s = std::net::TcpStream::from(take());
                    let mut v = [0u8; 4];
                    s.read_exact(&mut v).unwrap();
                    assert_eq!(u32::from_le_bytes(v), i);
                    s.write_all(&(i ^ 0xffff).to_le_bytes()).unwrap();
                }
                (3, Kind::Message) => {
                    assert_eq!(got.frame.fds(), 4);
                    std::fs::File::from(take()).write_all(&[i as u8]).unwrap();
                    let mut e = std::fs::File::from(take());
                    let mut v = [0u8; 8];
                    e.read_exact(&mut v).unwrap();
                    assert_eq!(u64::from_ne_bytes(v), i as u64 + 1);
                    e.write_all(&(i as u64 + 2).to_ne_bytes()).unwrap();
                    let mut s = std::net::TcpStream::from(take());
                    let mut w = [0u8; 4];
                    s.read_exact(&mut w).unwrap();
                    assert_eq!(u32::from_le_bytes(w), i);
                    s.write_all(&(i ^ 0xffff).to_le_bytes()).unwrap();
                    let mut q = std::fs::File::from(take());
                    let mut b = [0u8; 1];
                    q.read_exact(&mut b).unwrap();
                    assert_eq!(b[0], !(i as u8));
                }
                other => panic!("round {i}: unexpected {other:?}"),
            }
            drop(fds);
            // Reply with our pipe's read end, a byte waiting in it.
            cw.write_all(&[i as u8 ^ 0x5a]).unwrap();
            let reply = Frame::new(Kind::Message, i, b"ok").with_fds(1);
            theirs.send(&reply, &[cr.as_fd()]).unwrap();
        }
        let last = theirs.recv(&mut buf).unwrap();
        assert_eq!(last.frame.kind(), Kind::Close);
        drop(last);
        assert_eq!(util::fd_count(), before, "child: fd count changed");
        0
    }));
    drop(theirs);

    let mut pr = std::fs::File::from(pr);
    let mut qw = std::fs::File::from(qw);
    let mut e = std::fs::File::from(efd.try_clone().unwrap());
    let mut server = server;
    let mut buf = RecvBuf::new();
    let before = util::fd_count();
    for i in 0..ROUNDS {
        let payload = i.to_le_bytes();
        match i % 4 {
            0 => ours
                .send(
                    &Frame::new(Kind::Message, i, &payload).with_fds(1),
                    &[pw.as_fd()],
                )
                .unwrap(),
            1 => {
                e.write_all(&(i as u64 + 1).to_ne_bytes()).unwrap();
                ours.send(
                    &Frame::new(Kind::Message, i, &payload).with_fds(1),
                    &[efd.as_fd()],
                )
                .unwrap();
            }
            2 => {
                server.write_all(&i.to_le_bytes()).unwrap();
                let idx = (i as u16).to_le_bytes();
                ours.send(&Frame::new(Kind::Connection, i, &idx), &[client.as_fd()])
                    .unwrap();
            }
            _ => {
                e.write_all(&(i as u64 + 1).to_ne_bytes()).unwrap();
                server.write_all(&i.to_le_bytes()).unwrap();
                qw.write_all(&[!(i as u8)]).unwrap();
                ours.send(
                    &Frame::new(Kind::Message, i, &payload).with_fds(4),
                    &[pw.as_fd(), efd.as_fd(), client.as_fd(), qr.as_fd()],
                )
                .unwrap();
            }
        }
        let reply = ours.recv(&mut buf).unwrap();
        assert_eq!((reply.frame.seq(), reply.frame.payload()), (i, &b"ok"[..]));
        assert_eq!(reply.fds.len(), 1);
        let fd = reply.fds.into_iter().next().unwrap();
        assert!(util::is_cloexec(&fd), "round {i}: fd without FD_CLOEXEC");
        let mut b = [0u8; 1];
        std::fs::File::from(fd).read_exact(&mut b).unwrap();
        assert_eq!(b[0], i as u8 ^ 0x5a);
        // What the child wrote through the fds we sent.
        match i % 4 {
            0 => {
                pr.read_exact(&mut b).unwrap();
                assert_eq!(b[0], i as u8);
            }
            1 => {
                let mut v = [0u8; 8];
                e.read_exact(&mut v).unwrap();
                assert_eq!(u64::from_ne_bytes(v), i as u64 + 2);
            }
            2 => {
                let mut v = [0u8; 4];
                server.read_exact(&mut v).unwrap();
                assert_eq!(u32::from_le_bytes(v), i ^ 0xffff);
            }
            _ => {
                pr.read_exact(&mut b).unwrap();
                assert_eq!(b[0], i as u8);
                let mut v = [0u8; 8];
                e.read_exact(&mut v).unwrap();
                assert_eq!(u64::from_ne_bytes(v), i as u64 + 2);
                let mut w = [0u8; 4];
                server.read_exact(&mut w).unwrap();
                assert_eq!(u32::from_le_bytes(w), i ^ 0xffff);
            }
        }
    }
    ours.send(&Frame::new(Kind::Close, ROUNDS, b""), &[])
        .unwrap();
    assert_eq!(util::fd_count(), before, "parent: fd count changed");
    join(child);
}

// ---------------------------------------------------------------------------------------------
// 4. Hostile datagrams, sent raw.

/// Sends `bytes` as one datagram with `fds` attached, bypassing `Channel::send`.
fn send_raw(sock: &impl AsFd, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(64))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    let n = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .expect("raw sendmsg");
    assert_eq!(n, bytes.len());
}

/// What the channel must make of a datagram of `bytes` with `nfds` fds, by the documented rules.
fn expected(bytes: &[u8], nfds: usize) -> Result<RefFrame, Error> {
    if nfds > 8 {
        return Err(Error::ControlTruncated);
    }
    if bytes.len() > 4096 {
        return Err(Error::Truncated);
    }
    let f = ref_decode(bytes).map_err(Error::Frame)?;
    if f.fds as usize != nfds {
        return Err(Error::FdMismatch {
            header: f.fds,
            received: nfds as u8,
        });
    }
    Ok(f)
}

/// A channel with a raw sender, fds to attach, and the receiving process's fd count.
struct Hostile {
    tx: Channel,
    rx: Channel,
    buf: RecvBuf,
    spare: Vec<OwnedFd>,
    cases: usize,
    errors: std::collections::BTreeMap<String, usize>,
    /// Under qemu-user: the cases with more than `MAX_FDS` fds, whose fd count is not checked.
    qemu: Option<usize>,
}

impl Hostile {
    fn new() -> Hostile {
        let (tx, rx) = Channel::pair().unwrap();
        let (r, w) = rustix::pipe::pipe().unwrap();
        let mut spare = vec![r, w];
        spare.extend((0..62).map(|_| dev_null()));
        Hostile {
            tx,
            rx,
            buf: RecvBuf::new(),
            spare,
            cases: 0,
            errors: Default::default(),
            qemu: util::under_qemu().then_some(0),
        }
    }

    /// Sends the datagram, receives it, and checks the result against `want`, the fd count,
    /// and that the channel still carries a good frame afterwards.
    fn case(&mut self, bytes: &[u8], nfds: usize, want: Result<RefFrame, Error>) {
        let before = util::fd_count();
        let fds: Vec<BorrowedFd<'_>> = self.spare[..nfds].iter().map(|f| f.as_fd()).collect();
        send_raw(&self.tx, bytes, &fds);
        let what = || format!("{} with {nfds} fds", hex(bytes));
        match (self.rx.try_recv(&mut self.buf), want) {
            (Ok(Some(got)), Ok(w)) => {
                let f = got.frame;
                assert_eq!(
                    (f.kind() as u8, f.flags(), f.fds(), f.seq(), f.payload()),
                    (w.kind, w.flags, w.fds, w.seq, &bytes[16..]),
                    "{}",
                    what()
                );
                assert_eq!(got.fds.len(), nfds, "{}", what());
                for fd in &got.fds {
                    assert!(util::is_cloexec(fd));
                }
                *self.errors.entry("ok".into()).or_default() += 1;
            }
            (Err(e), Err(w)) => {
                assert_eq!(e, w, "{}", what());
                let name = format!("{e:?}");
                let name = name.split(['(', ' ', '{']).next().unwrap().to_string();
                *self.errors.entry(name).or_default() += 1;
            }
            (got, want) => panic!(
                "{}: got {:?}, want {want:?}",
                what(),
                got.map(|r| r.map(|r| r.frame))
            ),
        }
        match &mut self.qemu {
            // qemu-user hands the kernel a control buffer twice the size of the guest's and
            // leaves open the fds that do not fit back into the guest's: its leak, not the
            // channel's, and only with more fds than the buffer holds. Real kernels check it.
            Some(unchecked) if nfds > MAX_FDS => *unchecked += 1,
            _ => assert_eq!(util::fd_count(), before, "{}: fd leaked", what()),
        }
        self.still_works();
        self.cases += 1;
    }

    /// Like `case`, with the expectation from the documented rules.
    fn case_ref(&mut self, bytes: &[u8], nfds: usize) {
        self.case(bytes, nfds, expected(bytes, nfds));
    }

    /// A good frame with an fd goes through, and nothing else is queued.
    fn still_works(&mut self) {
        let before = util::fd_count();
        let seq = 0xC0FF_EE00 + self.cases as u32;
        let f = Frame::new(Kind::Message, seq, b"still here").with_fds(1);
        self.tx.send(&f, &[self.spare[1].as_fd()]).unwrap();
        {
            let got = self
                .rx
                .try_recv(&mut self.buf)
                .unwrap()
                .expect("good frame lost");
            assert_eq!(got.frame, f);
            assert_eq!(got.fds.len(), 1);
        }
        assert!(self.rx.try_recv(&mut self.buf).unwrap().is_none());
        assert_eq!(util::fd_count(), before);
    }

    fn report(&self, min_cases: usize) {
        println!("    {} cases: {:?}", self.cases, self.errors);
        if let Some(n) = self.qemu.filter(|&n| n > 0) {
            println!(
                "    under qemu-user: fd leaks not checked in the {n} cases with more than \
                 {MAX_FDS} fds (qemu leaves open the fds beyond the guest's control buffer)"
            );
        }
        assert!(self.cases >= min_cases, "{} cases", self.cases);
    }
}

/// One valid datagram per kind (with the fds its header announces), plus Messages with fds.
fn sample_frames(rng: &mut Rng) -> Vec<(Vec<u8>, usize)> {
    let mut v = Vec::new();
    for &(k, pmin, pmax, fmin, _, _) in &TABLE {
        let len = pmin.max(pmax.min(40));
        let p = payload_for(k, len, rng);
        v.push((ref_encode(k, 0, fmin, rng.next() as u32, &p), fmin as usize));
    }
    let p = rng.bytes(100);
    v.push((ref_encode(5, 0, 3, 77, &p), 3));
    v.push((ref_encode(5, 0, 8, 78, &p[..5]), 8));
    v.push((ref_encode(4, 1, 0, 79, &[1, 0, 0, 0]), 0));
    v
}

fn hostile_empty_datagram_is_not_eof() {
    // A zero-length datagram from a live peer is a malformed frame, not end of file.
    let mut h = Hostile::new();
    h.case(b"", 0, Err(Error::Frame(FrameError::Short { len: 0 })));
    h.case(b"", 1, Err(Error::Frame(FrameError::Short { len: 0 })));
    h.case(b"", 0, Err(Error::Frame(FrameError::Short { len: 0 })));
    h.report(3);

    // Empty datagrams around a frame, then the peer closes: the frame is still read, then
    // Closed. (A trailing empty datagram from a peer that is gone cannot be told from end of
    // file, and needs not be.)
    let (tx, rx) = Channel::pair().unwrap();
    send_raw(&tx, b"", &[]);
    tx.send(&Frame::new(Kind::Online, 1, b""), &[]).unwrap();
    send_raw(&tx, b"", &[]);
    drop(tx);
    let mut buf = RecvBuf::new();
    assert_eq!(
        rx.try_recv(&mut buf).unwrap_err(),
        Error::Frame(FrameError::Short { len: 0 })
    );
    assert_eq!(
        rx.try_recv(&mut buf).unwrap().unwrap().frame.kind(),
        Kind::Online
    );
    assert_eq!(rx.try_recv(&mut buf).unwrap_err(), Error::Closed);
    assert_eq!(rx.recv(&mut buf).unwrap_err(), Error::Closed);

    // A peer that only shuts down its writing side is gone too.
    let (tx, rx) = Channel::pair().unwrap();
    send_raw(&tx, b"", &[]);
    rustix::net::shutdown(&tx, rustix::net::Shutdown::Write).unwrap();
    assert_eq!(rx.recv(&mut buf).unwrap_err(), Error::Closed);
    assert_eq!(rx.recv(&mut buf).unwrap_err(), Error::Closed);
    drop(tx);
}

fn hostile_truncations() {
    let mut rng = Rng::from_env(6);
    let mut h = Hostile::new();
    for (frame, nfds) in sample_frames(&mut rng) {
        for n in 0..frame.len() {
            let cut = &frame[..n];
            let want = if n < HEADER_LEN {
                FrameError::Short { len: n }
            } else {
                FrameError::Length {
                    header: (frame.len() - HEADER_LEN) as u32,
                    actual: n - HEADER_LEN,
                }
            };
            assert_eq!(expected(cut, nfds), Err(Error::Frame(want)));
            h.case(cut, nfds, Err(Error::Frame(want)));
        }
        // The whole frame is fine.
        h.case_ref(&frame, nfds);
    }
    h.report(300);
}

fn hostile_header_bit_flips() {
    let mut rng = Rng::from_env(7);
    let mut h = Hostile::new();
    for (frame, nfds) in sample_frames(&mut rng) {
        let mut m = frame.clone();
        for bit in 0..HEADER_LEN * 8 {
            m[bit / 8] ^= 1 << (bit % 8);
            h.case_ref(&m, nfds);
            m[bit / 8] ^= 1 << (bit % 8);
        }
    }
    h.report(11 * 128);
    for name in ["ok", "Frame", "FdMismatch"] {
        assert!(h.errors.contains_key(name), "never saw {name}");
    }
}

fn hostile_oversized_datagrams() {
    let mut rng = Rng::from_env(8);
    let mut h = Hostile::new();
    // Exactly one page is a valid frame.
    let p = rng.bytes(MAX_PAYLOAD);
    let full = ref_encode(5, 0, 0, 1, &p);
    assert_eq!(full.len(), MAX_FRAME);
    h.case_ref(&full, 0);
    for size in [MAX_FRAME + 1, MAX_FRAME + 2, MAX_FRAME + 100, 8192, 65536] {
        let p = rng.bytes(size - HEADER_LEN);
        // A header that claims exactly what was sent, and fds to go with it.
        for nfds in [0, 1, 8] {
            let d = ref_encode(5, 0, nfds as u8, 2, &p);
            h.case(&d, nfds, Err(Error::Truncated));
        }
        // Garbage of that size.
        h.case(&rng.bytes(size), 0, Err(Error::Truncated));
    }
    h.report(16);
}

fn hostile_length_fields() {
    let mut rng = Rng::from_env(9);
    let mut h = Hostile::new();
    for (frame, nfds) in sample_frames(&mut rng) {
        let actual = frame.len() - HEADER_LEN;
        for header in [
            actual as u32 + 1,
            actual as u32 + 100,
            4080,
            4081,
            4096,
            0x8000_0000,
            u32::MAX,
            (actual as u32).wrapping_sub(1),
            0,
        ] {
            if header as usize == actual {
                continue;
            }
            let mut m = frame.clone();
            m[12..16].copy_from_slice(&header.to_le_bytes());
            h.case(
                &m,
                nfds,
                Err(Error::Frame(FrameError::Length { header, actual })),
            );
        }
    }
    h.report(80);
}

fn hostile_fd_count_mismatches() {
    let mut h = Hostile::new();
    let idx = [1, 0];
    // Connection: the header says 1.
    let conn = ref_encode(3, 0, 1, 5, &idx);
    for (n, ok) in [(0, false), (1, true), (2, false), (8, false)] {
        let want = if ok {
            expected(&conn, n)
        } else {
            Err(Error::FdMismatch {
                header: 1,
                received: n as u8,
            })
        };
        assert!(want.is_ok() == ok);
        h.case(&conn, n, want);
    }
    // Message: every header count against every count that arrives.
    for header in 0..=8u8 {
        let m = ref_encode(5, 0, header, 6, b"fds");
        for n in 0..=8usize {
            let want = if n == header as usize {
                expected(&m, n)
            } else {
                Err(Error::FdMismatch {
                    header,
                    received: n as u8,
                })
            };
            h.case(&m, n, want);
        }
    }
    // fds attached to kinds that carry none (their header says 0).
    for &(k, pmin, _, fmin, fmax, _) in &TABLE {
        if fmax != 0 {
            continue;
        }
        assert_eq!(fmin, 0);
        let p = payload_for(k, pmin, &mut Rng(k as u64));
        let d = ref_encode(k, 0, 0, 7, &p);
        for n in [1, 2, 8] {
            h.case(
                &d,
                n,
                Err(Error::FdMismatch {
                    header: 0,
                    received: n as u8,
                }),
            );
        }
        // And a header that claims fds for such a kind: malformed, whatever arrives.
        let d = ref_encode(k, 0, 1, 7, &p);
        for n in [0, 1] {
            h.case(
                &d,
                n,
                Err(Error::Frame(FrameError::FdCount {
                    kind: ref_kind(k),
                    fds: 1,
                })),
            );
        }
    }
    h.report(4 + 81 + 6 * 5);
}

fn hostile_too_many_fds() {
    let mut rng = Rng::from_env(10);
    let mut h = Hostile::new();
    for n in [9, 10, 16, 32, 64] {
        // A valid header for 8 fds, a header for 0, garbage, and an oversized datagram: the
        // control message is checked first.
        let p = rng.bytes(10);
        for d in [
            ref_encode(5, 0, 8, 1, &p),
            ref_encode(5, 0, 0, 1, &p),
            rng.bytes(20),
            Vec::new(),
            rng.bytes(MAX_FRAME + 1),
        ] {
            h.case(&d, n, Err(Error::ControlTruncated));
        }
    }
    // Exactly MAX_FDS is fine.
    h.case_ref(&ref_encode(5, 0, 8, 2, b""), 8);
    h.report(26);
}

fn hostile_random_datagrams() {
    let mut rng = Rng::from_env(11);
    let mut h = Hostile::new();
    let samples = sample_frames(&mut rng);
    for _ in 0..3_000 {
        let nfds = rng.below(11);
        let d = match rng.below(3) {
            0 => {
                let n = rng.below(64);
                rng.bytes(n)
            }
            1 => {
                let n = rng.below(MAX_FRAME + 64);
                let mut d = rng.bytes(n);
                if d.len() >= 16 {
                    d[..3].copy_from_slice(b"FC\x01");
                    d[3] = 1 + rng.below(8) as u8;
                    d[5] = rng.below(10) as u8;
                    d[6] = 0;
                    d[7] = 0;
                    let len = (d.len() - 16) as u32;
                    d[12..16].copy_from_slice(&len.to_le_bytes());
                }
                d
            }
            _ => {
                let (mut d, _) = samples[rng.below(samples.len())].clone();
                let i = rng.below(d.len());
                d[i] = rng.byte();
                d
            }
        };
        h.case_ref(&d, nfds);
    }
    h.report(3_000);
}

/// Inputs that once made a fuzz target fail (see `fuzz/README.md`), as byte literals.
const FRAME_DECODE_REGRESSIONS: &[&[u8]] = &[];
const CHANNEL_RECV_REGRESSIONS: &[&[u8]] = &[
    // `channel_recv`: an empty datagram (no fds) from a live peer came back as `Error::Closed`.
    b"\x00",
];

/// Replays the regressions with the checks of their targets: `frame_decode` (decode agrees
/// with the reference; what decodes re-encodes to the same bytes) and `channel_recv` (first
/// byte: fd count modulo 11; the rest: the datagram; the documented result, no fd leaked).
fn fuzz_regressions() {
    let mut seen = Outcomes::default();
    let mut out = [0u8; MAX_FRAME];
    for input in FRAME_DECODE_REGRESSIONS {
        seen.check(input);
        if let Ok(f) = Frame::decode(input) {
            let n = f.encode(&mut out).unwrap();
            assert_eq!(&out[..n], *input);
        }
    }
    let mut h = Hostile::new();
    for input in CHANNEL_RECV_REGRESSIONS {
        let (&first, rest) = input.split_first().unwrap();
        h.case_ref(rest, first as usize % 11);
    }
    h.report(CHANNEL_RECV_REGRESSIONS.len());
}

fn peer_closes_mid_stream() {
    let (rx, tx) = Channel::pair().unwrap();
    let before = util::fd_count();
    let child = util::KillOnDrop(util::fork_child(|| {
        let (r, w) = rustix::pipe::pipe().unwrap();
        tx.send(&Frame::new(Kind::Online, 1, b""), &[]).unwrap();
        tx.send(
            &Frame::new(Kind::Message, 2, b"two fds").with_fds(2),
            &[r.as_fd(), w.as_fd()],
        )
        .unwrap();
        // A bad one with an fd, then a good one; then the process exits, closing its end.
        send_raw(&tx, b"XX\x01\x05\0\x01\0\0\0\0\0\0\0\0\0\0", &[r.as_fd()]);
        tx.send(&Frame::new(Kind::Message, 4, b"last"), &[])
            .unwrap();
        0
    }));
    drop(tx);
    join(child);
    let mut buf = RecvBuf::new();
    {
        let got = rx.recv(&mut buf).unwrap();
        assert_eq!((got.frame.kind(), got.frame.seq()), (Kind::Online, 1));
    }
    {
        let got = rx.recv(&mut buf).unwrap();
        assert_eq!(got.frame.payload(), b"two fds");
        assert_eq!(got.fds.len(), 2);
        for fd in &got.fds {
            assert!(fd_target(fd.as_fd()).starts_with("pipe:"));
        }
    }
    assert_eq!(
        rx.recv(&mut buf).unwrap_err(),
        Error::Frame(FrameError::Magic(*b"XX"))
    );
    {
        let got = rx.recv(&mut buf).unwrap();
        assert_eq!(got.frame.payload(), b"last");
    }
    // Now the queue is empty and the peer gone: closed, every time, blocking or not.
    assert_eq!(rx.recv(&mut buf).unwrap_err(), Error::Closed);
    assert_eq!(rx.try_recv(&mut buf).unwrap_err(), Error::Closed);
    assert_eq!(rx.recv(&mut buf).unwrap_err(), Error::Closed);
    // Sending to it is Closed too, and no SIGPIPE kills us.
    assert_eq!(
        rx.send(&Frame::new(Kind::Close, 9, b""), &[]),
        Err(Error::Closed)
    );
    assert_eq!(
        rx.try_send(&Frame::new(Kind::Close, 9, b""), &[]),
        Err(Error::Closed)
    );
    // Our copy of the peer's end is gone, theirs died with them: one fd fewer, nothing leaked.
    assert_eq!(util::fd_count(), before - 1);
}

/// A socket call a process can be blocked in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SockCall {
    Recv,
    Send,
}

/// Waits until process `pid` is blocked in `call` on its socket `fd`, as `/proc/PID/syscall`
/// shows it (the number, then the arguments). The test's time limit bounds the wait.
fn wait_in_syscall(pid: i32, call: SockCall, fd: i32) {
    let qemu = util::under_qemu();
    loop {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/syscall")) {
            let mut f = s.split_whitespace();
            let nr = f.next().and_then(|t| t.parse::<libc::c_long>().ok());
            let arg0 = f
                .next()
                .and_then(|t| u64::from_str_radix(t.trim_start_matches("0x"), 16).ok());
            if let (Some(nr), Some(arg0)) = (nr, arg0) {
                if blocked_in(nr, arg0, call, fd, qemu) && sleeping(pid) {
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether system call `nr` with first argument `arg0` is `call` on `fd`:
/// * `recvmsg`/`sendmsg(fd, ..)`, the usual way;
/// * `socketcall(SYS_RECVMSG/SYS_SENDMSG, args)` on the architectures that have the multiplexer
///   (rustix makes every socket call through it on 32-bit x86, so i686 shows 102, never 372);
/// * under qemu-user, which makes the call as a host system call, numbered for the host's
///   architecture rather than the target's: the call with `fd` (qemu passes guest fds through
///   unchanged) as its first argument, whatever its number.
fn blocked_in(nr: libc::c_long, arg0: u64, call: SockCall, fd: i32, qemu: bool) -> bool {
    let direct = match call {
        SockCall::Recv => libc::SYS_recvmsg,
        SockCall::Send => libc::SYS_sendmsg,
    };
    if (nr == direct || qemu) && arg0 == fd as u64 {
        return true;
    }
    #[cfg(any(
        target_arch = "x86",
        target_arch = "mips",
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "s390x",
        target_arch = "sparc",
        target_arch = "sparc64",
        target_arch = "m68k"
    ))]
    {
        // <linux/net.h>
        const SYS_SENDMSG: u64 = 16;
        const SYS_RECVMSG: u64 = 17;
        let sub = match call {
            SockCall::Recv => SYS_RECVMSG,
            SockCall::Send => SYS_SENDMSG,
        };
        if nr == libc::SYS_socketcall && arg0 == sub {
            return true;
        }
    }
    false
}

/// Whether process `pid` is asleep (state `S` in `/proc/PID/stat`), not merely passing through
/// a system call.
fn sleeping(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
            == Some("S")
    })
}

fn peer_closes_while_receiver_blocks() {
    let (rx, tx) = Channel::pair().unwrap();
    let rx_fd = rx.as_raw_fd();
    let parent = std::process::id() as i32;
    let child = util::KillOnDrop(util::fork_child(|| {
        wait_in_syscall(parent, SockCall::Recv, rx_fd);
        drop(tx);
        0
    }));
    // The closure took `tx` by value: the parent's copy was dropped with it.
    let mut buf = RecvBuf::new();
    assert_eq!(rx.recv(&mut buf).unwrap_err(), Error::Closed);
    join(child);
}

// ---------------------------------------------------------------------------------------------
// 5. Nonblocking calls and EINTR.

fn try_recv_on_empty_channel_is_none() {
    let (a, b) = Channel::pair().unwrap();
    let mut buf = RecvBuf::new();
    for _ in 0..3 {
        assert!(a.try_recv(&mut buf).unwrap().is_none());
        assert!(b.try_recv(&mut buf).unwrap().is_none());
    }
    a.try_send(&Frame::new(Kind::Online, 1, b""), &[]).unwrap();
    assert_eq!(b.try_recv(&mut buf).unwrap().unwrap().frame.seq(), 1);
    assert!(b.try_recv(&mut buf).unwrap().is_none());
    assert!(a.try_recv(&mut buf).unwrap().is_none());
}

fn try_send_on_full_channel_would_block() {
    let (a, b) = Channel::pair().unwrap();
    let payload = [7u8; 1000];
    let mut sent = 0u32;
    let err = loop {
        match a.try_send(&Frame::new(Kind::Message, sent, &payload), &[]) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 1_000_000, "the channel never filled");
    };
    assert!(err.is_would_block(), "{err:?}");
    assert_eq!(err.raw_os_error(), Some(libc::EAGAIN));
    assert!(sent > 0);
    // Still full; then every frame sent arrives, in order, and no more.
    assert!(a
        .try_send(&Frame::new(Kind::Online, 0, b""), &[])
        .unwrap_err()
        .is_would_block());
    let mut buf = RecvBuf::new();
    for i in 0..sent {
        let got = b.try_recv(&mut buf).unwrap().expect("frame missing");
        assert_eq!(got.frame.seq(), i);
        assert_eq!(got.frame.payload(), &payload[..]);
    }
    assert!(b.try_recv(&mut buf).unwrap().is_none());
    // And there is room again.
    a.try_send(&Frame::new(Kind::Online, 0, b""), &[]).unwrap();
}

static HANDLED: AtomicUsize = AtomicUsize::new(0);
static NOTIFY_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    HANDLED.fetch_add(1, Ordering::SeqCst);
    let fd = NOTIFY_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; the buffer is a static byte.
        unsafe { libc::write(fd, b"!".as_ptr().cast(), 1) };
    }
}

/// Installs `on_signal` for SIGUSR1 without SA_RESTART (so blocked calls fail with EINTR), and
/// returns the read end of the pipe the handler writes a byte to.
fn install_usr1_without_restart() -> std::fs::File {
    let (r, w) = rustix::pipe::pipe().unwrap();
    NOTIFY_FD.store(w.as_raw_fd(), Ordering::SeqCst);
    // The write end is the handler's now, for the life of the test process.
    std::mem::forget(w);
    // SAFETY: a zeroed sigaction is a valid start; the handler is an `extern "C" fn(c_int)` that
    // only touches atomics and write(2); sa_flags 0 leaves SA_RESTART off.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = 0;
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
    std::fs::File::from(r)
}

/// Signals `pid` with SIGUSR1 once it is blocked in `call` on `fd`, and waits until its handler
/// ran.
fn interrupt(pid: i32, call: SockCall, fd: i32, notified: &mut std::fs::File) {
    wait_in_syscall(pid, call, fd);
    // SAFETY: kill has no memory preconditions; `pid` is our parent.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
    let mut b = [0u8; 1];
    notified.read_exact(&mut b).unwrap();
}

fn recv_survives_eintr() {
    let mut notified = install_usr1_without_restart();
    let (a, b) = Channel::pair().unwrap();
    let a_fd = a.as_raw_fd();
    let parent = std::process::id() as i32;
    let child = util::KillOnDrop(util::fork_child(|| {
        interrupt(parent, SockCall::Recv, a_fd, &mut notified);
        b.send(&Frame::new(Kind::Message, 42, b"after the signal"), &[])
            .unwrap();
        0
    }));
    let mut buf = RecvBuf::new();
    let got = a.recv(&mut buf).unwrap();
    assert_eq!(
        (got.frame.seq(), got.frame.payload()),
        (42, &b"after the signal"[..])
    );
    assert_eq!(
        HANDLED.load(Ordering::SeqCst),
        1,
        "the signal never arrived"
    );
    join(child);
}

fn send_survives_eintr() {
    let mut notified = install_usr1_without_restart();
    let (a, b) = Channel::pair().unwrap();
    let payload = [3u8; 1000];
    let mut sent = 0u32;
    while a
        .try_send(&Frame::new(Kind::Message, sent, &payload), &[])
        .is_ok()
    {
        sent += 1;
    }
    let a_fd = a.as_raw_fd();
    let parent = std::process::id() as i32;
    let child = util::KillOnDrop(util::fork_child(|| {
        interrupt(parent, SockCall::Send, a_fd, &mut notified);
        // Drain everything, including the frame whose send was interrupted.
        let mut buf = RecvBuf::new();
        for i in 0..=sent {
            let got = b.recv(&mut buf).unwrap();
            assert_eq!(got.frame.seq(), i);
        }
        assert!(b.try_recv(&mut buf).unwrap().is_none());
        0
    }));
    a.send(&Frame::new(Kind::Message, sent, &payload), &[])
        .unwrap();
    assert_eq!(
        HANDLED.load(Ordering::SeqCst),
        1,
        "the signal never arrived"
    );
    join(child);
}
