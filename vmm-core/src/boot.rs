//! Loading a kernel and setting the boot vCPU up for the Linux x86_64 64-bit boot
//! protocol (Documentation/arch/x86/boot.rst, "64-bit boot protocol"): long mode,
//! identity-mapped page tables, flat segments, RSI pointing at `boot_params`.
//! The probe guest is entered the same way (docs/platform.md).

use std::io::{Read, Seek};

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, ReadVolatile};

use crate::memory::GuestMemory;

/// GDT location.
pub const GDT_ADDR: u64 = 0x500;
/// `boot_params` (zero page) location; passed in RSI.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// PML4 of the boot page tables.
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT of the boot page tables.
pub const PDPT_ADDR: u64 = 0xa000;
/// PD of the boot page tables (first 1 GiB in 2 MiB pages).
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line location.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line, NUL included.
pub const CMDLINE_MAX: usize = 4096;
/// Start of the legacy hole that is not RAM in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// Where kernels are loaded (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;

const GDT_CODE64: u64 = 0x00af_9b00_0000_ffff;
const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;
const CODE_SELECTOR: u16 = 0x10;
const DATA_SELECTOR: u16 = 0x18;

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Errors loading a guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel image could not be loaded.
    #[error("cannot load the kernel image")]
    Kernel(#[source] linux_loader::loader::Error),
    /// The command line is too long or has bad characters.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing boot structures into guest memory failed (memory too small).
    #[error("guest memory too small for the boot structures")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// The kernel loaded outside RAM or overlapping the core's boot structures.
    #[error("the kernel does not fit in guest memory")]
    KernelPlacement,
    /// The file is neither an ELF vmlinux nor a bzImage.
    #[error("neither an ELF vmlinux nor a bzImage")]
    UnknownFormat,
    /// A bzImage without the 64-bit entry point (XLF_KERNEL_64).
    #[error("the bzImage has no 64-bit entry point")]
    NotKernel64,
    /// Reading the image failed.
    #[error("cannot read the image")]
    Io(#[source] std::io::Error),
    /// The initramfs does not fit below the kernel's limit.
    #[error("the initramfs ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooBig {
        /// Initramfs size.
        size: u64,
        /// Highest address the kernel accepts.
        limit: u64,
    },
}

/// Where the loaded kernel starts executing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryPoint(pub GuestAddress);

/// A kernel in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: EntryPoint,
    /// First byte after the kernel.
    pub end: u64,
    /// The bzImage's setup header, which `boot_params` must carry.
    pub setup_header: Option<setup_header>,
}

/// `xloadflags` bit: the kernel has the 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 1;
/// Offset of the 64-bit entry point in a loaded bzImage (boot.rst, "64-bit boot protocol").
const BZIMAGE_ENTRY_64: u64 = 0x200;
/// Offset of the "HdrS" magic in a bzImage.
const BZIMAGE_HDR_OFFSET: u64 = 0x202;
/// The kernel's default `initrd_addr_max` for old headers.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Loads a kernel, telling an ELF vmlinux from a bzImage by its magic bytes.
pub fn load_kernel<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemory,
    image: &mut F,
) -> Result<LoadedKernel, BootError> {
    let mut magic = [0u8; 4];
    image
        .seek(std::io::SeekFrom::Start(0))
        .map_err(BootError::Io)?;
    let elf = image.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    let mut hdrs = [0u8; 4];
    image
        .seek(std::io::SeekFrom::Start(BZIMAGE_HDR_OFFSET))
        .map_err(BootError::Io)?;
    let bzimage = image.read_exact(&mut hdrs).is_ok() && hdrs == *b"HdrS";
    image
        .seek(std::io::SeekFrom::Start(0))
        .map_err(BootError::Io)?;
    if elf {
        let entry = load_elf(mem, image)?;
        return Ok(LoadedKernel {
            entry,
            end: 0,
            setup_header: None,
        });
    }
    if !bzimage {
        return Err(BootError::UnknownFormat);
    }
    let res = BzImage::load(mem, None, image, Some(GuestAddress(HIMEM_START)))
        .map_err(BootError::Kernel)?;
    let hdr = res.setup_header.ok_or(BootError::UnknownFormat)?;
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::NotKernel64);
    }
    Ok(LoadedKernel {
        entry: EntryPoint(GuestAddress(res.kernel_load.0 + BZIMAGE_ENTRY_64)),
        end: res.kernel_end,
        setup_header: Some(hdr),
    })
}

/// Places an initramfs as high as the kernel allows (`initrd_addr_max`), page-aligned,
/// and returns its (address, size).
pub fn load_initrd<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    image: &mut F,
) -> Result<(u64, u64), BootError> {
    let size = image
        .seek(std::io::SeekFrom::End(0))
        .map_err(BootError::Io)?;
    image
        .seek(std::io::SeekFrom::Start(0))
        .map_err(BootError::Io)?;
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let low_ram_end = mem.iter().next().map_or(0, |r| r.start_addr().0 + r.len());
    let limit = low_ram_end.min(addr_max.saturating_add(1));
    let floor = kernel.end.max(HIMEM_START);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= floor);
    let Some(addr) = addr else {
        return Err(BootError::InitrdTooBig { size, limit });
    };
    let mut slice_left = size as usize;
    let mut at = addr;
    while slice_left > 0 {
        let n = mem
            .read_volatile_from(GuestAddress(at), image, slice_left)
            .map_err(BootError::Memory)?;
        if n == 0 {
            return Err(BootError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        slice_left -= n;
        at += n as u64;
    }
    Ok((addr, size))
}

/// Loads a 64-bit ELF kernel from `image` into `mem`.
pub fn load_elf<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemory,
    image: &mut F,
) -> Result<EntryPoint, BootError> {
    let res =
        Elf::load(mem, None, image, Some(GuestAddress(HIMEM_START))).map_err(BootError::Kernel)?;
    if res.kernel_load.0 < HIMEM_START
        || !mem.address_in_range(GuestAddress(res.kernel_end.saturating_sub(1)))
    {
        return Err(BootError::KernelPlacement);
    }
    Ok(EntryPoint(res.kernel_load))
}

/// Builds the command line: the user's, then the core's `extra` entries.
pub fn build_cmdline(user: &str, extra: &[String]) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(BootError::Cmdline)?;
    if !user.trim().is_empty() {
        cmdline
            .insert_str(user.trim())
            .map_err(BootError::Cmdline)?;
    }
    for e in extra {
        cmdline.insert_str(e).map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Writes the command line, `boot_params`, the GDT and the page tables.
pub fn write_boot_structures(
    mem: &GuestMemory,
    cmdline: &Cmdline,
    kernel: &LoadedKernel,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), cmdline).map_err(|e| match e {
        linux_loader::loader::Error::CommandLineOverflow => BootError::KernelPlacement,
        other => BootError::Kernel(other),
    })?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes()
        .len();

    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    let e820 = e820_map(mem);
    params.e820_entries = e820.len() as u8;
    params.e820_table[..e820.len()].copy_from_slice(&e820);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(BootError::Memory)?;

    let gdt: [u64; 4] = [0, 0, GDT_CODE64, GDT_DATA];
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(BootError::Memory)?;
    }
    write_page_tables(mem)
}

/// Tells the kernel where the ACPI RSDP is: `boot_params.acpi_rsdp_addr` (offset 0x070,
/// boot protocol 2.14, Documentation/arch/x86/zero-page.rst). Kernels that predate the
/// field have padding there and find the RSDP by scanning the BIOS area instead.
pub fn set_acpi_rsdp(mem: &GuestMemory, rsdp: GuestAddress) -> Result<(), BootError> {
    let offset = std::mem::offset_of!(boot_params, acpi_rsdp_addr) as u64;
    mem.write_obj(rsdp.0, GuestAddress(ZERO_PAGE_ADDR + offset))
        .map_err(BootError::Memory)
}

/// The e820 map: low RAM below the EBDA, then RAM from 1 MiB (and above 4 GiB).
fn e820_map(mem: &GuestMemory) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64| boot_e820_entry {
        addr,
        size,
        r#type: E820_RAM,
    };
    let mut map = vec![entry(0, EBDA_START)];
    for region in mem.iter() {
        let start = region.start_addr().0.max(HIMEM_START);
        let end = region.start_addr().0 + region.len();
        if end > start {
            map.push(entry(start, end - start));
        }
    }
    map
}

/// Identity map of the first 1 GiB with 2 MiB pages.
fn write_page_tables(mem: &GuestMemory) -> Result<(), BootError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    mem.write_obj(PDPT_ADDR | PRESENT_RW, GuestAddress(PML4_ADDR))
        .map_err(BootError::Memory)?;
    mem.write_obj(PD_ADDR | PRESENT_RW, GuestAddress(PDPT_ADDR))
        .map_err(BootError::Memory)?;
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | PRESENT_RW | PAGE_SIZE_2M).to_le_bytes())
        .collect();
    mem.write_slice(&pd, GuestAddress(PD_ADDR))
        .map_err(BootError::Memory)
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers of the boot vCPU: long mode with the core's GDT and page tables.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(CODE_SELECTOR, true);
    let data = segment(DATA_SELECTOR, false);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// General registers of the boot vCPU.
pub fn boot_regs(entry: EntryPoint) -> kvm_regs {
    kvm_regs {
        rip: entry.0 .0,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE_ADDR,
        rflags: 0x2,
        ..Default::default()
    }
}

/// FPU state after reset (x87 control word and MXCSR defaults).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn boot_structures_describe_memory_and_cmdline() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let cmdline = build_cmdline(
            "  probe.seed=3 ",
            &["virtio_mmio.device=4K@0xd0000000:5".into()],
        )
        .unwrap();
        let kernel = LoadedKernel {
            entry: EntryPoint(GuestAddress(HIMEM_START)),
            end: 2 << 20,
            setup_header: None,
        };
        let initrd =
            load_initrd(&mem, &kernel, &mut std::io::Cursor::new(vec![7u8; 5000])).unwrap();
        assert_eq!(initrd, ((64 << 20) - 8192, 5000));
        write_boot_structures(&mem, &cmdline, &kernel, Some(initrd)).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!(params.e820_entries, 2);
        assert_eq!(
            ({ params.hdr.ramdisk_image }, { params.hdr.ramdisk_size }),
            ((64 << 20) - 8192, 5000)
        );
        let last = params.e820_table[1];
        assert_eq!({ last.addr } + { last.size }, 64 << 20);
        let mut buf = vec![0u8; params.hdr.cmdline_size as usize + 1];
        mem.read_slice(&mut buf, GuestAddress(u64::from(params.hdr.cmd_line_ptr)))
            .unwrap();
        assert_eq!(&buf, b"probe.seed=3 virtio_mmio.device=4K@0xd0000000:5\0");
        let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8 * 511)).unwrap();
        assert_eq!(pde, (511 << 21) | 0x83);
    }

    #[test]
    fn too_long_cmdline_is_an_error_not_a_panic() {
        let long = "x".repeat(CMDLINE_MAX + 1);
        assert!(build_cmdline(&long, &[]).is_err());
    }

    #[test]
    fn initrd_that_does_not_fit_is_an_error() {
        let mem = create_guest_memory(4 << 20).unwrap();
        let kernel = LoadedKernel {
            entry: EntryPoint(GuestAddress(HIMEM_START)),
            end: 3 << 20,
            setup_header: None,
        };
        let err =
            load_initrd(&mem, &kernel, &mut std::io::Cursor::new(vec![0u8; 2 << 20])).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooBig { .. }));
    }

    #[test]
    fn garbage_kernel_is_rejected() {
        let mem = create_guest_memory(16 << 20).unwrap();
        assert!(matches!(
            load_kernel(&mem, &mut std::io::Cursor::new(vec![0u8; 4096])),
            Err(BootError::UnknownFormat)
        ));
        let mut fake_bz = vec![0u8; 4096];
        fake_bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert!(load_kernel(&mem, &mut std::io::Cursor::new(fake_bz)).is_err());
        let mut img = std::io::Cursor::new(vec![0x7fu8, b'E', b'L', b'F', 1, 2, 3]);
        assert!(load_elf(&mem, &mut img).is_err());
        let mut img = std::io::Cursor::new(Vec::<u8>::new());
        assert!(load_elf(&mem, &mut img).is_err());
    }
}
