//! A small initramfs for Linux test guests, built at run time from the host's installed
//! Debian packages: Debian's kernel (`linux-image-amd64`), the kernel modules a test
//! names (with their dependencies, from `modules.dep`), `busybox-static` as the whole
//! userland, and one guest script.
//!
//! The guest's `/init` mounts proc/sys/dev/tmp, loads the modules in dependency order,
//! runs the script with busybox `sh`, prints its exit status and powers off (`poweroff
//! -f`), so QEMU started with `-no-reboot` exits when the script ends. Everything the
//! script prints goes to the serial console (`console=ttyS0`).
//!
//! Building takes a fraction of a second (copies and one `cpio` run), so every test
//! builds its own archive in its own temporary folder: no shared cache, no collisions
//! between test runs.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The line `/init` prints after the guest script ended: `plexvm-init: script exit N`.
pub const SCRIPT_EXIT_PREFIX: &str = "plexvm-init: script exit ";

/// Busybox from `busybox-static` (statically linked, so no libraries to copy).
pub const BUSYBOX: &str = "/bin/busybox";

/// The virtio-pci transport and virtio-blk driver, in the order the issue names them
/// (dependencies are added and ordered automatically anyway).
pub const VIRTIO_BLK_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
];

/// ext4 (which also mounts ext2, `CONFIG_EXT4_USE_FOR_EXT2`) and the crc32c
/// implementation it asks for through a soft dependency (`modules.softdep`, which this
/// builder does not follow).
pub const EXT4_MODULES: &[&str] = &["crc32c_generic", "ext4"];

/// Why an initramfs could not be built.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// No `/boot/vmlinuz-*` with a matching `/lib/modules/*` folder.
    #[error("no installed kernel found (/boot/vmlinuz-<version> with /lib/modules/<version>); install linux-image-amd64")]
    NoKernel,
    /// A module name that `modules.dep` does not know.
    #[error("kernel module {0} not found in modules.dep of kernel {1}")]
    UnknownModule(String, String),
    /// A compressed module the builder cannot unpack.
    #[error("kernel module {0} has an unsupported compression")]
    CompressedModule(PathBuf),
    /// A file could not be read or written.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `cpio` failed.
    #[error("cpio failed: {0}")]
    Cpio(String),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InitramfsError {
    let path = path.to_path_buf();
    move |source| InitramfsError::Io { what, path, source }
}

/// An installed Debian kernel: its image and its module tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestKernel {
    /// `uname -r` of the kernel, e.g. `6.1.0-56-amd64`.
    pub version: String,
    /// `/boot/vmlinuz-<version>` (a bzImage QEMU loads with `-kernel`).
    pub image: PathBuf,
    /// `/lib/modules/<version>`.
    pub modules_dir: PathBuf,
}

impl GuestKernel {
    /// The newest installed kernel that has both an image and a module tree.
    pub fn find_installed() -> Result<GuestKernel, InitramfsError> {
        let entries = fs::read_dir("/lib/modules").map_err(|_| InitramfsError::NoKernel)?;
        let mut versions: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|v| {
                Path::new("/boot").join(format!("vmlinuz-{v}")).is_file()
                    && Path::new("/lib/modules")
                        .join(v)
                        .join("modules.dep")
                        .is_file()
            })
            .collect();
        versions.sort_by_key(|v| version_key(v));
        let version = versions.pop().ok_or(InitramfsError::NoKernel)?;
        Ok(GuestKernel {
            image: PathBuf::from(format!("/boot/vmlinuz-{version}")),
            modules_dir: Path::new("/lib/modules").join(&version),
            version,
        })
    }

    /// Module files (relative to the module tree) of `names` and everything they
    /// depend on, dependencies before dependants, each once.
    pub fn resolve_modules(&self, names: &[&str]) -> Result<Vec<PathBuf>, InitramfsError> {
        let dep_file = self.modules_dir.join("modules.dep");
        let text = fs::read_to_string(&dep_file).map_err(io_err("read", &dep_file))?;
        let deps = parse_modules_dep(&text);
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for name in names {
            let key = normalise(name);
            if !deps.contains_key(&key) {
                return Err(InitramfsError::UnknownModule(
                    name.to_string(),
                    self.version.clone(),
                ));
            }
            visit(&key, &deps, &mut seen, &mut order);
        }
        Ok(order
            .into_iter()
            .filter_map(|k| deps.get(&k).map(|(path, _)| PathBuf::from(path)))
            .collect())
    }
}

/// Orders kernel versions by their numeric parts (6.1.0-56 before 6.1.0-100).
fn version_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// Module name as the kernel knows it: file name without `.ko*`, `-` as `_`.
fn normalise(name_or_path: &str) -> String {
    let file = name_or_path.rsplit('/').next().unwrap_or(name_or_path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// `modules.dep` lines are `path.ko: dep1.ko dep2.ko`; returns name → (path, dep names).
fn parse_modules_dep(text: &str) -> BTreeMap<String, (String, Vec<String>)> {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(path, deps)| {
            let deps = deps.split_whitespace().map(normalise).collect();
            (normalise(path), (path.trim().to_string(), deps))
        })
        .collect()
}

fn visit(
    key: &str,
    deps: &BTreeMap<String, (String, Vec<String>)>,
    seen: &mut HashSet<String>,
    order: &mut Vec<String>,
) {
    if !seen.insert(key.to_string()) {
        return;
    }
    if let Some((_, children)) = deps.get(key) {
        for child in children {
            visit(child, deps, seen, order);
        }
    }
    order.push(key.to_string());
}

/// What goes into one initramfs.
#[derive(Debug, Clone)]
pub struct InitramfsSpec {
    /// Kernel whose modules are packed.
    pub kernel: GuestKernel,
    /// Modules to load (dependencies are added).
    pub modules: Vec<String>,
    /// The guest script, run by busybox `sh` after the modules are loaded.
    pub script: String,
    /// Extra files: guest path (absolute) → contents.
    pub files: Vec<(String, Vec<u8>)>,
    /// Host programs copied in at their own paths, with the shared libraries they need.
    pub programs: Vec<PathBuf>,
}

impl InitramfsSpec {
    /// An initramfs for `kernel` that loads `modules` and runs `script`.
    pub fn new(kernel: GuestKernel, modules: &[&str], script: &str) -> InitramfsSpec {
        InitramfsSpec {
            kernel,
            modules: modules.iter().map(|m| m.to_string()).collect(),
            script: script.to_string(),
            files: Vec::new(),
            programs: Vec::new(),
        }
    }

    /// Adds a dynamically linked host program (e.g. `/sbin/mke2fs`) at its own path,
    /// with every library `ldd` names, so the guest can run what busybox lacks.
    pub fn with_host_program(mut self, path: &str) -> InitramfsSpec {
        self.programs.push(PathBuf::from(path));
        self
    }

    /// Adds a file at the absolute guest path `path`.
    pub fn with_file(mut self, path: &str, contents: &[u8]) -> InitramfsSpec {
        self.files.push((path.to_string(), contents.to_vec()));
        self
    }

    /// Builds the archive (uncompressed newc cpio) as `<dir>/initramfs.cpio`, staging
    /// its tree in `<dir>/initramfs-root`.
    pub fn build(&self, dir: &Path) -> Result<PathBuf, InitramfsError> {
        let root = dir.join("initramfs-root");
        for sub in [
            "bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "mnt",
        ] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err("create", &p))?;
        }
        fs::create_dir_all(root.join("lib/modules"))
            .map_err(io_err("create", &root.join("lib/modules")))?;
        copy_file(Path::new(BUSYBOX), &root.join("bin/busybox"), 0o755)?;
        let modules = self
            .kernel
            .resolve_modules(&self.modules.iter().map(String::as_str).collect::<Vec<_>>())?;
        let mut names = Vec::new();
        for rel in &modules {
            let name = normalise(&rel.to_string_lossy());
            let src = self.kernel.modules_dir.join(rel);
            copy_module(&src, &root.join(format!("lib/modules/{name}.ko")))?;
            names.push(name);
        }
        write_file(&root.join("init"), init_script(&names).as_bytes(), 0o755)?;
        write_file(&root.join("guest-script"), self.script.as_bytes(), 0o755)?;
        for (path, contents) in &self.files {
            let dest = root.join(path.trim_start_matches('/'));
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).map_err(io_err("create", parent))?;
            }
            write_file(&dest, contents, 0o644)?;
        }
        for program in &self.programs {
            copy_with_libraries(program, &root)?;
        }
        let archive = dir.join("initramfs.cpio");
        pack_cpio(&root, &archive)?;
        Ok(archive)
    }
}

/// The guest's `/init`: a fixed busybox script around the test's script.
fn init_script(modules: &[String]) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
for m in {modules}; do
  insmod /lib/modules/$m.ko || echo "plexvm-init: insmod $m failed"
done
echo "plexvm-init: modules loaded"
sh /guest-script
echo "{SCRIPT_EXIT_PREFIX}$?"
poweroff -f
"#,
        modules = modules.join(" ")
    )
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), InitramfsError> {
    fs::write(path, contents).map_err(io_err("write", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
}

fn copy_file(src: &Path, dest: &Path, mode: u32) -> Result<(), InitramfsError> {
    fs::copy(src, dest).map_err(io_err("copy", src))?;
    fs::set_permissions(dest, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", dest))
}

/// Copies `program` and the libraries `ldd` lists for it (the dynamic loader included)
/// into `root` at their host paths.
fn copy_with_libraries(program: &Path, root: &Path) -> Result<(), InitramfsError> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .map_err(io_err("run ldd on", program))?;
    let mut files = vec![program.to_path_buf()];
    // Lines are `libx.so.1 => /lib/.../libx.so.1 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`.
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = line
            .split("=>")
            .last()
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(p) = path {
            files.push(PathBuf::from(p));
        }
    }
    for file in files {
        // Copy the file a symlink points at, under the link's name.
        let real = fs::canonicalize(&file).map_err(io_err("resolve", &file))?;
        let dest = root.join(file.strip_prefix("/").unwrap_or(&file));
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_err("create", parent))?;
        }
        copy_file(&real, &dest, 0o755)?;
    }
    Ok(())
}

/// Copies a module, unpacking `.ko.xz` / `.ko.zst` (newer Debian kernels) with the
/// host's `xz` / `zstd`, because busybox `insmod` takes plain ELF objects only.
fn copy_module(src: &Path, dest: &Path) -> Result<(), InitramfsError> {
    let name = src.to_string_lossy();
    let tool = if name.ends_with(".ko") {
        return copy_file(src, dest, 0o644);
    } else if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else {
        return Err(InitramfsError::CompressedModule(src.to_path_buf()));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(src)
        .output()
        .map_err(io_err("unpack", src))?;
    if !out.status.success() {
        return Err(InitramfsError::CompressedModule(src.to_path_buf()));
    }
    write_file(dest, &out.stdout, 0o644)
}

/// Every path under `root`, relative, parents before children (what `cpio -o` wants).
fn tree_paths(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), InitramfsError> {
    let dir = root.join(rel);
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .map_err(io_err("list", &dir))?
        .filter_map(|e| e.ok())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let child = rel.join(e.file_name());
        out.push(child.clone());
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            tree_paths(root, &child, out)?;
        }
    }
    Ok(())
}

/// Packs `root` with the host's `cpio -o -H newc` (package `cpio`).
fn pack_cpio(root: &Path, archive: &Path) -> Result<(), InitramfsError> {
    let mut paths = Vec::new();
    tree_paths(root, Path::new(""), &mut paths)?;
    let list: String = paths.iter().map(|p| format!("{}\n", p.display())).collect();
    let out_file = fs::File::create(archive).map_err(io_err("create", archive))?;
    let mut child = Command::new("cpio")
        .args(["-o", "-H", "newc", "--quiet", "--owner=0:0"])
        .current_dir(root)
        .stdin(Stdio::piped())
        .stdout(out_file)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| InitramfsError::Cpio(format!("cannot start cpio: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(list.as_bytes())
            .map_err(|e| InitramfsError::Cpio(format!("writing the file list: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| InitramfsError::Cpio(e.to_string()))?;
    if !out.status.success() {
        return Err(InitramfsError::Cpio(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
kernel/drivers/virtio/virtio_ring.ko:\n\
kernel/crypto/crc32c-generic.ko.xz:\n";

    #[test]
    fn dependencies_come_first_and_once() {
        let deps = parse_modules_dep(DEP);
        let mut seen = HashSet::new();
        let mut order = Vec::new();
        visit("virtio_blk", &deps, &mut seen, &mut order);
        visit("virtio", &deps, &mut seen, &mut order);
        assert_eq!(order, ["virtio_ring", "virtio", "virtio_blk"]);
    }

    #[test]
    fn names_are_normalised() {
        assert_eq!(
            normalise("kernel/crypto/crc32c-generic.ko.xz"),
            "crc32c_generic"
        );
        assert_eq!(normalise("virtio_pci"), "virtio_pci");
    }

    #[test]
    fn versions_sort_numerically() {
        let mut v = vec!["6.1.0-100-amd64", "6.1.0-56-amd64", "5.10.0-9-amd64"];
        v.sort_by_key(|s| version_key(s));
        assert_eq!(v, ["5.10.0-9-amd64", "6.1.0-56-amd64", "6.1.0-100-amd64"]);
    }
}
