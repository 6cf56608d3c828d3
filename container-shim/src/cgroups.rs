//! Cgroups through youki's `libcgroups` (v1, hybrid and v2 layouts).
//!
//! libcgroups does the controller work (memory, cpu, pids, devices with the
//! default device allow-list, freezer, ...). What is here: choosing the path
//! (runtime-spec "cgroupsPath" rules, systemd's `slice:prefix:name` turned into
//! the cgroupfs path systemd would use, because systemd is not pid 1 on these
//! machines) and adding the config's device nodes to the allow-list.

use std::path::{Path, PathBuf};

use libcgroups::common::{
    create_cgroup_manager, AnyCgroupManager, CgroupConfig, CgroupManager, ControllerOpt,
    FreezerState,
};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxDeviceCgroupBuilder, LinuxResources, Spec};

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
    /// Building device rules failed.
    #[error("invalid device cgroup rule")]
    Device(#[source] oci_spec::OciSpecError),
    /// A systemd-style path that is not `slice:prefix:name`.
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

/// One container's cgroup.
pub struct Cgroup {
    path: PathBuf,
    manager: AnyCgroupManager,
}

impl std::fmt::Debug for Cgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cgroup").field("path", &self.path).finish()
    }
}

impl Cgroup {
    /// Opens (does not create) the cgroup at `path` in every hierarchy.
    pub fn open(path: &Path, id: &str) -> Result<Cgroup> {
        let manager = create_cgroup_manager(CgroupConfig {
            cgroup_path: path.to_path_buf(),
            systemd_cgroup: false,
            container_name: id.to_string(),
        })
        .map_err(|source| CgroupError::Open {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        Ok(Cgroup {
            path: path.to_path_buf(),
            manager,
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

    /// Moves `pid` into the cgroup (creating it) and applies the limits.
    pub fn join_and_apply(&self, pid: i32, spec: &Spec) -> Result<()> {
        self.op("join", self.manager.add_task(Pid::from_raw(pid)))?;
        let resources = resources_with_devices(spec)?;
        let opt = ControllerOpt {
            resources: &resources,
            disable_oom_killer: resources
                .memory()
                .as_ref()
                .and_then(|m| m.disable_oom_killer())
                .unwrap_or(false),
            oom_score_adj: None,
            freezer_state: None,
        };
        self.op("apply limits to", self.manager.apply(&opt))
    }

    /// Moves `pid` into the existing cgroup (for `exec`).
    pub fn join(&self, pid: i32) -> Result<()> {
        self.op("join", self.manager.add_task(Pid::from_raw(pid)))
    }

    /// All pids in the cgroup.
    pub fn pids(&self) -> Result<Vec<i32>> {
        let pids = self.op("list processes of", self.manager.get_all_pids())?;
        Ok(pids.into_iter().map(|p| p.as_raw()).collect())
    }

    /// Freezes or thaws all processes.
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        let state = if frozen {
            FreezerState::Frozen
        } else {
            FreezerState::Thawed
        };
        self.op("freeze", self.manager.freeze(state))
    }

    /// Removes the cgroup (libcgroups SIGKILLs what is left in it first).
    pub fn remove(&self) -> Result<()> {
        self.op("remove", self.manager.remove())
    }
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
        let rule = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(dev.typ())
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
