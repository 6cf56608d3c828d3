//! Host-side checks of guest-written ext2/ext4 images with e2fsprogs (`e2fsck`,
//! `debugfs`, `mke2fs -d`): no loop device and no mount, so the checks need no
//! privileges beyond reading the image, and they use code we did not write.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Why an image check could not be done or failed.
#[derive(Debug, thiserror::Error)]
pub enum ExtImageError {
    /// A tool could not be started.
    #[error("cannot run {0}")]
    Spawn(&'static str, #[source] std::io::Error),
    /// A tool reported a problem.
    #[error("{tool} failed ({status}): {output}")]
    Failed {
        /// The tool.
        tool: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its stdout and stderr.
        output: String,
    },
    /// A file of the test tree could not be written.
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

fn run(tool: &'static str, cmd: &mut Command) -> Result<Vec<u8>, ExtImageError> {
    let out = cmd.output().map_err(|e| ExtImageError::Spawn(tool, e))?;
    if !out.status.success() {
        return Err(ExtImageError::Failed {
            tool,
            status: out.status,
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(out.stdout)
}

/// `e2fsck -fn`: a forced, read-only check; fails unless the filesystem is clean
/// (exit status 0).
pub fn e2fsck_clean(image: &Path) -> Result<(), ExtImageError> {
    run("e2fsck", Command::new("e2fsck").arg("-fn").arg(image)).map(drop)
}

/// The contents of `path` (absolute, inside the filesystem) read by `debugfs`.
pub fn debugfs_cat(image: &Path, path: &str) -> Result<Vec<u8>, ExtImageError> {
    run(
        "debugfs",
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat \"{path}\""))
            .arg(image),
    )
}

/// Formats `image` (created or truncated to `size_kib`) as ext2 holding a copy of the
/// tree under `source` (`mke2fs -d`).
pub fn mkfs_ext2_from(image: &Path, source: &Path, size_kib: u64) -> Result<(), ExtImageError> {
    run(
        "mke2fs",
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext2", "-b", "4096", "-d"])
            .arg(source)
            .arg(image)
            .arg(format!("{size_kib}k")),
    )
    .map(drop)
}

/// Deterministic bytes for test files (xorshift64*; only needs to differ per file and
/// offset, not to be random).
pub fn pattern_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes a tree of files of mixed sizes (empty, one byte, around page and block
/// boundaries, over 1 MiB) under `root`; returns their paths relative to `root`.
pub fn write_test_tree(root: &Path, seed: u64) -> Result<Vec<String>, ExtImageError> {
    const FILES: &[(&str, usize)] = &[
        ("empty", 0),
        ("one", 1),
        ("a/sector", 512),
        ("a/page-1", 4095),
        ("a/page", 4096),
        ("a/page+1", 4097),
        ("a/b/odd", 100_003),
        ("a/b/c/mib+1", 1_048_577),
        ("d/two-mib", 2 << 20),
    ];
    let mut names = Vec::new();
    for (i, (name, len)) in FILES.iter().enumerate() {
        let path = root.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| ExtImageError::Write(parent.into(), e))?;
        }
        fs::write(&path, pattern_bytes(seed + i as u64, *len))
            .map_err(|e| ExtImageError::Write(path.clone(), e))?;
        names.push(name.to_string());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_seeded() {
        assert_eq!(pattern_bytes(7, 100), pattern_bytes(7, 100));
        assert_ne!(pattern_bytes(7, 100), pattern_bytes(8, 100));
        assert_eq!(pattern_bytes(7, 13).len(), 13);
        assert_eq!(&pattern_bytes(7, 100)[..13], &pattern_bytes(7, 13)[..]);
    }
}
