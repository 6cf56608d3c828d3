//! Backend processes: spawning `exec` backends, attaching to `socket` ones.
//!
//! [`start`] gives the connected vhost-user stream (for
//! [`crate::vhost_user::VhostUserFrontend::connect`]) and a [`Backend`] that owns the
//! backend process, if the core spawned one: dropping it stops the process (SIGTERM, a
//! short grace, SIGKILL) and reaps it. [`Backend::exit_watch`] lets the event loop notice
//! a backend that exits while the VM runs.
//!
//! Launch time: [`spawn_early`] starts the `exec` backends before the VM is built, so that
//! they start up while the core sets up KVM and guest memory; [`start`] then connects to
//! the process spawned early for the device instead of spawning one.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use plexvm_protocol::paths::backend_socket;
use plexvm_protocol::spec::{resolve_program, BackendSource, DeviceConfig};

/// How long a spawned backend may take to accept the core's connection.
pub const SPAWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the core retries connecting to a `socket` backend.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a backend gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_millis(500);
/// How many of a backend's last stderr lines are kept for error messages.
pub const STDERR_TAIL_LINES: usize = 20;
const MAX_LINE: usize = 4096;
/// First pause between attempts to connect to a starting backend. plexvm-blk listens
/// a few ms after exec here, and a fixed 10 ms poll cost up to 10 ms of launch time
/// (perf/results/NOTES.md); connect() on a missing socket costs a few µs.
const RETRY_FIRST: Duration = Duration::from_micros(100);
/// Longest pause between attempts: bounds the time lost once the socket is there.
const RETRY_MAX: Duration = Duration::from_millis(1);

/// Pauses between connection attempts: 100 µs doubling up to 1 ms.
#[derive(Debug)]
struct Backoff(Duration);

impl Backoff {
    fn new() -> Backoff {
        Backoff(RETRY_FIRST)
    }

    /// Sleeps for the next pause, but not past `deadline`.
    fn sleep(&mut self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        std::thread::sleep(self.0.min(left));
        self.0 = (self.0 * 2).min(RETRY_MAX);
    }
}

/// Errors starting or attaching to a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The `exec` program was not found.
    #[error("device {device}: backend program {program:?} not found (looked next to plexvm, on PATH, or relative to the spec's folder)")]
    NotFound {
        /// Device id.
        device: String,
        /// The program as the spec names it.
        program: String,
    },
    /// The program could not be started.
    #[error("device {device}: cannot start backend {program}")]
    Spawn {
        /// Device id.
        device: String,
        /// Resolved program path.
        program: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The backend exited before it accepted a connection.
    #[error("device {device}: backend {program} exited with {status} before accepting a connection on {socket}{tail}", tail = tail_text(.stderr))]
    ExitedEarly {
        /// Device id.
        device: String,
        /// Resolved program path.
        program: PathBuf,
        /// Its exit status.
        status: ExitStatus,
        /// The socket it was told to listen on.
        socket: PathBuf,
        /// Its last stderr lines.
        stderr: Vec<String>,
    },
    /// The backend did not accept a connection in time (it was stopped).
    #[error("device {device}: backend {program} did not accept a connection on {socket} within {timeout:?}{tail}", tail = tail_text(.stderr))]
    Timeout {
        /// Device id.
        device: String,
        /// Resolved program path.
        program: PathBuf,
        /// The socket it was told to listen on.
        socket: PathBuf,
        /// How long the core waited.
        timeout: Duration,
        /// Its last stderr lines.
        stderr: Vec<String>,
    },
    /// No `socket` backend listens at the path.
    #[error("device {device}: cannot connect to the backend socket {socket}")]
    Connect {
        /// Device id.
        device: String,
        /// The socket path.
        socket: PathBuf,
        /// The last connect error.
        #[source]
        source: std::io::Error,
    },
}

fn tail_text(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!("; its last stderr lines: {}", lines.join(" | "))
    }
}

/// A device's backend: where it listens and, for `exec` backends, its process.
#[derive(Debug)]
pub struct Backend {
    socket: PathBuf,
    process: Option<BackendProcess>,
}

/// How long [`Backend::kill_and_describe`] waits for a SIGKILLed backend to end.
pub const FENCE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`Backend::stop_and_describe`] waits for a backend whose connection ended to
/// exit by itself, and for the end of its stderr.
const EXIT_WAIT: Duration = Duration::from_millis(200);

impl Backend {
    /// Stops the backend if it still runs, reaps it, and says in one line why it went
    /// away: the exit code or signal and its last stderr lines, or for an attached
    /// backend that it closed the connection.
    pub fn stop_and_describe(self) -> String {
        let Some(process) = &self.process else {
            return format!(
                "the backend at {} closed its vhost-user connection",
                self.socket.display()
            );
        };
        let deadline = Instant::now() + EXIT_WAIT;
        let mut status = process.try_exit_status();
        let mut backoff = Backoff::new();
        while status.is_none() && Instant::now() < deadline {
            backoff.sleep(deadline);
            status = process.try_exit_status();
        }
        let what = match status {
            Some(status) => describe_status(status),
            None => "closed its vhost-user connection and was stopped".to_string(),
        };
        let head = format!(
            "backend {} (pid {}) {what}",
            process.program().display(),
            process.pid()
        );
        // Dropping the process stops it if it still runs; the stderr thread then ends.
        let tail = process.stderr.clone();
        drop(self);
        format!("{head}{}", tail_text(&tail.lines(EXIT_WAIT)))
    }

    /// Fences a backend that lives but does not serve: SIGKILL, then reap, so that it
    /// can never complete a request after another backend got its rings. Says in one
    /// line what happened, `why` first. A process that does not die within
    /// [`FENCE_TIMEOUT`] (uninterruptible sleep in the kernel) is handed back: it is
    /// not fenced yet. A `socket` backend cannot be fenced by the core: it is handed
    /// back at once.
    pub fn kill_and_describe(self, why: &str) -> Result<String, Backend> {
        let Some(process) = &self.process else {
            return Err(self);
        };
        let Some(status) = process.kill_and_reap(FENCE_TIMEOUT) else {
            return Err(self);
        };
        let head = format!(
            "backend {} (pid {}) {why}; it {}",
            process.program().display(),
            process.pid(),
            describe_status(status)
        );
        let tail = process.stderr.clone();
        drop(self);
        Ok(format!("{head}{}", tail_text(&tail.lines(Duration::ZERO))))
    }

    /// Whether the spawned process has exited and been reaped (always false for a
    /// `socket` backend).
    pub fn is_reaped(&self) -> bool {
        self.process
            .as_ref()
            .is_some_and(|p| p.try_exit_status().is_some())
    }

    /// The program, for messages (`None` for an attached backend).
    pub fn program(&self) -> Option<&Path> {
        self.process.as_ref().map(BackendProcess::program)
    }

    /// The vhost-user socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The process id when the core spawned the backend.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(BackendProcess::pid)
    }

    /// The spawned process, if any.
    pub fn process(&self) -> Option<&BackendProcess> {
        self.process.as_ref()
    }

    /// A watch that becomes readable when the spawned process exits (`None` for `socket`
    /// backends, whose end the event loop sees as a socket hang-up).
    pub fn exit_watch(&self) -> std::io::Result<Option<BackendExitWatch>> {
        self.process
            .as_ref()
            .map(BackendProcess::exit_watch)
            .transpose()
    }
}

/// Starts or attaches to the backend of `device` and connects to it.
///
/// `exec` backends run with `vm_runtime_dir/<id>.sock` as `--socket`, `base_dir` (the
/// spec's folder) as current directory, stdin closed, stdout inherited and stderr
/// forwarded line by line, prefixed with the device id. A process that [`spawn_early`]
/// already started for the device is taken from `early` instead of spawning another.
pub fn start(
    device: &DeviceConfig,
    vm_runtime_dir: &Path,
    base_dir: &Path,
    early: &mut EarlyBackends,
) -> Result<(Backend, UnixStream), BackendError> {
    match &device.backend {
        BackendSource::Exec(argv) => {
            let socket = backend_socket(vm_runtime_dir, &device.id);
            let (process, stream) = match early.take(&socket) {
                Some(process) => {
                    let stream = process.wait_for_socket(SPAWN_TIMEOUT)?;
                    (process, stream)
                }
                None => BackendProcess::spawn(
                    &device.id,
                    argv,
                    exe_dir().as_deref(),
                    base_dir,
                    &socket,
                )?,
            };
            let backend = Backend {
                socket,
                process: Some(process),
            };
            Ok((backend, stream))
        }
        BackendSource::Socket(path) => {
            let stream = connect_with_retry(&device.id, path, ATTACH_TIMEOUT)?;
            let backend = Backend {
                socket: path.clone(),
                process: None,
            };
            Ok((backend, stream))
        }
    }
}

/// The folder of the running program, where `exec` backends are looked for first.
fn exe_dir() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
}

/// The `exec` backends spawned by [`spawn_early`] and not yet taken by [`start`];
/// dropping it stops those (the VM set-up failed before reaching them). It must stay
/// on the thread that spawned them: a backend is tied to that thread
/// (PR_SET_PDEATHSIG).
#[derive(Debug, Default)]
#[must_use = "dropping it stops the backends spawned early"]
pub struct EarlyBackends {
    spawned: Vec<BackendProcess>,
}

impl EarlyBackends {
    /// None spawned: [`start`] spawns every `exec` backend itself.
    pub fn none() -> EarlyBackends {
        EarlyBackends::default()
    }

    /// The processes still waiting to be taken.
    pub fn pids(&self) -> Vec<u32> {
        self.spawned.iter().map(BackendProcess::pid).collect()
    }

    fn take(&mut self, socket: &Path) -> Option<BackendProcess> {
        let at = self.spawned.iter().position(|p| p.socket == socket)?;
        Some(self.spawned.swap_remove(at))
    }
}

/// Spawns the `exec` backends of `devices` without waiting for them, so that they start
/// while the core builds the VM; [`start`], given the result and the same
/// `vm_runtime_dir`, connects to them. `socket` backends are left to [`start`].
pub fn spawn_early(
    devices: &[DeviceConfig],
    vm_runtime_dir: &Path,
    base_dir: &Path,
) -> Result<EarlyBackends, BackendError> {
    let mut early = EarlyBackends::none();
    let exe_dir = exe_dir();
    for device in devices {
        let BackendSource::Exec(argv) = &device.backend else {
            continue;
        };
        let socket = backend_socket(vm_runtime_dir, &device.id);
        early.spawned.push(BackendProcess::launch(
            &device.id,
            argv,
            exe_dir.as_deref(),
            base_dir,
            &socket,
        )?);
    }
    Ok(early)
}

/// The socket path of the `generation`-th backend spawned for device `id`: the first one
/// gets the usual `<id>.sock`, later ones (a swap runs the new backend beside the old
/// one) `<id>.<generation>.sock`.
pub fn spawn_socket(vm_runtime_dir: &Path, id: &str, generation: u64) -> PathBuf {
    if generation == 0 {
        backend_socket(vm_runtime_dir, id)
    } else {
        vm_runtime_dir.join(format!("{id}.{generation}.sock"))
    }
}

/// Starts (`exec`, listening on `socket`) or attaches to (`socket`, one connection
/// attempt) the backend `source` of device `id`: what a restart or a swap does.
pub fn start_source(
    id: &str,
    source: &BackendSource,
    socket: &Path,
    base_dir: &Path,
) -> Result<(Backend, UnixStream), BackendError> {
    match source {
        BackendSource::Exec(argv) => {
            let (process, stream) =
                BackendProcess::spawn(id, argv, exe_dir().as_deref(), base_dir, socket)?;
            let backend = Backend {
                socket: socket.to_path_buf(),
                process: Some(process),
            };
            Ok((backend, stream))
        }
        BackendSource::Socket(path) => {
            let path = base_dir.join(path);
            let stream = connect_with_retry(id, &path, Duration::ZERO)?;
            Ok((
                Backend {
                    socket: path,
                    process: None,
                },
                stream,
            ))
        }
    }
}

/// "exited with code 3", "was killed by signal 9 (SIGKILL)".
pub fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig} ({})", signal_name(sig)),
        _ => format!("ended with {status}"),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGPIPE => "SIGPIPE",
        _ => "another signal",
    }
}

/// Connects to a listening backend, retrying while the socket is missing or refuses.
pub fn connect_with_retry(
    device: &str,
    socket: &Path,
    timeout: Duration,
) -> Result<UnixStream, BackendError> {
    let deadline = Instant::now() + timeout;
    let mut backoff = Backoff::new();
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline || !retryable(&e) => {
                return Err(BackendError::Connect {
                    device: device.to_string(),
                    socket: socket.to_path_buf(),
                    source: e,
                })
            }
            Err(_) => backoff.sleep(deadline),
        }
    }
}

fn retryable(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
    )
}

/// The last lines a backend wrote to stderr, filled by a forwarding thread.
#[derive(Debug, Default)]
struct StderrTail {
    lines: Mutex<(VecDeque<String>, bool)>,
    done: Condvar,
}

impl StderrTail {
    fn lock(&self) -> MutexGuard<'_, (VecDeque<String>, bool)> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, line: String) {
        let mut g = self.lock();
        if g.0.len() == STDERR_TAIL_LINES {
            g.0.pop_front();
        }
        g.0.push_back(line);
    }

    fn finish(&self) {
        self.lock().1 = true;
        self.done.notify_all();
    }

    /// The kept lines, after waiting up to `wait` for the stream to end.
    fn lines(&self, wait: Duration) -> Vec<String> {
        let g = self.lock();
        let (g, _) = self
            .done
            .wait_timeout_while(g, wait, |(_, done)| !*done)
            .unwrap_or_else(|e| e.into_inner());
        g.0.iter().cloned().collect()
    }
}

/// Forwards a backend's stderr to ours, line by line, prefixed with the device id.
fn forward_stderr(device: String, stderr: ChildStderr, tail: Arc<StderrTail>) {
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // Bounded: a backend writing without newlines cannot grow this without limit.
        match (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut buf)
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\n', '\r']);
                // Not eprintln!: a closed stderr must not panic this thread.
                let _ = writeln!(std::io::stderr().lock(), "[{device}] {line}");
                tail.push(line.to_string());
            }
        }
    }
    tail.finish();
}

/// A spawned backend process; dropping it stops and reaps it.
#[derive(Debug)]
pub struct BackendProcess {
    device: String,
    program: PathBuf,
    pid: u32,
    child: Arc<Mutex<Child>>,
    stderr: Arc<StderrTail>,
    socket: PathBuf,
}

impl BackendProcess {
    /// Spawns `argv` plus `--socket socket` for device `device` and waits (up to
    /// [`SPAWN_TIMEOUT`]) until it accepts a connection on `socket`, which is returned.
    pub fn spawn(
        device: &str,
        argv: &[String],
        exe_dir: Option<&Path>,
        base_dir: &Path,
        socket: &Path,
    ) -> Result<(Self, UnixStream), BackendError> {
        Self::spawn_with_timeout(device, argv, exe_dir, base_dir, socket, SPAWN_TIMEOUT)
    }

    fn spawn_with_timeout(
        device: &str,
        argv: &[String],
        exe_dir: Option<&Path>,
        base_dir: &Path,
        socket: &Path,
        timeout: Duration,
    ) -> Result<(Self, UnixStream), BackendError> {
        let process = Self::launch(device, argv, exe_dir, base_dir, socket)?;
        let stream = process.wait_for_socket(timeout)?;
        Ok((process, stream))
    }

    /// Spawns `argv` plus `--socket socket` and returns at once.
    fn launch(
        device: &str,
        argv: &[String],
        exe_dir: Option<&Path>,
        base_dir: &Path,
        socket: &Path,
    ) -> Result<Self, BackendError> {
        let name = argv.first().map(String::as_str).unwrap_or_default();
        let program =
            resolve_program(name, exe_dir, base_dir).ok_or_else(|| BackendError::NotFound {
                device: device.to_string(),
                program: name.to_string(),
            })?;
        // A socket file left by an earlier run would make the backend's bind fail.
        let _ = std::fs::remove_file(socket);
        let mut command = Command::new(&program);
        command
            .args(argv.iter().skip(1))
            .arg("--socket")
            .arg(socket)
            .current_dir(base_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped());
        // A backend must not outlive a core that is killed (SIGKILL leaves no chance to
        // stop it): it gets SIGTERM, on which backends flush and exit, when the thread
        // that spawned it ends (the main thread, or the supervisor at the VM's end).
        // With PRIO_PROCESS and the process id, getpriority reads the main thread's
        // nice value, not that of the calling (perhaps raised) thread.
        // SAFETY: getpriority takes plain integers and touches no memory.
        let process_nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, std::process::id()) };
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // prctl and setpriority, which are async-signal-safe; it touches no memory of the
        // parent.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The supervisor thread runs with a raised priority (supervisor.rs);
                // the backend gets the process's own. Best effort.
                let _ = libc::setpriority(libc::PRIO_PROCESS, 0, process_nice);
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|source| BackendError::Spawn {
            device: device.to_string(),
            program: program.clone(),
            source,
        })?;
        let tail = Arc::new(StderrTail::default());
        if let Some(stderr) = child.stderr.take() {
            let (id, t) = (device.to_string(), tail.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("{device}-stderr"))
                .spawn(move || forward_stderr(id, stderr, t));
            if spawned.is_err() {
                tail.finish();
            }
        }
        Ok(BackendProcess {
            device: device.to_string(),
            program,
            pid: child.id(),
            child: Arc::new(Mutex::new(child)),
            stderr: tail,
            socket: socket.to_path_buf(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The program that runs.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// The backend's last stderr lines so far.
    pub fn stderr_tail(&self) -> Vec<String> {
        self.stderr.lines(Duration::ZERO)
    }

    /// Its exit status, if it has exited (reaps it then).
    pub fn try_exit_status(&self) -> Option<ExitStatus> {
        try_wait(&self.child)
    }

    /// SIGKILL, then waits up to `timeout` for the process to end and reaps it; its
    /// exit status, or `None` if it still has not ended.
    pub fn kill_and_reap(&self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        // Child::kill sends SIGKILL to our unreaped child (reaping happens only here,
        // under this lock), so the pid cannot have been reused.
        let _ = child.kill();
        let deadline = Instant::now() + timeout;
        let mut backoff = Backoff::new();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            backoff.sleep(deadline);
        }
    }

    fn wait_for_socket(&self, timeout: Duration) -> Result<UnixStream, BackendError> {
        let deadline = Instant::now() + timeout;
        let mut backoff = Backoff::new();
        loop {
            if let Some(status) = self.try_exit_status() {
                return Err(BackendError::ExitedEarly {
                    device: self.device.clone(),
                    program: self.program.clone(),
                    status,
                    socket: self.socket.clone(),
                    stderr: self.stderr.lines(Duration::from_secs(1)),
                });
            }
            match UnixStream::connect(&self.socket) {
                Ok(s) => return Ok(s),
                Err(e) if !retryable(&e) => {
                    tracing::debug!("device {}: connect: {e}", self.device)
                }
                Err(_) => {}
            }
            if Instant::now() >= deadline {
                // The process is stopped by our drop; its stderr is read first.
                return Err(BackendError::Timeout {
                    device: self.device.clone(),
                    program: self.program.clone(),
                    socket: self.socket.clone(),
                    timeout,
                    stderr: self.stderr.lines(Duration::ZERO),
                });
            }
            backoff.sleep(deadline);
        }
    }

    /// A pidfd-based watch for the event loop (readable once the process exits).
    pub fn exit_watch(&self) -> std::io::Result<BackendExitWatch> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1. The child
        // is not reaped before this object is dropped (only `try_wait` under our lock
        // reaps it, after which std never signals the pid again), so the pid is ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(BackendExitWatch {
            pidfd,
            child: self.child.clone(),
            program: self.program.display().to_string(),
            pid: self.pid,
        })
    }
}

fn try_wait(child: &Mutex<Child>) -> Option<ExitStatus> {
    let mut c = child.lock().unwrap_or_else(|e| e.into_inner());
    c.try_wait().ok().flatten()
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(None) = child.try_wait() {
            // SAFETY: kill() with a pid and a signal number has no memory effects; the
            // child is not reaped (try_wait just said so), so the pid is still ours.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
            // Backends exit within a few ms of SIGTERM: a fine poll keeps the VM's end
            // (and a restart) from waiting a whole poll interval for each of them.
            let deadline = Instant::now() + STOP_GRACE;
            let mut backoff = Backoff::new();
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                backoff.sleep(deadline);
            }
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Becomes readable (as a pidfd) when a spawned backend exits.
#[derive(Debug)]
pub struct BackendExitWatch {
    pidfd: OwnedFd,
    child: Arc<Mutex<Child>>,
    program: String,
    pid: u32,
}

impl BackendExitWatch {
    /// The pidfd to poll for readability.
    pub fn pidfd(&self) -> &OwnedFd {
        &self.pidfd
    }

    /// The exit status once the process has exited (reaps it).
    pub fn exit_status(&self) -> Option<ExitStatus> {
        try_wait(&self.child)
    }

    /// The program, for messages.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_killed_backend_is_described_with_its_signal_and_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let sock = spawn_socket(dir.path(), "d", 2);
        assert_eq!(sock, dir.path().join("d.2.sock"));
        assert_eq!(spawn_socket(dir.path(), "d", 0), dir.path().join("d.sock"));
        let source = BackendSource::Exec(argv(&["python3", "-c", LISTENER]));
        let (backend, _stream) = start_source("d", &source, &sock, dir.path()).unwrap();
        let pid = backend.pid().unwrap();
        // SAFETY: the pid is our unreaped child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        let text = backend.stop_and_describe();
        assert!(text.contains("killed by signal 9 (SIGKILL)"), "{text}");
        assert!(text.contains("listening"), "{text}");
        assert!(!alive(pid));
    }

    /// A stand-in backend: listens on the `--socket` path and waits for one byte.
    const LISTENER: &str = "import socket,sys\n\
        print('listening', file=sys.stderr, flush=True)\n\
        s=socket.socket(socket.AF_UNIX)\n\
        s.bind(sys.argv[sys.argv.index('--socket')+1])\n\
        s.listen(1)\n\
        c,_=s.accept()\n\
        c.recv(1)\n";

    fn argv(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    fn alive(pid: u32) -> bool {
        // SAFETY: signal 0 only checks that the pid exists.
        unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
    }

    #[test]
    fn a_stopped_backend_is_fenced_killed_and_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("d.sock");
        let source = BackendSource::Exec(argv(&["python3", "-c", LISTENER]));
        let (backend, _stream) = start_source("d", &source, &sock, dir.path()).unwrap();
        let pid = backend.pid().unwrap();
        // SAFETY: the pid is our unreaped child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
        let text = backend.kill_and_describe("stalled").unwrap();
        assert!(
            text.contains("stalled; it was killed by signal 9"),
            "{text}"
        );
        assert!(!alive(pid), "reaped, not a zombie");
        // A backend the core did not spawn cannot be fenced.
        let listener = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
        let (attached, _s) = start_source(
            "d",
            &BackendSource::Socket(dir.path().join("s")),
            &sock,
            dir.path(),
        )
        .unwrap();
        assert!(attached.kill_and_describe("stalled").is_err());
        drop(listener);
    }

    #[test]
    fn missing_program_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("d.sock");
        let err = BackendProcess::spawn("d", &argv(&["plexvm-nope"]), None, dir.path(), &sock)
            .unwrap_err();
        assert!(matches!(err, BackendError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("plexvm-nope"), "{err}");
    }

    #[test]
    fn early_exit_reports_status_and_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("d.sock");
        let script = "echo first >&2; echo \"bad image\" >&2; exit 3";
        let err = BackendProcess::spawn(
            "disk0",
            &argv(&["sh", "-c", script]),
            None,
            dir.path(),
            &sock,
        )
        .unwrap_err();
        let BackendError::ExitedEarly { status, stderr, .. } = &err else {
            panic!("unexpected error {err}");
        };
        assert_eq!(status.code(), Some(3));
        assert_eq!(stderr, &["first".to_string(), "bad image".to_string()]);
        let msg = err.to_string();
        assert!(msg.starts_with("device disk0: backend "), "{msg}");
        assert!(msg.contains("bad image"), "{msg}");
    }

    #[test]
    fn spawned_backend_is_connected_then_stopped_and_reaped_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("d.sock");
        let (p, stream) = BackendProcess::spawn(
            "d",
            &argv(&["python3", "-c", LISTENER]),
            None,
            dir.path(),
            &sock,
        )
        .unwrap();
        let pid = p.pid();
        assert!(alive(pid));
        assert!(stream.as_raw_fd() >= 0);
        drop(p);
        // Reaped, not a zombie: the pid is gone.
        assert!(!alive(pid));
        assert!(!sock.exists());
    }

    #[test]
    fn backend_that_never_listens_times_out_and_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("d.sock");
        let err = BackendProcess::spawn_with_timeout(
            "d",
            &argv(&["sh", "-c", "echo waiting >&2; exec sleep 30"]),
            None,
            dir.path(),
            &sock,
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(matches!(err, BackendError::Timeout { .. }), "{err}");
    }

    #[test]
    fn exit_watch_sees_a_backend_killed_while_running() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("d.sock");
        let (p, _stream) = BackendProcess::spawn(
            "d",
            &argv(&["python3", "-c", LISTENER]),
            None,
            dir.path(),
            &sock,
        )
        .unwrap();
        let watch = p.exit_watch().unwrap();
        assert!(watch.exit_status().is_none());
        // SAFETY: the pid is our unreaped child.
        unsafe { libc::kill(p.pid() as libc::pid_t, libc::SIGKILL) };
        let mut fds = [libc::pollfd {
            fd: watch.pidfd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
        assert_eq!(unsafe { libc::poll(fds.as_mut_ptr(), 1, 10_000) }, 1);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            watch.exit_status().and_then(|s| s.signal()),
            Some(libc::SIGKILL)
        );
        // The stream has ended with the process: wait for the forwarding thread.
        let tail = p.stderr.lines(Duration::from_secs(10));
        assert!(tail.iter().any(|l| l == "listening"), "{tail:?}");
    }

    fn exec_device(id: &str, args: &[&str]) -> DeviceConfig {
        DeviceConfig {
            id: id.into(),
            kind: plexvm_protocol::spec::DeviceKind::Blk,
            backend: BackendSource::Exec(argv(args)),
            restart: Default::default(),
            params: Default::default(),
            transport: Default::default(),
        }
    }

    #[test]
    fn start_connects_to_the_backend_spawned_early() {
        let dir = tempfile::tempdir().unwrap();
        let device = exec_device("d", &["python3", "-c", LISTENER]);
        let mut early = spawn_early(std::slice::from_ref(&device), dir.path(), dir.path()).unwrap();
        let pid = early.pids();
        assert_eq!(pid.len(), 1);
        let (backend, _stream) = start(&device, dir.path(), dir.path(), &mut early).unwrap();
        assert_eq!(
            backend.pid(),
            Some(pid[0]),
            "start spawned a second backend"
        );
        assert!(early.pids().is_empty());
        drop(early);
        // Taken by start: dropping the early set leaves it running.
        assert!(alive(pid[0]));
        drop(backend);
        assert!(!alive(pid[0]));
    }

    #[test]
    fn backends_spawned_early_but_never_connected_are_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let devices = [
            exec_device("a", &["sh", "-c", "exec sleep 30"]),
            exec_device("b", &["sh", "-c", "exec sleep 30"]),
        ];
        let early = spawn_early(&devices, dir.path(), dir.path()).unwrap();
        let pids = early.pids();
        assert_eq!(pids.len(), 2);
        assert!(pids.iter().all(|p| alive(*p)));
        drop(early);
        assert!(pids.iter().all(|p| !alive(*p)), "left running: {pids:?}");
        // A missing program fails the early spawn with the same error as `start`.
        let err = spawn_early(
            &[exec_device("c", &["plexvm-nope"])],
            dir.path(),
            dir.path(),
        )
        .unwrap_err();
        assert!(matches!(err, BackendError::NotFound { .. }), "{err}");
    }

    #[test]
    fn socket_backend_that_is_not_there_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("none.sock");
        let err = connect_with_retry("d", &sock, Duration::from_millis(50)).unwrap_err();
        assert!(err.to_string().contains("none.sock"), "{err}");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let config = DeviceConfig {
            id: "d".into(),
            kind: plexvm_protocol::spec::DeviceKind::Blk,
            backend: BackendSource::Socket(sock.clone()),
            restart: Default::default(),
            params: Default::default(),
            transport: Default::default(),
        };
        let (backend, _stream) =
            start(&config, dir.path(), dir.path(), &mut EarlyBackends::none()).unwrap();
        assert_eq!(backend.pid(), None);
        assert_eq!(backend.socket(), sock);
        assert!(backend.exit_watch().unwrap().is_none());
        drop(listener);
    }
}
