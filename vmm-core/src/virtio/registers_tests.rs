//! Unit tests of the register file against a fake device.

use super::*;

#[derive(Debug, thiserror::Error)]
#[error("fake backend refused")]
struct FakeError;

#[derive(Debug, Default)]
struct FakeDevice {
    config: Vec<u8>,
    activations: Vec<DeviceState>,
    stops: usize,
    notifies: Vec<u32>,
    interrupts: Vec<u32>,
    fail_activate: bool,
}

impl DeviceOps for FakeDevice {
    type Error = FakeError;

    fn read_config(&mut self, offset: u32, data: &mut [u8]) -> Result<(), FakeError> {
        let start = offset as usize;
        let bytes = self
            .config
            .get(start..start + data.len())
            .ok_or(FakeError)?;
        data.copy_from_slice(bytes);
        Ok(())
    }

    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), FakeError> {
        let start = offset as usize;
        let bytes = self
            .config
            .get_mut(start..start + data.len())
            .ok_or(FakeError)?;
        bytes.copy_from_slice(data);
        Ok(())
    }

    fn activate(&mut self, state: &mut DeviceState) -> Result<(), FakeError> {
        if self.fail_activate {
            return Err(FakeError);
        }
        for q in state.queues.iter_mut().filter(|q| q.ready) {
            q.started = true;
        }
        self.activations.push(state.clone());
        Ok(())
    }

    fn stop(&mut self, state: &mut DeviceState) {
        self.stops += 1;
        for q in &mut state.queues {
            if q.started {
                q.started = false;
                q.base = 42;
            }
        }
    }

    fn queue_notify(&mut self, queue: u32) {
        self.notifies.push(queue);
    }

    fn interrupt(&mut self, bits: u32) {
        self.interrupts.push(bits);
    }
}

const FEATURES: u64 = (1 << 32) | (1 << 9) | 1;
const ACK_DRIVER: u32 = status::ACKNOWLEDGE | status::DRIVER;
const TO_FEATURES_OK: u32 = ACK_DRIVER | status::FEATURES_OK;
const TO_DRIVER_OK: u32 = TO_FEATURES_OK | status::DRIVER_OK;

struct Bench {
    regs: MmioRegisters,
    dev: FakeDevice,
    isr: Arc<AtomicU32>,
}

impl Bench {
    fn new() -> Self {
        let isr = Arc::new(AtomicU32::new(0));
        let state = DeviceState::new(FEATURES, 2, 256);
        let dev = FakeDevice {
            config: (0u8..64).collect(),
            ..Default::default()
        };
        Bench {
            regs: MmioRegisters::new("t", 2, state, isr.clone()),
            dev,
            isr,
        }
    }

    fn r(&mut self, offset: u64) -> u32 {
        let mut data = [0xffu8; 4];
        self.regs.read(&mut self.dev, offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn w(&mut self, offset: u64, value: u32) {
        self.regs.write(&mut self.dev, offset, &value.to_le_bytes());
    }

    fn negotiate(&mut self, features: u64) {
        self.w(STATUS, status::ACKNOWLEDGE);
        self.w(STATUS, ACK_DRIVER);
        self.w(DRIVER_FEATURES_SEL, 0);
        self.w(DRIVER_FEATURES, features as u32);
        self.w(DRIVER_FEATURES_SEL, 1);
        self.w(DRIVER_FEATURES, (features >> 32) as u32);
        self.w(STATUS, TO_FEATURES_OK);
    }

    /// Sets up queue `q` the way Linux's vm_setup_vq does.
    fn setup_queue(&mut self, q: u32, size: u32, base: u64) {
        self.w(QUEUE_SEL, q);
        assert_eq!(self.r(QUEUE_READY), 0);
        self.w(QUEUE_NUM, size);
        for (low, addr) in [
            (QUEUE_DESC_LOW, base),
            (QUEUE_DRIVER_LOW, base + 0x1000),
            (QUEUE_DEVICE_LOW, base + 0x2000),
        ] {
            self.w(low, addr as u32);
            self.w(low + 4, (addr >> 32) as u32);
        }
        self.w(QUEUE_READY, 1);
    }

    fn bring_up(&mut self) {
        self.negotiate(FEATURES);
        self.setup_queue(0, 128, 0x1_0000_0000);
        self.w(STATUS, TO_DRIVER_OK);
    }
}

#[test]
fn identification_registers() {
    let mut b = Bench::new();
    assert_eq!(b.r(MAGIC), 0x7472_6976);
    assert_eq!(b.r(VERSION), 2);
    assert_eq!(b.r(DEVICE_ID), 2);
    assert_eq!(b.r(VENDOR), 0x706c_7876);
    assert_eq!(b.r(CONFIG_GENERATION), 0);
    assert_eq!(b.r(SHM_LEN_LOW), u32::MAX);
    assert_eq!(b.r(QUEUE_NOTIFY), 0, "write-only registers read as 0");
}

#[test]
fn device_features_are_selected_by_word() {
    let mut b = Bench::new();
    assert_eq!(b.r(DEVICE_FEATURES), (1 << 9) | 1);
    b.w(DEVICE_FEATURES_SEL, 1);
    assert_eq!(b.r(DEVICE_FEATURES), 1);
    b.w(DEVICE_FEATURES_SEL, 2);
    assert_eq!(b.r(DEVICE_FEATURES), 0);
}

#[test]
fn features_ok_only_for_a_subset_of_the_offer() {
    let mut b = Bench::new();
    b.negotiate(1 << 32 | 1);
    assert_eq!(b.r(STATUS), TO_FEATURES_OK);
    assert_eq!(b.regs.state().driver_features, 1 << 32 | 1);

    let mut b = Bench::new();
    b.negotiate(1 << 33 | 1);
    assert_eq!(b.r(STATUS), ACK_DRIVER, "FEATURES_OK must read back clear");

    let mut b = Bench::new();
    b.w(STATUS, status::ACKNOWLEDGE);
    b.w(STATUS, ACK_DRIVER);
    b.w(DRIVER_FEATURES_SEL, 2);
    b.w(DRIVER_FEATURES, 1);
    b.w(STATUS, TO_FEATURES_OK);
    assert_eq!(b.r(STATUS), ACK_DRIVER, "bits above 63 are never offered");
}

#[test]
fn driver_features_are_frozen_outside_the_negotiation_window() {
    let mut b = Bench::new();
    b.w(DRIVER_FEATURES, 1);
    assert_eq!(b.regs.state().driver_features, 0, "before DRIVER");
    b.negotiate(1);
    b.w(DRIVER_FEATURES_SEL, 0);
    b.w(DRIVER_FEATURES, 1 << 9);
    assert_eq!(b.regs.state().driver_features, 1, "after FEATURES_OK");
}

#[test]
fn status_transitions_follow_the_spec() {
    let mut b = Bench::new();
    b.w(STATUS, status::DRIVER);
    assert_eq!(b.r(STATUS), 0, "DRIVER needs ACKNOWLEDGE");
    b.w(STATUS, status::ACKNOWLEDGE | status::DEVICE_NEEDS_RESET);
    assert_eq!(
        b.r(STATUS),
        status::ACKNOWLEDGE,
        "NEEDS_RESET is the device's bit"
    );
    b.w(STATUS, ACK_DRIVER | status::DRIVER_OK);
    assert_eq!(b.r(STATUS), ACK_DRIVER, "DRIVER_OK needs FEATURES_OK");
    b.w(STATUS, status::ACKNOWLEDGE);
    assert_eq!(
        b.r(STATUS),
        ACK_DRIVER,
        "bits are never cleared but by reset"
    );
    b.w(STATUS, ACK_DRIVER | status::FAILED);
    assert_eq!(b.r(STATUS), ACK_DRIVER | status::FAILED);
    assert!(b.dev.activations.is_empty());
    assert_eq!(b.regs.guest_issue_count(), 3);
}

#[test]
fn queue_registers() {
    let mut b = Bench::new();
    b.w(QUEUE_SEL, 1);
    assert_eq!(b.r(QUEUE_NUM_MAX), 256);
    b.w(QUEUE_SEL, 2);
    assert_eq!(b.r(QUEUE_NUM_MAX), 0, "no queue 2");
    b.w(QUEUE_NUM, 8);
    b.w(QUEUE_READY, 1);
    assert_eq!(b.r(QUEUE_READY), 0);

    b.setup_queue(1, 64, 0x1234_5678_9000);
    let q = b.regs.state().queues[1];
    assert_eq!((q.size, q.ready), (64, true));
    assert_eq!(q.desc_table, 0x1234_5678_9000);
    assert_eq!(q.avail_ring, 0x1234_5678_a000);
    assert_eq!(q.used_ring, 0x1234_5678_b000);

    b.w(QUEUE_NUM, 32);
    b.w(QUEUE_DESC_LOW, 0);
    assert_eq!(b.regs.state().queues[1], q, "no set-up writes while ready");
    b.w(QUEUE_READY, 0);
    b.w(QUEUE_NUM, 512);
    assert_eq!(b.regs.state().queues[1].size, 64, "above QueueNumMax");
    b.w(QUEUE_NUM, 32);
    assert_eq!(b.regs.state().queues[1].size, 32);
}

#[test]
fn driver_ok_activates_with_the_programmed_state() {
    let mut b = Bench::new();
    b.bring_up();
    assert_eq!(b.r(STATUS), TO_DRIVER_OK);
    assert!(b.regs.state().activated);
    let [seen] = &b.dev.activations[..] else {
        panic!("one activation expected, got {:?}", b.dev.activations);
    };
    assert_eq!(seen.driver_features, FEATURES);
    assert_eq!(seen.queues[0].size, 128);
    assert!(seen.queues[0].ready && !seen.queues[1].ready);

    // After DRIVER_OK the rings are fixed.
    b.w(QUEUE_SEL, 0);
    b.w(QUEUE_READY, 0);
    b.w(QUEUE_SEL, 1);
    b.w(QUEUE_READY, 1);
    assert!(b.regs.state().queues[0].ready && !b.regs.state().queues[1].ready);

    b.w(QUEUE_NOTIFY, 0);
    b.w(QUEUE_NOTIFY, 7);
    assert_eq!(b.dev.notifies, [0], "notify of a missing queue is dropped");
}

#[test]
fn failed_activation_sets_needs_reset_and_raises_a_config_interrupt() {
    let mut b = Bench::new();
    b.dev.fail_activate = true;
    b.bring_up();
    assert_eq!(b.r(STATUS), TO_DRIVER_OK | status::DEVICE_NEEDS_RESET);
    assert!(!b.regs.state().activated);
    assert_eq!(b.dev.interrupts, [INT_CONFIG]);
    b.w(STATUS, 0);
    assert_eq!(b.r(STATUS), 0);
    assert_eq!(b.dev.stops, 0, "nothing was started");
}

#[test]
fn bad_rings_fail_before_reaching_the_backend() {
    for (size, base) in [(100, 0x10000), (128, 0x10008)] {
        let mut b = Bench::new();
        b.negotiate(FEATURES);
        b.setup_queue(0, size, base);
        b.w(STATUS, TO_DRIVER_OK);
        assert_ne!(
            b.r(STATUS) & status::DEVICE_NEEDS_RESET,
            0,
            "{size} {base:#x}"
        );
        assert!(b.dev.activations.is_empty());
    }
}

#[test]
fn reset_stops_rings_and_returns_to_the_initial_state() {
    let mut b = Bench::new();
    b.bring_up();
    b.isr.store(INT_VRING | INT_CONFIG, Ordering::Release);
    b.w(QUEUE_SEL, 1);
    b.w(STATUS, 0);
    assert_eq!(b.dev.stops, 1);
    assert_eq!(b.r(STATUS), 0);
    assert_eq!(b.r(INTERRUPT_STATUS), 0);
    assert_eq!(b.regs.state(), &DeviceState::new(FEATURES, 2, 256));
    // A second reset has no rings to stop.
    b.w(STATUS, 0);
    assert_eq!(b.dev.stops, 1);
    // And the device can be brought up again.
    b.bring_up();
    assert_eq!(b.dev.activations.len(), 2);
}

#[test]
fn interrupt_ack_clears_only_the_written_bits() {
    let mut b = Bench::new();
    b.isr.store(INT_VRING | INT_CONFIG, Ordering::Release);
    assert_eq!(b.r(INTERRUPT_STATUS), 3);
    b.w(INTERRUPT_ACK, INT_VRING);
    assert_eq!(b.r(INTERRUPT_STATUS), INT_CONFIG);
}

#[test]
fn registers_ignore_accesses_that_are_not_32_bit() {
    let mut b = Bench::new();
    let mut two = [0xffu8; 2];
    b.regs.read(&mut b.dev, MAGIC, &mut two);
    assert_eq!(two, [0, 0]);
    let mut eight = [0xffu8; 8];
    b.regs.read(&mut b.dev, MAGIC, &mut eight);
    assert_eq!(eight, [0; 8]);
    let mut unaligned = [0xffu8; 4];
    b.regs.read(&mut b.dev, MAGIC + 1, &mut unaligned);
    assert_eq!(unaligned, [0; 4]);
    b.regs.write(&mut b.dev, STATUS, &[1]);
    b.regs.write(&mut b.dev, STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(b.r(STATUS), 0);
}

#[test]
fn config_space_any_width_is_forwarded_with_its_offset() {
    let mut b = Bench::new();
    for len in [1usize, 2, 4, 8] {
        let mut data = vec![0u8; len];
        b.regs.read(&mut b.dev, 0x100 + 3, &mut data);
        assert_eq!(data, (3..3 + len as u8).collect::<Vec<_>>());
    }
    b.regs.write(&mut b.dev, 0x108, &[0xaa, 0xbb]);
    assert_eq!(&b.dev.config[8..10], &[0xaa, 0xbb]);
    // Past the fake's config: the error reads as zeros.
    let mut data = [0xffu8; 4];
    b.regs.read(&mut b.dev, 0x100 + 62, &mut data);
    assert_eq!(data, [0; 4]);
}

#[test]
fn no_offset_or_width_panics() {
    let mut b = Bench::new();
    let offsets = (0..0x1100u64)
        .step_by(1)
        .chain([u64::MAX - 3, u64::MAX, 1 << 40]);
    for offset in offsets {
        for len in 0..=9usize {
            let mut data = vec![0x5a; len];
            b.regs.read(&mut b.dev, offset, &mut data);
            let write = vec![0x01; len];
            b.regs.write(&mut b.dev, offset, &write);
        }
    }
}
