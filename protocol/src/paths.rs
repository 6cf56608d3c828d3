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

/// The vhost-user socket the core gives a spawned backend of device `device_id`.
pub fn backend_socket(vm_dir: &Path, device_id: &str) -> PathBuf {
    vm_dir.join(format!("{device_id}.sock"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
