//! Child processes that cannot outlive the harness: killed and reaped on drop, also
//! when a run fails half-way.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Errors starting or waiting for a child process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// Program path.
        program: PathBuf,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// Waiting failed.
    #[error("cannot wait for {name}")]
    Wait {
        /// Name used in messages.
        name: String,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// The process exited before its socket appeared.
    #[error("{name} exited ({status}) before creating {socket}")]
    ExitedEarly {
        /// Name used in messages.
        name: String,
        /// Its exit status.
        status: ExitStatus,
        /// The socket it was to create.
        socket: PathBuf,
    },
    /// The socket did not appear in time.
    #[error("{name} did not create {socket} within {secs} s")]
    NoSocket {
        /// Name used in messages.
        name: String,
        /// The socket it was to create.
        socket: PathBuf,
        /// Seconds waited.
        secs: u64,
    },
}

/// A child that is killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    name: String,
}

impl ChildGuard {
    /// Spawns `command`, naming it `name` in messages.
    pub fn spawn(name: &str, command: &mut Command) -> Result<ChildGuard, ProcessError> {
        let child = command.spawn().map_err(|source| ProcessError::Spawn {
            program: PathBuf::from(command.get_program()),
            source,
        })?;
        Ok(ChildGuard {
            child: Some(child),
            name: name.to_string(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The child, e.g. to take its pipes.
    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// Waits until `path` exists (a listening socket), failing if the process exits
    /// first or `timeout` passes.
    pub fn wait_for_socket(&mut self, path: &Path, timeout: Duration) -> Result<(), ProcessError> {
        let deadline = Instant::now() + timeout;
        while !path.exists() {
            if let Some(status) = self.try_wait()? {
                return Err(ProcessError::ExitedEarly {
                    name: self.name.clone(),
                    status,
                    socket: path.to_path_buf(),
                });
            }
            if Instant::now() >= deadline {
                return Err(ProcessError::NoSocket {
                    name: self.name.clone(),
                    socket: path.to_path_buf(),
                    secs: timeout.as_secs(),
                });
            }
            sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// The exit status if the process has ended.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ProcessError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        child.try_wait().map_err(|source| ProcessError::Wait {
            name: self.name.clone(),
            source,
        })
    }

    /// Waits up to `timeout` for the process to exit; kills it if it does not and
    /// returns `None`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, ProcessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                self.kill();
                return Ok(None);
            }
            sleep(Duration::from_millis(2));
        }
    }

    /// Asks the process to stop (SIGTERM), waits up to `timeout`, then kills it.
    pub fn terminate(&mut self, timeout: Duration) {
        if let Ok(pid) = i32::try_from(self.pid()) {
            if matches!(self.try_wait(), Ok(None)) {
                // SAFETY: kill(2) has no memory-safety preconditions; the pid is our
                // own child, not yet reaped (the guard reaps only in wait/drop), so it
                // cannot name another process.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        let _ = self.wait_timeout(timeout);
    }

    /// Kills and reaps the process.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}
