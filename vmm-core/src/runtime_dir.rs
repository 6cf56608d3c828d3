//! The VM's runtime folder (`/tmp/plexvm-<uid>/<name>.<pid>/`, or under
//! `$XDG_RUNTIME_DIR/plexvm/`): the sockets of the backends the core spawns live there.
//! The core removes it when the VM ends; a core that was killed (SIGKILL, OOM) cannot,
//! so every core, once its own folder exists, sweeps the folders of cores that are gone.
//!
//! "Gone": no process with the folder's pid in this pid namespace, and nobody holds
//! the folder's lock file (a core in another pid namespace sharing the folder — a
//! container with the host's /tmp — keeps its lock for as long as it runs).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use plexvm_protocol::paths::{runtime_root, vm_runtime_dir, vm_runtime_dir_pid};

use crate::runner::RunError;

/// The file a running core keeps locked (flock) in its runtime folder.
const LOCK_FILE: &str = "core.lock";

/// A runtime folder that is removed when the VM ends.
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
    /// Held locked for the core's lifetime; closing it releases the lock.
    _lock: File,
}

impl RuntimeDir {
    /// Creates this core's folder for VM `name`, and sweeps stale ones on a helper
    /// thread (off the launch path).
    pub fn create(name: &str) -> Result<RuntimeDir, RunError> {
        let xdg = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        let root = runtime_root(xdg.as_deref(), uid);
        let dir = RuntimeDir::create_in(&root, name).map_err(|source| RunError::RuntimeDir {
            path: vm_runtime_dir(&root, name, std::process::id()),
            source,
        })?;
        let own = dir.path.clone();
        let _ = std::thread::Builder::new()
            .name("plexvm-sweep".into())
            .spawn(move || sweep_stale(&root, &own));
        Ok(dir)
    }

    fn create_in(root: &Path, name: &str) -> std::io::Result<RuntimeDir> {
        let path = vm_runtime_dir(root, name, std::process::id());
        std::fs::create_dir_all(&path)?;
        let lock = File::create(path.join(LOCK_FILE))?;
        try_lock(&lock)?;
        Ok(RuntimeDir { path, _lock: lock })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// flock(LOCK_EX | LOCK_NB).
fn try_lock(file: &File) -> std::io::Result<()> {
    // SAFETY: flock on a descriptor this File owns; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether the folder `path` of a core with `pid` is stale (see the module docs).
fn is_stale(path: &Path, pid: u32) -> bool {
    if Path::new("/proc").join(pid.to_string()).exists() {
        return false;
    }
    match File::open(path.join(LOCK_FILE)) {
        // Released locks are the only ones a sweeper can take.
        Ok(lock) => try_lock(&lock).is_ok(),
        // Made before cores kept a lock file, or by a core killed before it made one.
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// Removes the stale runtime folders under `root` other than `own`; returns how many.
fn sweep_stale(root: &Path, own: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let pid = entry.file_name().to_str().and_then(vm_runtime_dir_pid);
        let Some(pid) = pid.filter(|_| is_dir && path != own) else {
            continue;
        };
        if is_stale(&path, pid) && std::fs::remove_dir_all(&path).is_ok() {
            tracing::debug!(
                "removed the runtime folder of a core that is gone: {}",
                path.display()
            );
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pid above any pid_max (2^22): no such process.
    const NO_SUCH_PID: u32 = 1 << 30;

    #[test]
    fn folders_of_gone_cores_are_swept_and_live_ones_kept() {
        let root = tempfile::tempdir().unwrap();
        let own = RuntimeDir::create_in(root.path(), "vm").unwrap();
        // Killed without a lock file, and killed holding one (released at death).
        let gone = root.path().join(format!("a.b.{NO_SUCH_PID}"));
        std::fs::create_dir(&gone).unwrap();
        let gone_locked = root.path().join(format!("c.{}", NO_SUCH_PID + 1));
        std::fs::create_dir(&gone_locked).unwrap();
        File::create(gone_locked.join(LOCK_FILE)).unwrap();
        // A live core of this namespace (this test's parent, which holds no lock).
        let parent = root
            .path()
            .join(format!("d.{}", std::os::unix::process::parent_id()));
        std::fs::create_dir(&parent).unwrap();
        // A live core elsewhere: its pid is not ours to see, its lock is held.
        let elsewhere = root.path().join(format!("e.{}", NO_SUCH_PID + 2));
        std::fs::create_dir(&elsewhere).unwrap();
        let held = File::create(elsewhere.join(LOCK_FILE)).unwrap();
        try_lock(&held).unwrap();
        // Not a runtime folder at all.
        let other = root.path().join("notes");
        std::fs::create_dir(&other).unwrap();

        assert_eq!(sweep_stale(root.path(), own.path()), 2);
        assert!(!gone.exists() && !gone_locked.exists());
        assert!(own.path().exists() && parent.exists() && elsewhere.exists() && other.exists());
        drop(own);
        assert!(!root
            .path()
            .join(format!("vm.{}", std::process::id()))
            .exists());
    }
}
