//! Cgroups through youki's `libcgroups` (v1, hybrid and v2 layouts).
//!
//! libcgroups does the controller work (memory, cpu, pids, devices with the
//! default device allow-list, freezer, ...). What is here: choosing the path
//! (runtime-spec "cgroupsPath" rules, systemd's `slice:prefix:name` turned into
//! the cgroupfs path systemd would use, because systemd is not pid 1 on these
//! machines) and adding the config's device nodes to the allow-list. On v1
//! and hybrid hosts the hierarchies themselves are handled in `cgroup_v1.rs`
//! (libcgroups then only writes the limits), which is what keeps `run` fast.

use std::path::{Path, PathBuf};

use libcgroups::common::{
    create_cgroup_manager, get_cgroup_setup, AnyCgroupManager, CgroupConfig, CgroupManager,
    CgroupSetup, ControllerOpt, FreezerState,
};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxResources, Spec};

use crate::cgroup_v1::{V1Error, V1Hierarchies};

/// Errors from cgroup handling.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The cgroup manager could not be set up.
    #[error("cannot open cgroup {path}")]
    Open {
        /// Cgroup path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<libcgroups::common::CreateCgroupSetupError>,
    },
    /// A cgroup operation failed.
    #[error("cannot {what} cgroup {path}")]
    Op {
        /// What was being done.
        what: &'static str,
        /// Cgroup path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<libcgroups::common::AnyManagerError>,
    },
    /// A v1 hierarchy operation failed.
    #[error("cgroup {path}")]
    V1 {
        /// Cgroup path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: V1Error,
    },
    /// Building device rules failed.
    #[error("invalid device cgroup rule")]
    Device(#[source] oci_spec::OciSpecError),
    /// A systemd-style path that is not `slice:prefix:name`.
    /// Rootless on cgroup v1: the hierarchies are not writable, so limits
    /// and the freezer cannot be had (runc refuses the same).
    #[error(
        "rootless containers cannot {0} on this cgroup v1 host (the hierarchies are not writable)"
    )]
    Rootless(&'static str),
    #[error("invalid systemd cgroupsPath {0:?} (want slice:prefix:name)")]
    SystemdPath(String),
}

type Result<T> = std::result::Result<T, CgroupError>;

/// The cgroup path for a container, relative to each hierarchy's root.
pub fn cgroup_path(spec: &Spec, id: &str, systemd: bool) -> Result<PathBuf> {
    let given = spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().clone())
        .filter(|p| !p.as_os_str().is_empty());
    let Some(given) = given else {
        return Ok(PathBuf::from(format!("/plexvm-shim/{id}")));
    };
    let text = given.to_string_lossy();
    if systemd && !text.starts_with('/') {
        return systemd_to_fs_path(&text);
    }
    // Relative paths are taken relative to the hierarchy root, as runc does for
    // cgroupfs when its own cgroup is the root.
    Ok(Path::new("/").join(given))
}

/// `machine-a.slice:libpod:ID` -> `/machine.slice/machine-a.slice/libpod-ID.scope`.
fn systemd_to_fs_path(text: &str) -> Result<PathBuf> {
    let parts: Vec<&str> = text.split(':').collect();
    let [slice, prefix, name] = parts.as_slice() else {
        return Err(CgroupError::SystemdPath(text.to_string()));
    };
    if name.is_empty() || [slice, prefix, name].iter().any(|p| p.contains('/')) {
        return Err(CgroupError::SystemdPath(text.to_string()));
    }
    let slice = if slice.is_empty() {
        "system.slice"
    } else {
        slice
    };
    let mut path = PathBuf::from("/");
    if slice != "-.slice" {
        let stem = slice.strip_suffix(".slice").unwrap_or(slice);
        let mut acc = String::new();
        for part in stem.split('-') {
            if !acc.is_empty() {
                acc.push('-');
            }
            acc.push_str(part);
            path.push(format!("{acc}.slice"));
        }
    }
    let unit = if name.ends_with(".slice") {
        name.to_string()
    } else if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    };
    path.push(unit);
    Ok(path)
}

/// One container's cgroup: the v1 hierarchies handled here (see
/// `cgroup_v1.rs` for why), or libcgroups' manager on a unified (v2) host.
pub struct Cgroup {
    path: PathBuf,
    id: String,
    backend: Backend,
}

enum Backend {
    V1(V1Hierarchies),
    Managed(AnyCgroupManager),
    /// Rootless without writable cgroups (as runc: no cgroup, no limits).
    Disabled,
}

impl std::fmt::Debug for Cgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cgroup").field("path", &self.path).finish()
    }
}

impl Cgroup {
    /// Opens (does not create) the cgroup at `path` in every hierarchy.
    pub fn open(path: &Path, id: &str) -> Result<Cgroup> {
        let backend = match get_cgroup_setup() {
            Ok(CgroupSetup::Legacy | CgroupSetup::Hybrid) if !v1_writable() => Backend::Disabled,
            Ok(CgroupSetup::Legacy | CgroupSetup::Hybrid) => Backend::V1(
                V1Hierarchies::discover(path).map_err(|source| CgroupError::V1 {
                    path: path.to_path_buf(),
                    source,
                })?,
            ),
            _ => Backend::Managed(Self::manager(path, id)?),
        };
        Ok(Cgroup {
            path: path.to_path_buf(),
            id: id.to_string(),
            backend,
        })
    }

    /// True when no cgroup is used (rootless on v1).
    pub fn is_disabled(&self) -> bool {
        matches!(self.backend, Backend::Disabled)
    }

    /// libcgroups' manager (on v1 only built when limits or the freezer
    /// need it: its constructor scans mountinfo once per controller).
    fn manager(path: &Path, id: &str) -> Result<AnyCgroupManager> {
        create_cgroup_manager(CgroupConfig {
            cgroup_path: path.to_path_buf(),
            systemd_cgroup: false,
            container_name: id.to_string(),
        })
        .map_err(|source| CgroupError::Open {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    fn op<T>(
        &self,
        what: &'static str,
        r: std::result::Result<T, libcgroups::common::AnyManagerError>,
    ) -> Result<T> {
        r.map_err(|source| CgroupError::Op {
            what,
            path: self.path.clone(),
            source: Box::new(source),
        })
    }

    fn v1<T>(&self, r: std::result::Result<T, V1Error>) -> Result<T> {
        r.map_err(|source| CgroupError::V1 {
            path: self.path.clone(),
            source,
        })
    }

    /// Before `create` forks: on v1 creates the directories and writes the
    /// limits, so the child can join through [`Cgroup::self_join_files`]
    /// (the kernel takes no global lock for that). Nothing on v2.
    pub fn prepare(&self, spec: &Spec) -> Result<()> {
        if let Backend::Disabled = &self.backend {
            let mut limits = resources_with_devices(spec)?;
            limits.set_devices(None);
            if limits != LinuxResources::default() {
                return Err(CgroupError::Rootless("set resource limits"));
            }
            return Ok(());
        }
        let Backend::V1(h) = &self.backend else {
            return Ok(());
        };
        let resources = resources_with_devices(spec)?;
        self.v1(h.create())?;
        let rules = resources.devices().clone().unwrap_or_default();
        self.v1(h.apply_devices(&rules))?;
        if needs_controllers(&resources) {
            let manager = Self::manager(&self.path, &self.id)?;
            self.op(
                "apply limits to",
                manager.apply(&controller_opt(&resources)),
            )?;
        }
        Ok(())
    }

    /// Where the child cannot join by itself (v2): moves `pid` into the
    /// cgroup (creating it) and applies the limits.
    pub fn adopt(&self, pid: i32, spec: &Spec) -> Result<()> {
        match &self.backend {
            Backend::Disabled => Ok(()),
            Backend::V1(h) => self.v1(h.join(pid)),
            Backend::Managed(m) => {
                let resources = resources_with_devices(spec)?;
                self.op("join", m.add_task(Pid::from_raw(pid)))?;
                self.op("apply limits to", m.apply(&controller_opt(&resources)))
            }
        }
    }

    /// The v1 `tasks` files a single-threaded child writes `0` to in order
    /// to join; empty where the runtime moves it ([`Cgroup::adopt`]).
    pub fn self_join_files(&self) -> Vec<PathBuf> {
        match &self.backend {
            Backend::V1(h) => h.tasks_files(),
            // Empty: init does not join, and `adopt` does nothing.
            Backend::Managed(_) | Backend::Disabled => Vec::new(),
        }
    }

    /// Moves `pid` into the existing cgroup (for `exec`).
    pub fn join(&self, pid: i32) -> Result<()> {
        match &self.backend {
            Backend::Disabled => Ok(()),
            Backend::V1(h) => self.v1(h.join(pid)),
            Backend::Managed(m) => self.op("join", m.add_task(Pid::from_raw(pid))),
        }
    }

    /// All pids in the cgroup.
    pub fn pids(&self) -> Result<Vec<i32>> {
        match &self.backend {
            // No cgroup lists them: callers fall back to init's pid.
            Backend::Disabled => Ok(Vec::new()),
            Backend::V1(h) => self.v1(h.pids()),
            Backend::Managed(m) => {
                let pids = self.op("list processes of", m.get_all_pids())?;
                Ok(pids.into_iter().map(|p| p.as_raw()).collect())
            }
        }
    }

    /// Freezes or thaws all processes.
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        let state = if frozen {
            FreezerState::Frozen
        } else {
            FreezerState::Thawed
        };
        match &self.backend {
            Backend::V1(_) => {
                let manager = Self::manager(&self.path, &self.id)?;
                self.op("freeze", manager.freeze(state))
            }
            Backend::Managed(m) => self.op("freeze", m.freeze(state)),
            Backend::Disabled => Err(CgroupError::Rootless("pause")),
        }
    }

    /// Removes the cgroup, SIGKILLing what is left in it first.
    pub fn remove(&self) -> Result<()> {
        match &self.backend {
            Backend::V1(h) => self.v1(h.remove()),
            Backend::Managed(m) => self.op("remove", m.remove()),
            Backend::Disabled => Ok(()),
        }
    }
}

/// Can this process make cgroups in the v1 hierarchies? Host root can; a
/// rootless caller (not root, or root of a user namespace, as under
/// rootless podman) normally cannot.
fn v1_writable() -> bool {
    if !crate::cli::is_rootless() {
        return true;
    }
    let probe = Path::new("/sys/fs/cgroup/pids");
    let probe = if probe.is_dir() {
        probe
    } else {
        Path::new("/sys/fs/cgroup/devices")
    };
    nix::unistd::access(probe, nix::unistd::AccessFlags::W_OK).is_ok()
}

fn controller_opt(resources: &LinuxResources) -> ControllerOpt<'_> {
    ControllerOpt {
        resources,
        disable_oom_killer: resources
            .memory()
            .as_ref()
            .and_then(|m| m.disable_oom_killer())
            .unwrap_or(false),
        oom_score_adj: None,
        freezer_state: None,
    }
}

/// True when the config sets limits other than device rules (those need
/// libcgroups' controllers; device rules are written in `cgroup_v1.rs`).
fn needs_controllers(resources: &LinuxResources) -> bool {
    let mut rest = resources.clone();
    rest.set_devices(None);
    rest != LinuxResources::default()
}

/// `linux.resources` plus an allow rule for every device node in `linux.devices`
/// (runc does the same, otherwise the nodes exist but cannot be opened).
fn resources_with_devices(spec: &Spec) -> Result<LinuxResources> {
    let linux = spec.linux().as_ref();
    let mut resources = linux
        .and_then(|l| l.resources().clone())
        .unwrap_or_default();
    let devices = linux.and_then(|l| l.devices().as_ref());
    let mut rules = resources.devices().clone().unwrap_or_default();
    for dev in devices.into_iter().flatten() {
        // FIFOs need no rule (the devices controller knows only b and c);
        // `u` (unbuffered) is a character device.
        let typ = match dev.typ() {
            LinuxDeviceType::P => continue,
            LinuxDeviceType::U => LinuxDeviceType::C,
            t => t,
        };
        let rule = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(typ)
            .major(dev.major())
            .minor(dev.minor())
            .access("rwm")
            .build()
            .map_err(CgroupError::Device)?;
        rules.push(rule);
    }
    resources.set_devices(Some(rules));
    Ok(resources)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_paths_become_cgroupfs_paths() {
        assert_eq!(
            systemd_to_fs_path("machine.slice:libpod:abc").unwrap(),
            PathBuf::from("/machine.slice/libpod-abc.scope")
        );
        assert_eq!(
            systemd_to_fs_path("user-1000.slice:docker:x").unwrap(),
            PathBuf::from("/user.slice/user-1000.slice/docker-x.scope")
        );
        assert_eq!(
            systemd_to_fs_path(":runc:x").unwrap(),
            PathBuf::from("/system.slice/runc-x.scope")
        );
        assert!(systemd_to_fs_path("a:b").is_err());
        assert!(systemd_to_fs_path("a:b:../c/d").is_err());
    }

    #[test]
    fn default_and_given_paths() {
        let mut spec = Spec::default();
        assert_eq!(
            cgroup_path(&spec, "c1", false).unwrap(),
            PathBuf::from("/plexvm-shim/c1")
        );
        let mut linux = spec.linux().clone().unwrap();
        linux.set_cgroups_path(Some("default/c1".into()));
        spec.set_linux(Some(linux));
        assert_eq!(
            cgroup_path(&spec, "c1", false).unwrap(),
            PathBuf::from("/default/c1")
        );
    }
}
