//! The runc-compatible command line.
//!
//! Flag names and defaults follow runc 1.1 (`runc --help`), because podman's
//! conmon and containerd's runc shim build these command lines themselves.
//! Flags that runc has and that have no meaning here (`--criu`,
//! `--no-new-keyring`, ...) are accepted and ignored so those callers work.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Default state directory (runc uses /run/runc).
pub const DEFAULT_ROOT: &str = "/run/plexvm-shim";

impl Cli {
    /// The state directory: `--root`, else runc's rule: rootless (not root,
    /// or root of a user namespace that is not the host's, as under rootless
    /// podman) with $XDG_RUNTIME_DIR set → `$XDG_RUNTIME_DIR/plexvm-shim`.
    pub fn root_dir(&self) -> PathBuf {
        if let Some(root) = &self.root {
            return root.clone();
        }
        match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(dir) if !dir.is_empty() && is_rootless() => PathBuf::from(dir).join("plexvm-shim"),
            _ => PathBuf::from(DEFAULT_ROOT),
        }
    }
}

/// Not host root: a non-zero euid, or a user namespace other than the
/// initial one (whose uid_map is the identity over all ids).
pub fn is_rootless() -> bool {
    if !nix::unistd::geteuid().is_root() {
        return true;
    }
    let map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let fields: Vec<&str> = map.split_whitespace().collect();
    fields != ["0", "0", "4294967295"]
}

/// plexvm's OCI container runtime (runc-compatible command line).
#[derive(Debug, Parser)]
#[command(name = "plexvm-shim", version = VERSION_TEXT, disable_version_flag = true)]
pub struct Cli {
    /// Root directory for storage of container state (tmpfs recommended;
    /// default /run/plexvm-shim, or $XDG_RUNTIME_DIR/plexvm-shim when
    /// rootless, as runc).
    #[arg(long, global = true)]
    pub root: Option<PathBuf>,
    /// Log file for errors and debug messages (default: stderr only).
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    /// Format of the log file.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Enable debug output in the log.
    #[arg(long, global = true)]
    pub debug: bool,
    /// Treat `linux.cgroupsPath` as systemd's `slice:prefix:name`.
    #[arg(long, global = true)]
    pub systemd_cgroup: bool,
    /// Accepted for runc compatibility; checkpointing is not supported.
    #[arg(long, global = true, hide = true)]
    pub criu: Option<String>,
    /// Accepted for runc compatibility (true, false or auto).
    #[arg(long, global = true, hide = true)]
    pub rootless: Option<String>,
    /// Print the version.
    #[arg(short = 'v', long = "version", action = clap::ArgAction::Version)]
    pub version: Option<bool>,
    #[command(subcommand)]
    pub command: Command,
}

/// `--version` text: our version and the runtime-spec version (runc's shape).
const VERSION_TEXT: &str = concat!(env!("CARGO_PKG_VERSION"), "\nspec: 1.2.0");

/// Format of `--log` lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `time level msg` lines.
    Text,
    /// One JSON object per line: `{"level":..,"msg":..,"time":..}`.
    Json,
}

/// Output format of `list` and `ps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable table.
    Table,
    /// JSON.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a container (the user program waits for `start`).
    Create(CreateArgs),
    /// Run the user program of a created container.
    Start(IdArg),
    /// Print the state of a container as runtime-spec state JSON.
    State(IdArg),
    /// Send a signal to the container's init process (default SIGTERM).
    Kill(KillArgs),
    /// Delete a stopped container and its resources.
    Delete(DeleteArgs),
    /// Create and start a container, wait for it and exit with its status.
    Run(RunArgs),
    /// Run a new process inside a running container.
    Exec(ExecArgs),
    /// List the containers under --root.
    List(ListArgs),
    /// List the processes of a container.
    Ps(PsArgs),
    /// Suspend all processes of a container (freezer cgroup).
    Pause(IdArg),
    /// Resume a paused container.
    Resume(IdArg),
    /// Print the features this runtime supports as JSON.
    Features,
}

/// A single container ID.
#[derive(Debug, Args)]
pub struct IdArg {
    /// Container ID.
    pub id: String,
}

/// Options shared by `create` and `run`.
#[derive(Debug, Args, Clone)]
pub struct CreateOpts {
    /// Path to the bundle directory (holds config.json).
    #[arg(short = 'b', long, default_value = ".")]
    pub bundle: PathBuf,
    /// File to write the container's init pid to.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Unix socket to which the pty master is sent when process.terminal is true.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Use chroot(2) (after MS_MOVE) instead of pivot_root(2).
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility; no session keyring is created.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Number of extra file descriptors (from 3 on) passed to the container.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
}

/// `create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub opts: CreateOpts,
    /// Container ID.
    pub id: String,
}

/// `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub opts: CreateOpts,
    /// Return after starting instead of waiting for the container.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Do not delete the container after it exits.
    #[arg(long)]
    pub keep: bool,
    /// Container ID.
    pub id: String,
}

/// `kill`.
#[derive(Debug, Args)]
pub struct KillArgs {
    /// Send the signal to all processes of the container.
    #[arg(short = 'a', long)]
    pub all: bool,
    /// Container ID.
    pub id: String,
    /// Signal name (TERM, SIGTERM) or number.
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

/// `delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Kill the container first if it is still running.
    #[arg(short = 'f', long)]
    pub force: bool,
    /// Container ID.
    pub id: String,
}

/// `exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// JSON file with the runtime-spec `process` to run.
    #[arg(short = 'p', long)]
    pub process: Option<PathBuf>,
    /// Return once the process runs instead of waiting for it.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// File to write the new process's pid to.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Unix socket to which the pty master is sent.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Allocate a pseudo-terminal.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Working directory in the container.
    #[arg(long)]
    pub cwd: Option<PathBuf>,
    /// Extra environment variables (KEY=VALUE).
    #[arg(short = 'e', long = "env")]
    pub env: Vec<String>,
    /// User as UID[:GID].
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Additional group IDs.
    #[arg(short = 'g', long = "additional-gids")]
    pub additional_gids: Vec<u32>,
    /// Extra capabilities to add.
    #[arg(short = 'c', long = "cap")]
    pub caps: Vec<String>,
    /// Set no_new_privileges for the process.
    #[arg(long)]
    pub no_new_privs: bool,
    /// Number of extra file descriptors (from 3 on) passed to the process.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// Accepted for runc compatibility; SELinux labels are not supported.
    #[arg(long, hide = true)]
    pub process_label: Option<String>,
    /// Accepted for runc compatibility; AppArmor is not supported.
    #[arg(long, hide = true)]
    pub apparmor: Option<String>,
    /// Container ID.
    pub id: String,
    /// Command and arguments (when --process is not given).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// `list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Output format.
    #[arg(short = 'f', long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
    /// Print only the container IDs.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

/// `ps`.
#[derive(Debug, Args)]
pub struct PsArgs {
    /// Output format.
    #[arg(short = 'f', long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
    /// Container ID.
    pub id: String,
    /// Ignored `ps` options (runc passes them to ps(1)).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub ps_args: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_conmon_create_line() {
        let cli = Cli::try_parse_from([
            "plexvm-shim",
            "--systemd-cgroup",
            "create",
            "--bundle",
            "/b",
            "--pid-file",
            "/p",
            "--console-socket",
            "/s",
            "abc",
        ])
        .unwrap();
        assert!(cli.systemd_cgroup);
        let Command::Create(args) = cli.command else {
            panic!("not create")
        };
        assert_eq!(args.id, "abc");
        assert_eq!(args.opts.bundle, PathBuf::from("/b"));
        assert_eq!(args.opts.console_socket, Some(PathBuf::from("/s")));
    }

    #[test]
    fn parses_containerd_global_flags_and_kill() {
        let cli = Cli::try_parse_from([
            "plexvm-shim",
            "--root",
            "/run/containerd/runc/default",
            "--log",
            "/b/log.json",
            "--log-format",
            "json",
            "kill",
            "--all",
            "abc",
            "9",
        ])
        .unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
        let Command::Kill(args) = cli.command else {
            panic!("not kill")
        };
        assert!(args.all);
        assert_eq!(args.signal, "9");
    }

    #[test]
    fn exec_takes_trailing_command_with_dashes() {
        let cli =
            Cli::try_parse_from(["plexvm-shim", "exec", "-t", "abc", "ls", "-l", "/"]).unwrap();
        let Command::Exec(args) = cli.command else {
            panic!("not exec")
        };
        assert!(args.tty);
        assert_eq!(args.args, ["ls", "-l", "/"]);
    }
}
