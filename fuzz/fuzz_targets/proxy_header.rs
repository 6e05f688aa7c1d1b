//! A node parses the PROXY v2 header of whoever connects to it, before any
//! authentication: parsing must never panic, whatever the bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some((family, body)) = data.split_first() {
        let _ = turnstile_ssh::proxy_header::parse(*family, body);
    }
});
