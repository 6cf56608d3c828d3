//! Debian root filesystems made with mmdebstrap at test time and cached
//! between runs under the test binaries' `CARGO_TARGET_TMPDIR` (a folder the
//! tests own; `cargo clean` removes it). Containers use them through podman's
//! overlay (`--rootfs DIR:O`), so the cache is never written by a container.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The packages a system container needs besides minbase (the list).
pub const INCLUDE: &str = "systemd,systemd-sysv,dbus,procps";

/// The cached rootfs of `suite` (`bookworm`, `trixie`), made on first use.
/// Err says why it cannot be made: mmdebstrap missing (the caller skips) or
/// mmdebstrap failed (with its output; the caller decides).
pub fn rootfs(suite: &str) -> Result<PathBuf, String> {
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("plexvm-shim-debian");
    std::fs::create_dir_all(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let dir = cache.join(suite);
    // Test binaries run as separate processes: serialize the first build.
    let lock = std::fs::File::create(cache.join(format!("{suite}.lock")))
        .map_err(|e| format!("lock: {e}"))?;
    // SAFETY: flock on an fd we own; it is released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!("flock: {}", std::io::Error::last_os_error()));
    }
    // A finished build is renamed into place, so a complete one has sbin/init.
    if dir.join("sbin/init").exists() {
        return Ok(dir);
    }
    if super::podman::find_in_path("mmdebstrap").is_none() {
        return Err("mmdebstrap not installed (run container-shim/tests/deps.sh)".into());
    }
    let partial = cache.join(format!("{suite}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    let out = Command::new("mmdebstrap")
        .args(["--variant=minbase", &format!("--include={INCLUDE}"), suite])
        .arg(&partial)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("mmdebstrap: {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(format!(
            "mmdebstrap {suite} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    std::fs::rename(&partial, &dir).map_err(|e| format!("rename: {e}"))?;
    Ok(dir)
}
