//! CPUID for each vCPU: KVM's supported set, with this vCPU's APIC ID and topology, the
//! hypervisor bit, and the hypervisor timing leaf (docs/platform.md, "CPUID").

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use plexvm_protocol::spec::{CpuFeature, CpuidReg};

/// First hypervisor leaf.
pub const HYPERVISOR_LEAF: u32 = 0x4000_0000;
/// Timing leaf: EAX = TSC kHz, EBX = local APIC bus kHz.
pub const TIMING_LEAF: u32 = 0x4000_0010;
/// The local APIC bus runs at 1 GHz in KVM's in-kernel APIC.
const APIC_BUS_KHZ: u32 = 1_000_000;

/// Adjusts `cpuid` (KVM's supported set) for vCPU `index` of `count`, hiding the
/// features in `mask`.
pub fn configure(
    cpuid: &mut CpuId,
    index: u8,
    count: u8,
    tsc_khz: u32,
    mask: &[CpuFeature],
) -> Result<(), vmm_sys_util::fam::Error> {
    let apic_id = u32::from(index);
    for e in cpuid.as_mut_slice() {
        for f in mask.iter().filter(|f| f.leaf == e.function && e.index == 0) {
            let reg = match f.reg {
                CpuidReg::Ebx => &mut e.ebx,
                CpuidReg::Ecx => &mut e.ecx,
                CpuidReg::Edx => &mut e.edx,
            };
            *reg &= !(1 << f.bit);
        }
        match e.function {
            1 => {
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (u32::from(count) << 16);
                // ECX[31]: running under a hypervisor. EDX[28]: HTT (several logical CPUs).
                e.ecx |= 1 << 31;
                if count > 1 {
                    e.edx |= 1 << 28;
                }
            }
            0xb | 0x1f => {
                // Extended topology: one thread per core, `count` cores per package.
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = shift_for(count);
                        e.ebx = u32::from(count);
                        e.ecx = (2 << 8) | 1;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            4 => {
                // EAX[31:26]: cores per package - 1.
                e.eax = (e.eax & 0x03ff_ffff) | (u32::from(count.saturating_sub(1)) << 26);
            }
            HYPERVISOR_LEAF => e.eax = TIMING_LEAF,
            _ => {}
        }
    }
    if !cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == HYPERVISOR_LEAF)
    {
        let [b, c, d] = signature(b"KVMKVMKVM\0\0\0");
        cpuid.push(kvm_cpuid_entry2 {
            function: HYPERVISOR_LEAF,
            eax: TIMING_LEAF,
            ebx: b,
            ecx: c,
            edx: d,
            ..Default::default()
        })?;
    }
    cpuid.retain(|e| e.function != TIMING_LEAF);
    cpuid.push(kvm_cpuid_entry2 {
        function: TIMING_LEAF,
        eax: tsc_khz,
        ebx: APIC_BUS_KHZ,
        ..Default::default()
    })?;
    Ok(())
}

/// Bits of the x2APIC ID that the core level uses for `count` cores.
fn shift_for(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

fn signature(s: &[u8; 12]) -> [u32; 3] {
    let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    [w(0), w(4), w(8)]
}

/// Whether an entry depends on its index (ECX); kept for callers building entries.
pub fn is_indexed(e: &kvm_cpuid_entry2) -> bool {
    e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apic_id_topology_and_timing_leaf() {
        let mut cpuid = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_0800,
                ecx: 1 << 13,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            },
        ])
        .unwrap();
        let cx16 = CpuFeature::from_name("cx16").unwrap();
        configure(&mut cpuid, 3, 4, 2_500_000, &[cx16]).unwrap();
        let e = cpuid.as_slice();
        assert_eq!(e[0].ecx & (1 << 13), 0, "cx16 masked");
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x0800);
        assert_ne!(e[0].ecx & (1 << 31), 0);
        assert_eq!((e[1].eax, e[1].ebx, e[1].edx), (2, 4, 3));
        assert!(is_indexed(&e[1]));
        let timing = e.iter().find(|e| e.function == TIMING_LEAF).unwrap();
        assert_eq!(timing.eax, 2_500_000);
        let hv = e.iter().find(|e| e.function == HYPERVISOR_LEAF).unwrap();
        assert_eq!(hv.eax, TIMING_LEAF);
        assert_eq!(hv.ebx, u32::from_le_bytes(*b"KVMK"));
    }
}
