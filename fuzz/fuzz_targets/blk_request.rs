//! `cargo +nightly fuzz run blk_request`: see [`plexvm_fuzz::blk_request`].
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| plexvm_fuzz::blk_request(data));
