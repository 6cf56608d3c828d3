//! The runtime side of `create`.
//!
//! A failed `create` leaves nothing behind: [`CreateGuard`] kills and reaps
//! the container process, removes the cgroup and the state dir unless the
//! create finished. The runtime is a child subreaper while it runs, so init
//! (the intermediate child's child) is re-parented to it and can be reaped
//! here; when `create` exits, init goes on to the caller's subreaper (conmon,
//! containerd-shim) like runc's init does.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::sys::signal::{kill, Signal};
use nix::sys::stat::Mode;
use nix::sys::wait::waitpid;
use nix::unistd::{fork, mkfifo, ForkResult, Pid};
use oci_spec::runtime::LinuxNamespaceType;

use crate::cgroups::{self, Cgroup, CgroupError};
use crate::cli::CreateOpts;
use crate::console::{self, ConsoleError};
use crate::hooks::{self, HookError, HookKind};
use crate::init::{self, InitContext};
use crate::namespaces::{self, NamespaceError};
use crate::seccomp::{self, CompiledProfile, SeccompError};
use crate::spec::{self, SpecError};
use crate::state::{proc_stat, ContainerRecord, StateError, StateRoot, Status};
use crate::sync::{Channel, Message, SyncError};

/// Errors of `create`.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// Bad bundle or config.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// State directory problem.
    #[error(transparent)]
    State(#[from] StateError),
    /// Cgroup problem.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// Namespace problem.
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    /// Console problem.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// seccomp profile problem.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// A hook failed.
    #[error(transparent)]
    Hook(#[from] HookError),
    /// The container process failed during set-up.
    #[error("container set-up failed")]
    Sync(#[from] SyncError),
    /// A syscall failed.
    #[error("cannot {0}")]
    Sys(&'static str, #[source] nix::Error),
    /// A file operation failed.
    #[error("cannot {0}")]
    Io(&'static str, #[source] std::io::Error),
    /// Writing the pid file failed.
    #[error("cannot write pid file {path}")]
    PidFile {
        /// The pid file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, CreateError>;

/// Undoes a partial create when dropped while armed.
#[derive(Debug)]
pub struct CreateGuard<'a> {
    root: &'a StateRoot,
    id: String,
    cgroup: Option<&'a Cgroup>,
    pids: Vec<i32>,
    armed: bool,
}

impl Drop for CreateGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for pid in self.pids.iter().rev() {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(*pid), None);
        }
        if let Some(cg) = &self.cgroup {
            let _ = cg.remove();
        }
        let _ = self.root.remove(&self.id);
    }
}

/// Makes the calling process a child subreaper (orphaned descendants are
/// re-parented to it, so it can wait for them).
pub fn become_subreaper() -> Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and no pointers.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    nix::Error::result(rc)
        .map(drop)
        .map_err(|e| CreateError::Sys("become child subreaper", e))
}

/// Writes `pid` to `path` atomically (temp file + rename), as runc does.
pub fn write_pid_file(path: &Path, pid: i32) -> Result<()> {
    let err = |source| CreateError::PidFile {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, pid.to_string()).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Result of a successful create.
#[derive(Debug)]
pub struct Created {
    /// The saved state.
    pub record: ContainerRecord,
    /// The container's cgroup (opening it again costs mountinfo scans).
    pub cgroup: Cgroup,
}

/// Loads and checks the bundle and compiles its seccomp profile.
fn load_checked(opts: &CreateOpts) -> Result<(spec::Bundle, Option<CompiledProfile>)> {
    let bundle = spec::load_bundle(&opts.bundle)?;
    let spec = &bundle.spec;
    // Without a mount namespace of its own the container is set up in the
    // runtime's (or a joined) namespace, as runc does (see rootfs::Enter).
    let terminal = spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    if terminal && opts.console_socket.is_none() {
        return Err(ConsoleError::NoSocket.into());
    }
    let seccomp = match spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        Some(profile) => Some(seccomp::compile(profile)?),
        None => None,
    };
    Ok((bundle, seccomp))
}

fn make_fifo(dir: &Path) -> Result<PathBuf> {
    let fifo = dir.join(crate::state::EXEC_FIFO);
    mkfifo(&fifo, Mode::from_bits_truncate(0o622))
        .map_err(|e| CreateError::Sys("create exec.fifo", e))?;
    // The user may be non-root: it opens the FIFO for writing (umask-proof).
    std::fs::set_permissions(&fifo, std::fs::Permissions::from_mode(0o622))
        .map_err(|e| CreateError::Io("chmod exec.fifo", e))?;
    Ok(fifo)
}

/// Connects the console socket (when needed) and opens the namespaces to join.
fn init_context(
    id: &str,
    opts: &CreateOpts,
    bundle: spec::Bundle,
    seccomp: Option<CompiledProfile>,
    cgroup: &Cgroup,
    cgroup_path: PathBuf,
    fifo: PathBuf,
) -> Result<InitContext> {
    let spec = bundle.spec;
    let terminal = spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    let console = match (&opts.console_socket, terminal) {
        (Some(path), true) => Some(console::connect(path)?),
        _ => None,
    };
    let runtime_hooks = !hooks::hooks_of(&spec, HookKind::Prestart).is_empty()
        || !hooks::hooks_of(&spec, HookKind::CreateRuntime).is_empty();
    Ok(InitContext {
        id: id.to_string(),
        ns_files: namespaces::open_configured(&spec)?,
        new_userns: spec::creates_namespace(&spec, LinuxNamespaceType::User),
        spec,
        bundle: bundle.dir,
        rootfs: bundle.rootfs,
        cgroup_path,
        cgroup_join: cgroup.self_join_files(),
        fifo,
        no_pivot: opts.no_pivot,
        preserve_fds: opts.preserve_fds,
        console,
        seccomp,
        runtime_hooks,
    })
}

/// Forks the intermediate child; returns the context back with the channel.
fn spawn_intermediate(ctx: InitContext) -> Result<(InitContext, Channel, i32)> {
    let (chan, child_chan) = Channel::pair()?;
    // SAFETY: the runtime is single-threaded; the child only runs `intermediate`.
    match unsafe { fork() }.map_err(|e| CreateError::Sys("fork", e))? {
        ForkResult::Child => {
            drop(chan);
            init::intermediate(ctx, child_chan)
        }
        ForkResult::Parent { child } => Ok((ctx, chan, child.as_raw())),
    }
}

/// `create`: sets the container up; the user program waits for `start`.
pub fn create(root: &StateRoot, id: &str, opts: &CreateOpts, systemd: bool) -> Result<Created> {
    let (bundle, seccomp) = load_checked(opts)?;
    let cgroup_path = cgroups::cgroup_path(&bundle.spec, id, systemd)?;
    // Opening creates nothing yet (joining does).
    let cgroup = Cgroup::open(&cgroup_path, id)?;
    let dir = root.create_dir(id)?;
    let mut guard = CreateGuard {
        root,
        id: id.to_string(),
        cgroup: None,
        pids: Vec::new(),
        armed: true,
    };
    let mut record = ContainerRecord {
        id: id.to_string(),
        pid: 0,
        pid_start_time: 0,
        bundle: bundle.dir.clone(),
        rootfs: bundle.rootfs.clone(),
        created: crate::log::rfc3339_now(),
        creating: true,
        paused: false,
        cgroup_path: cgroup_path.clone(),
        config: bundle.spec.clone(),
    };
    root.save(&record)?;
    let fifo = make_fifo(&dir)?;
    let ctx = init_context(id, opts, bundle, seccomp, &cgroup, cgroup_path, fifo)?;
    guard.cgroup = Some(&cgroup);
    // On v1 the cgroup is made and limited before the fork, so the child
    // can join it at once, without a round trip to us.
    cgroup.prepare(&ctx.spec)?;
    become_subreaper()?;
    let (ctx, mut chan, child) = spawn_intermediate(ctx)?;
    guard.pids.push(child);
    let init_pid = drive_child(&mut guard, &mut chan, &ctx, &record, child)?;
    record.pid = init_pid;
    record.pid_start_time = proc_stat(init_pid).map(|(_, t)| t).unwrap_or(0);
    record.creating = false;
    root.save(&record)?;
    if let Some(path) = &opts.pid_file {
        write_pid_file(path, init_pid)?;
    }
    guard.armed = false;
    drop(guard);
    Ok(Created { record, cgroup })
}

/// The runtime's half of the set-up dialogue; returns init's pid.
fn drive_child(
    guard: &mut CreateGuard<'_>,
    chan: &mut Channel,
    ctx: &InitContext,
    record: &ContainerRecord,
    child: i32,
) -> Result<i32> {
    if ctx.cgroup_join.is_empty() {
        // The child cannot join by itself (cgroup v2): move it in.
        if let Some(cg) = &guard.cgroup {
            cg.adopt(child, &ctx.spec)?;
        }
        chan.send(&Message::Continue)?;
    }
    if ctx.new_userns {
        chan.expect(&Message::IdMapsNeeded)?;
        namespaces::write_id_maps(child, &ctx.spec)?;
        chan.send(&Message::Continue)?;
    }
    let init_pid = match chan.recv()? {
        Message::Pid { pid } => pid,
        other => return Err(SyncError::Unexpected(format!("{other:?}")).into()),
    };
    guard.pids.push(init_pid);
    if ctx.runtime_hooks {
        chan.expect(&Message::RuntimeHooks)?;
        let mut rec = record.clone();
        rec.pid = init_pid;
        let state = rec.oci_state(Status::Creating).to_string();
        hooks::run_hooks(&ctx.spec, HookKind::Prestart, &state)?;
        hooks::run_hooks(&ctx.spec, HookKind::CreateRuntime, &state)?;
        chan.send(&Message::Continue)?;
    }
    chan.expect(&Message::Ready)?;
    // The intermediate child exited right after sending the pid; reaping it
    // only now spares a wait (and a wake-up) while init sets itself up.
    let _ = waitpid(Pid::from_raw(child), None);
    guard.pids.retain(|p| *p != child);
    Ok(init_pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_file_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pidfile");
        write_pid_file(&path, 1234).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1234");
        write_pid_file(&path, 5).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "5");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
