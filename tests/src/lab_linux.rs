//! Linux guests on plexvm's core inside the lab (crate::lab): their initramfs, their VM
//! spec, and reading back what they printed.
//!
//! A guest is Debian's own kernel (the bzImage, or the ELF vmlinux inside it) with a
//! busybox initramfs (crate::initramfs) that loads the virtio-mmio transport and the
//! drivers a test needs and runs the test's script. The script prints `GUEST-RESULT
//! key=value ...` and `GUEST-FILE <sha256> <path>` lines on the serial console, which
//! the core writes to `<name>.serial.log` in the lab's work folder.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::initramfs::{GuestKernel, InitramfsSpec, EXT4_MODULES};

/// Prefix of a guest's result lines.
pub const GUEST_RESULT: &str = "GUEST-RESULT ";
/// Prefix of a guest's file-checksum lines: `GUEST-FILE <sha256> <path>`.
pub const GUEST_FILE: &str = "GUEST-FILE ";

/// The drivers every lab guest loads: virtio-mmio (Debian builds it as a module, without
/// `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`, so it binds only the DSDT's LNRO0005 devices),
/// virtio-blk and virtio-net, and pvpanic (the DSDT's QEMU0001 device).
pub const GUEST_MODULES: &[&str] = &["virtio_mmio", "virtio_blk", "virtio_net", "pvpanic_mmio"];

/// Shell functions every guest script starts with.
const GUEST_PRELUDE: &str = r#"
result() { echo "GUEST-RESULT $*"; }
fail() { echo "GUEST-RESULT status=fail why=$*"; exit 1; }
# wait_dev PATH: waits up to 30 s for a device node (drivers bind asynchronously).
wait_dev() {
  i=0
  while [ ! -e "$1" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
  [ -e "$1" ] || fail "no-$1"
}
# acpi_virtio: how many virtio-mmio devices Linux bound through ACPI (LNRO0005).
acpi_virtio() { ls -d /sys/bus/platform/drivers/virtio-mmio/LNRO0005:* 2>/dev/null | wc -l; }
# io_errors: kernel log lines that report an I/O error on a virtio disk.
io_errors() { dmesg | grep -ciE 'I/O error|blk_update_request|Buffer I/O|EXT4-fs error|virtio_blk.*error' || true; }
"#;

/// One Linux guest's boot files, built in the lab's work folder.
#[derive(Debug, Clone)]
pub struct LinuxGuest {
    /// The kernel the spec boots (bzImage or vmlinux).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
}

impl LinuxGuest {
    /// Builds `<work>/<name>-initramfs/initramfs.cpio` for `kernel` with [`GUEST_MODULES`],
    /// ext4, `extra_modules`, mke2fs (busybox has only ext2) and `script`.
    pub fn build(
        work: &Path,
        name: &str,
        kernel: &GuestKernel,
        boot_image: &Path,
        extra_modules: &[&str],
        script: &str,
    ) -> LinuxGuest {
        let mut modules: Vec<&str> = GUEST_MODULES.to_vec();
        modules.extend_from_slice(EXT4_MODULES);
        modules.extend_from_slice(extra_modules);
        let dir = work.join(format!("{name}-initramfs"));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let initrd = InitramfsSpec::new(
            kernel.clone(),
            &modules,
            &format!("{GUEST_PRELUDE}{script}"),
        )
        .with_host_program("/usr/sbin/mke2fs")
        .build(&dir)
        .unwrap_or_else(|e| panic!("build the initramfs of {name}: {e}"));
        LinuxGuest {
            kernel: boot_image.to_path_buf(),
            initrd,
        }
    }

    /// A `plexvm run` spec for this guest: `vcpus`, `memory_mib`, serial console to
    /// `<work>/<name>.serial.log`, API socket `<scratch>/<name>.api`, and `devices` (TOML
    /// `[[device]]` tables) appended.
    pub fn spec(
        &self,
        work: &Path,
        name: &str,
        vcpus: u8,
        memory_mib: u32,
        devices: &str,
    ) -> String {
        format!(
            "[vm]\nname = \"{name}\"\nvcpus = {vcpus}\nmemory_mib = {memory_mib}\n\
             kernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"panic=-1 quiet\"\n\
             serial = \"file:{}\"\napi_socket = \"/tmp/lab/{name}.api\"\n\n{devices}",
            self.kernel.display(),
            self.initrd.display(),
            work.join(format!("{name}.serial.log")).display(),
        )
    }
}

/// A `[[device]]` table for a plexvm-blk disk on `image` (a path in the lab's scratch).
pub fn blk_device(id: &str, image: &str) -> String {
    format!("[[device]]\nid = \"{id}\"\nkind = \"blk\"\nexec = [\"plexvm-blk\", \"--image\", \"{image}\"]\n")
}

/// What a guest printed on its serial console.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    /// The whole console.
    pub serial: String,
}

impl GuestOutput {
    /// Reads `<work>/<name>.serial.log`.
    pub fn read(work: &Path, name: &str) -> GuestOutput {
        let p = work.join(format!("{name}.serial.log"));
        GuestOutput {
            serial: String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned(),
        }
    }

    /// The fields of the last `GUEST-RESULT` line (empty when there is none).
    pub fn result(&self) -> BTreeMap<String, String> {
        self.serial
            .lines()
            .rev()
            .find_map(|l| {
                l.trim_end_matches('\r')
                    .split_once(GUEST_RESULT)
                    .map(|(_, r)| r)
            })
            .map(|r| {
                r.split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `(sha256, path)` of every `GUEST-FILE` line.
    pub fn files(&self) -> Vec<(String, String)> {
        self.serial
            .lines()
            .filter_map(|l| {
                l.trim_end_matches('\r')
                    .split_once(GUEST_FILE)
                    .map(|(_, r)| r)
            })
            .filter_map(|r| {
                let mut it = r.split_whitespace();
                Some((it.next()?.to_string(), it.next()?.to_string()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_and_files_are_read_from_the_console() {
        let out = GuestOutput {
            serial: "noise\r\nGUEST-FILE abc /mnt/a\nGUEST-RESULT status=ok cpus=4\r\nGUEST-FILE def /mnt/b\n"
                .into(),
        };
        assert_eq!(out.result().get("cpus").map(String::as_str), Some("4"));
        assert_eq!(
            out.files(),
            [
                ("abc".into(), "/mnt/a".into()),
                ("def".into(), "/mnt/b".into())
            ]
        );
        assert!(GuestOutput {
            serial: String::new()
        }
        .result()
        .is_empty());
    }
}
