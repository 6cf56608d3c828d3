//! The virtio-mmio transport and vhost-user frontend against the real `plexvm-blk`
//! backend: spawn it on a temporary image, bring the device up through its registers as a
//! guest driver would, place split-virtqueue requests in guest memory by hand, kick, and
//! check the image file, the used ring and the interrupt.
//!
//! Needs the `plexvm-blk` binary built for the same profile (`cargo build -p plexvm-blk`)
//! and `/dev/kvm` (ioeventfds and irqfds are registered on a real VM).

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use plexvm::backend;
use plexvm::devices::MmioDevice;
use plexvm::memory::{create_guest_memory, GuestMemory};
use plexvm::supervisor::{BackendSupervisor, SupervisedDevice};
use plexvm::vhost_user::VhostUserFrontend;
use plexvm::virtio::{default_queue_count, status, EventLoop, VirtioMmioTransport};
use plexvm_protocol::api::BackendState;
use plexvm_protocol::spec::{BackendSource, DeviceConfig, DeviceKind};
use vm_memory::{Bytes, GuestAddress};

const BASE: u64 = 0xd000_0000;
const SECTOR: u64 = 512;
const IMAGE_SECTORS: u64 = 2048;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;

// Guest-physical layout of the test ring and buffers.
const DESC: u64 = 0x1_0000;
const AVAIL: u64 = 0x1_1000;
const USED: u64 = 0x1_2000;
const HEADER: u64 = 0x2_0000;
const DATA: u64 = 0x2_1000;
const STATUS_BYTE: u64 = 0x2_2000;
const QUEUE_SIZE: u16 = 16;

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

struct Device {
    transport: Arc<Mutex<VirtioMmioTransport>>,
    config: DeviceConfig,
    mem: GuestMemory,
    // Dropped after the transport's backend: keeps the image and socket folder alive.
    _events: EventLoop,
    _vm: kvm_ioctls::VmFd,
    dir: tempfile::TempDir,
}

impl Device {
    fn t(&self) -> MutexGuard<'_, VirtioMmioTransport> {
        self.transport.lock().unwrap()
    }

    fn r(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.t().mmio_read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn w(&mut self, offset: u64, value: u32) {
        self.t().mmio_write(offset, &value.to_le_bytes());
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
    drop(file);

    let config = DeviceConfig {
        id: "disk0".into(),
        kind: DeviceKind::Blk,
        backend: BackendSource::Exec(vec![
            plexvm_blk().display().to_string(),
            "--image".into(),
            // Relative: the backend runs in the spec's folder.
            "disk.raw".into(),
        ]),
        restart: Default::default(),
        params: Default::default(),
        transport: Default::default(),
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
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let mem = create_guest_memory(16 << 20).unwrap();
    let transport =
        VirtioMmioTransport::new(&config, BASE, 5, &vm, mem.clone(), backend, frontend).unwrap();
    let events = EventLoop::start().unwrap();
    events.add(transport.event_handler().unwrap()).unwrap();
    Device {
        transport: Arc::new(Mutex::new(transport)),
        config,
        mem,
        _events: events,
        _vm: vm,
        dir,
    }
}

/// The driver side of device initialisation (virtio 1.2, 3.1.1) with queue 0 only.
fn driver_init(d: &mut Device) {
    d.w(0x70, 0);
    d.w(0x70, status::ACKNOWLEDGE);
    d.w(0x70, status::ACKNOWLEDGE | status::DRIVER);
    d.w(0x14, 0);
    assert_eq!(
        d.r(0x10) & (1 << 30),
        0,
        "VHOST_USER_F_PROTOCOL_FEATURES is not virtio's"
    );
    d.w(0x14, 1);
    assert_ne!(d.r(0x10) & 1, 0, "VIRTIO_F_VERSION_1 offered");
    d.w(0x24, 0);
    d.w(0x20, 0);
    d.w(0x24, 1);
    d.w(0x20, (VIRTIO_F_VERSION_1 >> 32) as u32);
    let features_ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    d.w(0x70, features_ok);
    assert_eq!(d.r(0x70), features_ok);

    for addr in [DESC, AVAIL, USED] {
        d.mem
            .write_slice(&[0u8; 0x1000], GuestAddress(addr))
            .unwrap();
    }
    d.w(0x30, 0);
    assert_eq!(d.r(0x44), 0);
    assert!(d.r(0x34) >= u32::from(QUEUE_SIZE));
    d.w(0x38, u32::from(QUEUE_SIZE));
    for (low, addr) in [(0x80, DESC), (0x90, AVAIL), (0xa0, USED)] {
        d.w(low, addr as u32);
        d.w(low + 4, (addr >> 32) as u32);
    }
    d.w(0x44, 1);
    d.w(0x70, features_ok | status::DRIVER_OK);
    assert_eq!(
        d.r(0x70),
        features_ok | status::DRIVER_OK,
        "no DEVICE_NEEDS_RESET"
    );
    assert!(d.t().info().activated);
}

fn write_desc(mem: &GuestMemory, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let at = DESC + 16 * u64::from(index);
    mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
    mem.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
    mem.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
    mem.write_obj(next.to_le(), GuestAddress(at + 14)).unwrap();
}

/// Queues one three-descriptor block request (header, data, status) as avail entry
/// `seq`, kicks, waits for the interrupt and returns the used length.
fn block_request(d: &mut Device, seq: u16, kind: u32, sector: u64) -> u32 {
    let mem = d.mem.clone();
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
    write_desc(&mem, 0, HEADER, 16, VIRTQ_DESC_F_NEXT, 1);
    write_desc(&mem, 1, DATA, SECTOR as u32, data_flags, 2);
    write_desc(&mem, 2, STATUS_BYTE, 1, VIRTQ_DESC_F_WRITE, 0);
    let slot = u64::from(seq % QUEUE_SIZE);
    mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))
        .unwrap();
    mem.write_obj((seq + 1).to_le(), GuestAddress(AVAIL + 2))
        .unwrap();

    // QueueNotify through the trapping path: the same kick eventfd KVM's ioeventfd
    // would signal.
    d.w(0x50, 0);
    // KVM consumes the irqfd's counter itself, so the interrupt is seen the way the guest
    // sees it: InterruptStatus bit 0. Like a real driver, look at the used ring after
    // each interrupt: one may come without a new entry (after a backend restart the
    // core raises one in case the old backend died before it signalled), virtio 1.2
    // section 2.7.7.2.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        wait_for_interrupt(d);
        d.w(0x64, 1);
        assert_eq!(d.r(0x60) & 1, 0);
        let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        if u16::from_le(used_idx) == seq + 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "used index {} after 10 s, want {}",
            u16::from_le(used_idx),
            seq + 1
        );
    }
    let elem = USED + 4 + 8 * slot;
    let id: u32 = mem.read_obj(GuestAddress(elem)).unwrap();
    assert_eq!(u32::from_le(id), 0);
    let status: u8 = mem.read_obj(GuestAddress(STATUS_BYTE)).unwrap();
    assert_eq!(status, 0, "VIRTIO_BLK_S_OK");
    u32::from_le(mem.read_obj(GuestAddress(elem + 4)).unwrap())
}

fn wait_for_interrupt(d: &mut Device) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.r(0x60) & 1 == 0 {
        assert!(Instant::now() < deadline, "no interrupt within 10 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn blk_requests_reach_the_image_and_complete_with_an_interrupt() {
    let mut d = start_device();
    let info = d.t().info();
    assert_eq!(info.state, BackendState::Up);
    assert!(info.backend_pid.is_some());
    assert_eq!(d.r(0x08), 2, "virtio-blk device ID");
    // Config space: capacity in sectors (virtio 1.2, 5.2.4), read as two 32-bit words.
    let capacity = u64::from(d.r(0x100)) | u64::from(d.r(0x104)) << 32;
    assert_eq!(capacity, IMAGE_SECTORS);

    driver_init(&mut d);
    let len = block_request(&mut d, 0, VIRTIO_BLK_T_IN, 1);
    assert_eq!(len, SECTOR as u32 + 1);
    let mut data = [0u8; SECTOR as usize];
    d.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert_eq!(data, [0xab; SECTOR as usize]);

    d.mem
        .write_slice(&[0xcd; SECTOR as usize], GuestAddress(DATA))
        .unwrap();
    block_request(&mut d, 1, VIRTIO_BLK_T_OUT, 2);
    let image = std::fs::read(d.image()).unwrap();
    assert_eq!(&image[1024..1536], &[0xcd; 512][..]);
    assert_eq!(&image[0..512], &[0; 512][..]);

    // Reset stops the ring; the device can be brought up again on fresh rings.
    d.w(0x70, 0);
    assert_eq!(d.r(0x70), 0);
    assert!(!d.t().info().activated);
    driver_init(&mut d);
    block_request(&mut d, 0, VIRTIO_BLK_T_IN, 2);
    d.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert_eq!(data, [0xcd; SECTOR as usize]);
}

#[test]
fn a_killed_backend_is_restarted_and_serves_the_rings_the_driver_set_up() {
    let mut d = start_device();
    driver_init(&mut d);
    d.mem
        .write_slice(&[0xcd; SECTOR as usize], GuestAddress(DATA))
        .unwrap();
    block_request(&mut d, 0, VIRTIO_BLK_T_OUT, 3);
    let supervisor = BackendSupervisor::start(
        vec![SupervisedDevice {
            transport: d.transport.clone(),
            config: d.config.clone(),
        }],
        d.dir.path().to_path_buf(),
        d.dir.path().to_path_buf(),
    )
    .unwrap();
    let pid = d.t().info().backend_pid.unwrap();
    // SAFETY: the pid is the transport's unreaped child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    // A request queued at once waits in the kick eventfd (or on the used index the new
    // backend starts from) and is served by the restarted backend.
    d.mem
        .write_slice(&[0u8; SECTOR as usize], GuestAddress(DATA))
        .unwrap();
    block_request(&mut d, 1, VIRTIO_BLK_T_IN, 3);
    let mut data = [0u8; SECTOR as usize];
    d.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert_eq!(data, [0xcd; SECTOR as usize]);
    // The supervisor counts the restart right after the new backend took the rings,
    // so the request above can complete first: wait (bounded) for the count.
    let deadline = Instant::now() + Duration::from_secs(10);
    let info = loop {
        let mut info = d.t().info();
        supervisor.health(0).fill(&mut info);
        if info.restarts >= 1 || Instant::now() > deadline {
            break info;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(info.state, BackendState::Up);
    assert_eq!(info.restarts, 1);
    assert_ne!(info.backend_pid, Some(pid));
    assert!(info.inflight_tracking, "plexvm-blk offers INFLIGHT_SHMFD");
    assert!(info.inflight_state_known);
    let why = info.last_exit.unwrap_or_default();
    assert!(why.contains("SIGKILL"), "{why}");
    drop(supervisor);
}

#[test]
fn a_ring_outside_ram_fails_the_device_not_the_core() {
    let mut d = start_device();
    d.w(0x70, status::ACKNOWLEDGE);
    d.w(0x70, status::ACKNOWLEDGE | status::DRIVER);
    d.w(0x24, 1);
    d.w(0x20, 1);
    let features_ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    d.w(0x70, features_ok);
    d.w(0x38, 16);
    d.w(0x80, 0);
    d.w(0x84, 1); // 4 GiB: past the 16 MiB of RAM
    d.w(0x90, 0x1000);
    d.w(0xa0, 0x2000);
    d.w(0x44, 1);
    d.w(0x70, features_ok | status::DRIVER_OK);
    assert_ne!(d.r(0x70) & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(d.r(0x60) & 2, 2, "configuration-change interrupt");
    assert!(!d.t().info().activated);
    // Reset recovers the device.
    d.w(0x70, 0);
    driver_init(&mut d);
}

#[test]
fn driver_ok_makes_no_round_trip_on_the_vcpu_thread() {
    let mut d = start_device();
    let pid = d.t().info().backend_pid.unwrap();
    let activator = Arc::new(vmm_sys_util::eventfd::EventFd::new(0).unwrap());
    d.t().set_activator(activator.clone());
    d.t().set_reply_timeout(Duration::from_millis(100));
    // SAFETY: the pid is the backend this test spawned, not reaped yet.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    // The whole driver initialisation against a stopped backend: every register
    // access returns (config reads come from the core's copy, DRIVER_OK only checks
    // the rings and wakes the activator), and no round trip missed its deadline.
    driver_init(&mut d);
    let mut capacity = [0u8; 8];
    d.t().mmio_read(0x100, &mut capacity);
    assert_eq!(
        u64::from_le_bytes(capacity),
        IMAGE_SECTORS,
        "config from the copy"
    );
    assert_eq!(d.t().broken(), None, "no round trip was made on the vCPU");
    assert_eq!(activator.read().unwrap(), 1, "the activation was handed on");
    // Off the vCPU, the activation meets the stopped backend and its deadline.
    d.t().activate_pending();
    let broken = d.t().broken().unwrap_or_default();
    assert!(broken.starts_with("did not answer "), "{broken}");
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}
