//! Disk images for the runs: one per storage kind, filled with non-zero data so that
//! reads never hit holes (a hole reads as zeroes without touching storage).

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// An image file that is removed when dropped.
#[derive(Debug)]
pub struct Image {
    path: PathBuf,
}

impl Image {
    /// Creates (or overwrites) `path` with `mib` MiB of data.
    pub fn create(path: &Path, mib: u64) -> io::Result<Image> {
        let image = Image {
            path: path.to_path_buf(),
        };
        let mut file = File::create(path)?;
        let mut chunk = vec![0u8; 1 << 20];
        for (i, byte) in chunk.iter_mut().enumerate() {
            *byte = (i % 251) as u8 | 1;
        }
        for block in 0..mib {
            chunk[..8].copy_from_slice(&block.to_le_bytes());
            file.write_all(&chunk)?;
        }
        file.sync_all()?;
        Ok(image)
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.img");
        {
            let image = Image::create(&path, 2).unwrap();
            let data = std::fs::read(image.path()).unwrap();
            assert_eq!(data.len(), 2 << 20);
            assert!(data[8..1 << 20].iter().all(|&b| b != 0));
            assert_eq!(data[(1 << 20)..(1 << 20) + 8], 1u64.to_le_bytes());
        }
        assert!(!path.exists());
    }
}
