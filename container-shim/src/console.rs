//! `process.terminal`: a pty made inside the container (its own devpts
//! instance), whose master goes to `--console-socket` with SCM_RIGHTS and
//! whose slave becomes stdio, controlling terminal and /dev/console — the
//! protocol conmon and containerd expect from runc.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::fcntl::{open, OFlag};
use nix::mount::{mount, MsFlags};
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use nix::sys::stat::Mode;
use nix::unistd::{dup2, setsid};
use oci_spec::runtime::Process;

/// Errors while setting up the terminal.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// Connecting to --console-socket failed.
    #[error("cannot connect to console socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// process.terminal without --console-socket.
    #[error("process.terminal is true but no --console-socket was given")]
    NoSocket,
    /// A pty syscall failed.
    #[error("cannot {0}")]
    Sys(&'static str, #[source] nix::Error),
    /// A file operation failed.
    #[error("cannot {0}")]
    Io(&'static str, #[source] std::io::Error),
}

type Result<T> = std::result::Result<T, ConsoleError>;

/// Connects to the caller's console socket (from the runtime's namespace,
/// before the container's mount namespace hides the path).
pub fn connect(path: &Path) -> Result<UnixStream> {
    UnixStream::connect(path).map_err(|source| ConsoleError::Connect {
        path: path.to_path_buf(),
        source,
    })
}

/// Creates the pty, hands the master to `socket`, and makes the slave the
/// caller's stdio and controlling terminal. With `bind_console` the slave is
/// also bind-mounted on /dev/console (init, not exec). Runs in the new root.
pub fn setup_terminal(socket: &UnixStream, process: &Process, bind_console: bool) -> Result<()> {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| ConsoleError::Sys("open /dev/ptmx", e))?;
    grantpt(&master).map_err(|e| ConsoleError::Sys("grantpt", e))?;
    unlockpt(&master).map_err(|e| ConsoleError::Sys("unlockpt", e))?;
    let slave_name = ptsname_r(&master).map_err(|e| ConsoleError::Sys("ptsname", e))?;
    let slave = open(
        slave_name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ConsoleError::Sys("open pty slave", e))?;
    // SAFETY: `open` just returned this fd and nothing else owns it.
    let slave: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(slave) };
    if let Some(size) = process.console_size() {
        let ws = libc::winsize {
            ws_row: size.height() as u16,
            ws_col: size.width() as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize struct that lives across the call.
        unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    }
    if bind_console {
        bind_dev_console(&slave_name)?;
    }
    send_fd(socket, master.as_fd(), "/dev/ptmx")?;
    drop(master);
    make_controlling_stdio(&slave)
}

/// Bind-mounts the pty slave on /dev/console through a handle that cannot be
/// a symlink (CVE-2025-52565: an image's /dev/console pointing at, say,
/// /proc/sysrq-trigger would otherwise get the pty mounted over that file).
/// Whatever is there and is not a regular file or character device is
/// replaced by a new empty file.
fn bind_dev_console(slave_name: &str) -> Result<()> {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::{fstat, lstat, Mode};
    let console = Path::new("/dev/console");
    let kind = |mode: libc::mode_t| mode & libc::S_IFMT;
    match lstat(console) {
        Ok(st) if kind(st.st_mode) == libc::S_IFREG || kind(st.st_mode) == libc::S_IFCHR => {}
        Ok(_) => nix::unistd::unlink(console)
            .map_err(|e| ConsoleError::Sys("remove a non-file /dev/console", e))?,
        Err(nix::Error::ENOENT) => {}
        Err(e) => return Err(ConsoleError::Sys("stat /dev/console", e)),
    }
    let create = OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    match open(console, create, Mode::from_bits_truncate(0o600)) {
        Ok(fd) => drop(unsafe_owned(fd)),
        // An existing character device (O_CREAT on it opens the device).
        Err(nix::Error::ENXIO | nix::Error::ENODEV | nix::Error::EACCES) => {}
        Err(e) => return Err(ConsoleError::Sys("create /dev/console", e)),
    }
    let fd = open(
        console,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ConsoleError::Sys("open /dev/console", e))?;
    let fd = unsafe_owned(fd);
    let st = fstat(fd.as_raw_fd()).map_err(|e| ConsoleError::Sys("stat /dev/console", e))?;
    if kind(st.st_mode) != libc::S_IFREG && kind(st.st_mode) != libc::S_IFCHR {
        return Err(ConsoleError::Sys("check /dev/console", nix::Error::ELOOP));
    }
    let target = format!("/proc/self/fd/{}", fd.as_raw_fd());
    mount(
        Some(slave_name),
        target.as_str(),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| ConsoleError::Sys("bind-mount /dev/console", e))
}

fn unsafe_owned(fd: std::os::fd::RawFd) -> std::os::fd::OwnedFd {
    // SAFETY: `fd` was just returned by open(2) and is owned by nobody else.
    unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
}

/// Sends `fd` with SCM_RIGHTS (payload: a name, as runc's utils.SendFile).
pub fn send_fd(socket: &UnixStream, fd: std::os::fd::BorrowedFd<'_>, name: &str) -> Result<()> {
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(name.as_bytes())];
    sendmsg::<UnixAddr>(socket.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map(drop)
        .map_err(|e| ConsoleError::Sys("send the pty master", e))
}

fn make_controlling_stdio(slave: &OwnedFd) -> Result<()> {
    // A new session has no controlling terminal, so TIOCSCTTY can take this one.
    // Init of a new pid namespace is already a session leader (EPERM is fine).
    match setsid() {
        Ok(_) | Err(nix::Error::EPERM) => {}
        Err(e) => return Err(ConsoleError::Sys("setsid", e)),
    }
    // SAFETY: TIOCSCTTY takes an integer argument and no pointers.
    let rc = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) };
    nix::Error::result(rc).map_err(|e| ConsoleError::Sys("set controlling terminal", e))?;
    for target in 0..=2 {
        dup2(slave.as_raw_fd(), target).map_err(|e| ConsoleError::Sys("dup pty to stdio", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{recvmsg, ControlMessageOwned};
    use std::io::IoSliceMut;

    #[test]
    fn fd_passes_over_the_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        send_fd(&a, file.as_fd(), "/dev/ptmx").unwrap();
        let mut buf = [0u8; 64];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<UnixAddr>(b.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty())
            .unwrap();
        let got: Vec<_> = msg
            .cmsgs()
            .unwrap()
            .filter_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => Some(fds),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(got.len(), 1);
        assert_eq!(msg.bytes, "/dev/ptmx".len());
        // SAFETY: the fd was just received and is owned by nobody else.
        drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(got[0]) });
    }

    #[test]
    fn missing_socket_is_a_connect_error() {
        assert!(matches!(
            connect(Path::new("/nonexistent/sock")),
            Err(ConsoleError::Connect { .. })
        ));
    }
}
