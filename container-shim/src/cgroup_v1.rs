//! cgroup v1 hierarchies (legacy and hybrid layouts) handled without
//! libcgroups' v1 manager, for speed.
//!
//! Two measured costs made `run` slow with libcgroups' v1 manager here:
//! - its constructor reads /proc/self/mountinfo and /proc/self/cgroup once
//!   per controller through pathrs' hardened procfs handle (~840 syscalls,
//!   ~1 ms of CPU per command); here mountinfo is read once, plainly, as runc
//!   does (the runtime runs in the host's mount namespace);
//! - moving a process by writing its pid to `cgroup.procs` takes the kernel's
//!   global `cgroup_threadgroup_rwsem` for writing, which waits for an RCU
//!   grace period (~10 ms on these machines, measured with strace -T). A
//!   single-threaded process that moves itself by writing `0` to `tasks` skips
//!   that lock (kernel/cgroup/cgroup.c, `cgroup_procs_write_start`). So the
//!   runtime creates the directories and writes the limits, and the
//!   intermediate child (single-threaded: forked from the single-threaded
//!   runtime) joins by itself before it creates any namespace or process.
//!
//! The limits other than device rules are still written by libcgroups (see
//! `cgroups.rs`); the device rules are the same list libcgroups writes.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceCgroupBuilder, LinuxDeviceType};

/// The controllers libcgroups' v1 manager handles (its `CONTROLLERS` list).
const CONTROLLERS: [&str; 12] = [
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "hugetlb",
    "pids",
    "perf_event",
    "memory",
    "blkio",
    "net_prio",
    "net_cls",
    "freezer",
];

/// Named (controller-less) hierarchies the container gets a directory in,
/// as with runc: systemd inside a container (and on the host) keeps its own
/// process tree in `name=systemd`, and a container's systemd needs its
/// cgroup there to exist, be its own, and be writable through the bind
/// mount podman adds for `--systemd`.
const NAMED: [&str; 1] = ["name=systemd"];

/// Errors of the v1 hierarchies.
#[derive(Debug, thiserror::Error)]
pub enum V1Error {
    /// The cgroup path leaves the hierarchy root (`..`) or is the root
    /// itself (removing it would SIGKILL every process on the host).
    #[error("cgroup path {0} must be below the hierarchy root, without '..'")]
    BadPath(PathBuf),
    /// A cgroup file or directory operation failed.
    #[error("cannot {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No hierarchy of the controller that lists processes is mounted.
    #[error("no devices (or other) v1 hierarchy is mounted")]
    NoHierarchy,
    /// A `cgroup.procs` line that is not a pid.
    #[error("bad pid {0:?} in cgroup.procs")]
    BadPid(String),
    /// Building a device rule failed.
    #[error("invalid device cgroup rule")]
    Device(#[source] oci_spec::OciSpecError),
}

type Result<T> = std::result::Result<T, V1Error>;

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> V1Error + 'a {
    move |source| V1Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// One container's directory in each mounted v1 hierarchy.
#[derive(Debug, Clone)]
pub struct V1Hierarchies {
    /// (controller, hierarchy mount point, container directory).
    dirs: Vec<(&'static str, PathBuf, PathBuf)>,
}

impl V1Hierarchies {
    /// Finds the hierarchies from one read of /proc/self/mountinfo.
    pub fn discover(cgroup_path: &Path) -> Result<Self> {
        let path = Path::new("/proc/self/mountinfo");
        let text = std::fs::read_to_string(path).map_err(io_err("read", path))?;
        Self::from_mountinfo(&text, cgroup_path)
    }

    /// The container directories for `cgroup_path` given mountinfo text.
    /// A hierarchy is matched by its super options (`rw,cpu,cpuacct`), so
    /// co-mounted controllers share one directory.
    pub fn from_mountinfo(mountinfo: &str, cgroup_path: &Path) -> Result<Self> {
        let rel = cgroup_path.strip_prefix("/").unwrap_or(cgroup_path);
        let below_root = rel.components().any(|c| matches!(c, Component::Normal(_)));
        if !below_root || cgroup_path.components().any(|c| c == Component::ParentDir) {
            return Err(V1Error::BadPath(cgroup_path.to_path_buf()));
        }
        let mounts: Vec<(PathBuf, Vec<&str>)> = mountinfo
            .lines()
            .filter_map(|line| {
                let (left, right) = line.split_once(" - ")?;
                let mut right = right.split(' ');
                if right.next()? != "cgroup" {
                    return None;
                }
                let opts = right.nth(1)?.split(',').collect();
                let mount_point = left.split(' ').nth(4)?;
                Some((
                    PathBuf::from(crate::mounts::unescape_octal(mount_point)),
                    opts,
                ))
            })
            .collect();
        let dirs = CONTROLLERS
            .iter()
            .chain(NAMED.iter())
            .filter_map(|ctrl| {
                let (mp, _) = mounts.iter().find(|(_, opts)| opts.contains(ctrl))?;
                Some((*ctrl, mp.clone(), mp.join(rel)))
            })
            .collect();
        Ok(V1Hierarchies { dirs })
    }

    /// The container's directory of `controller`, if that hierarchy is mounted.
    pub fn dir(&self, controller: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(c, _, _)| *c == controller)
            .map(|(_, _, d)| d.as_path())
    }

    /// Distinct container directories (co-mounted controllers share one).
    fn unique_dirs(&self) -> Vec<&Path> {
        let mut out: Vec<&Path> = Vec::new();
        for (_, _, dir) in &self.dirs {
            if !out.contains(&dir.as_path()) {
                out.push(dir);
            }
        }
        out
    }

    /// Creates the directories; a new cpuset gets its parent's cpus and mems
    /// (an empty cpuset refuses tasks with ENOSPC).
    pub fn create(&self) -> Result<()> {
        for dir in self.unique_dirs() {
            std::fs::create_dir_all(dir).map_err(io_err("create cgroup", dir))?;
        }
        if let Some((_, mount, dir)) = self.dirs.iter().find(|(c, _, _)| *c == "cpuset") {
            fill_cpuset(mount, dir)?;
        }
        Ok(())
    }

    /// Writes the device rules: the config's, then the default nodes and the
    /// default allow-list, in the order libcgroups writes them.
    pub fn apply_devices(&self, rules: &[LinuxDeviceCgroup]) -> Result<()> {
        let Some(dir) = self.dir("devices") else {
            return Ok(());
        };
        for rule in rules.iter().cloned().chain(default_rules()?) {
            let file = if rule.allow() {
                "devices.allow"
            } else {
                "devices.deny"
            };
            let path = dir.join(file);
            write_file(&path, &rule.to_string())?;
        }
        Ok(())
    }

    /// The `tasks` files the intermediate child writes `0` to.
    pub fn tasks_files(&self) -> Vec<PathBuf> {
        self.unique_dirs()
            .into_iter()
            .map(|d| d.join("tasks"))
            .collect()
    }

    /// Moves `pid` (all its threads) into every hierarchy.
    pub fn join(&self, pid: i32) -> Result<()> {
        for dir in self.unique_dirs() {
            std::fs::create_dir_all(dir).map_err(io_err("create cgroup", dir))?;
            let path = dir.join("cgroup.procs");
            write_file(&path, &pid.to_string())?;
        }
        Ok(())
    }

    /// The processes in the devices hierarchy (libcgroups reads the same one).
    pub fn pids(&self) -> Result<Vec<i32>> {
        let dir = self
            .dir("devices")
            .or_else(|| self.dirs.first().map(|(_, _, d)| d.as_path()))
            .ok_or(V1Error::NoHierarchy)?;
        read_pids(&dir.join("cgroup.procs"))
    }

    /// Kills what is left and removes the directories (not their parents),
    /// with the sub-cgroups a container's own systemd made in them.
    pub fn remove(&self) -> Result<()> {
        for dir in self.unique_dirs() {
            remove_tree(dir, 0)?;
        }
        Ok(())
    }
}

/// Sub-cgroups deeper than this are not followed (a container cannot make
/// the runtime recurse without bound).
const MAX_DEPTH: usize = 32;

/// Depth-first: kills the processes of `dir` and of every sub-cgroup, then
/// removes the directories bottom-up. Entries are read with `symlink_metadata`
/// (cgroupfs has no symlinks; nothing is followed either way).
fn remove_tree(dir: &Path, depth: usize) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    let pids = match read_pids(&procs) {
        Err(V1Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(())
        }
        other => other?,
    };
    for pid in pids {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    if depth < MAX_DEPTH {
        let entries = std::fs::read_dir(dir).map_err(io_err("list cgroup", dir))?;
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path(), depth + 1)?;
            }
        }
    }
    remove_dir_with_retry(dir)
}

/// Writes a cgroup file: opened for writing only, never created (a missing
/// file means a controller is not there, not something to make).
fn write_file(path: &Path, data: &str) -> Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(data.as_bytes()))
        .map_err(io_err("write", path))
}

fn read_pids(path: &Path) -> Result<Vec<i32>> {
    let text = std::fs::read_to_string(path).map_err(io_err("read", path))?;
    text.lines()
        .map(|l| l.trim().parse().map_err(|_| V1Error::BadPid(l.to_string())))
        .collect()
}

/// rmdir fails with EBUSY until killed tasks have left: retry a few times
/// with growing pauses (libcgroups does the same). The first try normally
/// succeeds, so the pause is only paid when something was still running.
fn remove_dir_with_retry(dir: &Path) -> Result<()> {
    let mut last = None;
    for pause_ms in [0u64, 10, 20, 60, 100] {
        std::thread::sleep(Duration::from_millis(pause_ms));
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(io_err("remove cgroup", dir)(last.unwrap_or_else(|| {
        std::io::Error::from(std::io::ErrorKind::TimedOut)
    })))
}

/// Copies `cpuset.cpus` / `cpuset.mems` down from the first non-empty
/// ancestor into each empty level between `mount` and `dir`.
fn fill_cpuset(mount: &Path, dir: &Path) -> Result<()> {
    let Ok(rel) = dir.strip_prefix(mount) else {
        return Ok(());
    };
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let mut current = mount.to_path_buf();
        let mut value = read_trimmed(&current.join(file))?;
        for part in rel.components() {
            current.push(part);
            let path = current.join(file);
            let here = read_trimmed(&path)?;
            if here.is_empty() {
                write_file(&path, &value)?;
            } else {
                value = here;
            }
        }
    }
    Ok(())
}

fn read_trimmed(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(io_err("read", path))
}

/// runc's and libcgroups' default device rules: the standard nodes
/// (null, zero, full, tty, urandom, random), mknod of any node, and
/// /dev/console, /dev/pts/*, /dev/ptmx and /dev/net/tun.
fn default_rules() -> Result<Vec<LinuxDeviceCgroup>> {
    use LinuxDeviceType::{B, C};
    let table: [(LinuxDeviceType, Option<i64>, Option<i64>, &str); 12] = [
        (C, Some(1), Some(3), "rwm"),
        (C, Some(1), Some(5), "rwm"),
        (C, Some(1), Some(7), "rwm"),
        (C, Some(5), Some(0), "rwm"),
        (C, Some(1), Some(9), "rwm"),
        (C, Some(1), Some(8), "rwm"),
        (C, None, None, "m"),
        (B, None, None, "m"),
        (C, Some(5), Some(1), "rwm"),
        (C, Some(136), None, "rwm"),
        (C, Some(5), Some(2), "rwm"),
        (C, Some(10), Some(200), "rwm"),
    ];
    table
        .into_iter()
        .map(|(typ, major, minor, access)| {
            let mut b = LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .typ(typ)
                .access(access);
            if let Some(m) = major {
                b = b.major(m);
            }
            if let Some(m) = minor {
                b = b.minor(m);
            }
            b.build().map_err(V1Error::Device)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hierarchies_come_from_super_options() {
        let h = V1Hierarchies::from_mountinfo(HYBRID, Path::new("/a/b")).unwrap();
        assert_eq!(
            h.dir("cpu"),
            Some(Path::new("/sys/fs/cgroup/cpu,cpuacct/a/b"))
        );
        assert_eq!(h.dir("cpuacct"), h.dir("cpu"));
        assert_eq!(
            h.dir("devices"),
            Some(Path::new("/sys/fs/cgroup/devices/a/b"))
        );
        assert_eq!(h.dir("memory"), None);
        // Co-mounted controllers are joined once; name=systemd is joined
        // (as runc does), the v2 hierarchy of a hybrid host is not.
        assert_eq!(
            h.tasks_files(),
            vec![
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/a/b/tasks"),
                PathBuf::from("/sys/fs/cgroup/cpuset/a/b/tasks"),
                PathBuf::from("/sys/fs/cgroup/devices/a/b/tasks"),
                PathBuf::from("/sys/fs/cgroup/systemd/a/b/tasks"),
            ]
        );
    }

    #[test]
    fn parent_dir_and_garbage_do_not_escape_or_panic() {
        for bad in ["/a/../../etc", "/", "", "/."] {
            assert!(
                matches!(
                    V1Hierarchies::from_mountinfo(HYBRID, Path::new(bad)),
                    Err(V1Error::BadPath(_))
                ),
                "{bad}"
            );
        }
        let h =
            V1Hierarchies::from_mountinfo("garbage\n - cgroup\n1 2 - cgroup x\n", Path::new("/x"))
                .unwrap();
        assert!(h.tasks_files().is_empty());
        assert!(matches!(h.pids(), Err(V1Error::NoHierarchy)));
    }

    #[test]
    fn default_rules_match_runc() {
        let rules: Vec<String> = default_rules()
            .unwrap()
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert_eq!(rules[0], "c 1:3 rwm");
        assert_eq!(rules[6], "c *:* m");
        assert_eq!(rules[7], "b *:* m");
        assert_eq!(rules[9], "c 136:* rwm");
        assert_eq!(rules.len(), 12);
    }

    #[test]
    fn cpuset_levels_are_filled_from_the_parent() {
        let tmp = tempfile::tempdir().unwrap();
        let mount = tmp.path();
        std::fs::write(mount.join("cpuset.cpus"), "0-1\n").unwrap();
        std::fs::write(mount.join("cpuset.mems"), "0\n").unwrap();
        let dir = mount.join("a/b");
        std::fs::create_dir_all(&dir).unwrap();
        for d in [mount.join("a"), dir.clone()] {
            std::fs::write(d.join("cpuset.cpus"), "\n").unwrap();
            std::fs::write(d.join("cpuset.mems"), "").unwrap();
        }
        std::fs::write(mount.join("a/cpuset.cpus"), "1\n").unwrap();
        fill_cpuset(mount, &dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("cpuset.cpus")).unwrap(),
            "1"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("cpuset.mems")).unwrap(),
            "0"
        );
        assert_eq!(
            std::fs::read_to_string(mount.join("a/cpuset.mems")).unwrap(),
            "0"
        );
    }
}
