//! ACPI for the root complex (docs/platform.md, "PCI"): the MCFG that gives Linux the
//! ECAM window, and the DSDT devices `\_SB.PCI0` (PNP0A08, a PCI Express host bridge
//! with `_CRS` windows) and `\_SB.MRES` (PNP0C02, reserving ECAM so Linux accepts the
//! MCFG: it refuses MMCONFIG areas that no motherboard resource or e820 entry reserves).
//!
//! Interrupts are MSI-only: the functions report Interrupt Pin 0 and there is no `_PRT`,
//! so nothing routes INTx (Linux's virtio_pci then needs MSI-X, which it prefers anyway).

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, Memory32Fixed, Name, Path,
    ResourceTemplate, IO,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::Aml;

use super::{CONFIG_IO_LEN, CONFIG_IO_PORT, ECAM_BASE, ECAM_SIZE};

/// What the ACPI tables say about PCI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciHostLayout {
    /// (base, size) of the 32-bit MMIO window.
    pub window32: (u64, u64),
    /// (base, size) of the 64-bit MMIO window.
    pub window64: (u64, u64),
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The MCFG table: segment 0, bus 0 at [`ECAM_BASE`].
pub fn mcfg(oem_id: [u8; 6], oem_revision: u32) -> Vec<u8> {
    let mut mcfg = MCFG::new(oem_id, *b"PLEXMCFG", oem_revision);
    mcfg.add_ecam(ECAM_BASE, 0, 0, 0);
    bytes_of(&mcfg)
}

/// `\_SB.PCI0` and `\_SB.MRES`, to go inside the DSDT's `\_SB` scope.
pub fn dsdt_devices(layout: &PciHostLayout) -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0A08"));
    let cid = Name::new(Path::new("_CID"), &EISAName::new("PNP0A03"));
    let adr = Name::new(Path::new("_ADR"), &0u32);
    let seg = Name::new(Path::new("_SEG"), &0u8);
    let uid = Name::new(Path::new("_UID"), &0u8);
    let bbn = Name::new(Path::new("_BBN"), &0u8);
    let buses = AddressSpace::<u16>::new_bus_number(0, 0);
    let config_io = IO::new(CONFIG_IO_PORT, CONFIG_IO_PORT, 1, CONFIG_IO_LEN as u8);
    let (b32, s32) = layout.window32;
    let (b64, s64) = layout.window64;
    let mem32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        b32 as u32,
        (b32 + s32 - 1) as u32,
        None,
    );
    let mem64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        b64,
        b64 + s64 - 1,
        None,
    );
    let crs = Name::new(
        Path::new("_CRS"),
        &ResourceTemplate::new(vec![&buses, &config_io, &mem32, &mem64]),
    );
    let mut out = bytes_of(&Device::new(
        Path::new("PCI0"),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs],
    ));
    let mres_hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0C02"));
    let mres_uid = Name::new(Path::new("_UID"), &1u8);
    let ecam = Memory32Fixed::new(true, ECAM_BASE as u32, ECAM_SIZE as u32);
    let mres_crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&ecam]));
    out.extend(bytes_of(&Device::new(
        Path::new("MRES"),
        vec![&mres_hid, &mres_uid, &mres_crs],
    )));
    out
}
