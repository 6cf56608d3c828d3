//! `cargo +nightly fuzz run spec`: see [`plexvm_fuzz::spec`].
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| plexvm_fuzz::spec(data));
