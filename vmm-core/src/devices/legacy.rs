//! The few legacy devices the core emulates: COM1 (16550, vm-superio), the i8042 reset
//! line (vm-superio), plexvm's exit port, the ACPI sleep control register (power-off of
//! a hardware-reduced ACPI platform) and a pvpanic port (docs/platform.md).

use std::io::Write;
use std::sync::mpsc::Sender;

use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::PioDevice;

/// COM1 port base.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;
/// i8042 data port (the device spans 0x60..=0x64).
pub const I8042_BASE: u16 = 0x60;
/// plexvm's exit port: `out 0x501, al` ends the VM with exit code AL.
pub const EXIT_PORT: u16 = 0x501;

/// The ACPI sleep control and status registers (FADT `SLEEP_CONTROL_REG` and
/// `SLEEP_STATUS_REG`, one byte each): how a hardware-reduced ACPI guest powers off.
pub const ACPI_SLEEP_PORT: u16 = 0x600;
/// The `\_S5_` sleep type the DSDT names; `SLP_TYP` of a write that means power off.
pub const S5_SLEEP_TYPE: u8 = 5;
/// pvpanic's port (QEMU's ISA pvpanic default; ACPI `QEMU0001`).
pub const PVPANIC_PORT: u16 = 0x505;
/// pvpanic events the device supports (read back by the driver): PANICKED, CRASH_LOADED.
const PVPANIC_CAPABILITIES: u8 = 0b11;
/// The pvpanic event "the guest kernel panicked".
const PVPANIC_PANICKED: u8 = 0b01;
/// `plexvm`'s exit code when the guest kernel reported a panic through pvpanic.
pub const PANIC_EXIT_CODE: i32 = 3;

/// Why the guest ended the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest wrote its status to the exit port.
    ExitPort(u8),
    /// The guest asked for a reset (i8042 pulse or KVM system event).
    Reset,
    /// The guest asked to power off (KVM system event).
    PowerOff,
    /// The guest triple-faulted.
    TripleFault,
    /// The guest kernel reported a panic (pvpanic).
    Panicked,
    /// A vCPU hit something the core cannot continue from.
    Error(String),
    /// The VM was stopped from outside (control API, signal).
    Stopped,
}

impl GuestExit {
    /// The `plexvm` exit code for this end.
    pub fn exit_code(&self) -> i32 {
        match self {
            GuestExit::ExitPort(code) => i32::from(*code),
            GuestExit::Reset | GuestExit::PowerOff | GuestExit::Stopped => 0,
            GuestExit::TripleFault | GuestExit::Error(_) => 1,
            GuestExit::Panicked => PANIC_EXIT_CODE,
        }
    }
}

/// An interrupt line driven through a KVM irqfd.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// COM1 on the port bus.
pub struct SerialPort<W: Write + Send> {
    serial: Serial<IrqLine, vm_superio::serial::NoEvents, W>,
}

impl<W: Write + Send> std::fmt::Debug for SerialPort<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialPort").finish_non_exhaustive()
    }
}

impl<W: Write + Send> SerialPort<W> {
    /// A 16550 raising `irq` and writing what the guest sends to `out`.
    pub fn new(irq: IrqLine, out: W) -> Self {
        SerialPort {
            serial: Serial::new(irq, out),
        }
    }
}

impl<W: Write + Send> PioDevice for SerialPort<W> {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        if let (Ok(off), [byte]) = (u8::try_from(offset), data) {
            *byte = self.serial.read(off);
        }
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) {
        if let (Ok(off), [byte]) = (u8::try_from(offset), data) {
            // An error here is the sink failing (e.g. a closed stdout); the guest
            // cannot do anything about it and must keep running.
            let _ = self.serial.write(off, *byte);
        }
    }
}

/// Sends a [`GuestExit`] to whoever runs the VM.
#[derive(Debug, Clone)]
pub struct ExitSender(pub Sender<GuestExit>);

impl Trigger for ExitSender {
    type E = ();

    fn trigger(&self) -> Result<(), ()> {
        self.0.send(GuestExit::Reset).map_err(|_| ())
    }
}

/// The i8042 controller, only for its CPU-reset command.
#[derive(Debug)]
pub struct I8042(I8042Device<ExitSender>);

impl I8042 {
    /// An i8042 whose reset command sends [`GuestExit::Reset`].
    pub fn new(exit: ExitSender) -> Self {
        I8042(I8042Device::new(exit))
    }
}

impl PioDevice for I8042 {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        if let (Ok(off), [byte]) = (u8::try_from(offset), data) {
            *byte = self.0.read(off);
        }
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) {
        if let (Ok(off), [byte]) = (u8::try_from(offset), data) {
            let _ = self.0.write(off, *byte);
        }
    }
}

/// The exit port: the guest's byte becomes `plexvm`'s exit code.
#[derive(Debug)]
pub struct ExitPort(pub Sender<GuestExit>);

impl PioDevice for ExitPort {
    fn pio_read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, _offset: u16, data: &[u8]) {
        if let Some(code) = data.first() {
            let _ = self.0.send(GuestExit::ExitPort(*code));
        }
    }
}

/// The ACPI sleep control register (ACPI 6.5, section 4.8.3.7): a write with `SLP_EN`
/// (bit 5) and `SLP_TYP` (bits 2..=4) = [`S5_SLEEP_TYPE`] powers the VM off. The status
/// register (offset 1) reads 0: no wake events on this platform.
#[derive(Debug)]
pub struct AcpiSleepControl(pub Sender<GuestExit>);

impl PioDevice for AcpiSleepControl {
    fn pio_read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) {
        const SLP_EN: u8 = 1 << 5;
        if let (0, [byte]) = (offset, data) {
            if byte & SLP_EN != 0 && (byte >> 2) & 0b111 == S5_SLEEP_TYPE {
                let _ = self.0.send(GuestExit::PowerOff);
            }
        }
    }
}

/// pvpanic (QEMU's docs/specs/pvpanic.rst): reading gives the supported events, writing
/// PANICKED ends the VM with [`PANIC_EXIT_CODE`]. Linux's `pvpanic_mmio` driver binds
/// it through the DSDT's `QEMU0001` device and writes it from its panic notifier.
#[derive(Debug)]
pub struct PvPanic(pub Sender<GuestExit>);

impl PioDevice for PvPanic {
    fn pio_read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PVPANIC_CAPABILITIES;
        }
    }

    fn pio_write(&mut self, _offset: u16, data: &[u8]) {
        if data.first().is_some_and(|b| b & PVPANIC_PANICKED != 0) {
            let _ = self.0.send(GuestExit::Panicked);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn s5_sleep_powers_off_and_pvpanic_reports_a_panic() {
        let (tx, rx) = channel();
        let mut sleep = AcpiSleepControl(tx.clone());
        sleep.pio_write(0, &[S5_SLEEP_TYPE << 2]);
        sleep.pio_write(0, &[(3 << 2) | (1 << 5)]);
        sleep.pio_write(1, &[(S5_SLEEP_TYPE << 2) | (1 << 5)]);
        assert!(
            rx.try_recv().is_err(),
            "only SLP_EN with S5 at offset 0 powers off"
        );
        sleep.pio_write(0, &[(S5_SLEEP_TYPE << 2) | (1 << 5)]);
        assert_eq!(rx.try_recv().unwrap(), GuestExit::PowerOff);
        let mut panic = PvPanic(tx);
        let mut caps = [0u8; 1];
        panic.pio_read(0, &mut caps);
        assert_eq!(caps, [PVPANIC_CAPABILITIES]);
        panic.pio_write(0, &[0b10]);
        assert!(rx.try_recv().is_err(), "CRASH_LOADED alone is not a panic");
        panic.pio_write(0, &[PVPANIC_PANICKED]);
        assert_eq!(rx.try_recv().unwrap(), GuestExit::Panicked);
        assert_eq!(GuestExit::Panicked.exit_code(), PANIC_EXIT_CODE);
    }

    #[test]
    fn exit_port_and_reset_report_the_guest_exit() {
        let (tx, rx) = channel();
        let mut port = ExitPort(tx.clone());
        port.pio_write(0, &[7]);
        assert_eq!(rx.try_recv().unwrap(), GuestExit::ExitPort(7));
        port.pio_write(0, &[]);
        assert!(rx.try_recv().is_err());
        let mut kbd = I8042::new(ExitSender(tx));
        kbd.pio_write(4, &[0xfe]);
        assert_eq!(rx.try_recv().unwrap(), GuestExit::Reset);
        kbd.pio_write(0, &[0xfe]);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn serial_passes_bytes_to_its_sink() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut com1 = SerialPort::new(IrqLine(evt), Vec::new());
        for b in b"hi\n" {
            com1.pio_write(0, &[*b]);
        }
        com1.pio_write(0, &[1, 2]);
        assert_eq!(com1.serial.writer(), b"hi\n");
    }
}
