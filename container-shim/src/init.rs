//! The child side of `create`: the intermediate process (namespaces) and the
//! container's init (rootfs, credentials, wait for `start`, execve).
//!
//! These run after fork(2) of the single-threaded runtime, so ordinary Rust
//! (allocation, std I/O) is fine. They never return: they end in execve or
//! `_exit`, so nothing of the runtime's (destructors, atexit) runs twice.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::fcntl::{open, OFlag};
use nix::sys::signal::{signal, SigHandler, Signal};
use nix::sys::stat::{umask, Mode};
use nix::unistd::{fork, setresgid, setresuid, ForkResult, Gid, Uid};
use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};

use crate::console::{self, ConsoleError};
use crate::hooks::{self, HookError, HookKind};
use crate::namespaces::{self, NamespaceError, NsFile};
use crate::process::{self, ProcessError};
use crate::rootfs::{self, RootfsError, RootfsPlan};
use crate::seccomp::{CompiledProfile, SeccompError};
use crate::sync::{Channel, Message, SyncError};

/// Errors in the container's set-up (sent to the runtime over the channel).
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// Namespace set-up failed.
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    /// Rootfs set-up failed.
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    /// Process set-up failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The terminal could not be set up.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// A hook failed.
    #[error(transparent)]
    Hook(#[from] HookError),
    /// seccomp failed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// The channel to the runtime failed.
    #[error(transparent)]
    Sync(#[from] SyncError),
    /// A syscall failed.
    #[error("cannot {0}")]
    Sys(&'static str, #[source] nix::Error),
    /// A file operation failed.
    #[error("cannot {0}")]
    Io(&'static str, #[source] std::io::Error),
    /// Joining the container's cgroup failed.
    #[error("cannot join cgroup through {path}")]
    CgroupJoin {
        /// The `tasks` file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, InitError>;

/// Everything init needs, prepared by `create` before fork.
#[derive(Debug)]
pub struct InitContext {
    /// Container ID.
    pub id: String,
    /// The config.
    pub spec: Spec,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// Absolute rootfs path.
    pub rootfs: PathBuf,
    /// Container cgroup path.
    pub cgroup_path: PathBuf,
    /// cgroup v1 `tasks` files the intermediate child joins through.
    pub cgroup_join: Vec<PathBuf>,
    /// The state dir's exec.fifo.
    pub fifo: PathBuf,
    /// chroot instead of pivot_root.
    pub no_pivot: bool,
    /// Extra fds passed to the user program.
    pub preserve_fds: u32,
    /// Namespaces to join, in order.
    pub ns_files: Vec<NsFile>,
    /// The config creates a user namespace.
    pub new_userns: bool,
    /// Connected console socket when process.terminal is set.
    pub console: Option<UnixStream>,
    /// Compiled seccomp profile.
    pub seccomp: Option<CompiledProfile>,
    /// The runtime must run prestart/createRuntime hooks.
    pub runtime_hooks: bool,
}

impl InitContext {
    fn process(&self) -> &Process {
        // `spec::validate` made sure there is one.
        self.spec
            .process()
            .as_ref()
            .expect("validated config has a process")
    }
}

/// Ends the process without running the runtime's exit handlers.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions; it ends the process immediately.
    unsafe { libc::_exit(code) }
}

/// The intermediate child: joins/creates namespaces, forks init, reports its
/// pid and exits.
pub fn intermediate(ctx: InitContext, mut chan: Channel) -> ! {
    match intermediate_steps(&ctx, &mut chan) {
        Ok(ForkResult::Child) => container_init(ctx, chan),
        Ok(ForkResult::Parent { child }) => {
            let code = match chan.send(&Message::Pid {
                pid: child.as_raw(),
            }) {
                Ok(()) => 0,
                Err(_) => 1,
            };
            exit_now(code)
        }
        Err(e) => {
            chan.send_error(&e);
            exit_now(1)
        }
    }
}

fn intermediate_steps(ctx: &InitContext, chan: &mut Channel) -> Result<ForkResult> {
    // Join the cgroup before anything else, so the cgroup namespace
    // (unshared below) is rooted at the container's cgroup and init is
    // forked inside it: by ourselves on v1 (the runtime made it before the
    // fork), else the runtime moves us and then says Continue.
    if ctx.cgroup_join.is_empty() {
        chan.expect(&Message::Continue)?;
    } else {
        join_cgroup_self(&ctx.cgroup_join)?;
    }
    namespaces::join_all(&ctx.ns_files)?;
    if ctx.new_userns {
        namespaces::unshare_flags(nix::sched::CloneFlags::CLONE_NEWUSER)?;
        chan.send(&Message::IdMapsNeeded)?;
        chan.expect(&Message::Continue)?;
        // Become root of the new namespace (if 0 is mapped) for the set-up.
        let _ = setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0));
        let _ = setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0));
    }
    let flags = namespaces::new_namespace_flags(&ctx.spec)?;
    namespaces::unshare_flags(flags)?;
    if flags.contains(namespaces::clone_flag(LinuxNamespaceType::Time)) {
        namespaces::write_time_offsets(&ctx.spec)?;
    }
    // SAFETY: the runtime is single-threaded, so the child may do anything.
    unsafe { fork() }.map_err(|e| InitError::Sys("fork container init", e))
}

/// Moves this (single-threaded) process into each v1 hierarchy by writing
/// `0` to `tasks`: the kernel skips its global threadgroup lock for a thread
/// moving itself, where writing a pid to `cgroup.procs` waits for an RCU
/// grace period (see `cgroup_v1.rs`).
pub fn join_cgroup_self(tasks_files: &[PathBuf]) -> Result<()> {
    for path in tasks_files {
        let file = File::options().write(true).open(path);
        file.and_then(|mut f| f.write_all(b"0"))
            .map_err(|source| InitError::CgroupJoin {
                path: path.clone(),
                source,
            })?;
    }
    Ok(())
}

/// Container init: never returns.
fn container_init(ctx: InitContext, mut chan: Channel) -> ! {
    let prepared = match init_before_start(&ctx, &mut chan) {
        Ok(p) => p,
        Err(e) => {
            chan.send_error(&e);
            exit_now(1)
        }
    };
    let err = init_after_start(&ctx, prepared, chan);
    let _ = writeln!(
        std::io::stderr(),
        "plexvm-shim: container init: {}",
        crate::sync::error_chain(&err)
    );
    exit_now(127)
}

/// What init has ready when it reports `Ready`.
struct Prepared {
    fifo: Option<OwnedFd>,
    exe: PathBuf,
    args: Vec<CString>,
    env: Vec<CString>,
}

fn init_before_start(ctx: &InitContext, chan: &mut Channel) -> Result<Prepared> {
    let process = ctx.process();
    if let Some(adj) = process.oom_score_adj() {
        process::write_oom_score_adj(Path::new("/proc/self"), adj)?;
    }
    process::apply_rlimits(process)?;
    let plan = RootfsPlan {
        spec: &ctx.spec,
        rootfs: &ctx.rootfs,
        bundle: &ctx.bundle,
        cgroup_path: &ctx.cgroup_path,
        // Also rootless: the runtime itself runs in a user namespace.
        in_userns: crate::spec::has_namespace(&ctx.spec, LinuxNamespaceType::User)
            || crate::cli::is_rootless(),
        own_mount_ns: crate::spec::creates_namespace(&ctx.spec, LinuxNamespaceType::Mount),
    };
    rootfs::prepare(&plan)?;
    // Held as O_PATH and reopened for writing after the pivot (runc's trick).
    let fifo = open(&ctx.fifo, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| InitError::Sys("open exec.fifo", e))?;
    // SAFETY: `open` just returned this fd and nothing else owns it.
    let fifo: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fifo) };
    if ctx.runtime_hooks {
        chan.send(&Message::RuntimeHooks)?;
        chan.expect(&Message::Continue)?;
    }
    let state = hook_state(ctx, "created");
    hooks::run_hooks(&ctx.spec, HookKind::CreateContainer, &state)?;
    let mode = if !crate::spec::has_namespace(&ctx.spec, LinuxNamespaceType::Mount) {
        rootfs::Enter::Chroot
    } else if ctx.no_pivot {
        rootfs::Enter::MoveAndChroot
    } else {
        rootfs::Enter::PivotRoot
    };
    rootfs::enter(&ctx.rootfs, mode)?;
    rootfs::finish(&ctx.spec)?;
    if process.terminal().unwrap_or(false) {
        if let Some(sock) = &ctx.console {
            console::setup_terminal(sock, process, true)?;
        }
    }
    let mut prepared = finalize_process(process, ctx.seccomp.as_ref())?;
    prepared.fifo = Some(fifo);
    chan.send(&Message::Ready)?;
    Ok(prepared)
}

/// Credentials, cwd, umask and the executable: shared by init and exec.
fn finalize_process(process: &Process, seccomp: Option<&CompiledProfile>) -> Result<Prepared> {
    let nnp = process.no_new_privileges().unwrap_or(false);
    if let (false, Some(profile)) = (nnp, seccomp) {
        // Without no_new_privs the filter needs CAP_SYS_ADMIN: install it
        // while we still have it.
        profile.install()?;
    }
    let env = process::environment(process);
    process::switch_user_and_caps(process)?;
    nix::unistd::chdir(process.cwd()).map_err(|e| InitError::Sys("chdir to process.cwd", e))?;
    if nnp {
        process::set_no_new_privs()?;
    }
    let mask = process.user().umask().unwrap_or(0o022);
    umask(Mode::from_bits_truncate(mask));
    let args = process.args().clone().unwrap_or_default();
    let Some(program) = args.first() else {
        return Err(ProcessError::NotFound("(process.args is empty)".into()).into());
    };
    let exe = process::find_executable(program, &env)?;
    Ok(Prepared {
        fifo: None,
        exe,
        args: process::cstrings(&args)?,
        env: process::cstrings(&env)?,
    })
}

extern "C" fn exit_on_signal(sig: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + sig) }
}

/// Waits for `start`, runs startContainer hooks, execs. Returns only errors.
fn init_after_start(ctx: &InitContext, prepared: Prepared, chan: Channel) -> InitError {
    // pid 1 of a pid namespace only gets signals it handles: let `kill` end
    // a created container that never started.
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        // SAFETY: the handler only calls the async-signal-safe _exit.
        let _ = unsafe { signal(sig, SigHandler::Handler(exit_on_signal)) };
    }
    drop(chan);
    if let Some(fifo) = &prepared.fifo {
        if let Err(e) = wait_for_start(fifo) {
            return e;
        }
    }
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        // SAFETY: restoring the default disposition has no preconditions.
        let _ = unsafe { signal(sig, SigHandler::SigDfl) };
    }
    let state = hook_state(ctx, "running");
    if let Err(e) = hooks::run_hooks(&ctx.spec, HookKind::StartContainer, &state) {
        return e.into();
    }
    exec_prepared(
        prepared,
        ctx.preserve_fds,
        ctx.seccomp.as_ref(),
        ctx.process(),
    )
}

fn wait_for_start(fifo: &OwnedFd) -> Result<()> {
    let path = format!("/proc/self/fd/{}", fifo.as_raw_fd());
    // Blocks until `start` opens the FIFO for reading.
    let mut file = loop {
        match File::options().write(true).open(&path) {
            Ok(f) => break f,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(InitError::Io("open exec.fifo", e)),
        }
    };
    file.write_all(b"0")
        .map_err(|e| InitError::Io("write exec.fifo", e))
}

/// The last steps before the user program: fd hygiene, late seccomp, execve.
fn exec_prepared(
    prepared: Prepared,
    preserve_fds: u32,
    seccomp: Option<&CompiledProfile>,
    process: &Process,
) -> InitError {
    drop(prepared.fifo);
    if let Err(e) = process::cloexec_fds_from(3 + preserve_fds as i32) {
        return e.into();
    }
    if let (true, Some(profile)) = (process.no_new_privileges().unwrap_or(false), seccomp) {
        // With no_new_privs the filter goes last, so it only has to allow execve.
        if let Err(e) = profile.install() {
            return e.into();
        }
    }
    process::exec(&prepared.exe, &prepared.args, &prepared.env).into()
}

fn hook_state(ctx: &InitContext, status: &str) -> String {
    let annotations = ctx.spec.annotations().clone().unwrap_or_default();
    serde_json::json!({
        "ociVersion": crate::OCI_VERSION,
        "id": ctx.id,
        "status": status,
        "pid": std::process::id(),
        "bundle": ctx.bundle,
        "annotations": annotations,
    })
    .to_string()
}

/// The process side of `exec`: runs in the joined namespaces.
pub fn exec_process(
    process: &Process,
    seccomp: Option<&CompiledProfile>,
    console: Option<&UnixStream>,
    preserve_fds: u32,
) -> InitError {
    let prepared = (|| -> Result<Prepared> {
        process::apply_rlimits(process)?;
        if let (true, Some(sock)) = (process.terminal().unwrap_or(false), console) {
            console::setup_terminal(sock, process, false)?;
        }
        finalize_process(process, seccomp)
    })();
    match prepared {
        Ok(p) => exec_prepared(p, preserve_fds, seccomp, process),
        Err(e) => e,
    }
}
