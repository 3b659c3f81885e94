//! Any bytes: `Frame::decode` never panics, and whatever it accepts re-encodes to exactly the
//! same bytes (the format has one encoding per frame, so decode loses nothing).
#![no_main]

use forkcluster::frame::{Frame, HEADER_LEN, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = Frame::decode(data) else {
        return;
    };
    assert!(data.len() <= MAX_FRAME);
    assert_eq!(frame.payload(), &data[HEADER_LEN..]);
    assert_eq!(frame.validate(), Ok(()));
    let mut out = [0u8; MAX_FRAME];
    let n = frame.encode(&mut out).expect("a decoded frame encodes");
    assert_eq!(&out[..n], data, "re-encoding differs");
    assert_eq!(Frame::decode(&out[..n]), Ok(frame));
});
