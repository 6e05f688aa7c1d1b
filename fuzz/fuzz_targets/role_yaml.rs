//! Role files come from administrators but are parsed and validated before
//! anything is stored: neither step may panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(role) = serde_norway::from_str::<turnstile_api::role::Role>(text)
    {
        let _ = role.validate();
    }
});
