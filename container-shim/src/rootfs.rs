//! The container's root filesystem: propagation, mounts, /dev, pivot_root,
//! and what happens inside the new root (sysctls, read-only and masked paths,
//! read-only root, hostname). Runs in init, in the container's mount namespace.

use std::fs::Permissions;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{open, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{fchmodat, makedev, mknodat, FchmodatFlags, Mode, SFlag};
use nix::unistd::{chdir, chroot, fchdir, fchownat, pivot_root, symlinkat, Gid, Uid};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, Spec};
use pathrs::Root;

use crate::mounts::{self, ensure_target, fd_path, locked_flags, MountContext, MountError};

/// Errors while building the root filesystem.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A config mount failed.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// A syscall on a rootfs path failed.
    #[error("cannot {what} {path}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// Opening the rootfs for safe path resolution failed.
    #[error("cannot open rootfs {path}")]
    Open {
        /// The rootfs.
        path: PathBuf,
        /// The cause.
        #[source]
        source: pathrs::error::Error,
    },
    /// /dev/null is not the null device (a symlink or file from the image).
    #[error("/dev/null in the container is not the null device (1:3); refusing to mask with it")]
    NotDevNull,
    /// A sysctl that is not a plain dotted name.
    #[error("invalid sysctl name {0:?}")]
    SysctlName(String),
    /// Writing a sysctl failed.
    #[error("cannot set sysctl {key}")]
    Sysctl {
        /// The sysctl.
        key: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, RootfsError>;

fn sys_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> RootfsError + 'a {
    move |source| RootfsError::Sys {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What the rootfs set-up needs besides the config.
#[derive(Debug)]
pub struct RootfsPlan<'a> {
    /// The config.
    pub spec: &'a Spec,
    /// Absolute rootfs path.
    pub rootfs: &'a Path,
    /// Bundle directory.
    pub bundle: &'a Path,
    /// Container cgroup path.
    pub cgroup_path: &'a Path,
    /// True when running in a new user namespace (mknod is not allowed).
    pub in_userns: bool,
    /// True when the config creates a mount namespace (not joined, not absent).
    pub own_mount_ns: bool,
}

/// Makes the mount that holds `rootfs`'s parent directory private.
fn make_parent_mount_private(rootfs: &Path) -> Result<()> {
    let parent = rootfs.parent().unwrap_or(Path::new("/"));
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mountpoint = mounts::parse_mountinfo(&text)
        .into_iter()
        .map(|(mp, _)| mp)
        .filter(|mp| parent.starts_with(mp))
        .max_by_key(|mp| mp.components().count())
        .unwrap_or_else(|| PathBuf::from("/"));
    mount(
        None::<&str>,
        &mountpoint,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys_err("make private", &mountpoint))
}

/// Propagation, self-bind of the rootfs, all config mounts, /dev nodes and
/// links. Runs before pivot_root, in the new mount namespace.
pub fn prepare(plan: &RootfsPlan<'_>) -> Result<()> {
    let linux = plan.spec.linux().as_ref();
    let propagation = linux
        .and_then(|l| l.rootfs_propagation().as_deref())
        .and_then(|p| {
            mounts::parse_options(&[p.to_string()])
                .propagation
                .first()
                .copied()
        })
        .unwrap_or(MsFlags::MS_SLAVE | MsFlags::MS_REC);
    // Keep our mounts from propagating back to the host. Only in a mount
    // namespace of the container's own: without one (or in a joined one)
    // the propagation of `/` belongs to whoever else lives there.
    if plan.own_mount_ns {
        mount(None::<&str>, "/", None::<&str>, propagation, None::<&str>)
            .map_err(sys_err("set propagation of", Path::new("/")))?;
    }
    // pivot_root refuses a new root whose parent mount is shared (as with
    // rootfsPropagation "shared"): make that parent mount private, as runc.
    if plan.own_mount_ns && propagation.contains(MsFlags::MS_SHARED) {
        make_parent_mount_private(plan.rootfs)?;
    }
    // pivot_root needs the new root to be a mount point.
    mount(
        Some(plan.rootfs),
        plan.rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys_err("bind-mount rootfs", plan.rootfs))?;
    let root = Root::open(plan.rootfs).map_err(|source| RootfsError::Open {
        path: plan.rootfs.to_path_buf(),
        source,
    })?;
    let ctx = MountContext {
        root: &root,
        bundle: plan.bundle,
        cgroup_path: plan.cgroup_path,
    };
    let config_mounts = plan.spec.mounts().as_deref().unwrap_or_default();
    for m in config_mounts {
        mounts::mount_one(&ctx, m)?;
    }
    let dev_is_bind = config_mounts.iter().any(|m| {
        m.destination() == Path::new("/dev")
            && (m.typ().as_deref() == Some("bind")
                || mounts::parse_options(m.options().as_deref().unwrap_or_default()).is_bind())
    });
    if !dev_is_bind {
        let mut dirs = DirCache::new(&root);
        create_devices(&root, &mut dirs, plan)?;
        create_dev_links(&mut dirs)?;
    }
    Ok(())
}

/// runc's default devices, overridden by the config's entries for the same path.
fn devices(spec: &Spec) -> Vec<LinuxDevice> {
    let mut list: Vec<LinuxDevice> = [
        ("/dev/null", 1, 3),
        ("/dev/zero", 1, 5),
        ("/dev/full", 1, 7),
        ("/dev/random", 1, 8),
        ("/dev/urandom", 1, 9),
        ("/dev/tty", 5, 0),
    ]
    .into_iter()
    .map(|(path, major, minor)| {
        let mut d = LinuxDevice::default();
        d.set_path(PathBuf::from(path));
        d.set_typ(LinuxDeviceType::C);
        d.set_major(major);
        d.set_minor(minor);
        d.set_file_mode(Some(0o666));
        d.set_uid(Some(0));
        d.set_gid(Some(0));
        d
    })
    .collect();
    let configured = spec
        .linux()
        .as_ref()
        .and_then(|l| l.devices().clone())
        .unwrap_or_default();
    list.retain(|d| configured.iter().all(|c| c.path() != d.path()));
    list.extend(configured);
    list
}

fn create_devices(root: &Root, dirs: &mut DirCache<'_>, plan: &RootfsPlan<'_>) -> Result<()> {
    for dev in devices(plan.spec) {
        let path = dev.path();
        if plan.in_userns {
            bind_host_device(root, path)?;
        } else {
            mknod_device(dirs, &dev)?;
        }
    }
    Ok(())
}

/// Directories inside the rootfs resolved (and created) once: pathrs'
/// `mkdir_all` re-checks procfs and reopens the handle on every call (~35
/// syscalls), and every default device and link lives in the same /dev.
struct DirCache<'a> {
    root: &'a Root,
    dirs: Vec<(PathBuf, pathrs::Handle)>,
}

impl<'a> DirCache<'a> {
    fn new(root: &'a Root) -> Self {
        DirCache {
            root,
            dirs: Vec::new(),
        }
    }

    fn get(&mut self, path: &Path) -> Result<&pathrs::Handle> {
        let index = match self.dirs.iter().position(|(p, _)| p == path) {
            Some(i) => i,
            None => {
                let handle = self
                    .root
                    .mkdir_all(path, &Permissions::from_mode(0o755))
                    .map_err(|source| MountError::Resolve {
                        path: path.to_path_buf(),
                        source,
                    })?;
                self.dirs.push((path.to_path_buf(), handle));
                self.dirs.len() - 1
            }
        };
        Ok(&self.dirs[index].1)
    }
}

/// In a user namespace mknod(2) is not allowed: bind the host's node instead.
fn bind_host_device(root: &Root, path: &Path) -> Result<()> {
    // A symlink from the image would redirect the bind: remove it first.
    if let Ok(h) = root.resolve_nofollow(path) {
        let st = nix::sys::stat::fstat(h.as_fd().as_raw_fd()).map_err(sys_err("stat", path))?;
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            root.remove_file(path)
                .map_err(|source| MountError::Resolve {
                    path: path.to_path_buf(),
                    source,
                })?;
        }
    }
    let handle = ensure_target(root, path, true)?;
    let target = fd_path(handle.as_fd());
    mount(
        Some(path),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys_err("bind device", path))
}

fn mknod_device(dirs: &mut DirCache<'_>, dev: &LinuxDevice) -> Result<()> {
    let path = dev.path();
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(());
    };
    let dir = dirs.get(parent)?;
    let kind = match dev.typ() {
        LinuxDeviceType::B => SFlag::S_IFBLK,
        LinuxDeviceType::P => SFlag::S_IFIFO,
        _ => SFlag::S_IFCHR,
    };
    let mode = Mode::from_bits_truncate(dev.file_mode().unwrap_or(0o666) & 0o7777);
    let devno = makedev(dev.major() as u64, dev.minor() as u64);
    let dirfd = dir.as_fd().as_raw_fd();
    match mknodat(Some(dirfd), name, kind, mode, devno) {
        Ok(()) => {}
        // Whatever the image has there (a symlink, a file) is replaced, so
        // the node is the configured device (CVE-2025-31133).
        Err(nix::Error::EEXIST) => {
            nix::unistd::unlinkat(Some(dirfd), name, nix::unistd::UnlinkatFlags::NoRemoveDir)
                .map_err(sys_err("replace", path))?;
            mknodat(Some(dirfd), name, kind, mode, devno).map_err(sys_err("mknod", path))?;
        }
        Err(e) => return Err(sys_err("mknod", path)(e)),
    }
    // mknod honours the umask; set the exact mode and owner.
    fchmodat(Some(dirfd), name, mode, FchmodatFlags::NoFollowSymlink)
        .or_else(|e| {
            if e == nix::Error::EOPNOTSUPP {
                Ok(())
            } else {
                Err(e)
            }
        })
        .map_err(sys_err("chmod", path))?;
    fchownat(
        Some(dirfd),
        name,
        dev.uid().map(Uid::from_raw),
        dev.gid().map(Gid::from_raw),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(sys_err("chown", path))
}

/// /dev/fd, /dev/std{in,out,err}, /dev/ptmx (and /dev/core if the host has
/// /proc/kcore), like runc.
fn create_dev_links(dirs: &mut DirCache<'_>) -> Result<()> {
    let dev = dirs.get(Path::new("/dev"))?;
    let mut links = vec![
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
    ];
    if Path::new("/proc/kcore").exists() {
        links.push(("/proc/kcore", "core"));
    }
    let dirfd = dev.as_fd().as_raw_fd();
    for (target, name) in links {
        match symlinkat(target, Some(dirfd), name) {
            Ok(()) | Err(nix::Error::EEXIST) => {}
            Err(e) => return Err(sys_err("symlink", Path::new(name))(e)),
        }
    }
    // /dev/ptmx must be the devpts instance's ptmx (newinstance): replace
    // whatever node the image or the default devices put there.
    let _ = nix::unistd::unlinkat(Some(dirfd), "ptmx", nix::unistd::UnlinkatFlags::NoRemoveDir);
    match symlinkat("pts/ptmx", Some(dirfd), "ptmx") {
        Ok(()) | Err(nix::Error::EEXIST) => Ok(()),
        Err(e) => Err(sys_err("symlink", Path::new("/dev/ptmx"))(e)),
    }
}

/// How the rootfs becomes `/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enter {
    /// pivot_root(2) and detach the old root (a mount namespace is listed).
    PivotRoot,
    /// MS_MOVE onto `/` and chroot(2) (`--no-pivot`).
    MoveAndChroot,
    /// Only chroot(2): no mount namespace of the container's own, so nothing
    /// may be moved or detached in the namespace it shares (runc does this).
    Chroot,
}

/// Makes the rootfs `/`.
pub fn enter(rootfs: &Path, mode: Enter) -> Result<()> {
    if mode == Enter::Chroot {
        chdir(rootfs).map_err(sys_err("chdir to", rootfs))?;
        chroot(".").map_err(sys_err("chroot to", rootfs))?;
    } else if mode == Enter::MoveAndChroot {
        chdir(rootfs).map_err(sys_err("chdir to", rootfs))?;
        mount(
            Some(rootfs),
            "/",
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(sys_err("move mount", rootfs))?;
        chroot(".").map_err(sys_err("chroot to", rootfs))?;
    } else {
        // pivot_root(".", ".") stacks the old root on top of the new one; it
        // is then detached without needing a directory for it (runc's way).
        let old = open(
            "/",
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(sys_err("open", Path::new("/")))?;
        // SAFETY: `open` just returned this fd and nothing else owns it.
        let old = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(old) };
        chdir(rootfs).map_err(sys_err("chdir to", rootfs))?;
        pivot_root(".", ".").map_err(sys_err("pivot_root to", rootfs))?;
        fchdir(old.as_raw_fd()).map_err(sys_err("fchdir to old root", rootfs))?;
        mount(
            None::<&str>,
            ".",
            None::<&str>,
            MsFlags::MS_SLAVE | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(sys_err("make old root slave", rootfs))?;
        umount2(".", MntFlags::MNT_DETACH).map_err(sys_err("unmount old root", rootfs))?;
    }
    chdir("/").map_err(sys_err("chdir to", Path::new("/")))
}

/// Inside the new root: sysctls, hostname, read-only paths, masked paths and
/// the read-only root. Order as in runc: sysctls before /proc/sys goes read-only.
pub fn finish(spec: &Spec) -> Result<()> {
    let linux = spec.linux().as_ref();
    if let Some(sysctls) = linux.and_then(|l| l.sysctl().as_ref()) {
        for (key, value) in sysctls {
            write_sysctl(key, value)?;
        }
    }
    if let Some(name) = spec.hostname() {
        nix::unistd::sethostname(name).map_err(sys_err("set hostname", Path::new(name)))?;
    }
    if let Some(name) = spec.domainname() {
        set_domainname(name)?;
    }
    for p in linux
        .and_then(|l| l.readonly_paths().as_deref())
        .unwrap_or_default()
    {
        readonly_path(Path::new(p))?;
    }
    for p in linux
        .and_then(|l| l.masked_paths().as_deref())
        .unwrap_or_default()
    {
        mask_path(Path::new(p))?;
    }
    if spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        let flags = flags | locked_flags(Path::new("/"));
        mount(None::<&str>, "/", None::<&str>, flags, None::<&str>)
            .map_err(sys_err("remount read-only", Path::new("/")))?;
    }
    Ok(())
}

fn set_domainname(name: &str) -> Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, which outlive the call.
    let rc = unsafe { libc::setdomainname(name.as_ptr().cast(), name.len()) };
    nix::Error::result(rc)
        .map(drop)
        .map_err(sys_err("set domainname", Path::new(name)))
}

/// Writes a sysctl through a private procfs instance (pathrs' hardened
/// handle: fsopen'd, no symlinks, no mount crossings), so nothing mounted
/// over a /proc/sys file in the container's mount namespace can redirect
/// the write to another file (CVE-2025-52881).
fn write_sysctl(key: &str, value: &str) -> Result<()> {
    use std::io::Write;
    let valid = !key.is_empty()
        && key
            .split(['.', '/'])
            .all(|part| !part.is_empty() && part != ".." && part != ".");
    if !valid {
        return Err(RootfsError::SysctlName(key.to_string()));
    }
    let sysctl_err = |e: std::io::Error| RootfsError::Sysctl {
        key: key.to_string(),
        source: e,
    };
    let pathrs_err = |e: pathrs::error::Error| sysctl_err(std::io::Error::other(e.to_string()));
    let procfs = pathrs::procfs::ProcfsHandle::new().map_err(pathrs_err)?;
    let sub = PathBuf::from("sys").join(key.replace('.', "/"));
    let mut file = procfs
        .open(
            pathrs::procfs::ProcfsBase::ProcRoot,
            &sub,
            pathrs::flags::OpenFlags::O_WRONLY | pathrs::flags::OpenFlags::O_CLOEXEC,
        )
        .map_err(pathrs_err)?;
    file.write_all(value.as_bytes()).map_err(sysctl_err)
}

fn readonly_path(path: &Path) -> Result<()> {
    match mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    ) {
        Ok(()) => {}
        Err(nix::Error::ENOENT) => return Ok(()),
        Err(e) => return Err(sys_err("bind", path)(e)),
    }
    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC;
    mount(
        None::<&str>,
        path,
        None::<&str>,
        flags | locked_flags(path),
        None::<&str>,
    )
    .map_err(sys_err("remount read-only", path))
}

/// Masks `path`: a read-only tmpfs on a directory, the container's
/// /dev/null bound over anything else. Both ends are opened without
/// following symlinks and /dev/null must be the real 1:3 device
/// (CVE-2025-31133: an image's /dev/null pointing at a /proc file would turn
/// the mask into a writable bind of that file).
fn mask_path(path: &Path) -> Result<()> {
    let target = match open_nofollow(path) {
        Ok(fd) => fd,
        Err(nix::Error::ENOENT) => return Ok(()),
        Err(e) => return Err(sys_err("open masked path", path)(e)),
    };
    let st = nix::sys::stat::fstat(target.as_raw_fd()).map_err(sys_err("stat", path))?;
    let target_path = fd_path(target.as_fd());
    let result = match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => mount(
            Some("tmpfs"),
            &target_path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        ),
        // A symlink is not followed to whatever it names; it is left alone.
        libc::S_IFLNK => return Ok(()),
        _ => {
            let null = real_dev_null()?;
            mount(
                Some(&fd_path(null.as_fd())),
                &target_path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
        }
    };
    result.map_err(sys_err("mask", path))
}

fn open_nofollow(path: &Path) -> nix::Result<std::os::fd::OwnedFd> {
    let fd = open(
        path,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: `open` just returned this fd and nothing else owns it.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// The container's /dev/null, checked to be the null device itself.
fn real_dev_null() -> Result<std::os::fd::OwnedFd> {
    let path = Path::new("/dev/null");
    let fd = open_nofollow(path).map_err(sys_err("open", path))?;
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(sys_err("stat", path))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFCHR || st.st_rdev != makedev(1, 3) {
        return Err(RootfsError::NotDevNull);
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_devices_override_defaults() {
        let mut spec = Spec::default();
        let mut linux = spec.linux().clone().unwrap();
        let mut null = LinuxDevice::default();
        null.set_path(PathBuf::from("/dev/null"));
        null.set_major(1);
        null.set_minor(3);
        null.set_file_mode(Some(0o600));
        let mut fuse = LinuxDevice::default();
        fuse.set_path(PathBuf::from("/dev/fuse"));
        fuse.set_major(10);
        fuse.set_minor(229);
        linux.set_devices(Some(vec![null, fuse]));
        spec.set_linux(Some(linux));
        let list = devices(&spec);
        assert_eq!(list.len(), 7);
        let nulls: Vec<_> = list
            .iter()
            .filter(|d| d.path() == Path::new("/dev/null"))
            .collect();
        assert_eq!(nulls.len(), 1);
        assert_eq!(nulls[0].file_mode(), Some(0o600));
    }

    #[test]
    fn sysctl_names_cannot_escape() {
        for bad in ["", "..", "net/../../etc", "a..b", "."] {
            assert!(
                matches!(write_sysctl(bad, "1"), Err(RootfsError::SysctlName(_))),
                "{bad}"
            );
        }
    }
}
