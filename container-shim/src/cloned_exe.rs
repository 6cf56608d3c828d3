//! Runs the runtime from a sealed in-memory copy of its binary
//! (CVE-2019-5736).
//!
//! Every process the runtime puts into a container (init, the `exec`
//! children) is a fork of the runtime, so its `/proc/self/exe` is the
//! runtime's binary on the host. A container image that makes the runtime
//! execute `/proc/self/exe` (a symlink, or a `#!/proc/self/exe` script)
//! runs that host binary inside the container, where a container process can
//! open it through `/proc/PID/exe` and write it once it is no longer busy:
//! the next `create` on the host then runs the attacker's code as root.
//!
//! As runc does, `create`, `run` and `exec` first copy the binary into a
//! memfd, seal it against every change and `fexecve` it; forks of that
//! process have the memfd as their executable, which cannot be written,
//! truncated or grown. The copy is made with sendfile(2) from the page cache
//! (~2 ms for the release binary).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

/// The memfd's name, visible as `/memfd:plexvm-shim (deleted)` in
/// `/proc/self/exe`; also how a process recognises it already runs a copy.
const NAME: &str = "plexvm-shim";

/// Errors while cloning the binary.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// A syscall failed.
    #[error("cannot {what} while cloning the runtime binary")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// Reading the binary failed.
    #[error("cannot read the runtime binary")]
    Io(#[source] std::io::Error),
}

fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> CloneError {
    move |source| CloneError::Sys { what, source }
}

/// True when this process already runs from a sealed copy.
pub fn is_cloned() -> bool {
    std::fs::read_link("/proc/self/exe")
        .is_ok_and(|p| p.to_string_lossy().starts_with(&format!("/memfd:{NAME}")))
}

/// Re-executes the runtime from a sealed memfd copy, with the same argv and
/// environment. Returns only on error (or if already running from one).
pub fn reexec_from_sealed_copy() -> Result<(), CloneError> {
    if is_cloned() {
        return Ok(());
    }
    let memfd = sealed_copy()?;
    let args: Vec<CString> = std::env::args_os()
        .map(|a| CString::new(a.into_encoded_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|_| sys("encode argv")(nix::Error::EINVAL))?;
    let env: Vec<CString> = std::env::vars_os()
        .map(|(k, v)| {
            let mut kv = k.into_encoded_bytes();
            kv.push(b'=');
            kv.extend(v.into_encoded_bytes());
            CString::new(kv)
        })
        .collect::<Result<_, _>>()
        .map_err(|_| sys("encode environment")(nix::Error::EINVAL))?;
    nix::unistd::fexecve(memfd.as_raw_fd(), &args, &env).map_err(sys("fexecve"))?;
    Ok(())
}

/// A memfd holding the binary, sealed against writes, resizing and new seals.
/// Close-on-exec: fexecve of an ELF image does not need the fd afterwards,
/// and it must not leak into the container (`--preserve-fds` counts from 3).
pub fn sealed_copy() -> Result<OwnedFd, CloneError> {
    let src = File::open("/proc/self/exe").map_err(CloneError::Io)?;
    let len = src.metadata().map_err(CloneError::Io)?.len();
    let name = CString::new(NAME).map_err(|_| sys("name memfd")(nix::Error::EINVAL))?;
    let flags = MemFdCreateFlag::MFD_ALLOW_SEALING | MemFdCreateFlag::MFD_CLOEXEC;
    let memfd = memfd_create(&name, flags).map_err(sys("memfd_create"))?;
    let mut copied: u64 = 0;
    while copied < len {
        let chunk = usize::try_from(len - copied)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        let n = nix::sys::sendfile::sendfile(memfd.as_fd(), src.as_fd(), None, chunk)
            .map_err(sys("sendfile"))?;
        if n == 0 {
            break;
        }
        copied += n as u64;
    }
    if copied != len {
        return Err(CloneError::Io(std::io::Error::from(
            std::io::ErrorKind::UnexpectedEof,
        )));
    }
    let seals = SealFlag::F_SEAL_SEAL
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_WRITE;
    fcntl(memfd.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals)).map_err(sys("seal memfd"))?;
    Ok(memfd)
}
