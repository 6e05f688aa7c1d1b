//! The reader must never panic, whatever the bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = turnstile_recording::reader::read_events(data);
});
