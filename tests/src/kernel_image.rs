//! Debian's installed kernel as the Linux tests boot it: the bzImage itself, and the ELF
//! `vmlinux` inside it (what Firecracker users boot), extracted at run time.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use crate::initramfs::GuestKernel;
use crate::prereq::{self, Tool};

/// Decompressors for the payload formats Debian's kernels use, with their arguments.
const XZ: (Tool, &[&str]) = (
    Tool {
        program: "xz",
        package: "xz-utils",
    },
    &["-dc", "--single-stream"],
);
const ZSTD: (Tool, &[&str]) = (
    Tool {
        program: "zstd",
        package: "zstd",
    },
    &["-dcq"],
);

/// The installed Debian kernel; fails the test (naming the package) when there is none.
pub fn debian_kernel(test: &str) -> GuestKernel {
    GuestKernel::find_installed().unwrap_or_else(|e| {
        prereq::require(test, &[e.to_string()]);
        unreachable!("prereq::require fails the test")
    })
}

/// The ELF vmlinux inside `kernel`'s bzImage, extracted once per kernel version into a
/// folder under /var/tmp (never into the repository).
pub fn vmlinux(test: &str, kernel: &GuestKernel) -> PathBuf {
    static CACHE: OnceLock<Mutex<Option<PathBuf>>> = OnceLock::new();
    let mut cached = CACHE
        .get_or_init(|| Mutex::new(None))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cached.as_ref() {
        return p.clone();
    }
    let fail = |e: String| -> ! { panic!("{}: {e}", kernel.image.display()) };
    let image = fs::read(&kernel.image).unwrap_or_else(|e| fail(e.to_string()));
    let payload = bzimage_payload(&image).unwrap_or_else(|e| fail(e));
    let (tool, args) = if payload.starts_with(b"\xfd7zXZ\0") {
        XZ
    } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        ZSTD
    } else {
        fail("the payload is neither xz nor zstd".into())
    };
    prereq::require(test, &prereq::missing(&[tool]));
    // Keyed by version and image size, so a rebuilt package is extracted afresh.
    let name = format!("vmlinux-{}-{}", kernel.version, image.len());
    let path = extract_vmlinux(&name, payload, tool.program, args).unwrap_or_else(|e| fail(e));
    *cached = Some(path.clone());
    path
}

/// Decompresses the bzImage's `payload` with `program` into `name` in a folder under
/// /var/tmp, unless an earlier run left it there. The result is written under a temporary
/// name and renamed, so test processes running at once never see half a file. Not under
/// /tmp: the lab (crate::lab) has a /tmp of its own and sees the host's /var/tmp.
fn extract_vmlinux(
    name: &str,
    payload: &[u8],
    program: &str,
    args: &[&str],
) -> Result<PathBuf, String> {
    let dir = Path::new("/var/tmp").join("plexvm-test-kernels");
    let out = dir.join(name);
    if is_elf(&out) {
        return Ok(out);
    }
    fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let tmp = tempfile::NamedTempFile::new_in(&dir).map_err(|e| e.to_string())?;
    let packed = tempfile::NamedTempFile::new_in(&dir).map_err(|e| e.to_string())?;
    fs::write(packed.path(), payload).map_err(|e| e.to_string())?;
    let status = Command::new(program)
        .args(args)
        .arg(packed.path())
        .stdout(tmp.reopen().map_err(|e| e.to_string())?)
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("run {program}: {e}"))?;
    if !is_elf(tmp.path()) {
        return Err(format!("{program} ({status}) did not produce an ELF file"));
    }
    tmp.persist(&out).map_err(|e| e.to_string())?;
    Ok(out)
}

fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// The compressed kernel inside a bzImage, located by the setup header's `setup_sects`,
/// `payload_offset` and `payload_length` (Documentation/arch/x86/boot.rst).
pub fn bzimage_payload(image: &[u8]) -> Result<&[u8], String> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(image.get(at..at + 4)?.try_into().ok()?))
    };
    if image.get(0x202..0x206) != Some(b"HdrS") {
        return Err("not a bzImage (no HdrS)".into());
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let (offset, len) = u32_at(0x248).zip(u32_at(0x24c)).ok_or("short header")?;
    let start = (setup_sects + 1) * 512 + offset as usize;
    image
        .get(start..start + len as usize)
        .ok_or_else(|| "payload outside the file".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_the_setup_header_is_not_a_bzimage() {
        assert!(bzimage_payload(&[0u8; 0x300]).is_err());
        let mut image = vec![0u8; 0x1000];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x1f1] = 1;
        image[0x248..0x24c].copy_from_slice(&0x10u32.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&0x20u32.to_le_bytes());
        assert_eq!(bzimage_payload(&image).map(<[u8]>::len), Ok(0x20));
        image[0x24c..0x250].copy_from_slice(&0x10_0000u32.to_le_bytes());
        assert!(bzimage_payload(&image).is_err());
    }
}
