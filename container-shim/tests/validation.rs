//! The OCI runtime-tools validation suite (the community's conformance test
//! for runtimes) against plexvm-shim and runc on this machine.
//!
//! The suite's source comes from `<repo>/../shared/vendor` (never copied into
//! the repository); it is built with Debian's Go into a cache folder under
//! `CARGO_TARGET_TMPDIR` the first time. Each of its programs is scored as
//! the vendor README says: a program passes when it exits 0, prints no
//! `not ok` line and no `"error":` note, and (except the `*_fail` programs,
//! which pass when the runtime refuses their config) at least one `ok`.
//! The test fails if plexvm-shim does not pass every program in
//! `tests/validation-expected.txt`: the set runc passes on these machines.

mod common;

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::podman::find_in_path;

const TARBALL: &str = "runtime-tools-go119.tar.gz";
/// The commit the tarball holds (vendor README), passed to its Makefile.
const COMMIT: &str = "260e151";

/// `<repo>/../shared/vendor`; from a git worktree, beside the main checkout.
fn vendor_dir() -> Option<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut candidates = vec![manifest.join("../../shared/vendor")];
    let common_dir = Command::new("git")
        .args(["rev-parse", "--path-format=absolute", "--git-common-dir"])
        .current_dir(manifest)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(git) = common_dir {
        candidates.push(git.join("../../shared/vendor"));
    }
    candidates.into_iter().find(|d| d.join(TARBALL).is_file())
}

/// The built suite (runtimetest + validation/*/*.t), built on first use.
fn suite() -> Result<PathBuf, String> {
    let vendor = vendor_dir().ok_or_else(|| format!("no ../shared/vendor/{TARBALL}"))?;
    if find_in_path("go").is_none() {
        return Err("go not installed (golang-go; run container-shim/tests/deps.sh)".into());
    }
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("plexvm-shim-validation");
    std::fs::create_dir_all(&cache).map_err(|e| e.to_string())?;
    let lock = std::fs::File::create(cache.join("lock")).map_err(|e| e.to_string())?;
    // SAFETY: flock on an fd we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!("flock: {}", std::io::Error::last_os_error()));
    }
    let tree = cache.join(COMMIT).join("runtime-tools");
    let done = cache.join(COMMIT).join("built");
    if done.exists() {
        return Ok(tree);
    }
    let _ = std::fs::remove_dir_all(cache.join(COMMIT));
    std::fs::create_dir_all(cache.join(COMMIT)).map_err(|e| e.to_string())?;
    let run = |cmd: &mut Command, what: &str| -> Result<(), String> {
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{what}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            panic!("{what} failed: {}", String::from_utf8_lossy(&out.stderr))
        }
    };
    run(
        Command::new("tar")
            .arg("xzf")
            .arg(vendor.join(TARBALL))
            .arg("-C")
            .arg(cache.join(COMMIT)),
        "unpacking the suite",
    )?;
    run(
        Command::new("make")
            .arg(format!("COMMIT={COMMIT}"))
            .args(["runtimetest", "validation-executables"])
            .current_dir(&tree)
            .env("GOFLAGS", "-mod=vendor")
            .env("GOPROXY", "off")
            .env("GOTOOLCHAIN", "local")
            .env("GOCACHE", cache.join("gocache"))
            .env("GOPATH", cache.join("gopath")),
        "building the suite",
    )?;
    std::fs::write(&done, "").map_err(|e| e.to_string())?;
    Ok(tree)
}

/// Mount points under /tmp/ocitest* (bundles of the programs that share the
/// host's mount namespace leave proc, sys, dev, mqueue mounted there).
fn ocitest_mounts() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    plexvm_shim::mounts::parse_mountinfo(&text)
        .into_iter()
        .map(|(mp, _)| mp)
        .filter(|mp| mp.to_string_lossy().starts_with("/tmp/ocitest"))
        .collect()
}

/// The /tmp/ocitest* bundle directories that exist now.
fn ocitest_dirs() -> Vec<PathBuf> {
    std::fs::read_dir("/tmp")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().starts_with("/tmp/ocitest"))
                .collect()
        })
        .unwrap_or_default()
}

/// Detaches the bundle mounts a run left, deepest first, then removes the
/// bundle directories the programs could not remove because of them; only
/// what was not there before the run, and never a directory that still has
/// a mount below it.
fn clean_up_after(mounts_before: &[PathBuf], dirs_before: &[PathBuf]) {
    let mut left: Vec<PathBuf> = ocitest_mounts()
        .into_iter()
        .filter(|m| !mounts_before.contains(m))
        .collect();
    left.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in left {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
    let still_mounted = ocitest_mounts();
    for dir in ocitest_dirs() {
        if !dirs_before.contains(&dir) && !still_mounted.iter().any(|m| m.starts_with(&dir)) {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// Did this program's output pass (see the module comment)?
fn passed(name: &str, code: Option<i32>, output: &str) -> bool {
    let lines = || output.lines().map(str::trim_start);
    code == Some(0)
        && !lines().any(|l| l.starts_with("not ok"))
        && !output.contains("\"error\":")
        && (name.ends_with("_fail") || lines().any(|l| l.starts_with("ok")))
}

/// Runs every program with `RUNTIME=runtime`; returns the passing names and
/// the total number of programs.
fn run_suite(tree: &Path, runtime: &Path) -> (BTreeSet<String>, usize) {
    let mut programs: Vec<PathBuf> = std::fs::read_dir(tree.join("validation"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let t = e.path().join(format!("{name}.t"));
            t.is_file().then_some(t)
        })
        .collect();
    programs.sort();
    let mut pass = BTreeSet::new();
    for t in &programs {
        let name = t.file_stem().unwrap().to_string_lossy().into_owned();
        let out = Command::new("timeout")
            .args(["-k", "10", "120"])
            .arg(t)
            .current_dir(tree)
            .env("RUNTIME", runtime)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if passed(&name, out.status.code(), &text) {
            pass.insert(name);
        } else if expected().contains(&name) {
            // The reason, for the failure message below.
            let tail: String = text
                .chars()
                .rev()
                .take(1500)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            eprintln!(
                "--- {name} ({}) failed: {:?}\n{tail}",
                runtime.display(),
                out.status.code()
            );
        }
    }
    (pass, programs.len())
}

fn expected() -> BTreeSet<String> {
    include_str!("validation-expected.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

#[test]
fn scoring_follows_the_vendor_readme() {
    assert!(passed("kill", Some(0), "TAP version 13\nok 1 - x\n1..1\n"));
    assert!(!passed("kill", Some(0), "ok 1 - x\nnot ok 2 - y\n"));
    assert!(!passed("kill", Some(1), "ok 1 - x\n"));
    assert!(!passed(
        "hooks",
        Some(0),
        "  ---\n  {\n    \"error\": \"x\"\n  }\n1..0\n"
    ));
    assert!(!passed("prestart", Some(0), "TAP version 13\n1..0\n"));
    assert!(passed("prestart_fail", Some(0), "TAP version 13\n1..0\n"));
    assert!(!passed("process_capabilities_fail", Some(1), "ok 1\n"));
}

#[test]
fn runtime_tools_validation_suite() {
    if let Some(why) = common::missing_prerequisite() {
        panic!("cannot run here: {why}");
    }
    let tree = match suite() {
        Ok(t) => t,
        Err(why) => {
            panic!("cannot run here: {why}");
        }
    };
    // The two runtimes run side by side (the programs mostly wait), each
    // program with its own bundle and container ID; what the programs that
    // share the host's mount namespace leave mounted is detached at the end.
    let (before, dirs_before) = (ocitest_mounts(), ocitest_dirs());
    let runc = find_in_path("runc");
    let ((shim, total), runc_pass) = std::thread::scope(|s| {
        let other = runc.as_ref().map(|r| s.spawn(|| run_suite(&tree, r)));
        let ours = run_suite(&tree, Path::new(common::SHIM));
        (ours, other.map(|h| h.join().unwrap().0))
    });
    clean_up_after(&before, &dirs_before);
    eprintln!("plexvm-shim passes {} of {total}: {shim:?}", shim.len());
    match runc_pass {
        Some(runc_pass) => {
            eprintln!("runc passes {} of {total}: {runc_pass:?}", runc_pass.len());
            let only_runc: Vec<_> = runc_pass.difference(&shim).collect();
            eprintln!("passed by runc, not by plexvm-shim: {only_runc:?}");
        }
        None => eprintln!("NOTE: runc is not installed; only plexvm-shim was run"),
    }
    let missing: Vec<_> = expected().difference(&shim).cloned().collect();
    assert!(
        missing.is_empty(),
        "plexvm-shim fails programs in tests/validation-expected.txt: {missing:?}"
    );
}
