//! Structured frames: when `validate` accepts one, encode then decode gives it back (and the
//! header bytes are the documented layout); when it refuses, `header` and `encode` refuse with
//! the same error and write nothing.
#![no_main]

use arbitrary::Arbitrary;
use forkcluster::frame::{Frame, FrameError, Kind, HEADER_LEN, MAGIC, VERSION};
use libfuzzer_sys::fuzz_target;

/// As bytes: kind, flags, fds, seq (u32 little-endian), then the payload: the last field takes
/// the rest of the input as it is (`fuzz/gen_seeds.py` writes seeds in this layout).
#[derive(Debug, Arbitrary)]
struct Input<'a> {
    kind: u8,
    flags: u8,
    fds: u8,
    seq: u32,
    payload: &'a [u8],
}

fuzz_target!(|input: Input<'_>| {
    let kind = match Kind::from_u8(input.kind) {
        Some(k) => {
            assert_eq!(k as u8, input.kind);
            k
        }
        None => {
            assert!(!(1..=8).contains(&input.kind));
            // Still build a frame: every kind, whatever the byte.
            Kind::ALL[input.kind as usize % Kind::ALL.len()]
        }
    };
    let frame = Frame::new(kind, input.seq, input.payload)
        .with_flags(input.flags)
        .with_fds(input.fds);
    let needed = HEADER_LEN + input.payload.len();
    let mut out = vec![0xA5u8; needed + 8];
    match frame.validate() {
        Ok(()) => {
            let n = frame.encode(&mut out).expect("a valid frame encodes");
            assert_eq!(n, needed);
            assert!(out[n..].iter().all(|&b| b == 0xA5), "wrote past the frame");
            let h = &out[..HEADER_LEN];
            assert_eq!(&h[0..2], &MAGIC);
            assert_eq!(h[2], VERSION);
            assert_eq!(h[3], kind as u8);
            assert_eq!(h[4], input.flags);
            assert_eq!(h[5], input.fds);
            assert_eq!(&h[6..8], &[0, 0]);
            assert_eq!(&h[8..12], &input.seq.to_le_bytes());
            assert_eq!(&h[12..16], &(input.payload.len() as u32).to_le_bytes());
            assert_eq!(&frame.header().expect("a valid frame has a header")[..], h);
            let back = Frame::decode(&out[..n]).expect("an encoded frame decodes");
            assert_eq!(back, frame);
            assert_eq!(
                frame.encode(&mut out[..n - 1]),
                Err(FrameError::BufferTooSmall { needed })
            );
        }
        Err(e) => {
            assert_eq!(frame.header(), Err(e));
            assert_eq!(frame.encode(&mut out), Err(e));
            assert!(
                out.iter().all(|&b| b == 0xA5),
                "a refused frame wrote bytes"
            );
        }
    }
});
