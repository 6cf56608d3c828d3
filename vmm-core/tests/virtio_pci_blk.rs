//! The virtio-pci transport against the real `plexvm-blk` backend, driven the way a guest
//! driver does: find the function through 0xCF8/0xCFC, walk its capabilities, bring the
//! device up through the common configuration in BAR 0, program MSI-X, place split-ring
//! block requests in guest memory by hand and notify; check the image, the used ring, the
//! MSI-X pending bits (a masked vector's completion waits in the PBA; unmasking sends it
//! and hands the queue's call eventfd to KVM as an irqfd), recovery after SIGKILL, and
//! that abuse of config space, BAR and MSI-X table changes nothing it must not.
//!
//! Needs `cargo build -p plexvm-blk` and `/dev/kvm`.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plexvm::backend;
use plexvm::devices::bus::Bus;
use plexvm::devices::{MmioDevice, PioDevice};
use plexvm::memory::{create_guest_memory, GuestMemory};
use plexvm::pci::platform::PciPlatform;
use plexvm::pci::{PciConfigIo, PciInterrupts};
use plexvm::supervisor::{BackendSupervisor, SupervisedDevice};
use plexvm::vhost_user::VhostUserFrontend;
use plexvm::virtio::{default_queue_count, status, EventLoop, VirtioMmioTransport};
use plexvm::vm::Vm;
use plexvm_protocol::api::BackendState;
use plexvm_protocol::spec::{BackendSource, DeviceConfig, DeviceKind, Transport};
use vm_memory::{Bytes, GuestAddress};

const SECTOR: u64 = 512;
const IMAGE_SECTORS: u64 = 2048;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const DESC: u64 = 0x1_0000;
const AVAIL: u64 = 0x1_1000;
const USED: u64 = 0x1_2000;
const HEADER: u64 = 0x2_0000;
const DATA: u64 = 0x2_1000;
const STATUS_BYTE: u64 = 0x2_2000;
const QUEUE_SIZE: u16 = 16;
const NO_VECTOR: u16 = 0xffff;

fn plexvm_blk() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join("plexvm-blk");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p plexvm-blk` first",
        p.display()
    );
    p
}

/// Where the driver found each structure (BAR 0 offsets) and MSI-X in config space.
#[derive(Debug, Default)]
struct Layout {
    bar: u64,
    common: u64,
    notify: u64,
    notify_multiplier: u64,
    isr: u64,
    device: u64,
    msix_cap: u8,
    table: u64,
    pba: u64,
}

struct Device {
    transport: Arc<Mutex<VirtioMmioTransport>>,
    interrupts: Arc<PciInterrupts>,
    config: DeviceConfig,
    io: Arc<Mutex<PciConfigIo>>,
    mmio: Bus<dyn MmioDevice>,
    mem: GuestMemory,
    l: Layout,
    _events: EventLoop,
    _vcpu: kvm_ioctls::VcpuFd,
    _vm: Vm,
    dir: tempfile::TempDir,
}

impl Device {
    fn cfg_read(&mut self, reg: u8, len: usize) -> u32 {
        let addr = (1u32 << 31) | (1 << 11) | u32::from(reg & 0xfc);
        let mut io = self.io.lock().unwrap();
        io.pio_write(0, &addr.to_le_bytes());
        let mut b = [0u8; 4];
        io.pio_read(4 + u16::from(reg & 3), &mut b[..len]);
        u32::from_le_bytes(b)
    }

    fn cfg_write(&mut self, reg: u8, data: &[u8]) {
        let addr = (1u32 << 31) | (1 << 11) | u32::from(reg & 0xfc);
        let mut io = self.io.lock().unwrap();
        io.pio_write(0, &addr.to_le_bytes());
        io.pio_write(4 + u16::from(reg & 3), data);
    }

    fn read(&self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.mmio
            .with_device(self.l.bar + off, |d, o| d.mmio_read(o, &mut b[..len]))
            .expect("BAR on the bus");
        u64::from_le_bytes(b)
    }

    fn write(&self, off: u64, len: usize, value: u64) {
        let b = value.to_le_bytes();
        self.mmio
            .with_device(self.l.bar + off, |d, o| d.mmio_write(o, &b[..len]))
            .expect("BAR on the bus");
    }

    fn common(&self, field: u64, len: usize) -> u64 {
        self.read(self.l.common + field, len)
    }

    fn set_common(&self, field: u64, len: usize, value: u64) {
        self.write(self.l.common + field, len, value)
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join("disk.raw")
    }
}

fn start_device() -> Device {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let file = std::fs::File::create(&image).unwrap();
    file.set_len(IMAGE_SECTORS * SECTOR).unwrap();
    file.write_all_at(&[0xab; SECTOR as usize], SECTOR).unwrap();
    let config = DeviceConfig {
        id: "disk0".into(),
        kind: DeviceKind::Blk,
        backend: BackendSource::Exec(vec![
            plexvm_blk().display().to_string(),
            "--image".into(),
            "disk.raw".into(),
        ]),
        restart: Default::default(),
        transport: Transport::Pci,
        params: Default::default(),
    };
    let (backend, stream) = backend::start(
        &config,
        dir.path(),
        dir.path(),
        &mut backend::EarlyBackends::none(),
    )
    .unwrap();
    let frontend =
        VhostUserFrontend::connect("disk0", stream, default_queue_count(DeviceKind::Blk)).unwrap();
    let mem = create_guest_memory(16 << 20).unwrap();
    let vm = Vm::new(mem.clone()).unwrap();
    // KVM_SIGNAL_MSI needs a local APIC to deliver to.
    let vcpu = vm.fd().create_vcpu(0).unwrap();
    let transport =
        VirtioMmioTransport::new_unwired(&config, mem.clone(), backend, frontend).unwrap();
    let transport = Arc::new(Mutex::new(transport));
    let mut pci = PciPlatform::new(&vm).unwrap();
    let (errs, config_irq) = {
        let t = transport.lock().unwrap();
        let errs: Vec<_> = t
            .err_eventfds()
            .iter()
            .map(|e| e.try_clone().unwrap())
            .collect();
        (errs, t.interrupt().irq_eventfd().try_clone().unwrap())
    };
    let (slot, interrupts) = pci.add_virtio(transport.clone()).unwrap();
    assert_eq!(slot, 1);
    let events = EventLoop::start().unwrap();
    events
        .add(interrupts.event_handler(errs, config_irq).unwrap())
        .unwrap();
    let mut mmio: Bus<dyn MmioDevice> = Bus::new();
    let installed = pci.install(&mut mmio).unwrap();
    let io = installed.config_io.clone();
    let mut d = Device {
        transport,
        interrupts,
        config,
        io,
        mmio,
        mem,
        l: Layout::default(),
        _events: events,
        _vcpu: vcpu,
        _vm: vm,
        dir,
    };
    d.l = discover(&mut d);
    d
}

/// What a driver does first: IDs, BAR 0, the capability list (virtio 1.2, 4.1.4).
fn discover(d: &mut Device) -> Layout {
    assert_eq!(d.cfg_read(0, 4), 0x1042_1af4, "modern virtio-blk");
    assert_eq!(d.cfg_read(0x08, 1), 1, "revision 1");
    assert_eq!(d.cfg_read(0x3d, 1), 0, "no INTx pin: MSI only");
    let lo = d.cfg_read(0x10, 4);
    assert_eq!(lo & 0x6, 0x4, "64-bit memory BAR");
    let bar = u64::from(lo & !0xf) | u64::from(d.cfg_read(0x14, 4)) << 32;
    assert!(bar >= 4 << 30, "in the 64-bit window: {bar:#x}");
    let mut l = Layout {
        bar,
        ..Layout::default()
    };
    let mut cap = d.cfg_read(0x34, 1) as u8;
    let mut seen = Vec::new();
    while cap != 0 {
        let id = d.cfg_read(cap, 1);
        if id == 0x09 {
            let cfg_type = d.cfg_read(cap + 3, 1);
            let offset = u64::from(d.cfg_read(cap + 8, 4));
            assert_eq!(d.cfg_read(cap + 4, 1), 0, "all in BAR 0");
            match cfg_type {
                1 => l.common = offset,
                2 => {
                    l.notify = offset;
                    l.notify_multiplier = u64::from(d.cfg_read(cap + 16, 4));
                }
                3 => l.isr = offset,
                4 => l.device = offset,
                _ => {}
            }
            seen.push(cfg_type);
        } else if id == 0x11 {
            l.msix_cap = cap;
            assert_eq!(
                d.cfg_read(cap + 2, 2) & 0x7ff,
                1,
                "2 vectors: queue + config"
            );
            l.table = u64::from(d.cfg_read(cap + 4, 4));
            l.pba = u64::from(d.cfg_read(cap + 8, 4));
            assert_eq!((l.table & 7, l.pba & 7), (0, 0), "BIR 0");
        }
        cap = d.cfg_read(cap + 1, 1) as u8;
    }
    seen.sort();
    assert_eq!(
        seen,
        [1, 2, 3, 4, 5],
        "common, notify, ISR, device, PCI cfg"
    );
    assert_ne!(l.msix_cap, 0);
    // Memory decoding and bus mastering on.
    d.cfg_write(0x04, &6u16.to_le_bytes());
    l
}

/// Device initialisation (3.1.1) through the common configuration, queue 0 on vector 1,
/// configuration changes on vector 0.
fn driver_init(d: &mut Device) {
    d.set_common(0x14, 1, 0);
    assert_eq!(d.common(0x14, 1), 0);
    d.set_common(0x14, 1, u64::from(status::ACKNOWLEDGE | status::DRIVER));
    d.set_common(0x00, 4, 1);
    assert_ne!(d.common(0x04, 4) & 1, 0, "VIRTIO_F_VERSION_1");
    d.set_common(0x08, 4, 1);
    d.set_common(0x0c, 4, 1);
    d.set_common(0x08, 4, 0);
    d.set_common(0x0c, 4, 0);
    let features_ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    d.set_common(0x14, 1, u64::from(features_ok));
    assert_eq!(d.common(0x14, 1), u64::from(features_ok));
    assert_eq!(d.common(0x12, 2), 1, "num_queues");
    d.set_common(0x10, 2, 0);
    assert_eq!(d.common(0x10, 2), 0);
    for addr in [DESC, AVAIL, USED] {
        d.mem
            .write_slice(&[0u8; 0x1000], GuestAddress(addr))
            .unwrap();
    }
    d.set_common(0x16, 2, 0);
    assert!(d.common(0x18, 2) >= u64::from(QUEUE_SIZE));
    d.set_common(0x18, 2, u64::from(QUEUE_SIZE));
    assert_eq!(d.common(0x18, 2), u64::from(QUEUE_SIZE));
    // A vector past the table is refused: it reads back NO_VECTOR.
    d.set_common(0x1a, 2, 7);
    assert_eq!(d.common(0x1a, 2), u64::from(NO_VECTOR));
    d.set_common(0x1a, 2, 1);
    assert_eq!(d.common(0x1a, 2), 1);
    d.set_common(0x20, 8, DESC);
    d.set_common(0x28, 4, AVAIL);
    d.set_common(0x2c, 4, 0);
    d.set_common(0x30, 8, USED);
    assert_eq!(d.common(0x20, 8), DESC);
    assert_eq!(d.common(0x28, 8), AVAIL);
    assert_eq!(d.common(0x1e, 2), 0, "queue_notify_off");
    d.set_common(0x1c, 2, 1);
    assert_eq!(d.common(0x1c, 2), 1);
    d.set_common(0x14, 1, u64::from(features_ok | status::DRIVER_OK));
    assert_eq!(
        d.common(0x14, 1),
        u64::from(features_ok | status::DRIVER_OK)
    );
    assert!(d.transport.lock().unwrap().info().activated);
}

/// MSI-X entry `v`: message to the BSP's LAPIC, masked or not.
fn program_vector(d: &Device, v: u64, masked: bool) {
    let e = d.l.table + 16 * v;
    d.write(e, 8, 0xfee0_0000);
    d.write(e + 8, 4, 0x30 + v);
    d.write(e + 12, 4, u64::from(masked));
}

fn enable_msix(d: &mut Device) {
    let control = d.cfg_read(d.l.msix_cap + 2, 2) as u16 | 1 << 15;
    d.cfg_write(d.l.msix_cap + 2, &control.to_le_bytes());
}

fn write_desc(mem: &GuestMemory, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let at = DESC + 16 * u64::from(index);
    mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
    mem.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
    mem.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
    mem.write_obj(next.to_le(), GuestAddress(at + 14)).unwrap();
}

/// Queues one block request as avail entry `seq`, notifies and waits for the used ring.
fn block_request(d: &Device, seq: u16, kind: u32, sector: u64) {
    let mem = &d.mem;
    mem.write_obj(kind.to_le(), GuestAddress(HEADER)).unwrap();
    mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
    mem.write_obj(sector.to_le(), GuestAddress(HEADER + 8))
        .unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS_BYTE)).unwrap();
    let data_flags = if kind == VIRTIO_BLK_T_IN {
        VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE
    } else {
        VIRTQ_DESC_F_NEXT
    };
    write_desc(mem, 0, HEADER, 16, VIRTQ_DESC_F_NEXT, 1);
    write_desc(mem, 1, DATA, SECTOR as u32, data_flags, 2);
    write_desc(mem, 2, STATUS_BYTE, 1, VIRTQ_DESC_F_WRITE, 0);
    let slot = u64::from(seq % QUEUE_SIZE);
    mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))
        .unwrap();
    mem.write_obj((seq + 1).to_le(), GuestAddress(AVAIL + 2))
        .unwrap();
    // The notify address of queue 0, through the trapping path (the same kick eventfd
    // KVM's ioeventfd signals).
    d.write(d.l.notify, 2, 0);
    wait_until("the used ring", || {
        let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        u16::from_le(used) == seq + 1
    });
    let status: u8 = mem.read_obj(GuestAddress(STATUS_BYTE)).unwrap();
    assert_eq!(status, 0, "VIRTIO_BLK_S_OK");
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn blk_over_pci_with_msix_pending_bits_and_irqfd_routing() {
    let mut d = start_device();
    // Device configuration: capacity in sectors (5.2.4).
    assert_eq!(d.read(d.l.device, 8), IMAGE_SECTORS);
    assert_eq!(d.l.notify_multiplier, 4);
    program_vector(&d, 0, false);
    program_vector(&d, 1, true);
    enable_msix(&mut d);
    driver_init(&mut d);
    assert_eq!(d.interrupts.routed_queues(), [false], "vector 1 is masked");

    block_request(&d, 0, VIRTIO_BLK_T_IN, 1);
    let mut data = [0u8; SECTOR as usize];
    d.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert_eq!(data, [0xab; SECTOR as usize]);
    // The completion waits as vector 1's pending bit, set by the core's event thread.
    wait_until("the pending bit", || d.read(d.l.pba, 8) & 2 != 0);
    assert_eq!(
        d.read(d.l.isr, 1),
        0,
        "with MSI-X on, ISR's queue bit stays clear"
    );
    // Unmasking sends it and moves the queue's call eventfd to a KVM irqfd.
    d.write(d.l.table + 16 + 12, 4, 0);
    assert_eq!(d.read(d.l.pba, 8), 0);
    assert_eq!(d.interrupts.routed_queues(), [true]);

    d.mem
        .write_slice(&[0xcd; SECTOR as usize], GuestAddress(DATA))
        .unwrap();
    block_request(&d, 1, VIRTIO_BLK_T_OUT, 2);
    let image = std::fs::read(d.image()).unwrap();
    assert_eq!(&image[1024..1536], &[0xcd; 512][..]);
    assert_eq!(d.read(d.l.pba, 8), 0, "KVM delivered it, nothing pending");

    // The function mask takes the queue back to the core.
    let control = d.cfg_read(d.l.msix_cap + 2, 2) as u16 | 1 << 14;
    d.cfg_write(d.l.msix_cap + 2, &control.to_le_bytes());
    assert_eq!(d.interrupts.routed_queues(), [false]);
    block_request(&d, 2, VIRTIO_BLK_T_IN, 2);
    wait_until("the pending bit", || d.read(d.l.pba, 8) & 2 != 0);
    d.cfg_write(d.l.msix_cap + 2, &(control & !(1 << 14)).to_le_bytes());
    assert_eq!(d.read(d.l.pba, 8), 0);
    assert_eq!(d.interrupts.routed_queues(), [true]);

    // Reset: vectors back to NO_VECTOR, the queue off KVM; the device comes up again.
    d.set_common(0x14, 1, 0);
    assert_eq!(d.common(0x14, 1), 0);
    assert_eq!(d.common(0x10, 2), u64::from(NO_VECTOR));
    assert_eq!(d.interrupts.routed_queues(), [false]);
    driver_init(&mut d);
    block_request(&d, 0, VIRTIO_BLK_T_IN, 2);
    d.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert_eq!(data, [0xcd; SECTOR as usize]);
}

#[test]
fn bad_guest_accesses_change_nothing_and_never_panic() {
    let mut d = start_device();
    program_vector(&d, 1, true);
    let table = |d: &Device| {
        (0..8)
            .map(|i| d.read(d.l.table + 4 * i, 4))
            .collect::<Vec<_>>()
    };
    let before = table(&d);
    // MSI-X table abuse: unaligned, byte and word writes, past the table, into the PBA.
    d.write(d.l.table + 2, 4, u64::MAX);
    d.write(d.l.table + 16, 1, 0xff);
    d.write(d.l.table + 16, 2, 0xffff);
    d.write(d.l.table + 32, 4, u64::MAX);
    d.write(d.l.pba, 8, u64::MAX);
    assert_eq!(table(&d), before);
    assert_eq!(d.read(d.l.pba, 8), 0);
    // Reserved vector-control bits read 0.
    d.write(d.l.table + 16 + 12, 4, 0xffff_fffe);
    assert_eq!(d.read(d.l.table + 16 + 12, 4), 0);
    // Read-only common fields, wrong widths, past the structure, ISR writes.
    d.set_common(0x12, 2, 9);
    assert_eq!(d.common(0x12, 2), 1);
    d.set_common(0x04, 4, 0);
    assert_ne!(d.common(0x04, 4), 0);
    d.set_common(0x14, 4, 0xf);
    assert_eq!(d.common(0x14, 1), 0);
    assert_eq!(d.common(0x13, 1), 0);
    d.set_common(0x100, 4, 1);
    d.write(d.l.isr, 1, 0xff);
    assert_eq!(d.read(d.l.isr, 1), 0);
    // Device config past its 256 bytes, and the notify of a queue that does not exist.
    assert_eq!(d.read(d.l.device + 0xfc, 8), 0);
    d.write(d.l.notify + 4 * 40, 2, 40);
    // Config space: IDs, capability pointers and MSI-X table size are read-only.
    d.cfg_write(0x00, &[0xff; 4]);
    d.cfg_write(0x34, &[0]);
    d.cfg_write(d.l.msix_cap + 2, &0x3fffu16.to_le_bytes());
    assert_eq!(d.cfg_read(0x00, 4), 0x1042_1af4);
    assert_eq!(d.cfg_read(d.l.msix_cap + 2, 2) & 0x7ff, 1);
    assert_eq!(discover(&mut d).bar, d.l.bar);
    // The device still works; without MSI-X a completion shows as ISR bit 0, which
    // reading clears.
    driver_init(&mut d);
    block_request(&d, 0, VIRTIO_BLK_T_IN, 1);
    wait_until("ISR bit 0", || d.read(d.l.isr, 1) & 1 != 0);
    assert_eq!(d.read(d.l.isr, 1), 0);
}

#[test]
fn a_killed_backend_is_restarted_and_keeps_its_msix_route() {
    let mut d = start_device();
    program_vector(&d, 1, false);
    enable_msix(&mut d);
    driver_init(&mut d);
    assert_eq!(d.interrupts.routed_queues(), [true]);
    d.mem
        .write_slice(&[0xcd; SECTOR as usize], GuestAddress(DATA))
        .unwrap();
    block_request(&d, 0, VIRTIO_BLK_T_OUT, 3);
    let supervisor = BackendSupervisor::start(
        vec![SupervisedDevice {
            transport: d.transport.clone(),
            config: d.config.clone(),
        }],
        d.dir.path().to_path_buf(),
        d.dir.path().to_path_buf(),
    )
    .unwrap();
    let pid = d.transport.lock().unwrap().info().backend_pid.unwrap();
    // SAFETY: the pid is the transport's unreaped child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    d.mem
        .write_slice(&[0u8; SECTOR as usize], GuestAddress(DATA))
        .unwrap();
    block_request(&d, 1, VIRTIO_BLK_T_IN, 3);
    let mut data = [0u8; SECTOR as usize];
    d.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert_eq!(data, [0xcd; SECTOR as usize]);
    let mut info = d.transport.lock().unwrap().info();
    supervisor.health(0).fill(&mut info);
    assert_eq!(info.state, BackendState::Up);
    assert_eq!(info.restarts, 1);
    assert_ne!(info.backend_pid, Some(pid));
    // The new backend got the same call eventfd: still the KVM irqfd.
    assert_eq!(d.interrupts.routed_queues(), [true]);
    drop(supervisor);
}
