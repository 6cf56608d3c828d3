//! The built-in probe guest (`vmm-core/probe/`).

/// The probe guest ELF: a static x86_64 image linked at 1 MiB that the core loads
/// like a 64-bit Linux kernel (entry in long mode, RSI = boot_params; see
/// docs/platform.md). Its command line selects the workload (`probe.workload=`,
/// `probe.seed=`, `probe.seconds=`); it reports on COM1 and ends the VM through the
/// exit port 0x501 with 0 = ok, 1 = verification failure, 2 = device error or
/// timeout, 3 = bad command line, 4 = panic. See vmm-core/probe/README.md.
///
/// Built by `build.rs` from `vmm-core/probe/` on every build of this crate whose
/// probe sources changed.
pub const PROBE_ELF: &[u8] = include_bytes!(env!("PLEXVM_PROBE_ELF"));

#[cfg(test)]
mod tests {
    use super::PROBE_ELF;

    fn u16_at(at: usize) -> u16 {
        u16::from_le_bytes([PROBE_ELF[at], PROBE_ELF[at + 1]])
    }

    fn u32_at(at: usize) -> u32 {
        u32::from_le_bytes(PROBE_ELF[at..at + 4].try_into().expect("4 bytes"))
    }

    fn u64_at(at: usize) -> u64 {
        u64::from_le_bytes(PROBE_ELF[at..at + 8].try_into().expect("8 bytes"))
    }

    /// The core loads the probe like a 64-bit Linux kernel: a static x86_64 executable
    /// whose segments sit at physical addresses from 1 MiB (docs/platform.md).
    #[test]
    fn probe_is_a_static_elf_at_one_mib() {
        assert_eq!(&PROBE_ELF[..4], b"\x7fELF");
        assert_eq!(PROBE_ELF[4], 2, "ELFCLASS64");
        assert_eq!(u16_at(16), 2, "ET_EXEC");
        assert_eq!(u16_at(18), 62, "EM_X86_64");
        let entry = u64_at(24);
        let (phoff, phentsize, phnum) = (
            u64_at(32) as usize,
            usize::from(u16_at(54)),
            usize::from(u16_at(56)),
        );
        let mut loads = 0;
        let mut entry_loaded = false;
        for i in 0..phnum {
            let ph = phoff + i * phentsize;
            let (kind, paddr, filesz, memsz) = (
                u32_at(ph),
                u64_at(ph + 24),
                u64_at(ph + 32),
                u64_at(ph + 40),
            );
            assert!(
                kind != 2 && kind != 3,
                "PT_DYNAMIC / PT_INTERP present: not a static image"
            );
            if kind == 1 {
                loads += 1;
                assert!(paddr >= 0x10_0000, "LOAD segment below 1 MiB at {paddr:#x}");
                assert!(
                    paddr + memsz <= 0x100_0000,
                    "probe image larger than expected"
                );
                entry_loaded |= filesz > 0 && (paddr..paddr + filesz).contains(&entry);
            }
        }
        assert!(loads > 0);
        assert!(entry_loaded, "entry {entry:#x} is not in a loaded segment");
    }
}
