//! The config's `mounts`, mounted into the rootfs.
//!
//! Mount targets are created and resolved inside the rootfs with `pathrs`
//! (openat2 RESOLVE_IN_ROOT), so a symlink in an image cannot point a mount at
//! a host path; the mount then goes onto `/proc/self/fd/N` of the resolved
//! handle, as runc does.

use std::fs::Permissions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sys::statvfs::{statvfs, FsFlags};
use oci_spec::runtime::Mount;
use pathrs::flags::OpenFlags;
use pathrs::Root;

/// Errors while mounting.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// Creating or resolving a path inside the rootfs failed.
    #[error("cannot resolve {path} in the rootfs")]
    Resolve {
        /// Container path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: pathrs::error::Error,
    },
    /// mount(2) failed.
    #[error("cannot mount {source_path} on {target} (type {fstype})")]
    Mount {
        /// Mount source.
        source_path: String,
        /// Container path.
        target: PathBuf,
        /// Filesystem type.
        fstype: String,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// A bind source does not exist.
    #[error("bind source {path} is not accessible")]
    BindSource {
        /// Host path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading /proc/self/mountinfo failed.
    #[error("cannot read /proc/self/mountinfo")]
    MountInfo(#[source] std::io::Error),
    /// A mount on /proc that is not procfs, or onto a /proc file that is not
    /// on runc's list (CVE-2019-16884: a fake /proc redirects the runtime's
    /// writes to /proc).
    #[error("{dest} is not allowed: only procfs may be mounted on /proc, and only lxcfs-style files below it")]
    ProcMount {
        /// Container path.
        dest: PathBuf,
    },
    /// /proc or /sys in the rootfs is a symlink (CVE-2023-27561).
    #[error("{path} in the rootfs is a symlink; refusing to mount {fstype} through it")]
    Symlink {
        /// Container path.
        path: PathBuf,
        /// Filesystem type.
        fstype: String,
    },
}

type Result<T> = std::result::Result<T, MountError>;

/// Mount options split into flags, propagation and filesystem data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Flags to set.
    pub flags: MsFlags,
    /// Propagation changes, applied after mounting.
    pub propagation: Vec<MsFlags>,
    /// Filesystem-specific options (`mode=755`, `size=...`).
    pub data: Vec<String>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            flags: MsFlags::empty(),
            propagation: Vec::new(),
            data: Vec::new(),
        }
    }
}

impl MountOptions {
    /// True for `bind`/`rbind`.
    pub fn is_bind(&self) -> bool {
        self.flags.contains(MsFlags::MS_BIND)
    }

    /// The data string for mount(2).
    pub fn data_str(&self) -> Option<String> {
        (!self.data.is_empty()).then(|| self.data.join(","))
    }
}

/// Parses mount(8)-style options (runc's table).
pub fn parse_options(options: &[String]) -> MountOptions {
    let mut out = MountOptions::default();
    for opt in options {
        if let Some((clear, flag)) = flag_option(opt) {
            if clear {
                out.flags.remove(flag);
            } else {
                out.flags.insert(flag);
            }
        } else if let Some(prop) = propagation_option(opt) {
            out.propagation.push(prop);
        } else if matches!(opt.as_str(), "tmpcopyup" | "idmap" | "ridmap" | "defaults") {
            // Not supported here (crun/cri-o extensions) or no-ops.
        } else {
            out.data.push(opt.clone());
        }
    }
    out
}

/// (clears?, flag) for a flag option.
fn flag_option(opt: &str) -> Option<(bool, MsFlags)> {
    let f = match opt {
        "ro" => (false, MsFlags::MS_RDONLY),
        "rw" => (true, MsFlags::MS_RDONLY),
        "nosuid" => (false, MsFlags::MS_NOSUID),
        "suid" => (true, MsFlags::MS_NOSUID),
        "nodev" => (false, MsFlags::MS_NODEV),
        "dev" => (true, MsFlags::MS_NODEV),
        "noexec" => (false, MsFlags::MS_NOEXEC),
        "exec" => (true, MsFlags::MS_NOEXEC),
        "sync" => (false, MsFlags::MS_SYNCHRONOUS),
        "async" => (true, MsFlags::MS_SYNCHRONOUS),
        "dirsync" => (false, MsFlags::MS_DIRSYNC),
        "remount" => (false, MsFlags::MS_REMOUNT),
        "mand" => (false, MsFlags::MS_MANDLOCK),
        "nomand" => (true, MsFlags::MS_MANDLOCK),
        "noatime" => (false, MsFlags::MS_NOATIME),
        "atime" => (true, MsFlags::MS_NOATIME),
        "nodiratime" => (false, MsFlags::MS_NODIRATIME),
        "diratime" => (true, MsFlags::MS_NODIRATIME),
        "relatime" => (false, MsFlags::MS_RELATIME),
        "norelatime" => (true, MsFlags::MS_RELATIME),
        "strictatime" => (false, MsFlags::MS_STRICTATIME),
        "nostrictatime" => (true, MsFlags::MS_STRICTATIME),
        "bind" => (false, MsFlags::MS_BIND),
        "rbind" => (false, MsFlags::MS_BIND | MsFlags::MS_REC),
        "silent" => (false, MsFlags::MS_SILENT),
        "loud" => (true, MsFlags::MS_SILENT),
        _ => return None,
    };
    Some(f)
}

fn propagation_option(opt: &str) -> Option<MsFlags> {
    let p = match opt {
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
        _ => return None,
    };
    Some(p)
}

/// The magic-link path of an fd, for mount(2) targets.
pub fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn resolve_err<'a>(path: &'a Path) -> impl FnOnce(pathrs::error::Error) -> MountError + 'a {
    move |source| MountError::Resolve {
        path: path.to_path_buf(),
        source,
    }
}

fn do_mount(
    source: Option<&Path>,
    target: &Path,
    container_path: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    mount(source, target, fstype, flags, data).map_err(|e| MountError::Mount {
        source_path: source.map(|s| s.display().to_string()).unwrap_or_default(),
        target: container_path.to_path_buf(),
        fstype: fstype.unwrap_or("none").to_string(),
        source: e,
    })
}

/// Makes sure `dest` exists in the rootfs as a directory (or, for a bind of a
/// file, as a file) and returns a handle to it.
pub fn ensure_target(root: &Root, dest: &Path, file: bool) -> Result<pathrs::Handle> {
    if file {
        if let Some(parent) = dest.parent() {
            root.mkdir_all(parent, &Permissions::from_mode(0o755))
                .map_err(resolve_err(dest))?;
        }
        if root.resolve(dest).is_err() {
            root.create_file(
                dest,
                OpenFlags::O_RDONLY | OpenFlags::O_CLOEXEC,
                &Permissions::from_mode(0o644),
            )
            .map_err(resolve_err(dest))?;
        }
        root.resolve(dest).map_err(resolve_err(dest))
    } else {
        root.mkdir_all(dest, &Permissions::from_mode(0o755))
            .map_err(resolve_err(dest))
    }
}

/// Flags a bind remount must keep because the kernel locks them (a remount
/// that would clear nosuid/nodev/noexec of the source fails with EPERM).
pub fn locked_flags(target: &Path) -> MsFlags {
    let Ok(st) = statvfs(target) else {
        return MsFlags::empty();
    };
    let f = st.flags();
    let mut out = MsFlags::empty();
    for (st_flag, ms_flag) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(st_flag) {
            out |= ms_flag;
        }
    }
    out
}

/// Where the mount helpers need more than the mount itself.
#[derive(Debug)]
pub struct MountContext<'a> {
    /// The rootfs, opened after it was bind-mounted onto itself.
    pub root: &'a Root,
    /// Bundle directory (relative bind sources are relative to it).
    pub bundle: &'a Path,
    /// The container's cgroup path (for `cgroup` mounts).
    pub cgroup_path: &'a Path,
}

/// /proc files that may be bind-mounted over (lxcfs and the like), as runc
/// allows them.
const PROC_ALLOWED: [&str; 10] = [
    "/proc/cpuinfo",
    "/proc/diskstats",
    "/proc/meminfo",
    "/proc/stat",
    "/proc/swaps",
    "/proc/uptime",
    "/proc/loadavg",
    "/proc/slabinfo",
    "/proc/net/dev",
    "/proc/sys/kernel/ns_last_pid",
];

/// The destination with `.` and `..` folded lexically (as the kernel would
/// resolve it inside the root, where `..` of `/` is `/`).
fn clean(dest: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in dest.components() {
        match c {
            std::path::Component::Normal(n) => out.push(n),
            std::path::Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// runc's checkProcMount: /proc itself takes only procfs; below /proc only
/// the allowed files, or a bind whose source is itself in procfs.
fn check_proc_mount(m: &Mount, fstype: &str, is_bind: bool) -> Result<()> {
    let dest = clean(m.destination());
    if !dest.starts_with("/proc") {
        return Ok(());
    }
    let ok = if dest == Path::new("/proc") {
        fstype == "proc"
    } else {
        PROC_ALLOWED.iter().any(|p| dest == Path::new(p))
            || (is_bind
                && m.source().as_ref().is_some_and(|src| {
                    nix::sys::statfs::statfs(src.as_path())
                        .is_ok_and(|st| st.filesystem_type() == nix::sys::statfs::PROC_SUPER_MAGIC)
                }))
    };
    if ok {
        Ok(())
    } else {
        Err(MountError::ProcMount { dest })
    }
}

/// Refuses to mount procfs or sysfs through a symlink at the destination:
/// the image could point it anywhere in the rootfs (runc 1.1.5).
fn check_not_symlink(root: &Root, dest: &Path, fstype: &str) -> Result<()> {
    if fstype != "proc" && fstype != "sysfs" {
        return Ok(());
    }
    match root.resolve_nofollow(dest) {
        Ok(h) => {
            let st =
                nix::sys::stat::fstat(h.as_fd().as_raw_fd()).map_err(|e| MountError::Mount {
                    source_path: fstype.to_string(),
                    target: dest.to_path_buf(),
                    fstype: fstype.to_string(),
                    source: e,
                })?;
            if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
                return Err(MountError::Symlink {
                    path: dest.to_path_buf(),
                    fstype: fstype.to_string(),
                });
            }
            Ok(())
        }
        // Missing: created as a directory below.
        Err(_) => Ok(()),
    }
}

/// Mounts one config mount into the rootfs.
pub fn mount_one(ctx: &MountContext<'_>, m: &Mount) -> Result<()> {
    let opts = parse_options(m.options().as_deref().unwrap_or_default());
    let fstype = m.typ().as_deref().unwrap_or("none");
    let dest = m.destination();
    check_proc_mount(m, fstype, opts.is_bind() || fstype == "bind")?;
    check_not_symlink(ctx.root, dest, fstype)?;
    if fstype == "cgroup" || fstype == "cgroup2" {
        return mount_cgroup(ctx, dest, &opts);
    }
    if opts.is_bind() || fstype == "bind" {
        return mount_bind(ctx, m, &opts);
    }
    let handle = ensure_target(ctx.root, dest, false)?;
    let target = fd_path(handle.as_fd());
    let source = m.source().clone().unwrap_or_else(|| PathBuf::from(fstype));
    let data = opts.data_str();
    do_mount(
        Some(&source),
        &target,
        dest,
        Some(fstype),
        opts.flags,
        data.as_deref(),
    )?;
    apply_propagation(ctx.root, dest, &opts)
}

fn mount_bind(ctx: &MountContext<'_>, m: &Mount, opts: &MountOptions) -> Result<()> {
    let dest = m.destination();
    let source = m.source().clone().unwrap_or_default();
    let source = ctx.bundle.join(source);
    let meta = std::fs::metadata(&source).map_err(|e| MountError::BindSource {
        path: source.clone(),
        source: e,
    })?;
    let handle = ensure_target(ctx.root, dest, !meta.is_dir())?;
    let target = fd_path(handle.as_fd());
    let bind_flags = MsFlags::MS_BIND | (opts.flags & MsFlags::MS_REC);
    do_mount(Some(&source), &target, dest, None, bind_flags, None)?;
    let extra = opts.flags - (MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
    if !extra.is_empty() {
        // The handle points below the new mount: resolve again to reach it.
        let mounted = ctx.root.resolve(dest).map_err(resolve_err(dest))?;
        let target = fd_path(mounted.as_fd());
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra | locked_flags(&target);
        do_mount(None, &target, dest, None, flags, None)?;
    }
    apply_propagation(ctx.root, dest, opts)
}

fn apply_propagation(root: &Root, dest: &Path, opts: &MountOptions) -> Result<()> {
    if opts.propagation.is_empty() {
        return Ok(());
    }
    let mounted = root.resolve(dest).map_err(resolve_err(dest))?;
    let target = fd_path(mounted.as_fd());
    for flag in &opts.propagation {
        do_mount(None, &target, dest, None, *flag, None)?;
    }
    Ok(())
}

/// A `cgroup` mount: a tmpfs with each host hierarchy's container cgroup
/// bind-mounted into it (cgroup v1/hybrid), or the container's cgroup v2
/// directory (unified). runc does the same without a cgroup namespace.
fn mount_cgroup(ctx: &MountContext<'_>, dest: &Path, opts: &MountOptions) -> Result<()> {
    let hierarchies = cgroup_hierarchies()?;
    let unified_only = hierarchies.len() == 1 && hierarchies[0].1 == "cgroup2";
    let rel = ctx.cgroup_path.strip_prefix("/").unwrap_or(ctx.cgroup_path);
    let ro = opts.flags & MsFlags::MS_RDONLY;
    let base = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if unified_only {
        let host = hierarchies[0].0.join(rel);
        return bind_ro(ctx.root, &host, dest, base | ro);
    }
    let handle = ensure_target(ctx.root, dest, false)?;
    do_mount(
        Some(Path::new("tmpfs")),
        &fd_path(handle.as_fd()),
        dest,
        Some("tmpfs"),
        base,
        Some("mode=755"),
    )?;
    for (mountpoint, _) in &hierarchies {
        let host = mountpoint.join(rel);
        let Some(name) = mountpoint.file_name() else {
            continue;
        };
        if host.is_dir() {
            bind_ro(ctx.root, &host, &dest.join(name), base | ro)?;
        }
    }
    if !ro.is_empty() {
        let mounted = ctx.root.resolve(dest).map_err(resolve_err(dest))?;
        let target = fd_path(mounted.as_fd());
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | base;
        do_mount(None, &target, dest, None, flags, None)?;
    }
    Ok(())
}

fn bind_ro(root: &Root, host: &Path, dest: &Path, flags: MsFlags) -> Result<()> {
    let handle = ensure_target(root, dest, false)?;
    let target = fd_path(handle.as_fd());
    do_mount(Some(host), &target, dest, None, MsFlags::MS_BIND, None)?;
    let mounted = root.resolve(dest).map_err(resolve_err(dest))?;
    let target = fd_path(mounted.as_fd());
    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags | locked_flags(&target);
    do_mount(None, &target, dest, None, flags, None)
}

/// (mount point, fs type) of the host's cgroup hierarchies under /sys/fs/cgroup.
fn cgroup_hierarchies() -> Result<Vec<(PathBuf, String)>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(MountError::MountInfo)?;
    Ok(parse_mountinfo(&text)
        .into_iter()
        .filter(|(mp, ty)| (ty == "cgroup" || ty == "cgroup2") && mp.starts_with("/sys/fs/cgroup"))
        .collect())
}

/// (mount point, fs type) of each mountinfo line.
pub fn parse_mountinfo(text: &str) -> Vec<(PathBuf, String)> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mountpoint = left.split(' ').nth(4)?;
            let fstype = right.split(' ').next()?;
            Some((
                PathBuf::from(unescape_octal(mountpoint)),
                fstype.to_string(),
            ))
        })
        .collect()
}

/// Undoes the kernel's `\040`-style escapes in mountinfo fields.
pub fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let d = &bytes[i + 1..i + 4];
            if d.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let v = (d[0] - b'0') as u32 * 64 + (d[1] - b'0') as u32 * 8 + (d[2] - b'0') as u32;
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn podman_proc_and_dev_options() {
        let o = parse_options(&strs(&[
            "nosuid",
            "noexec",
            "strictatime",
            "mode=755",
            "size=65536k",
        ]));
        assert_eq!(
            o.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_STRICTATIME
        );
        assert_eq!(o.data_str().as_deref(), Some("mode=755,size=65536k"));
        assert!(!o.is_bind());
    }

    #[test]
    fn bind_with_propagation_and_rw_clearing_ro() {
        let o = parse_options(&strs(&["rbind", "ro", "rw", "rprivate"]));
        assert!(o.is_bind());
        assert!(o.flags.contains(MsFlags::MS_REC));
        assert!(!o.flags.contains(MsFlags::MS_RDONLY));
        assert_eq!(o.propagation, vec![MsFlags::MS_PRIVATE | MsFlags::MS_REC]);
        assert_eq!(o.data_str(), None);
    }

    #[test]
    fn mountinfo_lines_with_escapes() {
        let text = "30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu\n\
                    31 25 0:27 / /mnt/a\\040b rw - ext4 /dev/x rw\n\
                    garbage line\n";
        let v = parse_mountinfo(text);
        assert_eq!(v.len(), 2);
        assert_eq!(
            v[0],
            (PathBuf::from("/sys/fs/cgroup/cpu"), "cgroup".to_string())
        );
        assert_eq!(v[1].0, PathBuf::from("/mnt/a b"));
        assert_eq!(unescape_octal("x\\"), "x\\");
        assert_eq!(unescape_octal("\\04"), "\\04");
    }
}
