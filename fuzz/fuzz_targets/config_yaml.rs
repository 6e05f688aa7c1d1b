//! The config file is parsed and resolved before anything starts: neither
//! may panic, whatever the file says.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(file) = turnstile::config::file::parse(text)
    {
        let _ = turnstile::config::resolve::resolve(file, None, true);
    }
});
