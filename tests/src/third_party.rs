//! Third-party vhost-user backends that `tests/deps/vhost-devices.sh` installs with
//! `cargo install` at pinned versions into one cache folder, and where tests find them.

use std::path::PathBuf;

use crate::prereq::require;

/// The cache folder: `PLEXVM_BACKENDS_DIR`, else `~/.cache/plexvm/backends` (the same
/// rule as tests/deps/vhost-devices.sh).
pub fn backends_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PLEXVM_BACKENDS_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/plexvm/backends")
}

/// The installed binary `name` (e.g. `vhost-device-rng`); fails `test`, saying why, when
/// it is not installed (a test never skips).
pub fn installed(test: &str, name: &str) -> PathBuf {
    let path = backends_dir().join("bin").join(name);
    if !path.is_file() {
        let reason = format!(
            "{} is not installed (tests/deps/vhost-devices.sh installs it; tests/run.sh runs that)",
            path.display()
        );
        require(test, &[reason]);
    }
    path
}
