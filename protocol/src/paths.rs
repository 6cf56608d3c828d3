//! Where a running VM keeps its sockets.
//!
//! Each `plexvm run` gets its own runtime folder named after the VM and the core's pid,
//! so two VMs (even two with the same name) never share a path.

use std::path::{Path, PathBuf};

/// The parent of all per-VM runtime folders: `$XDG_RUNTIME_DIR/plexvm`, else
/// `/tmp/plexvm-<uid>` (`uid` given by the caller).
pub fn runtime_root(xdg_runtime_dir: Option<&Path>, uid: u32) -> PathBuf {
    match xdg_runtime_dir {
        Some(d) if d.is_absolute() => d.join("plexvm"),
        _ => PathBuf::from(format!("/tmp/plexvm-{uid}")),
    }
}

/// The runtime folder of one VM.
pub fn vm_runtime_dir(root: &Path, vm_name: &str, core_pid: u32) -> PathBuf {
    root.join(format!("{vm_name}.{core_pid}"))
}

/// The core pid at the end of a runtime folder's name (`<vm name>.<pid>`), if any.
pub fn vm_runtime_dir_pid(folder_name: &str) -> Option<u32> {
    let (_, pid) = folder_name.rsplit_once('.')?;
    pid.parse().ok().filter(|&pid| pid > 0)
}

/// The vhost-user socket the core gives a spawned backend of device `device_id`.
pub fn backend_socket(vm_dir: &Path, device_id: &str) -> PathBuf {
    vm_dir.join(format!("{device_id}.sock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_core_pid_is_read_back_from_a_folder_name() {
        let dir = vm_runtime_dir(Path::new("/r"), "web.1", 4242);
        let name = dir.file_name().unwrap().to_str().unwrap();
        assert_eq!(vm_runtime_dir_pid(name), Some(4242));
        assert_eq!(vm_runtime_dir_pid("notes"), None);
        assert_eq!(vm_runtime_dir_pid("vm.0"), None);
        assert_eq!(vm_runtime_dir_pid("vm.-3"), None);
    }

    #[test]
    fn two_vms_with_one_name_get_different_folders() {
        let root = runtime_root(None, 0);
        assert_eq!(root, PathBuf::from("/tmp/plexvm-0"));
        assert_ne!(vm_runtime_dir(&root, "a", 1), vm_runtime_dir(&root, "a", 2));
        assert_eq!(
            backend_socket(Path::new("/r/a.1"), "disk0"),
            PathBuf::from("/r/a.1/disk0.sock")
        );
    }

    #[test]
    fn relative_xdg_runtime_dir_is_ignored() {
        assert_eq!(
            runtime_root(Some(Path::new("rel")), 5),
            PathBuf::from("/tmp/plexvm-5")
        );
        assert_eq!(
            runtime_root(Some(Path::new("/run/user/5")), 5),
            PathBuf::from("/run/user/5/plexvm")
        );
    }
}
