//! Builds the probe guest (`probe/`, its own cargo workspace) and hands its ELF to
//! the crate as `PLEXVM_PROBE_ELF` (see `src/probe.rs`), and links the `plexvm`
//! binary statically (see [`link_core_statically`]).
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
    link_core_statically(&out_dir.join("static-libs"));
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

/// Set to any value to link the `plexvm` binary dynamically (e.g. for sanitizers or
/// tools that interpose on libc).
const DYNAMIC_LINK_ENV: &str = "PLEXVM_DYNAMIC_LINK";

/// The C libraries rustc names for std and the `libc` crate on `*-linux-gnu`
/// (`-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc`), each with the static archives
/// that replace it. libc comes as a group with libgcc because each needs the other
/// (libgcc_eh's unwinder calls `dl_iterate_phdr`, libc needs libgcc's helpers).
const STATIC_REPLACEMENTS: &[(&str, &str)] = &[
    ("c", "GROUP ( -l:libc.a -l:libgcc.a -l:libgcc_eh.a )"),
    ("gcc_s", "INPUT ( -l:libgcc_eh.a -l:libgcc.a )"),
    ("m", "INPUT ( -l:libm.a )"),
    ("rt", "INPUT ( -l:librt.a )"),
    ("pthread", "INPUT ( -l:libpthread.a )"),
    ("util", "INPUT ( -l:libutil.a )"),
    ("dl", "INPUT ( -l:libdl.a )"),
];

/// Links the `plexvm` binary (only it: not the library, its tests or the crates that
/// depend on it) as a static PIE against glibc.
///
/// Why: the issue-7 overhead (VmRSS − guest RAM) counts every resident page of every
/// mapping, and a dynamic core has ~1.6 MiB of libc.so, ld.so and libgcc_s resident
/// (fault-around maps 64 KiB around each fault); linked statically only the libc code
/// the core calls is in the binary (perf/results/NOTES.md, "Core overhead"). The core
/// uses no NSS (no user or host names) and no dlopen, which static glibc cannot do.
///
/// How, on stable Rust and for one binary: `-static-pie` makes the C driver link with
/// glibc's self-relocating start files and no interpreter; but rustc still names the
/// shared libraries (`-Bdynamic -lgcc_s ... -lc`, as it does without `crt-static`), so
/// a directory of linker scripts named `libc.so`, `libgcc_s.so`, ... that point at the
/// static archives is searched before the system's (`-L` order decides, its position
/// among the `-l` does not). `crt-static` itself cannot be set per binary, and in
/// RUSTFLAGS it reaches every binary and proc-macro of the workspace.
///
/// Falls back to the dynamic link, with a warning, where glibc's static archive is
/// not installed or the target is not `*-linux-gnu`.
fn link_core_statically(script_dir: &Path) {
    println!("cargo:rerun-if-env-changed={DYNAMIC_LINK_ENV}");
    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let target_env = env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let crt_static = env::var("CARGO_CFG_TARGET_FEATURE")
        .unwrap_or_default()
        .split(',')
        .any(|feature| feature == "crt-static");
    if env::var_os(DYNAMIC_LINK_ENV).is_some()
        || target_os != "linux"
        || target_env != "gnu"
        || crt_static
    {
        return;
    }
    if !static_libc_installed() {
        println!(
            "cargo:warning=glibc's libc.a not found (install libc6-dev / glibc-static): \
             plexvm is linked dynamically and uses ~1.5 MiB more memory"
        );
        return;
    }
    std::fs::create_dir_all(script_dir)
        .unwrap_or_else(|error| panic!("cannot create {}: {error}", script_dir.display()));
    for (library, script) in STATIC_REPLACEMENTS {
        let path = script_dir.join(format!("lib{library}.so"));
        std::fs::write(
            &path,
            format!("/* plexvm: link {library} statically */\n{script}\n"),
        )
        .unwrap_or_else(|error| panic!("cannot write {}: {error}", path.display()));
    }
    println!("cargo:rustc-link-arg-bin=plexvm=-static-pie");
    // A static PIE relocates itself at start-up and so reads all its relative
    // relocations: as RELA that is ~170 KiB resident, packed as RELR ~4 KiB. Only
    // glibc ≥ 2.36 applies RELR; an older one would start with unrelocated pointers.
    if glibc_version().is_some_and(|version| version >= (2, 36)) {
        println!("cargo:rustc-link-arg-bin=plexvm=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo:rustc-link-arg-bin=plexvm=-L{}", script_dir.display());
}

/// The build host's glibc version (`getconf GNU_LIBC_VERSION`: "glibc 2.36"), which is
/// that of its libc.a: distributions ship the static archive at the runtime's version.
fn glibc_version() -> Option<(u32, u32)> {
    let output = Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
        .ok()
        .filter(|output| output.status.success())?;
    let text = String::from_utf8_lossy(&output.stdout);
    let (major, minor) = text.trim().strip_prefix("glibc ")?.split_once('.')?;
    let minor = minor.split('.').next()?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Whether the C compiler (rustc's default linker driver) finds glibc's `libc.a`.
fn static_libc_installed() -> bool {
    let compiler = env::var_os("CC").unwrap_or_else(|| OsString::from("cc"));
    Command::new(compiler)
        .arg("-print-file-name=libc.a")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
        .is_some_and(|path| path.is_absolute() && path.exists())
}
