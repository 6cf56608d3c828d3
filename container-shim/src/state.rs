//! Container state kept under `--root/<id>/`.
//!
//! `state.json` holds what later commands need (pid, bundle, cgroup path and
//! the whole config, so a changed bundle cannot change a running container);
//! `exec.fifo` exists from `create` until `start`. The status is derived the
//! way runc derives it: creating while `create` runs, created while the FIFO
//! exists, running while the init pid lives (same start time, not a zombie),
//! otherwise stopped.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};

/// Name of the FIFO that holds init before the user program.
pub const EXEC_FIFO: &str = "exec.fifo";
const STATE_FILE: &str = "state.json";

/// Errors of the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The ID has characters that could escape the state directory.
    #[error("invalid container ID {0:?} (allowed: letters, digits, '_', '+', '-', '.')")]
    InvalidId(String),
    /// `create` with an ID that is in use.
    #[error("container {0} already exists")]
    Exists(String),
    /// No such container under --root.
    #[error("container {0} does not exist")]
    NotFound(String),
    /// I/O on the state directory failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// state.json is not what this runtime wrote.
    #[error("corrupt state file {path}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

type Result<T> = std::result::Result<T, StateError>;

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Lifecycle status (runtime-spec "state" section).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// `create` is still setting the container up.
    Creating,
    /// Set up; the user program waits for `start`.
    Created,
    /// The user program runs.
    Running,
    /// Frozen by `pause`.
    Paused,
    /// The init process has exited.
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        };
        f.write_str(s)
    }
}

/// What the runtime remembers about one container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// Container ID.
    pub id: String,
    /// Host pid of the container's init (0 while creating).
    pub pid: i32,
    /// Start time of `pid` (field 22 of /proc/pid/stat), against pid reuse.
    pub pid_start_time: u64,
    /// Absolute bundle path.
    pub bundle: PathBuf,
    /// Absolute rootfs path.
    pub rootfs: PathBuf,
    /// Creation time, RFC 3339.
    pub created: String,
    /// True until `create` finished.
    pub creating: bool,
    /// Set by `pause`, cleared by `resume`.
    #[serde(default)]
    pub paused: bool,
    /// Cgroup path relative to each hierarchy's root.
    pub cgroup_path: PathBuf,
    /// The bundle's config as it was at `create`.
    pub config: Spec,
}

/// The directory that holds all containers' state (`--root`).
#[derive(Debug, Clone)]
pub struct StateRoot {
    root: PathBuf,
}

impl StateRoot {
    /// Uses `root` as the state directory (created on demand).
    pub fn new(root: &Path) -> Self {
        StateRoot {
            root: root.to_path_buf(),
        }
    }

    /// The per-container directory.
    pub fn dir(&self, id: &str) -> Result<PathBuf> {
        validate_id(id)?;
        Ok(self.root.join(id))
    }

    /// Creates the container's directory; fails if the ID is taken.
    pub fn create_dir(&self, id: &str) -> Result<PathBuf> {
        let dir = self.dir(id)?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&self.root)
            .map_err(io_err("cannot create state root", &self.root))?;
        match fs::DirBuilder::new().mode(0o711).create(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(StateError::Exists(id.to_string()))
            }
            Err(e) => Err(io_err("cannot create state dir", &dir)(e)),
        }
    }

    /// Writes state.json atomically (temp file + rename).
    pub fn save(&self, record: &ContainerRecord) -> Result<()> {
        let dir = self.dir(&record.id)?;
        let tmp = dir.join(".state.json.tmp");
        let path = dir.join(STATE_FILE);
        let data = serde_json::to_vec(record).map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        let mut file = fs::File::create(&tmp).map_err(io_err("cannot write", &tmp))?;
        file.write_all(&data)
            .map_err(io_err("cannot write", &tmp))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
            .map_err(io_err("cannot chmod", &tmp))?;
        replace(&tmp, &path)
    }

    /// Reads a container's state.json.
    pub fn load(&self, id: &str) -> Result<ContainerRecord> {
        let path = self.dir(id)?.join(STATE_FILE);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::NotFound(id.to_string()))
            }
            Err(e) => return Err(io_err("cannot read", &path)(e)),
        };
        serde_json::from_slice(&data).map_err(|source| StateError::Corrupt { path, source })
    }

    /// Removes a container's directory (ignores one that is already gone).
    pub fn remove(&self, id: &str) -> Result<()> {
        let dir = self.dir(id)?;
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io_err("cannot remove", &dir)(e))
            }
            _ => Ok(()),
        }
    }

    /// IDs of all containers with a state directory, sorted.
    pub fn ids(&self) -> Result<Vec<String>> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("cannot list", &self.root)(e)),
        };
        let mut ids: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join(STATE_FILE).exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|id| validate_id(id).is_ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// The FIFO path of a container.
    pub fn fifo(&self, id: &str) -> Result<PathBuf> {
        Ok(self.dir(id)?.join(EXEC_FIFO))
    }
}

/// Moves `tmp` to `path` atomically. An existing `path` is swapped out with
/// RENAME_EXCHANGE and then unlinked instead of being renamed over: ext4's
/// `auto_da_alloc` allocates the new file's blocks at once when a rename
/// replaces a file, and on a `discard` mount (these machines' root) freeing
/// them later in `delete` waits for a synchronous discard (~2 ms, measured
/// with perf sched_switch stacks). Exchanged, the short-lived state file
/// usually never gets blocks. Falls back to rename(2) where there is nothing
/// to exchange or the filesystem lacks RENAME_EXCHANGE.
fn replace(tmp: &Path, path: &Path) -> Result<()> {
    use nix::fcntl::{renameat2, RenameFlags};
    match renameat2(None, tmp, None, path, RenameFlags::RENAME_EXCHANGE) {
        Ok(()) => fs::remove_file(tmp).map_err(io_err("cannot remove", tmp)),
        Err(_) => fs::rename(tmp, path).map_err(io_err("cannot rename to", path)),
    }
}

/// Accepts runc's ID alphabet (`^[\w+-\.]+$`), never `.` or `..`.
pub fn validate_id(id: &str) -> Result<()> {
    let ok_chars = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.'));
    if id.is_empty() || id.len() > 1024 || !ok_chars || id == "." || id == ".." {
        return Err(StateError::InvalidId(id.to_string()));
    }
    Ok(())
}

/// State letter and start time of a process from /proc/pid/stat.
pub fn proc_stat(pid: i32) -> Option<(char, u64)> {
    if pid <= 0 {
        return None;
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

fn parse_stat(stat: &str) -> Option<(char, u64)> {
    // comm (field 2) may contain spaces and parentheses: split at the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state (field 3) comes field 4; starttime is field 22.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

impl ContainerRecord {
    /// True while the init process exists and is not a zombie.
    pub fn init_alive(&self) -> bool {
        match proc_stat(self.pid) {
            Some((state, start)) => start == self.pid_start_time && state != 'Z' && state != 'X',
            None => false,
        }
    }

    /// Derives the current status.
    pub fn status(&self, fifo: &Path) -> Status {
        if self.creating {
            return Status::Creating;
        }
        if !self.init_alive() {
            return Status::Stopped;
        }
        if fifo.exists() {
            return Status::Created;
        }
        if self.paused {
            return Status::Paused;
        }
        Status::Running
    }

    /// The runtime-spec state document (plus runc's `rootfs`, `created`, `owner`).
    pub fn oci_state(&self, status: Status) -> serde_json::Value {
        let pid = if status == Status::Stopped {
            0
        } else {
            self.pid
        };
        let annotations: HashMap<String, String> =
            self.config.annotations().clone().unwrap_or_default();
        serde_json::json!({
            "ociVersion": crate::OCI_VERSION,
            "id": self.id,
            "status": status.to_string(),
            "pid": pid,
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
            "owner": "",
            "annotations": annotations,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_escape_are_rejected() {
        for bad in ["", ".", "..", "a/b", "../x", "a b", "a\0"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        for good in ["abc", "a.b-c_d+e", "5844869eb08d"] {
            assert!(validate_id(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn parses_stat_with_odd_comm() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 12345 1000 10";
        assert_eq!(parse_stat(stat), Some(('S', 12345)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1"), None);
    }

    #[test]
    fn own_process_is_alive() {
        let pid = std::process::id() as i32;
        let (state, _) = proc_stat(pid).unwrap();
        assert_ne!(state, 'Z');
    }

    #[test]
    fn save_replaces_the_record_and_leaves_no_temp_file() {
        let tmp = tempfile::tempdir().unwrap();
        let root = StateRoot::new(tmp.path());
        let dir = root.create_dir("c1").unwrap();
        let mut record = ContainerRecord {
            id: "c1".into(),
            pid: 0,
            pid_start_time: 0,
            bundle: PathBuf::from("/b"),
            rootfs: PathBuf::from("/b/rootfs"),
            created: String::new(),
            creating: true,
            paused: false,
            cgroup_path: PathBuf::from("/c1"),
            config: Spec::default(),
        };
        root.save(&record).unwrap();
        record.creating = false;
        record.pid = 42;
        root.save(&record).unwrap();
        let loaded = root.load("c1").unwrap();
        assert!(!loaded.creating);
        assert_eq!(loaded.pid, 42);
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
    }

    #[test]
    fn create_twice_fails_and_remove_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let root = StateRoot::new(&tmp.path().join("root"));
        root.create_dir("c1").unwrap();
        assert!(matches!(root.create_dir("c1"), Err(StateError::Exists(_))));
        assert!(root.ids().unwrap().is_empty(), "no state.json yet");
        root.remove("c1").unwrap();
        root.remove("c1").unwrap();
        assert!(matches!(root.load("c1"), Err(StateError::NotFound(_))));
    }
}
