//! `cargo +nightly fuzz run backend_reply`: see [`plexvm_fuzz::backend_reply`].
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| plexvm_fuzz::backend_reply(data));
