//! `exec`: a new process in a running container's namespaces and cgroup.
//!
//! Same shape as `create`: an intermediate child joins the namespaces and
//! forks the process (so it lands in the container's pid namespace); the
//! process reports failures over the close-on-exec channel, and a clean EOF
//! means execve succeeded.

use std::path::PathBuf;

use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult, Pid};
use oci_spec::runtime::{Capabilities, Capability, Process};

use crate::cgroups::{Cgroup, CgroupError};
use crate::cli::ExecArgs;
use crate::console::{self, ConsoleError};
use crate::create::{become_subreaper, write_pid_file, CreateError};
use crate::init::{self, exit_now};
use crate::namespaces::{self, NamespaceError};
use crate::seccomp::{self, SeccompError};
use crate::state::{StateError, StateRoot, Status};
use crate::sync::{Channel, Message, SyncError};

/// Errors of `exec`.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// State problem.
    #[error(transparent)]
    State(#[from] StateError),
    /// The container is not running.
    #[error("cannot exec in a {0} container")]
    NotRunning(Status),
    /// --process file problem.
    #[error("cannot read process file {path}")]
    ProcessFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// --process file is not a runtime-spec process.
    #[error("invalid process file {path}")]
    ProcessJson {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// Neither --process nor a command.
    #[error("exec needs --process or a command")]
    NoCommand,
    /// A --user or --cap value that does not parse.
    #[error("invalid {0}")]
    BadArg(String),
    /// Namespace problem.
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    /// Cgroup problem.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The child could not join the cgroup.
    #[error(transparent)]
    Join(#[from] init::InitError),
    /// Console problem.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// seccomp problem.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// Runtime helper problem.
    #[error(transparent)]
    Create(#[from] CreateError),
    /// The process failed to start.
    #[error("exec failed")]
    Sync(#[from] SyncError),
    /// A syscall failed.
    #[error("cannot {0}")]
    Sys(&'static str, #[source] nix::Error),
}

type Result<T> = std::result::Result<T, ExecError>;

/// The process to run: from --process, or the container's process with the
/// command line's arguments and options.
fn build_process(args: &ExecArgs, base: Option<&Process>) -> Result<Process> {
    if let Some(path) = &args.process {
        let data = std::fs::read(path).map_err(|source| ExecError::ProcessFile {
            path: path.clone(),
            source,
        })?;
        return serde_json::from_slice(&data).map_err(|source| ExecError::ProcessJson {
            path: path.clone(),
            source,
        });
    }
    if args.args.is_empty() {
        return Err(ExecError::NoCommand);
    }
    let mut p = base.cloned().unwrap_or_default();
    p.set_args(Some(args.args.clone()));
    p.set_terminal(Some(args.tty));
    if let Some(cwd) = &args.cwd {
        p.set_cwd(cwd.clone());
    }
    let mut env = p.env().clone().unwrap_or_default();
    env.extend(args.env.iter().cloned());
    p.set_env(Some(env));
    if let Some(user) = &args.user {
        let (uid, gid) = user.split_once(':').unwrap_or((user, "0"));
        let bad = || ExecError::BadArg(format!("--user {user:?}"));
        p.user_mut().set_uid(uid.parse().map_err(|_| bad())?);
        p.user_mut().set_gid(gid.parse().map_err(|_| bad())?);
    }
    if !args.additional_gids.is_empty() {
        p.user_mut()
            .set_additional_gids(Some(args.additional_gids.clone()));
    }
    if args.no_new_privs {
        p.set_no_new_privileges(Some(true));
    }
    if !args.caps.is_empty() {
        add_caps(&mut p, &args.caps)?;
    }
    Ok(p)
}

fn add_caps(p: &mut Process, names: &[String]) -> Result<()> {
    let mut caps = p.capabilities().clone().unwrap_or_default();
    let mut extra = Capabilities::new();
    for name in names {
        let bare = name.strip_prefix("CAP_").unwrap_or(name);
        let cap: Capability = bare
            .parse()
            .map_err(|_| ExecError::BadArg(format!("capability {name:?}")))?;
        extra.insert(cap);
    }
    let add = |set: &Option<Capabilities>| {
        let mut s = set.clone().unwrap_or_default();
        s.extend(extra.iter().copied());
        Some(s)
    };
    caps.set_bounding(add(caps.bounding()));
    caps.set_effective(add(caps.effective()));
    caps.set_permitted(add(caps.permitted()));
    p.set_capabilities(Some(caps));
    Ok(())
}

/// `exec`; returns the exit code for the runtime to exit with.
pub fn exec(root: &StateRoot, args: &ExecArgs) -> Result<i32> {
    let record = root.load(&args.id)?;
    let status = record.status(&root.fifo(&args.id)?);
    if !matches!(status, Status::Created | Status::Running) {
        return Err(ExecError::NotRunning(status));
    }
    let process = build_process(args, record.config.process().as_ref())?;
    let terminal = process.terminal().unwrap_or(false);
    let console = match (&args.console_socket, terminal) {
        (Some(path), true) => Some(console::connect(path)?),
        (None, true) => return Err(ConsoleError::NoSocket.into()),
        _ => None,
    };
    let seccomp = match record
        .config
        .linux()
        .as_ref()
        .and_then(|l| l.seccomp().as_ref())
    {
        Some(profile) => Some(seccomp::compile(profile)?),
        None => None,
    };
    let ns_files = namespaces::open_of_process(record.pid, &record.config)?;
    let cgroup = Cgroup::open(&record.cgroup_path, &args.id)?;
    let cgroup_join = cgroup.self_join_files();
    become_subreaper()?;
    let (mut chan, child_chan) = Channel::pair()?;
    // SAFETY: the runtime is single-threaded; the child only joins and forks.
    let child = match unsafe { fork() }.map_err(|e| ExecError::Sys("fork", e))? {
        ForkResult::Child => {
            drop(chan);
            let child = ExecChild {
                process: &process,
                seccomp: seccomp.as_ref(),
                console: console.as_ref(),
                preserve_fds: args.preserve_fds,
                cgroup_join: &cgroup_join,
            };
            child.run(&ns_files, child_chan)
        }
        ForkResult::Parent { child } => child,
    };
    drop(child_chan);
    drop(console);
    let pid = drive_exec(
        &mut chan,
        (cgroup_join.is_empty()).then_some(&cgroup),
        child,
    )?;
    if let Some(path) = &args.pid_file {
        write_pid_file(path, pid)?;
    }
    if args.detach {
        return Ok(0);
    }
    Ok(crate::ops::wait_exit_code(pid))
}

/// What the intermediate child of `exec` needs.
struct ExecChild<'a> {
    process: &'a Process,
    seccomp: Option<&'a crate::seccomp::CompiledProfile>,
    console: Option<&'a std::os::unix::net::UnixStream>,
    preserve_fds: u32,
    cgroup_join: &'a [PathBuf],
}

impl ExecChild<'_> {
    /// Joins the cgroup (by itself on v1, see `cgroup_v1.rs`; else the
    /// runtime moves it and says Continue) and the namespaces, forks the
    /// process; never returns.
    fn run(&self, ns_files: &[namespaces::NsFile], mut chan: Channel) -> ! {
        let in_cgroup = if self.cgroup_join.is_empty() {
            chan.expect(&Message::Continue).map_err(ExecError::from)
        } else {
            init::join_cgroup_self(self.cgroup_join).map_err(ExecError::from)
        };
        let joined =
            in_cgroup.and_then(|()| namespaces::join_all(ns_files).map_err(ExecError::from));
        if let Err(e) = joined {
            chan.send_error(&e);
            exit_now(1);
        }
        // SAFETY: still single-threaded.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                let err =
                    init::exec_process(self.process, self.seccomp, self.console, self.preserve_fds);
                chan.send_error(&err);
                exit_now(127)
            }
            Ok(ForkResult::Parent { child }) => {
                let ok = chan
                    .send(&Message::Pid {
                        pid: child.as_raw(),
                    })
                    .is_ok();
                exit_now(if ok { 0 } else { 1 })
            }
            Err(e) => {
                chan.send_error(&ExecError::Sys("fork", e));
                exit_now(1)
            }
        }
    }
}

/// `cgroup` is the cgroup to move the child into, or `None` when the child
/// joins by itself.
fn drive_exec(chan: &mut Channel, cgroup: Option<&Cgroup>, child: Pid) -> Result<i32> {
    let result = (|| -> Result<i32> {
        if let Some(cgroup) = cgroup {
            cgroup.join(child.as_raw())?;
            chan.send(&Message::Continue)?;
        }
        let pid = match chan.recv()? {
            Message::Pid { pid } => pid,
            other => return Err(SyncError::Unexpected(format!("{other:?}")).into()),
        };
        match chan.recv_or_eof()? {
            None => Ok(pid),
            Some(Message::Error { msg }) => {
                let _ = waitpid(Pid::from_raw(pid), None);
                Err(SyncError::Child(msg).into())
            }
            Some(other) => Err(SyncError::Unexpected(format!("{other:?}")).into()),
        }
    })();
    let _ = waitpid(child, None);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn exec_args(argv: &[&str]) -> ExecArgs {
        let mut full = vec!["plexvm-shim", "exec"];
        full.extend_from_slice(argv);
        match crate::cli::Cli::try_parse_from(full).unwrap().command {
            crate::cli::Command::Exec(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn command_line_overrides_base_process() {
        let base = Process::default();
        let args = exec_args(&[
            "-e",
            "A=1",
            "-u",
            "1000:1001",
            "--cwd",
            "/tmp",
            "--cap",
            "CAP_SYS_ADMIN",
            "c1",
            "ls",
            "-l",
        ]);
        let p = build_process(&args, Some(&base)).unwrap();
        assert_eq!(p.args().as_deref().unwrap(), ["ls", "-l"]);
        assert!(p.env().as_ref().unwrap().contains(&"A=1".to_string()));
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 1001));
        assert_eq!(p.cwd(), &PathBuf::from("/tmp"));
        let caps = p.capabilities().as_ref().unwrap();
        assert!(caps
            .effective()
            .as_ref()
            .unwrap()
            .contains(&Capability::SysAdmin));
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(matches!(
            build_process(&exec_args(&["c1"]), None),
            Err(ExecError::NoCommand)
        ));
        assert!(matches!(
            build_process(&exec_args(&["-u", "x", "c1", "sh"]), None),
            Err(ExecError::BadArg(_))
        ));
        assert!(matches!(
            build_process(&exec_args(&["--cap", "CAP_NOPE", "c1", "sh"]), None),
            Err(ExecError::BadArg(_))
        ));
        assert!(matches!(
            build_process(&exec_args(&["-p", "/nonexistent.json", "c1"]), None),
            Err(ExecError::ProcessFile { .. })
        ));
    }
}
