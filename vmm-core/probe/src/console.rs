//! Serial output (COM1, `out 0x3f8` per byte: the core's UART always has THR empty)
//! and the exit port (docs/platform.md).

use crate::arch::outb;
use core::fmt;

const COM1: u16 = 0x3f8;
const EXIT_PORT: u16 = 0x501;

/// The probe's exit status, written to the exit port; `plexvm` exits with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// Workload passed.
    Ok = 0,
    /// Data did not verify / a check failed.
    VerifyFailed = 1,
    /// Device error, no device, or a request timed out.
    DeviceError = 2,
    /// Bad command line.
    BadCmdline = 3,
    /// The probe panicked.
    Panic = 4,
}

/// `core::fmt::Write` onto COM1.
#[derive(Debug, Clone, Copy, Default)]
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(|b| outb(COM1, b));
        Ok(())
    }
}

/// Prints to the serial port.
#[macro_export]
macro_rules! serial_print {
    ($($arg:tt)*) => {{
        // Writing to the serial port cannot fail.
        let _ = core::fmt::Write::write_fmt(&mut $crate::console::Serial, format_args!($($arg)*));
    }};
}

/// Prints a line to the serial port.
#[macro_export]
macro_rules! serial_println {
    ($($arg:tt)*) => {{
        $crate::serial_print!($($arg)*);
        $crate::serial_print!("\n");
    }};
}

/// Ends the VM with `code` (`out 0x501, al`) and never returns.
pub fn exit(code: ExitCode) -> ! {
    outb(EXIT_PORT, code as u8);
    // `hlt` is privileged at CPL3: spin until the core tears the VM down.
    loop {
        core::hint::spin_loop();
    }
}

/// Lower-case hex of `bytes`, into `out` (twice as long), returned as a `str`.
pub fn hex<'a>(bytes: &[u8], out: &'a mut [u8]) -> &'a str {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut len = 0;
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xf)];
        len += 2;
    }
    // Only ASCII digits were written.
    core::str::from_utf8(&out[..len]).unwrap_or("")
}

/// Displays an error followed by its `source()` chain: "outer: inner: root".
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(pub &'a dyn core::error::Error);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{hex, Chain};
    use crate::virtio::blk::BlkError;
    use crate::virtio::mmio::MmioError;

    #[test]
    fn chain_shows_sources() {
        let error = BlkError::from(MmioError::BadVersion(1));
        assert_eq!(
            Chain(&error).to_string(),
            "virtio-mmio: virtio-mmio version 1, only version 2 is supported"
        );
    }

    #[test]
    fn hex_encodes() {
        let mut buf = [0u8; 8];
        assert_eq!(hex(&[0x00, 0xab, 0x7f], &mut buf), "00ab7f");
        assert_eq!(hex(&[1, 2, 3, 4, 5], &mut buf), "01020304");
    }
}
