//! Link the probe binary as a static, freestanding ELF at 1 MiB (see `probe.ld`).
//!
//! Link arguments live here rather than in `.cargo/config.toml` because cargo reads
//! config from the current directory, not from the manifest's.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let script = dir.join("probe.ld");
    println!("cargo:rerun-if-changed=probe.ld");
    println!("cargo:rerun-if-changed=build.rs");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-Wl,--build-id=none",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
}
