//! Devices the core emulates itself, and the buses vCPU exits are dispatched on.

pub mod bus;
pub mod legacy;
pub mod serial_buffer;

/// A device in the guest's MMIO space. `offset` is relative to the device's base.
///
/// Called from vCPU threads on KVM_EXIT_MMIO; an access the device does not
/// understand is ignored (reads return zeros), never a panic.
pub trait MmioDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`.
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn mmio_write(&mut self, offset: u64, data: &[u8]);
}

/// A device in the guest's port-I/O space. `offset` is relative to the device's base.
pub trait PioDevice: Send {
    /// Guest `in` of `data.len()` bytes.
    fn pio_read(&mut self, offset: u16, data: &mut [u8]);
    /// Guest `out`.
    fn pio_write(&mut self, offset: u16, data: &[u8]);
}
