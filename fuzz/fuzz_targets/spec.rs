//! The VM spec parser (`plexvm run vm.toml`): any text gets a spec or a one-line error,
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = plexvm_protocol::VmSpec::parse(&text, "fuzz.toml") {
        // The error is meant for one stderr line.
        assert!(!e.to_string().is_empty());
    }
});
