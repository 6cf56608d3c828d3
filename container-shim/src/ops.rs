//! The lifecycle commands after `create`: start, state, kill, delete, run,
//! list, ps, pause and resume, with the runtime-spec's rules on which status
//! allows which operation.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, signal, SigHandler, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::cgroups::{Cgroup, CgroupError};
use crate::cli::{OutputFormat, RunArgs};
use crate::create::{self, CreateError};
use crate::hooks::{self, HookKind};
use crate::state::{ContainerRecord, StateError, StateRoot, Status};

/// Errors of the lifecycle commands.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// State problem.
    #[error(transparent)]
    State(#[from] StateError),
    /// Cgroup problem.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// `create` (for `run`) failed.
    #[error(transparent)]
    Create(#[from] CreateError),
    /// The operation is not allowed in this status.
    #[error("cannot {op} container {id} that is {status}")]
    WrongStatus {
        /// The operation.
        op: &'static str,
        /// Container ID.
        id: String,
        /// Its status.
        status: Status,
    },
    /// kill on a stopped container (containerd matches this text).
    #[error("container not running")]
    NotRunning,
    /// A signal name or number that does not parse.
    #[error("invalid signal {0:?}")]
    BadSignal(String),
    /// Init died before `start` could release it.
    #[error("container init exited before start")]
    InitGone,
    /// The FIFO handshake failed.
    #[error("cannot {0} exec.fifo")]
    Fifo(&'static str, #[source] std::io::Error),
    /// A syscall failed.
    #[error("cannot {0}")]
    Sys(&'static str, #[source] nix::Error),
    /// The processes did not die after SIGKILL.
    #[error("container processes did not exit after SIGKILL")]
    KillTimeout,
}

type Result<T> = std::result::Result<T, OpsError>;

fn load_with_status(root: &StateRoot, id: &str) -> Result<(ContainerRecord, Status)> {
    let record = root.load(id)?;
    let status = record.status(&root.fifo(id)?);
    Ok((record, status))
}

/// `state`: the runtime-spec state JSON.
pub fn state(root: &StateRoot, id: &str) -> Result<String> {
    let (record, status) = load_with_status(root, id)?;
    Ok(serde_json::to_string_pretty(&record.oci_state(status)).unwrap_or_default())
}

/// `start`: releases init from the FIFO so it execs the user program.
pub fn start(root: &StateRoot, id: &str) -> Result<()> {
    let (record, status) = load_with_status(root, id)?;
    if status != Status::Created {
        return Err(OpsError::WrongStatus {
            op: "start",
            id: id.into(),
            status,
        });
    }
    start_created(root, &record)
}

/// `start` of a container known to be created (`run` has its record in
/// hand: reading state.json back would only delay init).
fn start_created(root: &StateRoot, record: &ContainerRecord) -> Result<()> {
    let fifo = root.fifo(&record.id)?;
    release_init(record, &fifo)?;
    let _ = std::fs::remove_file(&fifo);
    let state = record.oci_state(Status::Running).to_string();
    if let Err(e) = hooks::run_hooks(&record.config, HookKind::Poststart, &state) {
        crate::log::warn(&crate::sync::error_chain(&e));
    }
    Ok(())
}

/// Opens the FIFO for reading (non-blocking, so a dead init cannot hang us)
/// and waits for init's byte.
fn release_init(record: &ContainerRecord, fifo: &Path) -> Result<()> {
    let mut file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo)
        .map_err(|e| OpsError::Fifo("open", e))?;
    loop {
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(100u16)) {
            Ok(0) | Err(nix::Error::EINTR) => {
                if !record.init_alive() {
                    return Err(OpsError::InitGone);
                }
                continue;
            }
            Ok(_) => {}
            Err(e) => return Err(OpsError::Sys("poll exec.fifo", e)),
        }
        let mut byte = [0u8; 1];
        match file.read(&mut byte) {
            Ok(1) => return Ok(()),
            // Writer went away without writing: init died.
            Ok(_) => return Err(OpsError::InitGone),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(OpsError::Fifo("read", e)),
        }
    }
}

/// Parses `TERM`, `SIGTERM`, `sigterm` or `15`.
pub fn parse_signal(text: &str) -> Result<libc::c_int> {
    let bad = || OpsError::BadSignal(text.into());
    let (rtmin, rtmax) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    if let Ok(n) = text.parse::<libc::c_int>() {
        // Real-time signals (systemd's SIGRTMIN+3 shutdown request) are not
        // nix `Signal`s, so numbers are checked against the kernel's range.
        let valid = Signal::try_from(n).is_ok() || (rtmin..=rtmax).contains(&n);
        return valid.then_some(n).ok_or_else(bad);
    }
    let upper = text.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let rt = |base: libc::c_int, rest: &str, sign: libc::c_int| {
        let off: libc::c_int = if rest.is_empty() {
            0
        } else {
            rest.parse().ok()?
        };
        let n = base + sign * off;
        (rtmin..=rtmax).contains(&n).then_some(n)
    };
    if let Some(rest) = name.strip_prefix("RTMIN") {
        return rest
            .strip_prefix('+')
            .or((rest.is_empty()).then_some(""))
            .and_then(|r| rt(rtmin, r, 1))
            .ok_or_else(bad);
    }
    if let Some(rest) = name.strip_prefix("RTMAX") {
        return rest
            .strip_prefix('-')
            .or((rest.is_empty()).then_some(""))
            .and_then(|r| rt(rtmax, r, -1))
            .ok_or_else(bad);
    }
    format!("SIG{name}")
        .parse::<Signal>()
        .map(|s| s as libc::c_int)
        .map_err(|_| bad())
}

/// kill(2) with a raw signal number (nix's `Signal` has no real-time ones).
fn send_signal(pid: i32, sig: libc::c_int) -> nix::Result<()> {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    nix::Error::result(unsafe { libc::kill(pid, sig) }).map(drop)
}

/// `kill`: allowed while created, running or paused.
pub fn kill_container(root: &StateRoot, id: &str, sig: &str, all: bool) -> Result<()> {
    let signal = parse_signal(sig)?;
    let (record, status) = load_with_status(root, id)?;
    match status {
        Status::Created | Status::Running | Status::Paused => {}
        Status::Stopped => return Err(OpsError::NotRunning),
        Status::Creating => {
            return Err(OpsError::WrongStatus {
                op: "kill",
                id: id.into(),
                status,
            })
        }
    }
    if all {
        let cgroup = Cgroup::open(&record.cgroup_path, id)?;
        for pid in cgroup.pids()? {
            let _ = send_signal(pid, signal);
        }
    }
    send_signal(record.pid, signal).map_err(|e| OpsError::Sys("send signal", e))
}

/// `delete`: only a stopped container unless `force`; a missing container is
/// fine with `force` (runc behaves the same).
pub fn delete(root: &StateRoot, id: &str, force: bool) -> Result<()> {
    let (record, status) = match load_with_status(root, id) {
        Ok(r) => r,
        Err(OpsError::State(StateError::NotFound(_))) if force => {
            root.remove(id)?;
            return Ok(());
        }
        Err(OpsError::State(StateError::Corrupt { .. })) if force => {
            root.remove(id)?;
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    if status != Status::Stopped && !force {
        return Err(OpsError::WrongStatus {
            op: "delete",
            id: id.into(),
            status,
        });
    }
    let cgroup = Cgroup::open(&record.cgroup_path, id)?;
    if status != Status::Stopped {
        kill_all_and_wait(&record, &cgroup, status == Status::Paused)?;
    }
    cleanup(root, &record, &cgroup)
}

/// Removes cgroup and state, then runs poststop hooks.
fn cleanup(root: &StateRoot, record: &ContainerRecord, cgroup: &Cgroup) -> Result<()> {
    cgroup.remove()?;
    root.remove(&record.id)?;
    let state = record.oci_state(Status::Stopped).to_string();
    if let Err(e) = hooks::run_hooks(&record.config, HookKind::Poststop, &state) {
        crate::log::warn(&crate::sync::error_chain(&e));
    }
    Ok(())
}

fn kill_all_and_wait(record: &ContainerRecord, cgroup: &Cgroup, paused: bool) -> Result<()> {
    let _ = kill(Pid::from_raw(record.pid), Signal::SIGKILL);
    for pid in cgroup.pids().unwrap_or_default() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    if paused {
        // Frozen tasks only die once thawed.
        let _ = cgroup.freeze(false);
    }
    // SIGKILL cannot be ignored, so this ends quickly unless a task is stuck
    // in the kernel. A pidfd wakes us when init exits (no polling sleeps); it
    // is opened while init is known alive, so it cannot name a reused pid.
    let deadline = Instant::now() + Duration::from_secs(10);
    let pidfd = pidfd_open(record.pid);
    while record.init_alive() {
        // If init is our child (run), reap it.
        let _ = waitpid(
            Pid::from_raw(record.pid),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(OpsError::KillTimeout);
        }
        match &pidfd {
            Some(fd) => {
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
                let _ = poll(&mut fds, PollTimeout::from(ms));
                // A zombie child stays "alive" until reaped: reap, re-check.
                let _ = waitpid(
                    Pid::from_raw(record.pid),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                );
            }
            // No pidfd (kernel < 5.3): fall back to a short sleep.
            None => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    Ok(())
}

/// A pidfd for `pid` (readable once the process exits), if the kernel has
/// pidfd_open(2).
fn pidfd_open(pid: i32) -> Option<std::os::fd::OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    Some(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// `pause` / `resume`.
pub fn set_paused(root: &StateRoot, id: &str, pause: bool) -> Result<()> {
    let (mut record, status) = load_with_status(root, id)?;
    let ok = if pause {
        status == Status::Running
    } else {
        status == Status::Paused
    };
    if !ok {
        return Err(OpsError::WrongStatus {
            op: if pause { "pause" } else { "resume" },
            id: id.into(),
            status,
        });
    }
    Cgroup::open(&record.cgroup_path, id)?.freeze(pause)?;
    record.paused = pause;
    root.save(&record)?;
    Ok(())
}

/// `list`.
pub fn list(root: &StateRoot, format: OutputFormat, quiet: bool) -> Result<String> {
    let mut rows = Vec::new();
    for id in root.ids()? {
        if let Ok((record, status)) = load_with_status(root, &id) {
            rows.push(record.oci_state(status));
        }
    }
    if quiet {
        return Ok(rows
            .iter()
            .map(|r| format!("{}\n", r["id"].as_str().unwrap_or_default()))
            .collect());
    }
    if format == OutputFormat::Json {
        return Ok(serde_json::Value::Array(rows).to_string());
    }
    let mut out = String::from("ID\tPID\tSTATUS\tBUNDLE\tCREATED\tOWNER\n");
    for r in rows {
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\troot\n",
            r["id"].as_str().unwrap_or_default(),
            r["pid"],
            r["status"].as_str().unwrap_or_default(),
            r["bundle"].as_str().unwrap_or_default(),
            r["created"].as_str().unwrap_or_default(),
        ));
    }
    Ok(out)
}

/// `ps`: the container's pids (JSON array) or a PID/CMD table.
pub fn ps(root: &StateRoot, id: &str, format: OutputFormat) -> Result<String> {
    let record = root.load(id)?;
    let mut pids = Cgroup::open(&record.cgroup_path, id)?.pids()?;
    pids.sort_unstable();
    if format == OutputFormat::Json {
        return Ok(serde_json::to_string(&pids).unwrap_or_default());
    }
    let mut out = String::from("PID\tCMD\n");
    for pid in pids {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .trim_end()
                    .to_string()
            })
            .unwrap_or_default();
        out.push_str(&format!("{pid}\t{cmd}\n"));
    }
    Ok(out)
}

/// Waits for a child (or re-parented descendant) and maps its end to an exit
/// code: the code itself, or 128 + signal number.
pub fn wait_exit_code(pid: i32) -> i32 {
    loop {
        match waitpid(Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) | Err(nix::Error::EINTR) => continue,
            Err(_) => return 255,
        }
    }
}

static FORWARD_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = FORWARD_PID.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// `run`: create + start; unless detached, wait, delete and return the
/// container's exit code.
pub fn run(root: &StateRoot, args: &RunArgs, systemd: bool) -> Result<i32> {
    let created = create::create(root, &args.id, &args.opts, systemd)?;
    let (record, cgroup) = (created.record, created.cgroup);
    if let Err(e) = start_created(root, &record) {
        let _ = delete(root, &args.id, true);
        return Err(e);
    }
    if args.detach {
        return Ok(0);
    }
    FORWARD_PID.store(record.pid, Ordering::Relaxed);
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGWINCH,
    ] {
        // SAFETY: the handler only reads an atomic and calls kill(2).
        let _ = unsafe { signal(sig, SigHandler::Handler(forward_signal)) };
    }
    // We are init's subreaper (create made us one), so we can wait for it.
    let code = wait_exit_code(record.pid);
    if !args.keep {
        cleanup(root, &record, &cgroup)?;
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(parse_signal("TERM").unwrap(), libc::SIGTERM);
        assert_eq!(parse_signal("SIGKILL").unwrap(), libc::SIGKILL);
        assert_eq!(parse_signal("sigusr1").unwrap(), libc::SIGUSR1);
        assert_eq!(parse_signal("9").unwrap(), libc::SIGKILL);
        // podman sends systemd's shutdown signal by number.
        assert_eq!(parse_signal("37").unwrap(), libc::SIGRTMIN() + 3);
        assert_eq!(parse_signal("RTMIN+3").unwrap(), libc::SIGRTMIN() + 3);
        assert_eq!(parse_signal("SIGRTMAX-1").unwrap(), libc::SIGRTMAX() - 1);
        assert_eq!(parse_signal("SIGRTMIN").unwrap(), libc::SIGRTMIN());
        assert!(parse_signal("RTMIN+99").is_err());
        assert!(parse_signal("RTMIN3").is_err());
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("999").is_err());
        assert!(parse_signal("").is_err());
    }

    #[test]
    fn missing_container_errors_and_force_delete_is_ok() {
        let tmp = tempfile::tempdir().unwrap();
        let root = StateRoot::new(tmp.path());
        assert!(matches!(
            state(&root, "nope"),
            Err(OpsError::State(StateError::NotFound(_)))
        ));
        assert!(delete(&root, "nope", false).is_err());
        delete(&root, "nope", true).unwrap();
        assert_eq!(list(&root, OutputFormat::Json, false).unwrap(), "[]");
    }
}
