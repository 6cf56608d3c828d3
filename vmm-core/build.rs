//! Builds the probe guest (`probe/`, its own cargo workspace) and hands its ELF to
//! the crate as `PLEXVM_PROBE_ELF` (see `src/probe.rs`).
//!
//! The nested cargo gets its own target dir under OUT_DIR (on the outer target dir
//! it would wait forever for the lock the outer cargo holds) and an environment
//! scrubbed of what the outer cargo sets for build scripts, so that the outer
//! profile, target, flags and jobserver do not leak into the guest build.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The probe is built for the host triple (the only std installed), as a
/// freestanding static ELF; see probe/build.rs and probe/probe.ld.
const PROBE_TARGET: &str = "x86_64-unknown-linux-gnu";
/// Rustflags for the probe, unit-separated as in CARGO_ENCODED_RUSTFLAGS.
const PROBE_RUSTFLAGS: &str = "-Crelocation-model=static";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let probe_dir = manifest_dir.join("probe");
    println!("cargo:rerun-if-changed=build.rs");
    for path in [
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "probe.ld",
        "src",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", probe_dir.join(path).display());
    }
    let elf = build_probe(&probe_dir, &out_dir.join("probe-target"));
    println!("cargo:rustc-env=PLEXVM_PROBE_ELF={}", elf.display());
}

fn build_probe(probe_dir: &Path, target_dir: &Path) -> PathBuf {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut command = Command::new(cargo);
    command
        .current_dir(probe_dir)
        .arg("build")
        .arg("--release")
        .arg("--manifest-path")
        .arg(probe_dir.join("Cargo.toml"))
        .arg("--target")
        .arg(PROBE_TARGET)
        .arg("--target-dir")
        .arg(target_dir);
    for (key, _) in env::vars_os() {
        if key.to_str().is_none_or(leaks_into_nested_cargo) {
            command.env_remove(&key);
        }
    }
    command.env("CARGO_ENCODED_RUSTFLAGS", PROBE_RUSTFLAGS);
    if let Some(jobs) = env::var_os("NUM_JOBS") {
        command.arg("--jobs").arg(jobs);
    }
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("cannot run cargo to build the probe guest: {error}"));
    if !output.status.success() {
        panic!(
            "building the probe guest failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    target_dir
        .join(PROBE_TARGET)
        .join("release")
        .join("plexvm-probe")
}

/// Variables cargo (or the user, for the outer build) sets that would change the
/// nested build: cargo's build-script variables, target/profile/flag overrides,
/// compiler wrappers and the outer jobserver. CARGO_HOME and the registry/network
/// settings stay so the nested cargo finds the same crate cache.
fn leaks_into_nested_cargo(key: &str) -> bool {
    const KEEP: &[&str] = &[
        "CARGO_HOME",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
    ];
    const DROP: &[&str] = &[
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_LINKER",
        "RUSTDOC",
        "TARGET",
        "HOST",
        "OUT_DIR",
        "OPT_LEVEL",
        "DEBUG",
        "PROFILE",
        "NUM_JOBS",
        "CARGO",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_MAKEFLAGS",
    ];
    if KEEP.iter().any(|prefix| key.starts_with(prefix)) {
        return false;
    }
    DROP.contains(&key)
        || key.starts_with("CARGO_")
        || key.starts_with("__CARGO")
        || key.starts_with("DEP_")
}
