//! ACPI tables that let a stock Linux kernel find what the command line cannot tell it:
//! its CPUs and interrupt controllers (MADT) and the virtio-mmio devices and COM1 (DSDT),
//! for kernels built without `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` (Debian's, for one).
//!
//! The platform is "hardware-reduced" ACPI (ACPI 6.5, section 4.1), as in Firecracker:
//! no PM timer, no SCI, no fixed-feature registers, nothing for the guest to poll that the
//! core does not emulate. On x86 Linux this also means the kernel sets no legacy PIC and
//! no PIT/HPET timer up (`acpi_generic_reduced_hw_init`): the local APIC timer and
//! kvmclock are its clocks, and ISA devices get their interrupts from their `_CRS`.
//!
//! Everything lives in the BIOS area below 1 MiB that the e820 map leaves out of RAM:
//! the RSDP at [`RSDP_ADDR`], where Linux's legacy scan finds it (0xe0000..0xfffff on
//! 16-byte boundaries), then DSDT, FADT, MADT and XSDT. The core also passes the RSDP
//! address in `boot_params.acpi_rsdp_addr` (boot protocol 2.14) so no scan is needed.

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::legacy::{ACPI_SLEEP_PORT, COM1_BASE, COM1_IRQ, PVPANIC_PORT, S5_SLEEP_TYPE};
use crate::memory::GuestMemory;
use crate::pci::acpi::PciHostLayout;
use crate::virtio::MMIO_WINDOW_SIZE;

/// Where the RSDP goes: the start of the BIOS read-only area Linux scans.
pub const RSDP_ADDR: u64 = 0x000e_0000;
/// End of the area the tables may use (the BIOS area ends at 1 MiB, where kernels load).
pub const TABLES_END: u64 = 0x0010_0000;
/// The in-kernel IOAPIC's MMIO base (KVM's default).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APICs' MMIO base (architectural default).
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Most virtio-mmio devices the DSDT can name (`V000`..`VFFF`).
pub const MAX_ACPI_DEVICES: usize = 0x1000;

const OEM_ID: [u8; 6] = *b"PLEXVM";
const OEM_REVISION: u32 = 1;
/// Tables are placed on 16-byte boundaries (the RSDP must be; the others like it).
const TABLE_ALIGN: u64 = 16;
/// The virtio-mmio driver's ACPI ID (Linux `virtio_mmio_acpi_match`, QEMU, Firecracker).
const VIRTIO_MMIO_HID: &str = "LNRO0005";
/// FADT IA-PC boot architecture flags (ACPI 6.5, table 5.11): no VGA, MSI not supported,
/// do not enable PCIe ASPM, no CMOS RTC. The 8042 bit stays clear: the core emulates
/// only the i8042 reset line, which `reboot=k` uses without the i8042 driver.
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5);
/// The IA-PC boot architecture bit "MSI not supported".
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
/// FADT hypervisor vendor identity (ACPI 6.5, table 5.9).
const HYPERVISOR_VENDOR: [u8; 8] = *b"PLEXVM\0\0";

/// Errors building the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// More devices than the DSDT can name.
    #[error("{0} virtio devices are more than the ACPI tables can describe")]
    TooManyDevices(usize),
    /// A virtio-mmio window the 32-bit memory descriptor cannot express.
    #[error("virtio-mmio window at {0:#x} is above 4 GiB")]
    WindowAbove4G(u64),
    /// The tables do not fit in the BIOS area.
    #[error("the ACPI tables ({0} bytes) do not fit in the BIOS area below 1 MiB")]
    TooBig(u64),
    /// Guest memory does not cover the BIOS area.
    #[error("cannot write the ACPI tables into guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// Writes RSDP, XSDT, FADT, MADT and DSDT for `vcpus` vCPUs (APIC ID = vCPU index) and the
/// virtio-mmio devices in `virtio_windows` (MMIO base, GSI), in guest order. Returns the
/// RSDP's address.
pub fn write_acpi_tables(
    mem: &GuestMemory,
    vcpus: u8,
    virtio_windows: &[(u64, u32)],
) -> Result<GuestAddress, AcpiError> {
    write_acpi_tables_with_pci(mem, vcpus, virtio_windows, None)
}

/// [`write_acpi_tables`], plus, when `pci` is given, the PCI host bridge and ECAM
/// reservation in the DSDT, the MCFG, and a FADT that lets the guest use MSI
/// ([`crate::pci::acpi`]).
pub fn write_acpi_tables_with_pci(
    mem: &GuestMemory,
    vcpus: u8,
    virtio_windows: &[(u64, u32)],
    pci: Option<&PciHostLayout>,
) -> Result<GuestAddress, AcpiError> {
    let mut image = TableImage::new(bytes_of(&Rsdp::new(OEM_ID, 0)).len());
    let dsdt = image.push(&dsdt(virtio_windows, pci)?);
    let fadt = image.push(&bytes_of(&fadt(dsdt, pci.is_some())));
    let madt = image.push(&bytes_of(&madt(vcpus)));
    let mut xsdt = XSDT::new(OEM_ID, *b"PLEXXSDT", OEM_REVISION);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    if pci.is_some() {
        xsdt.add_entry(image.push(&crate::pci::acpi::mcfg(OEM_ID, OEM_REVISION)));
    }
    let xsdt = image.push(&bytes_of(&xsdt));
    image.set_rsdp(&bytes_of(&Rsdp::new(OEM_ID, xsdt)));
    if RSDP_ADDR + image.bytes.len() as u64 > TABLES_END {
        return Err(AcpiError::TooBig(image.bytes.len() as u64));
    }
    mem.write_slice(&image.bytes, GuestAddress(RSDP_ADDR))
        .map_err(AcpiError::Memory)?;
    Ok(GuestAddress(RSDP_ADDR))
}

/// The tables laid out one after another from [`RSDP_ADDR`], RSDP first.
struct TableImage {
    bytes: Vec<u8>,
}

impl TableImage {
    fn new(rsdp_len: usize) -> TableImage {
        TableImage {
            bytes: vec![0; rsdp_len],
        }
    }

    /// Appends a table at the next aligned offset; returns its guest address.
    fn push(&mut self, table: &[u8]) -> u64 {
        let offset = (self.bytes.len() as u64).next_multiple_of(TABLE_ALIGN);
        self.bytes.resize(offset as usize, 0);
        self.bytes.extend_from_slice(table);
        RSDP_ADDR + offset
    }

    fn set_rsdp(&mut self, rsdp: &[u8]) {
        self.bytes[..rsdp.len()].copy_from_slice(rsdp);
    }
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// FADT of a hardware-reduced platform whose DSDT is at `dsdt`. The power and sleep
/// buttons are flagged as control-method devices (there are no fixed-feature ones). The
/// sleep control and status registers are the one-byte ports at [`ACPI_SLEEP_PORT`]:
/// with them and the DSDT's `\_S5_`, Linux's `poweroff` powers the VM off (without
/// them it can only halt, and the VM would never end).
fn fadt(dsdt: u64, msi: bool) -> acpi_tables::fadt::FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"PLEXFACP", OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    let port = |p: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            p.into(),
        )
    };
    fadt.sleep_control_reg = port(ACPI_SLEEP_PORT);
    fadt.sleep_status_reg = port(ACPI_SLEEP_PORT + 1);
    // With PCI the "MSI not supported" bit must go: Linux would disable MSI-X.
    let boot_arch = if msi {
        IAPC_BOOT_ARCH & !IAPC_MSI_NOT_SUPPORTED
    } else {
        IAPC_BOOT_ARCH
    };
    fadt.iapc_boot_arch = boot_arch.into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    fadt.finalize()
}

/// MADT: one enabled local APIC per vCPU (ACPI processor UID = APIC ID = vCPU index, as
/// the core's CPUID reports) and KVM's in-kernel IOAPIC with GSIs 0..=23.
///
/// There is no interrupt source override for ISA IRQ 0: the core keeps KVM's default
/// GSI routing, in which the PIT's GSI 0 is IOAPIC pin 0 (QEMU's override IRQ0 -> GSI 2
/// goes with its own routing table), and a hardware-reduced Linux does not use the PIT.
fn madt(vcpus: u8) -> MADT {
    let mut madt = MADT::new(
        OEM_ID,
        *b"PLEXAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for i in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    madt
}

/// DSDT: `\_SB.COM1` (PNP0501) and one `\_SB.Vnnn` (LNRO0005) per virtio-mmio window, the
/// way QEMU's and Firecracker's virtio-mmio machines describe them: `_HID`, `_UID` and a
/// `_CRS` with the 4 KiB register window and an edge-triggered, active-high, exclusive
/// interrupt (the core injects it through an irqfd as an edge).
fn dsdt(virtio_windows: &[(u64, u32)], pci: Option<&PciHostLayout>) -> Result<Vec<u8>, AcpiError> {
    if virtio_windows.len() > MAX_ACPI_DEVICES {
        return Err(AcpiError::TooManyDevices(virtio_windows.len()));
    }
    let mut devices = com1_aml();
    devices.extend(pvpanic_aml());
    for (i, &(base, gsi)) in virtio_windows.iter().enumerate() {
        let base32 = u32::try_from(base).map_err(|_| AcpiError::WindowAbove4G(base))?;
        devices.extend(virtio_mmio_aml(i as u32, base32, gsi));
    }
    if let Some(pci) = pci {
        devices.extend(crate::pci::acpi::dsdt_devices(pci));
    }
    let body = Scope::raw(Path::new("\\_SB_"), devices);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"PLEXDSDT", OEM_REVISION);
    dsdt.append_slice(&body);
    // \_S5_: the soft-off sleep type written to the sleep control register.
    dsdt.append_slice(&bytes_of(&Name::new(
        Path::new("\\_S5_"),
        &Package::new(vec![&S5_SLEEP_TYPE]),
    )));
    Ok(dsdt.as_slice().to_vec())
}

fn virtio_mmio_aml(index: u32, base: u32, gsi: u32) -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &VIRTIO_MMIO_HID);
    let uid = Name::new(Path::new("_UID"), &index);
    let window = Memory32Fixed::new(true, base, MMIO_WINDOW_SIZE as u32);
    let irq = Interrupt::new(true, true, false, false, gsi);
    let crs = Name::new(
        Path::new("_CRS"),
        &ResourceTemplate::new(vec![&window, &irq]),
    );
    let name = format!("V{index:03X}");
    bytes_of(&Device::new(Path::new(&name), vec![&hid, &uid, &crs]))
}

/// pvpanic as QEMU describes it (`QEMU0001`, one I/O port), for Linux's `pvpanic_mmio`.
fn pvpanic_aml() -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &"QEMU0001");
    let ports = IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&ports]));
    bytes_of(&Device::new(Path::new("PEVT"), vec![&hid, &crs]))
}

/// COM1 as a PNP 16550 so Linux's 8250 driver binds it with its IRQ through ACPI.
fn com1_aml() -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0501"));
    let uid = Name::new(Path::new("_UID"), &1u8);
    let ports = IO::new(COM1_BASE, COM1_BASE, 1, 8);
    let irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let crs = Name::new(
        Path::new("_CRS"),
        &ResourceTemplate::new(vec![&ports, &irq]),
    );
    bytes_of(&Device::new(Path::new("COM1"), vec![&hid, &uid, &crs]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    const WINDOWS: [(u64, u32); 2] = [(0xd000_0000, 5), (0xd000_1000, 6)];

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// Reads the table at `addr` (length from its header), checking it lies in the BIOS
    /// area and that its checksum is right.
    fn table(mem: &GuestMemory, addr: u64) -> Vec<u8> {
        assert!((RSDP_ADDR..TABLES_END).contains(&addr), "{addr:#x}");
        let mut header = [0u8; 36];
        mem.read_slice(&mut header, GuestAddress(addr)).unwrap();
        let mut t = vec![0u8; u32_at(&header, 4) as usize];
        mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
        assert!(addr + t.len() as u64 <= TABLES_END);
        assert_eq!(
            sum(&t),
            0,
            "checksum of {}",
            String::from_utf8_lossy(&t[..4])
        );
        t
    }

    /// The tables reachable from the RSDP, by signature: (XSDT, FACP, APIC, DSDT).
    fn tables(mem: &GuestMemory, rsdp: GuestAddress) -> [Vec<u8>; 4] {
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, rsdp).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(sum(&r), 0, "extended checksum");
        assert_eq!(r[15], 2, "revision 2: XSDT");
        let xsdt = table(mem, u64_at(&r, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<Vec<u8>> = xsdt[36..]
            .chunks(8)
            .map(|e| table(mem, u64::from_le_bytes(e.try_into().unwrap())))
            .collect();
        let by_sig = |sig: &[u8]| entries.iter().find(|t| &t[..4] == sig).unwrap().clone();
        let fadt = by_sig(b"FACP");
        let dsdt = table(mem, u64_at(&fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        [xsdt, fadt, by_sig(b"APIC"), dsdt]
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    #[test]
    fn tables_are_chained_from_the_rsdp_with_valid_checksums() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let rsdp = write_acpi_tables(&mem, 2, &WINDOWS).unwrap();
        assert_eq!(rsdp, GuestAddress(RSDP_ADDR));
        assert_eq!(rsdp.0 % 16, 0, "Linux scans 16-byte boundaries");
        let [xsdt, fadt, _, _] = tables(&mem, rsdp);
        assert_eq!(xsdt.len(), 36 + 2 * 8);
        let flags = u32_at(&fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]), IAPC_BOOT_ARCH);
    }

    #[test]
    fn madt_has_one_local_apic_per_vcpu_and_the_ioapic() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let rsdp = write_acpi_tables(&mem, 4, &[]).unwrap();
        let [_, _, madt, _] = tables(&mem, rsdp);
        assert_eq!(u32_at(&madt, 36), LAPIC_ADDR);
        let mut at = 44;
        let (mut apic_ids, mut ioapics) = (Vec::new(), Vec::new());
        while at < madt.len() {
            let (kind, len) = (madt[at], usize::from(madt[at + 1]));
            match kind {
                0 => {
                    assert_eq!(len, 8);
                    assert_eq!(madt[at + 2], madt[at + 3], "processor UID = APIC ID");
                    assert_eq!(u32_at(&madt, at + 4), 1, "enabled");
                    apic_ids.push(madt[at + 3]);
                }
                1 => ioapics.push((u32_at(&madt, at + 4), u32_at(&madt, at + 8))),
                other => panic!("unexpected MADT entry type {other}"),
            }
            at += len;
        }
        assert_eq!(apic_ids, [0, 1, 2, 3]);
        assert_eq!(ioapics, [(IOAPIC_ADDR, 0)]);
    }

    #[test]
    fn dsdt_names_com1_and_every_virtio_window() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let rsdp = write_acpi_tables(&mem, 1, &WINDOWS).unwrap();
        let [_, _, _, dsdt] = tables(&mem, rsdp);
        assert_eq!(count(&dsdt, b"LNRO0005\0"), WINDOWS.len());
        for (base, gsi) in WINDOWS {
            // Memory32Fixed(ReadWrite, base, 4 KiB) and Interrupt(consumer, edge,
            // active-high, exclusive) { gsi } (ACPI 6.5, 6.4.3.4 and 6.4.3.6).
            let mut mem32 = vec![0x86, 9, 0, 1];
            mem32.extend_from_slice(&(base as u32).to_le_bytes());
            mem32.extend_from_slice(&0x1000u32.to_le_bytes());
            assert_eq!(count(&dsdt, &mem32), 1, "window {base:#x}");
            let mut irq = vec![0x89, 6, 0, 0b0011, 1];
            irq.extend_from_slice(&gsi.to_le_bytes());
            assert_eq!(count(&dsdt, &irq), 1, "GSI {gsi}");
        }
        // PNP0501 as an EISA ID, IO(Decode16, 0x3f8, 0x3f8, 1, 8), IRQ 4.
        assert_eq!(count(&dsdt, &[0x0c, 0x41, 0xd0, 0x05, 0x01]), 1);
        assert_eq!(count(&dsdt, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]), 1);
        assert_eq!(count(&dsdt, &[0x89, 6, 0, 0b0011, 1, 4, 0, 0, 0]), 1);
        // pvpanic: "QEMU0001" and IO(Decode16, 0x505, 0x505, 1, 1); \_S5_ = Package {5}.
        assert_eq!(count(&dsdt, b"QEMU0001\0"), 1);
        assert_eq!(count(&dsdt, &[0x47, 1, 0x05, 5, 0x05, 5, 1, 1]), 1);
        assert_eq!(count(&dsdt, b"_S5_\x12\x04\x01\x0a\x05"), 1);
    }

    #[test]
    fn fadt_names_the_sleep_control_and_status_ports() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let rsdp = write_acpi_tables(&mem, 1, &WINDOWS).unwrap();
        let [_, fadt, _, _] = tables(&mem, rsdp);
        // SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256 (ACPI 6.5, table 5.9): GAS
        // {SystemIO, 8 bits, offset 0, byte access, port}.
        let gas = |port: u64| {
            let mut g = vec![1, 8, 0, 1];
            g.extend_from_slice(&port.to_le_bytes());
            g
        };
        assert_eq!(fadt[244..256], gas(0x600)[..]);
        assert_eq!(fadt[256..268], gas(0x601)[..]);
    }

    #[test]
    fn boot_params_carry_the_rsdp_address() {
        use linux_loader::bootparam::boot_params;
        let mem = create_guest_memory(64 << 20).unwrap();
        let rsdp = write_acpi_tables(&mem, 1, &WINDOWS).unwrap();
        crate::boot::set_acpi_rsdp(&mem, rsdp).unwrap();
        let zero_page = GuestAddress(crate::boot::ZERO_PAGE_ADDR);
        let params: boot_params = mem.read_obj(zero_page).unwrap();
        assert_eq!({ params.acpi_rsdp_addr }, RSDP_ADDR);
        // Offset 0x070 of the zero page (Documentation/arch/x86/zero-page.rst).
        let raw: u64 = mem.read_obj(GuestAddress(zero_page.0 + 0x70)).unwrap();
        assert_eq!(raw, RSDP_ADDR);
    }

    #[test]
    fn bad_layouts_are_errors_not_panics() {
        let mem = create_guest_memory(64 << 20).unwrap();
        assert!(matches!(
            write_acpi_tables(&mem, 1, &[(0x1_0000_0000, 5)]),
            Err(AcpiError::WindowAbove4G(0x1_0000_0000))
        ));
        let many: Vec<(u64, u32)> = (0..MAX_ACPI_DEVICES as u64 + 1)
            .map(|i| (0xd000_0000 + i * 0x1000, 5))
            .collect();
        assert!(matches!(
            write_acpi_tables(&mem, 1, &many),
            Err(AcpiError::TooManyDevices(_))
        ));
        assert!(matches!(
            write_acpi_tables(&mem, 1, &many[..3000]),
            Err(AcpiError::TooBig(_))
        ));
        let small = create_guest_memory(512 << 10).unwrap();
        assert!(matches!(
            write_acpi_tables(&small, 1, &WINDOWS),
            Err(AcpiError::Memory(_))
        ));
    }

    /// ACPICA's disassembler (Debian `acpica-tools`, which tests/run.sh installs) reads
    /// every table back: proof they are well-formed beyond our own parsing.
    #[test]
    fn iasl_disassembles_the_tables() {
        assert!(
            std::process::Command::new("iasl")
                .arg("-v")
                .output()
                .is_ok_and(|o| o.status.success()),
            "iasl (Debian package acpica-tools) is missing: tests/run.sh installs it"
        );
        let mem = create_guest_memory(64 << 20).unwrap();
        let rsdp = write_acpi_tables(&mem, 2, &WINDOWS).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::new();
        for t in tables(&mem, rsdp) {
            let name = String::from_utf8_lossy(&t[..4]).to_lowercase();
            let dat = dir.path().join(format!("{name}.dat"));
            std::fs::write(&dat, &t).unwrap();
            let out = std::process::Command::new("iasl")
                .arg("-d")
                .arg(&dat)
                .output()
                .unwrap();
            let report = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "iasl -d {name}: {report}");
            assert!(
                !report.contains("Error") && !report.contains("Warning"),
                "iasl -d {name}: {report}"
            );
            text += &std::fs::read_to_string(dir.path().join(format!("{name}.dsl"))).unwrap();
        }
        // iasl aligns its columns with spaces: compare with whitespace collapsed.
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for want in [
            "Hardware Reduced (V5) : 1",
            "Local Apic ID : 01",
            "I/O Apic ID : 00",
            "Name (_HID, \"LNRO0005\")",
            "Memory32Fixed (ReadWrite, 0xD0001000, // Address Base 0x00001000,",
            "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000006, }",
            "Name (_HID, EisaId (\"PNP0501\")",
            "IO (Decode16, 0x03F8, // Range Minimum 0x03F8,",
            "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000004, }",
        ] {
            assert!(
                text.contains(want),
                "{want:?} not in the disassembly:\n{text}"
            );
        }
    }

    /// With PCI: the MCFG names ECAM for bus 0, the DSDT has the host bridge and the ECAM
    /// reservation, the FADT allows MSI; iasl reads it all back.
    #[test]
    fn pci_adds_mcfg_host_bridge_and_allows_msi() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let layout = PciHostLayout {
            window32: (0xc000_0000, 0x1000_0000),
            window64: (0x1_0000_0000, 64 << 30),
        };
        let rsdp = write_acpi_tables_with_pci(&mem, 1, &WINDOWS, Some(&layout)).unwrap();
        let [xsdt, fadt, _, dsdt] = tables(&mem, rsdp);
        let iapc = |f: &[u8]| u16::from_le_bytes([f[109], f[110]]);
        assert_eq!(iapc(&fadt) & IAPC_MSI_NOT_SUPPORTED, 0);
        let mcfg = xsdt[36..]
            .chunks(8)
            .map(|e| table(&mem, u64::from_le_bytes(e.try_into().unwrap())))
            .find(|t| &t[..4] == b"MCFG")
            .expect("an MCFG");
        // Header (36) + 8 reserved, then {base u64, segment u16, start bus, end bus}.
        assert_eq!(u64_at(&mcfg, 44), crate::pci::ECAM_BASE);
        assert_eq!(&mcfg[52..56], &[0, 0, 0, 0]);
        assert_eq!(count(&dsdt, b"PCI0"), 1);
        assert_eq!(count(&dsdt, b"MRES"), 1);
        // Without PCI: no MCFG, and MSI stays off.
        let rsdp = write_acpi_tables(&mem, 1, &WINDOWS).unwrap();
        let [xsdt, fadt, _, dsdt] = tables(&mem, rsdp);
        assert_ne!(iapc(&fadt) & IAPC_MSI_NOT_SUPPORTED, 0);
        assert_eq!(xsdt.len(), 36 + 16);
        assert_eq!(count(&dsdt, b"PCI0"), 0);
        if std::process::Command::new("iasl")
            .arg("-v")
            .output()
            .is_err()
        {
            // iasl_disassembles_the_tables enforces its presence in CI.
            return;
        }
        let rsdp = write_acpi_tables_with_pci(&mem, 1, &WINDOWS, Some(&layout)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let [_, _, _, dsdt] = tables(&mem, rsdp);
        let mut text = String::new();
        for (name, t) in [("dsdt", dsdt), ("mcfg", mcfg)] {
            let dat = dir.path().join(format!("{name}.dat"));
            std::fs::write(&dat, &t).unwrap();
            let out = std::process::Command::new("iasl")
                .arg("-d")
                .arg(&dat)
                .output()
                .unwrap();
            let report = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && !report.contains("Error"),
                "{name}: {report}"
            );
            text += &std::fs::read_to_string(dir.path().join(format!("{name}.dsl"))).unwrap();
        }
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for want in [
            "Name (_HID, EisaId (\"PNP0A08\")",
            "Name (_HID, EisaId (\"PNP0C02\")",
            "WordBusNumber (ResourceProducer",
            "0xC0000000, // Range Minimum 0xCFFFFFFF, // Range Maximum",
            "0x0000000100000000, // Range Minimum 0x00000010FFFFFFFF, // Range Maximum",
            "Memory32Fixed (ReadWrite, 0xE0000000, // Address Base 0x00100000,",
            "Base Address : 00000000E0000000",
        ] {
            assert!(
                text.contains(want),
                "{want:?} not in the disassembly:\n{text}"
            );
        }
    }
}
