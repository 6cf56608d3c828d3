use super::*;
use crate::pci::config::{command, offset, MemoryBar};

/// A function with one 64-bit BAR that records BAR accesses.
struct TestFunction {
    config: ConfigSpace,
    last_write: Option<(usize, u64, Vec<u8>)>,
}

impl TestFunction {
    fn new(bar_addr: u64) -> Self {
        let mut config = ConfigSpace::new(PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: (0x01, 0x00, 0x00),
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        let bar = MemoryBar {
            size: 0x4000,
            is_64bit: true,
            prefetchable: false,
        };
        config.add_bar(0, bar, bar_addr).unwrap();
        TestFunction {
            config,
            last_write: None,
        }
    }
}

impl PciFunction for TestFunction {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn write_config(&mut self, at: usize, data: &[u8]) {
        self.config.write(at, data);
    }
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(bar as u8 + offset as u8);
    }
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        self.last_write = Some((bar, offset, data.to_vec()));
    }
}

const BAR: u64 = 0x1_0000_0000;

fn root() -> (Arc<PciRoot>, Arc<Mutex<TestFunction>>) {
    let mut root = PciRoot::new();
    let f = Arc::new(Mutex::new(TestFunction::new(BAR)));
    assert_eq!(root.add(f.clone()).unwrap(), 1);
    (Arc::new(root), f)
}

fn cf8(io: &mut PciConfigIo, device: u32, register: u32) {
    let addr = (1 << 31) | (device << 11) | register;
    io.pio_write(0, &addr.to_le_bytes());
}

fn read32(io: &mut PciConfigIo, offset: u16) -> u32 {
    let mut b = [0; 4];
    io.pio_read(offset, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn config_io_reads_ids_and_absent_functions_read_all_ones() {
    let (root, _) = root();
    let mut io = PciConfigIo::new(root);
    cf8(&mut io, 0, 0);
    assert_eq!(read32(&mut io, 4), 0x0d57_8086);
    cf8(&mut io, 1, 0);
    assert_eq!(read32(&mut io, 4), 0x1042_1af4);
    // Byte and word reads at CONFIG_DATA + n read register + n.
    let mut w = [0; 2];
    io.pio_read(6, &mut w);
    assert_eq!(u16::from_le_bytes(w), 0x1042);
    cf8(&mut io, 2, 0);
    assert_eq!(read32(&mut io, 4), u32::MAX);
    // Function 1 of a present device, and another bus: absent.
    io.pio_write(0, &((1u32 << 31) | (1 << 11) | (1 << 8)).to_le_bytes());
    assert_eq!(read32(&mut io, 4), u32::MAX);
    io.pio_write(0, &((1u32 << 31) | (1 << 16)).to_le_bytes());
    assert_eq!(read32(&mut io, 4), u32::MAX);
    // Enable bit clear: nothing is selected.
    io.pio_write(0, &(1u32 << 11).to_le_bytes());
    assert_eq!(read32(&mut io, 4), u32::MAX);
    // CONFIG_ADDRESS keeps only its defined bits and only takes 32-bit writes.
    io.pio_write(0, &u32::MAX.to_le_bytes());
    assert_eq!(read32(&mut io, 0), 0x80ff_fffc);
    io.pio_write(0, &[0]);
    assert_eq!(read32(&mut io, 0), 0x80ff_fffc);
}

#[test]
fn config_writes_respect_read_only_fields() {
    let (root, f) = root();
    let mut io = PciConfigIo::new(root.clone());
    cf8(&mut io, 1, 0);
    io.pio_write(4, &u32::MAX.to_le_bytes());
    assert_eq!(read32(&mut io, 4), 0x1042_1af4);
    cf8(&mut io, 1, 0x08);
    io.pio_write(4, &0u32.to_le_bytes());
    assert_eq!(read32(&mut io, 4) >> 24, 0x01, "class is read-only");
    cf8(&mut io, 1, 0x04);
    io.pio_write(4, &0xffff_ffffu32.to_le_bytes());
    assert_eq!(read32(&mut io, 4) & 0xffff, u32::from(command::WRITABLE));
    assert_eq!(f.lock().unwrap().config.command(), command::WRITABLE);
}

#[test]
fn ecam_bad_accesses_read_all_ones_and_are_dropped() {
    let (root, f) = root();
    let mut ecam = PciConfigMmio::new(root.clone());
    let dev1 = 1 << 15;
    let mut b4 = [0; 4];
    ecam.mmio_read(dev1, &mut b4);
    assert_eq!(u32::from_le_bytes(b4), 0x1042_1af4);
    // Unaligned, 8-byte and 3-byte accesses.
    let mut b2 = [0; 2];
    ecam.mmio_read(dev1 + 1, &mut b2);
    assert_eq!(b2, [0xff; 2]);
    let mut b8 = [0; 8];
    ecam.mmio_read(dev1, &mut b8);
    assert_eq!(b8, [0xff; 8]);
    ecam.mmio_write(dev1 + offset::COMMAND as u64 + 1, &[0xff, 0xff]);
    ecam.mmio_write(dev1 + offset::COMMAND as u64, &[0xff, 0xff, 0xff]);
    assert_eq!(f.lock().unwrap().config.command(), 0);
    // Extended config space of a present function reads 0 (no capabilities).
    ecam.mmio_read(dev1 + 0x100, &mut b4);
    assert_eq!(b4, [0; 4]);
    ecam.mmio_read(dev1 + 0xffc, &mut b4);
    assert_eq!(b4, [0; 4]);
    ecam.mmio_write(dev1 + 0x100, &[1, 2, 3, 4]);
    // Past the ECAM window and absent slots.
    ecam.mmio_read(ECAM_SIZE, &mut b4);
    assert_eq!(b4, [0xff; 4]);
    ecam.mmio_read(31 << 15, &mut b4);
    assert_eq!(b4, [0xff; 4]);
    assert!(root.guest_issue_count() >= 4);
}

#[test]
fn bar_accesses_reach_the_decoding_function_only() {
    let (root, f) = root();
    let mut window = PciBarWindow::new(root.clone(), BAR);
    let mut b = [0; 4];
    // Memory decoding off: master abort.
    window.mmio_read(0x10, &mut b);
    assert_eq!(b, [0xff; 4]);
    let mut ecam = PciConfigMmio::new(root.clone());
    ecam.mmio_write(
        (1 << 15) + offset::COMMAND as u64,
        &command::MEMORY_SPACE.to_le_bytes(),
    );
    window.mmio_read(0x10, &mut b);
    assert_eq!(b, [0x10; 4]);
    window.mmio_write(0x3ffc, &[1, 2, 3, 4]);
    assert_eq!(
        f.lock().unwrap().last_write,
        Some((0, 0x3ffc, vec![1, 2, 3, 4]))
    );
    // Straddling the end of the BAR, and beyond it.
    window.mmio_read(0x3ffe, &mut b);
    assert_eq!(b, [0xff; 4]);
    window.mmio_read(0x4000, &mut b);
    assert_eq!(b, [0xff; 4]);
    // Moving the BAR moves what decodes.
    let bar_lo = (1 << 15) + offset::BAR0 as u64;
    ecam.mmio_write(bar_lo, &0x8000u32.to_le_bytes());
    window.mmio_read(0x10, &mut b);
    assert_eq!(b, [0xff; 4]);
    window.mmio_read(0x8010, &mut b);
    assert_eq!(b, [0x10; 4]);
    // An address that wraps around the address space.
    let mut top = PciBarWindow::new(root, u64::MAX);
    top.mmio_read(2, &mut b);
    assert_eq!(b, [0xff; 4]);
}

#[test]
fn the_bus_takes_31_devices() {
    let mut root = PciRoot::new();
    for slot in 1..SLOTS {
        let f = Arc::new(Mutex::new(TestFunction::new(BAR + 0x4000 * slot as u64)));
        assert_eq!(root.add(f).unwrap(), slot);
    }
    let f = Arc::new(Mutex::new(TestFunction::new(BAR)));
    assert_eq!(root.add(f), Err(RootError::BusFull));
}
