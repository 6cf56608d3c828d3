//! The container process's credentials and limits: rlimits, oom_score_adj,
//! user and groups, the five capability sets, no_new_privileges, environment,
//! the executable lookup, fd hygiene and execve.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use caps::{CapSet, Capability as HostCap, CapsHashSet};
use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
use oci_spec::runtime::{Capabilities, PosixRlimitType, Process};

/// Errors while preparing the process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// A syscall failed.
    #[error("cannot {0}")]
    Sys(&'static str, #[source] nix::Error),
    /// Setting capabilities failed.
    #[error("cannot set {0:?} capabilities")]
    Caps(CapSet, #[source] caps::errors::CapsError),
    /// An I/O step failed.
    #[error("cannot {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The executable was not found.
    #[error("exec: {0:?}: executable file not found (or not executable)")]
    NotFound(String),
    /// A string with a NUL byte.
    #[error("argument or environment entry contains a NUL byte")]
    Nul,
}

type Result<T> = std::result::Result<T, ProcessError>;

fn rlimit_resource(typ: PosixRlimitType) -> libc::__rlimit_resource_t {
    match typ {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }
}

/// Applies `process.rlimits` (before privileges are dropped: raising a hard
/// limit needs CAP_SYS_RESOURCE).
pub fn apply_rlimits(process: &Process) -> Result<()> {
    for rl in process.rlimits().as_deref().unwrap_or_default() {
        let lim = libc::rlimit {
            rlim_cur: rl.soft(),
            rlim_max: rl.hard(),
        };
        // SAFETY: `lim` is a valid rlimit that lives across the call.
        let rc = unsafe { libc::setrlimit(rlimit_resource(rl.typ()), &lim) };
        nix::Error::result(rc).map_err(|e| ProcessError::Sys("set rlimit", e))?;
    }
    Ok(())
}

/// Writes /proc/<pid>/oom_score_adj.
pub fn write_oom_score_adj(proc_dir: &Path, value: i32) -> Result<()> {
    let path = proc_dir.join("oom_score_adj");
    std::fs::write(&path, value.to_string()).map_err(|source| ProcessError::Io {
        what: "write",
        path,
        source,
    })
}

/// The capabilities this kernel knows (probing costs ~40 prctl calls: once).
fn supported_caps() -> &'static CapsHashSet {
    static SUPPORTED: std::sync::OnceLock<CapsHashSet> = std::sync::OnceLock::new();
    SUPPORTED.get_or_init(caps::runtime::thread_all_supported)
}

fn host_caps(set: Option<&Capabilities>) -> CapsHashSet {
    let supported = supported_caps();
    set.into_iter()
        .flatten()
        .filter_map(|c| format!("CAP_{c}").parse::<HostCap>().ok())
        .filter(|c| supported.contains(c))
        .collect()
}

/// Switches to the process's user and groups and sets all five capability
/// sets (runc's finalizeNamespace order: bounding set first, keep caps over
/// setuid, then effective/permitted/inheritable, then ambient).
pub fn switch_user_and_caps(process: &Process) -> Result<()> {
    let caps_cfg = process.capabilities().as_ref();
    let bounding = host_caps(caps_cfg.and_then(|c| c.bounding().as_ref()));
    for &cap in supported_caps() {
        if !bounding.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)
                .map_err(|e| ProcessError::Caps(CapSet::Bounding, e))?;
        }
    }
    set_keepcaps(true)?;
    let user = process.user();
    let gid = Gid::from_raw(user.gid());
    let uid = Uid::from_raw(user.uid());
    let groups: Vec<Gid> = user
        .additional_gids()
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    // setgroups(2) is refused in a user namespace with "deny" in setgroups.
    match setgroups(&groups) {
        Ok(()) => {}
        Err(nix::Error::EPERM) if groups.is_empty() => {}
        Err(e) => return Err(ProcessError::Sys("set additional groups", e)),
    }
    setresgid(gid, gid, gid).map_err(|e| ProcessError::Sys("set gid", e))?;
    setresuid(uid, uid, uid).map_err(|e| ProcessError::Sys("set uid", e))?;
    set_keepcaps(false)?;
    // Shrink effective first: capset(2) refuses an effective set that is not
    // a subset of the permitted one.
    let sets = [
        (
            CapSet::Effective,
            caps_cfg.and_then(|c| c.effective().as_ref()),
        ),
        (
            CapSet::Inheritable,
            caps_cfg.and_then(|c| c.inheritable().as_ref()),
        ),
        (
            CapSet::Permitted,
            caps_cfg.and_then(|c| c.permitted().as_ref()),
        ),
    ];
    for (set, list) in sets {
        caps::set(None, set, &host_caps(list)).map_err(|e| ProcessError::Caps(set, e))?;
    }
    // A cap can only be ambient if it is permitted and inheritable; configs
    // (runc's default among them) list ambient caps without inheritable ones,
    // and runc then skips them with a warning. So do we.
    for cap in host_caps(caps_cfg.and_then(|c| c.ambient().as_ref())) {
        if caps::raise(None, CapSet::Ambient, cap).is_err() {
            crate::log::log(
                crate::log::Level::Debug,
                &format!("cannot raise ambient {cap}"),
            );
        }
    }
    Ok(())
}

fn set_keepcaps(on: bool) -> Result<()> {
    // SAFETY: PR_SET_KEEPCAPS takes an integer flag and no pointers.
    let rc = unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, libc::c_ulong::from(on), 0, 0, 0) };
    nix::Error::result(rc)
        .map(drop)
        .map_err(|e| ProcessError::Sys("set keepcaps", e))
}

/// prctl(PR_SET_NO_NEW_PRIVS).
pub fn set_no_new_privs() -> Result<()> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments and no pointers.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    nix::Error::result(rc)
        .map(drop)
        .map_err(|e| ProcessError::Sys("set no_new_privs", e))
}

/// The environment: `process.env` plus HOME from the container's /etc/passwd
/// (or `/`) when the config has none, as runc does.
pub fn environment(process: &Process) -> Vec<String> {
    let mut env = process.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        let home = std::fs::read_to_string("/etc/passwd")
            .ok()
            .and_then(|p| home_of(&p, process.user().uid()))
            .unwrap_or_else(|| "/".to_string());
        env.push(format!("HOME={home}"));
    }
    env
}

fn home_of(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 6 && f[2].parse::<u32>().ok() == Some(uid)).then(|| f[5].to_string())
    })
}

/// Finds the executable like execvp(3), using PATH from the container env.
/// Runs inside the container root.
pub fn find_executable(name: &str, env: &[String]) -> Result<PathBuf> {
    let is_executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let path = PathBuf::from(name);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(ProcessError::NotFound(name.to_string()))
        };
    }
    let path_var = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path_var
        .split(':')
        .map(|dir| Path::new(if dir.is_empty() { "." } else { dir }).join(name))
        .find(|p| is_executable(p))
        .ok_or_else(|| ProcessError::NotFound(name.to_string()))
}

/// Marks every fd from `first_to_close` on close-on-exec, so only stdio and
/// the preserved fds reach the user program (no runtime fd leaks into the
/// container, cf. CVE-2024-21626).
pub fn cloexec_fds_from(first_to_close: i32) -> Result<()> {
    let dir = std::fs::read_dir("/proc/self/fd").map_err(|source| ProcessError::Io {
        what: "list",
        path: PathBuf::from("/proc/self/fd"),
        source,
    })?;
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd >= first_to_close)
        .collect();
    for fd in fds {
        // SAFETY: F_SETFD on an fd number only changes its flags; an fd that
        // was the directory iterator's and is closed now just returns EBADF.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(())
}

/// Turns strings into C strings for execve.
pub fn cstrings(items: &[String]) -> Result<Vec<CString>> {
    items
        .iter()
        .map(|s| CString::new(s.as_bytes()).map_err(|_| ProcessError::Nul))
        .collect()
}

/// execve(2); returns only on failure.
pub fn exec(path: &Path, args: &[CString], env: &[CString]) -> ProcessError {
    let Ok(cpath) = CString::new(path.as_os_str().as_bytes()) else {
        return ProcessError::Nul;
    };
    match nix::unistd::execve(&cpath, args, env) {
        Err(e) => ProcessError::Sys("execve", e),
        Ok(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_comes_from_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nbad line\nwww:x:33:33::/var/www:/bin/false\n";
        assert_eq!(home_of(passwd, 33).as_deref(), Some("/var/www"));
        assert_eq!(home_of(passwd, 0).as_deref(), Some("/root"));
        assert_eq!(home_of(passwd, 7), None);
    }

    #[test]
    fn executable_lookup_uses_path_from_env() {
        let env = vec!["PATH=/nonexistent:/bin:/usr/bin".to_string()];
        let sh = find_executable("sh", &env).unwrap();
        assert!(sh.ends_with("sh"));
        assert!(matches!(
            find_executable("no-such-binary-xyz", &env),
            Err(ProcessError::NotFound(_))
        ));
        assert!(find_executable("/x/y", &env).is_err());
        assert_eq!(
            find_executable("/bin/sh", &env).unwrap(),
            PathBuf::from("/bin/sh")
        );
    }

    #[test]
    fn capability_names_map_to_host_caps() {
        let mut set = Capabilities::new();
        set.insert(oci_spec::runtime::Capability::Chown);
        set.insert(oci_spec::runtime::Capability::NetBindService);
        let host = host_caps(Some(&set));
        assert!(host.contains(&HostCap::CAP_CHOWN));
        assert!(host.contains(&HostCap::CAP_NET_BIND_SERVICE));
        assert_eq!(host.len(), 2);
    }

    #[test]
    fn nul_bytes_are_rejected() {
        assert!(matches!(
            cstrings(&["a\0b".to_string()]),
            Err(ProcessError::Nul)
        ));
    }
}
