//! The kit every plexvm vhost-user backend process is built on (see README.md): the
//! serving loop with signals and shutdown ([`server`]), the vhost-user interposer with
//! hooks ([`interposer`]), rate-limited guest-facing logging ([`log`]), test guards
//! ([`guard`]), and the small pieces below.

pub mod guard;
pub mod interposer;
pub mod log;
pub mod server;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Mutex, PoisonError};

use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Exit status for unusable flags (as clap and most tools use).
pub const USAGE_ERROR: u8 = 2;

/// The whole `main` of a backend: logging (quiet unless `log_env` or `RUST_LOG` says
/// otherwise: under plexvm every stderr line is forwarded into the core's log), flags
/// `A` → config `C` (a bad flag or value: one line, exit 2), `run(config)` → exit code
/// (an error: its causes on one line, exit 1).
pub fn backend_main<A, C, E>(
    program: &str,
    log_env: &str,
    run: impl FnOnce(C) -> Result<(), E>,
) -> ExitCode
where
    A: clap::Parser,
    C: TryFrom<A>,
    C::Error: std::fmt::Display,
    E: std::error::Error,
{
    init_logging(log_env);
    let args: A = match parse_args(program) {
        Ok(args) => args,
        Err(code) => return code,
    };
    let config = match C::try_from(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{program}: {e}");
            return ExitCode::from(USAGE_ERROR);
        }
    };
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, `: `-separated (as anyhow's `{:#}`).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

/// Logs to stderr, without colours when stderr is not a terminal, at `warn` unless
/// `env_var` (or `RUST_LOG`) says otherwise: under plexvm every stderr line of a backend
/// is forwarded into the core's log.
pub fn init_logging(env_var: &str) {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(env_var)
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
}

/// Parses the command line; `--help`/`--version` print and exit as usual, a bad flag is
/// printed as one line (not clap's usage block) prefixed with `program`, and the caller
/// gets the exit code to return.
pub fn parse_args<A: clap::Parser>(program: &str) -> Result<A, ExitCode> {
    use clap::error::ErrorKind;
    match A::try_parse() {
        Ok(args) => Ok(args),
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => {
            eprintln!("{program}: {}", one_line(&e.render().to_string()));
            Err(ExitCode::from(USAGE_ERROR))
        }
    }
}

/// The first paragraph of a clap message, on one line, without its `error: ` prefix.
fn one_line(rendered: &str) -> String {
    let message: Vec<&str> = rendered
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect();
    message.join(" ").trim_start_matches("error: ").to_string()
}

/// Why a socket path could not be cleared.
#[derive(Debug, thiserror::Error)]
pub enum StaleSocketError {
    /// Something other than a socket is there; it is left alone.
    #[error("something other than a socket is at the socket path")]
    NotASocket,
    /// Looking at or removing the file failed.
    #[error("cannot clear the socket path")]
    Io(#[source] io::Error),
}

/// Removes a socket left behind by an earlier run; refuses to remove anything else.
pub fn remove_stale_socket(path: &Path) -> Result<(), StaleSocketError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(StaleSocketError::Io)
        }
        Ok(_) => Err(StaleSocketError::NotASocket),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StaleSocketError::Io(e)),
    }
}

/// The exit eventfd pairs of a backend's worker threads, handed out once each to
/// vhost-user-backend (`VhostUserBackend::exit_event`).
///
/// vhost-user-backend 0.24 converts the consumer it is given with `into_raw_fd` and never
/// closes it, so one descriptor per worker per connection would leak; this keeps the
/// numbers and closes them once the daemon is gone.
#[derive(Debug)]
pub struct WorkerExitEvents {
    events: Vec<Mutex<Option<(EventConsumer, EventNotifier)>>>,
    taken: Mutex<Vec<RawFd>>,
}

impl WorkerExitEvents {
    /// One pair per worker thread.
    pub fn new(workers: usize) -> io::Result<Self> {
        let events = (0..workers)
            .map(|_| {
                new_event_consumer_and_notifier(EventFlag::CLOEXEC).map(|p| Mutex::new(Some(p)))
            })
            .collect::<io::Result<_>>()?;
        Ok(WorkerExitEvents {
            events,
            taken: Mutex::new(Vec::new()),
        })
    }

    /// The pair of worker `thread_index`, the first time it is asked for.
    pub fn take(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let pair = self
            .events
            .get(thread_index)?
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        self.taken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(pair.0.as_raw_fd());
        Some(pair)
    }

    /// Closes the consumers handed out by [`Self::take`].
    ///
    /// # Safety
    ///
    /// Call only after the `VhostUserDaemon` they were handed to has been dropped:
    /// dropping it joins the worker threads, the only users of these descriptors.
    pub unsafe fn close_taken(&self) {
        let fds = std::mem::take(&mut *self.taken.lock().unwrap_or_else(PoisonError::into_inner));
        for fd in fds {
            // SAFETY: the caller guarantees the workers are gone; vhost-user-backend
            // converted these descriptors with `into_raw_fd` and never closes them, so
            // this is the one owner.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_events_are_handed_out_once_and_closed() {
        let events = WorkerExitEvents::new(2).unwrap();
        // vhost-user-backend takes the consumers' ownership this way and never closes them.
        let (consumer, _notifier) = events.take(0).unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(consumer);
        assert!(events.take(0).is_none());
        let (second, _notifier1) = events.take(1).unwrap();
        let _ = std::os::fd::IntoRawFd::into_raw_fd(second);
        assert!(events.take(2).is_none());
        // SAFETY: nothing else uses these descriptors in this test.
        unsafe { events.close_taken() };
        assert!(
            std::fs::read_link(format!("/proc/self/fd/{fd}")).is_err(),
            "fd {fd} still open"
        );
    }

    #[test]
    fn only_sockets_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            remove_stale_socket(&file),
            Err(StaleSocketError::NotASocket)
        ));
        assert!(file.exists());
        let sock = dir.path().join("s.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        remove_stale_socket(&sock).unwrap();
        assert!(!sock.exists());
        remove_stale_socket(&sock).unwrap();
    }

    #[test]
    fn error_chains_are_one_line() {
        let inner = io::Error::other("disk gone");
        let outer = StaleSocketError::Io(inner);
        assert_eq!(
            error_chain(&outer),
            "cannot clear the socket path: disk gone"
        );
    }

    #[test]
    fn clap_errors_become_one_line() {
        let text = "error: unexpected argument '--x' found\n\n  tip: ...\n\nUsage: p [OPTIONS]\n";
        assert_eq!(one_line(text), "unexpected argument '--x' found");
    }
}
