//! Third-party vhost-user backends that `tests/deps/vhost-devices.sh` installs with
//! `cargo install` at pinned versions into one cache folder, and where tests find them.

use std::path::PathBuf;

use crate::prereq::skip_unless_ready;

/// The cache folder: `PLEXVM_BACKENDS_DIR`, else `~/.cache/plexvm/backends` (the same
/// rule as tests/deps/vhost-devices.sh).
pub fn backends_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PLEXVM_BACKENDS_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/plexvm/backends")
}

/// The installed binary `name` (e.g. `vhost-device-rng`), or `None` (after saying why;
/// a panic where skipping is forbidden) when it is not installed.
pub fn installed(test: &str, name: &str) -> Option<PathBuf> {
    let path = backends_dir().join("bin").join(name);
    if path.is_file() {
        return Some(path);
    }
    let reason = format!(
        "{} is not installed (tests/deps/vhost-devices.sh installs it; tests/run.sh runs that)",
        path.display()
    );
    skip_unless_ready(test, &[reason]);
    None
}
