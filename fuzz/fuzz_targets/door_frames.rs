//! The proxy's `turnstile` subsystem reads frames from anyone, the anonymous
//! user included: decoding must never panic nor hold more than a frame.
#![no_main]

use turnstile_api::door::{self, DoorRequest, DoorResponse};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    for max in [64 * 1024, door::MAX_FRAME] {
        let mut buf = data.to_vec();
        while let Ok(Some(_)) = door::decode_within::<DoorRequest>(&mut buf, max) {}
        let mut buf = data.to_vec();
        while let Ok(Some(_)) = door::decode::<DoorResponse>(&mut buf) {}
    }
});
