//! Tap ports: a host tap device attached to the switch.
//!
//! The device is opened (and created when missing) with TUNSETIFF
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, its virtio-net header set to the 12-byte form
//! (TUNSETVNETHDRSZ), and TUNSETOFFLOAD told that the switch takes partial checksums and
//! TCP super-frames, so offloads pass between host and guests in both directions
//! (`drivers/net/tun.c`: the header is the guest's own). The descriptor is non-blocking:
//! a write that would block is a dropped frame, never a stalled switch, and reading is
//! done by one thread per tap that waits in epoll for the device or for shutdown.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use crate::frame::{Packet, VnetHdr, MAX_FRAME_LEN, VNET_HDR_LEN};

/// The clone device of the tun/tap driver.
pub const TUN_DEVICE: &str = "/dev/net/tun";

/// Why a tap could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long or contains `/` or whitespace.
    #[error("{0:?} is not a valid interface name (1 to 15 bytes, no '/' or whitespace)")]
    BadName(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open {TUN_DEVICE}")]
    Open(#[source] io::Error),
    /// An ioctl on the device failed.
    #[error("{what} failed for tap {name}")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// The interface.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Checks an interface name the way the kernel's `dev_valid_name` does.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name.contains(['/', ':'])
        && !name.chars().any(char::is_whitespace)
}

impl Tap {
    /// Opens tap `name`, creating it when it does not exist.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_ifname(name) {
            return Err(TapError::BadName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_DEVICE)
            .map_err(TapError::Open)?;
        let ioctl_err = |what: &'static str| {
            let source = io::Error::last_os_error();
            TapError::Ioctl {
                what,
                name: name.to_string(),
                source,
            }
        };
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `ifr` is.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
            return Err(ioctl_err("TUNSETIFF"));
        }
        let hdr_size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_size) } < 0 {
            return Err(ioctl_err("TUNSETVNETHDRSZ"));
        }
        let offloads = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        // SAFETY: TUNSETOFFLOAD takes its flags by value; no memory is accessed.
        if unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(offloads),
            )
        } < 0
        {
            return Err(ioctl_err("TUNSETOFFLOAD"));
        }
        // SAFETY: the kernel NUL-terminates ifr_name (IFNAMSIZ bytes, name < IFNAMSIZ).
        let actual = unsafe { CStr::from_ptr(ifr.ifr_name.as_ptr()) };
        Ok(Tap {
            file,
            name: actual.to_string_lossy().into_owned(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device descriptor (for epoll).
    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Writes one frame with its header. `WouldBlock` means the device queue is full.
    pub fn write_frame(&self, hdr: &VnetHdr, frame: &[u8]) -> io::Result<()> {
        let mut raw = [0u8; VNET_HDR_LEN];
        let mut h = *hdr;
        h.num_buffers = 0;
        h.write(&mut raw);
        let iov = [
            libc::iovec {
                iov_base: raw.as_ptr() as *mut libc::c_void,
                iov_len: raw.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        // SAFETY: both iovecs point to live buffers of the given lengths, which the
        // kernel only reads.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame into `pkt`. `Ok(false)` when none is waiting.
    pub fn read_frame(&self, pkt: &mut Packet) -> io::Result<bool> {
        pkt.buf.resize(VNET_HDR_LEN + MAX_FRAME_LEN, 0);
        // SAFETY: the buffer is live and writable for its whole length.
        let n = unsafe {
            libc::read(
                self.file.as_raw_fd(),
                pkt.buf.as_mut_ptr() as *mut libc::c_void,
                pkt.buf.len(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(false),
                _ => Err(e),
            };
        }
        pkt.buf.truncate(n as usize);
        pkt.hdr = VnetHdr::parse(&pkt.buf).unwrap_or_default();
        pkt.hdr.num_buffers = 0;
        pkt.start = VNET_HDR_LEN;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        assert!(valid_ifname("tap0"));
        assert!(valid_ifname("plexvm-uplink-1"));
        for bad in ["", "a/b", "a b", "x:1", ".", "..", "sixteen-chars-xx"] {
            assert!(!valid_ifname(bad), "{bad}");
        }
        assert!(matches!(Tap::open("a/b"), Err(TapError::BadName(_))));
    }
}
