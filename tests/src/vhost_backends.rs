//! Starting vhost-user-blk backends for end-to-end tests: ours (`plexvm-blk`) and one we
//! did not write (`qemu-storage-daemon`, Debian package `qemu-utils`), each under a
//! [`ChildGuard`] and returned only once its socket is listening.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::qemu::opt_value;
use crate::{bin, wait_for, ChildGuard};

/// The qemu-storage-daemon binary.
pub const QEMU_STORAGE_DAEMON: &str = "qemu-storage-daemon";

/// How long a backend may take to start listening.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a backend could not be started.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The process could not be spawned.
    #[error("cannot start {0}")]
    Spawn(String, #[source] anyhow::Error),
    /// The log file could not be created.
    #[error("cannot create {0}")]
    Log(PathBuf, #[source] std::io::Error),
    /// It exited or never listened on its socket.
    #[error("{name} is not listening on {socket}: {log}")]
    NotListening {
        /// Which backend.
        name: String,
        /// The socket it should listen on.
        socket: PathBuf,
        /// Its log so far.
        log: String,
    },
}

/// Options of one vhost-user-blk backend (the subset both implementations take).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkBackendOptions {
    /// Raw image file.
    pub image: PathBuf,
    /// Socket to listen on.
    pub socket: PathBuf,
    /// Number of virtqueues.
    pub queues: u16,
    /// Export the image read-only.
    pub readonly: bool,
}

impl BlkBackendOptions {
    /// One queue, writable.
    pub fn new(image: &Path, socket: &Path) -> BlkBackendOptions {
        BlkBackendOptions {
            image: image.to_path_buf(),
            socket: socket.to_path_buf(),
            queues: 1,
            readonly: false,
        }
    }
}

/// A running backend: killed and reaped when dropped.
#[derive(Debug)]
pub struct RunningBackend {
    /// The process.
    pub guard: ChildGuard,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

impl RunningBackend {
    /// What the backend has logged so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Asks the backend to end (SIGTERM: both flush and exit) and waits for it.
    pub fn stop(mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.guard.signal(libc::SIGTERM);
        self.guard.wait_timeout(Duration::from_secs(20))
    }
}

/// The `plexvm-blk` command line for `opts` (see backends/blk/README.md).
pub fn plexvm_blk_args(opts: &BlkBackendOptions) -> Vec<String> {
    let mut args = vec![
        "--socket".to_string(),
        opts.socket.to_string_lossy().into_owned(),
        "--image".to_string(),
        opts.image.to_string_lossy().into_owned(),
        "--queues".to_string(),
        opts.queues.to_string(),
    ];
    if opts.readonly {
        args.push("--readonly".into());
    }
    args
}

/// The `qemu-storage-daemon` arguments for `opts`, without the socket address (the
/// export's `addr.*` keys are appended by [`qemu_storage_daemon_args`]).
fn qsd_export(opts: &BlkBackendOptions) -> String {
    format!(
        "type=vhost-user-blk,id=exp0,node-name=disk0,writable={},num-queues={},addr.type=unix,addr.path={}",
        if opts.readonly { "off" } else { "on" },
        opts.queues,
        opt_value(&opts.socket)
    )
}

/// The `qemu-storage-daemon` command line for `opts`: a raw image on a file node with
/// `discard=unmap` (so DISCARD deallocates, as in plexvm-blk), exported as
/// vhost-user-blk.
pub fn qemu_storage_daemon_args(opts: &BlkBackendOptions) -> Vec<String> {
    vec![
        "--blockdev".into(),
        format!(
            "driver=file,node-name=file0,filename={},discard=unmap,read-only={}",
            opt_value(&opts.image),
            if opts.readonly { "on" } else { "off" }
        ),
        "--blockdev".into(),
        format!(
            "driver=raw,node-name=disk0,file=file0,discard=unmap,read-only={}",
            if opts.readonly { "on" } else { "off" }
        ),
        "--export".into(),
        qsd_export(opts),
    ]
}

/// Starts `plexvm-blk` (from the workspace's build) for `opts`; its log goes to
/// `<socket>.log`.
pub fn spawn_plexvm_blk(opts: &BlkBackendOptions) -> Result<RunningBackend, BackendError> {
    let mut cmd = Command::new(bin("plexvm-blk"));
    cmd.args(plexvm_blk_args(opts));
    spawn_listening("plexvm-blk", cmd, &opts.socket)
}

/// Starts `qemu-storage-daemon` for `opts`; its log goes to `<socket>.log`.
pub fn spawn_qemu_storage_daemon(opts: &BlkBackendOptions) -> Result<RunningBackend, BackendError> {
    let mut cmd = Command::new(QEMU_STORAGE_DAEMON);
    cmd.args(qemu_storage_daemon_args(opts));
    spawn_listening(QEMU_STORAGE_DAEMON, cmd, &opts.socket)
}

fn spawn_listening(
    name: &str,
    mut cmd: Command,
    socket: &Path,
) -> Result<RunningBackend, BackendError> {
    let log = PathBuf::from(format!("{}.log", socket.display()));
    let out = fs::File::create(&log).map_err(|e| BackendError::Log(log.clone(), e))?;
    let err = out
        .try_clone()
        .map_err(|e| BackendError::Log(log.clone(), e))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let mut guard =
        ChildGuard::spawn(name, &mut cmd).map_err(|e| BackendError::Spawn(name.into(), e))?;
    let listening = wait_for(LISTEN_TIMEOUT, || {
        !guard.is_running() || is_listening(socket)
    }) && guard.is_running();
    if !listening {
        return Err(BackendError::NotListening {
            name: name.into(),
            socket: socket.to_path_buf(),
            log: fs::read_to_string(&log).unwrap_or_default(),
        });
    }
    Ok(RunningBackend { guard, log })
}

/// Whether a Unix socket bound to `path` is in the listening state, from
/// `/proc/net/unix` (flag `__SO_ACCEPTCON`, 0x10000). Unlike a test connection this
/// does not use up the backend's one frontend connection.
pub fn is_listening(path: &Path) -> bool {
    let Ok(table) = fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.len() >= 8
            && cols[7] == wanted
            && u32::from_str_radix(cols[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_socket_is_seen_and_a_bound_one_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listening = dir.path().join("l.sock");
        let _l = std::os::unix::net::UnixListener::bind(&listening).expect("bind");
        assert!(is_listening(&listening));
        assert!(!is_listening(&dir.path().join("missing.sock")));
    }

    #[test]
    fn readonly_is_passed_to_both_backends() {
        let mut opts = BlkBackendOptions::new(Path::new("/i,mg"), Path::new("/s"));
        opts.readonly = true;
        opts.queues = 2;
        assert!(plexvm_blk_args(&opts).contains(&"--readonly".to_string()));
        let qsd = qemu_storage_daemon_args(&opts).join(" ");
        assert!(qsd.contains("filename=/i,,mg"));
        assert!(qsd.contains("writable=off"));
        assert!(qsd.contains("num-queues=2"));
    }
}
