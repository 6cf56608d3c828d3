//! plexvm's OCI runtime.
//!
//! `plexvm-shim` speaks runc's command line, so podman (through conmon) and
//! containerd (through `containerd-shim-runc-v2`) can run containers with it.
//! A container is a process tree in its own namespaces and cgroup, set up from
//! the bundle's `config.json` (runtime-spec 1.x).
//!
//! How `create` works (see `create.rs` and `init.rs`): the runtime forks an
//! intermediate child that joins or creates the namespaces, which forks the
//! container's init (pid 1 of a new pid namespace). Init mounts the rootfs,
//! pivots into it, drops privileges and then blocks opening the state dir's
//! `exec.fifo` for writing; `start` opens the FIFO for reading, which lets init
//! `execve` the user program. Runtime and children talk over a socketpair
//! ([`sync`]) so that every failure before the user program reaches the caller
//! of `create`, which then removes everything it made.

pub mod cgroup_v1;
pub mod cgroups;
pub mod cli;
pub mod cloned_exe;
pub mod console;
pub mod create;
pub mod exec;
pub mod features;
pub mod hooks;
pub mod init;
pub mod log;
pub mod mounts;
pub mod namespaces;
pub mod ops;
pub mod process;
pub mod rootfs;
pub mod seccomp;
pub mod spec;
pub mod state;
pub mod sync;

/// The runtime-spec version this runtime implements (reported by `state`,
/// `features` and `--version`).
pub const OCI_VERSION: &str = "1.2.0";
