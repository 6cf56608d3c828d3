//! `cargo +nightly fuzz run api_request`: see [`plexvm_fuzz::api_request`].
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| plexvm_fuzz::api_request(data));
