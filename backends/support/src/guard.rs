//! RAII guards for tests of backends: what a test starts is stopped and reaped also
//! when the test fails.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::server::Shutdown;

/// How long a guard waits for a process to listen or exit before it fails the test: a
/// guard against a hang, not a timing assertion.
pub const HANG_GUARD: Duration = Duration::from_secs(20);

/// A backend process; killed and reaped on drop if still running.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    /// Spawns `command`.
    pub fn spawn(command: &mut Command) -> io::Result<ChildGuard> {
        Ok(ChildGuard {
            child: command.spawn()?,
        })
    }

    /// Spawns `program args` with stdout discarded and stderr piped (for the test to
    /// read through [`Self::child_mut`]).
    pub fn spawn_piped(program: &str, args: &[&str]) -> io::Result<ChildGuard> {
        let mut command = Command::new(program);
        command
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        ChildGuard::spawn(&mut command)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child, e.g. for its piped stderr.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Sends `signal`; panics if the process is gone.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) with a pid we own (the child is not reaped yet).
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill: {}", io::Error::last_os_error());
    }

    /// Waits for the process to exit; panics after [`HANG_GUARD`].
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the process did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait()
    }

    /// Connects to `socket` once the process listens; panics if it exits first or
    /// never listens within [`HANG_GUARD`].
    pub fn connect(&mut self, socket: &Path) -> UnixStream {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            if let Ok(stream) = UnixStream::connect(socket) {
                return stream;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the process exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "never listened on {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A backend's serve loop in a thread of the test; shut down and joined on drop.
#[derive(Debug)]
pub struct ServeThread<E> {
    shutdown: Shutdown,
    thread: Option<JoinHandle<Result<(), E>>>,
}

impl<E: Send + 'static> ServeThread<E> {
    /// Runs `serve(shutdown)` in a thread.
    pub fn spawn(serve: impl FnOnce(&Shutdown) -> Result<(), E> + Send + 'static) -> Self {
        let shutdown = Shutdown::new().unwrap();
        let trigger = shutdown.clone();
        let thread = std::thread::spawn(move || serve(&trigger));
        ServeThread {
            shutdown,
            thread: Some(thread),
        }
    }

    /// Triggers shutdown and returns what the loop returned.
    pub fn stop(mut self) -> Result<(), E> {
        self.shutdown.trigger();
        self.thread.take().unwrap().join().unwrap()
    }
}

impl<E> Drop for ServeThread<E> {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
