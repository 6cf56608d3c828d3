//! The core's own costs: time from spawning `plexvm run` to the probe's first
//! instruction, and the core's resident memory beyond guest RAM.
//!
//! Launch time is measured from outside, without changing the core: the harness
//! stamps the spawn and the arrival of the probe's first serial line (`probe: plexvm
//! probe guest started at CPL3`, printed as the first thing at CPL3). That line costs
//! one port-I/O exit per byte; the time per byte is measured from the second line
//! (the command line echo, printed right after), and the first line's bytes are
//! subtracted to estimate the first instruction. Memory is `/proc/PID/status` of the
//! core, sampled while the probe runs a workload: overhead = VmRSS - RssShmem (guest
//! RAM is a memfd, so its touched pages are exactly RssShmem).

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::guest::{run_vm, Device, GuestError, MemorySample, VmOutcome, VmRequest};
use crate::sample::Spread;
use crate::vm_bench::{Binaries, GO_LINE, MEMORY_MIB};

/// Firecracker's published figures, for context.
pub const FIRECRACKER_LAUNCH_MS: f64 = 125.0;
/// Firecracker's published memory overhead, MiB.
pub const FIRECRACKER_OVERHEAD_MIB: f64 = 5.0;
/// The targets.
pub const TARGET_LAUNCH_MS: f64 = 20.0;
/// Core overhead target, MiB.
pub const TARGET_OVERHEAD_MIB: f64 = 3.0;

/// Launch time of one configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Launch {
    /// Spawn to the first serial line, ms.
    pub first_line_ms: Spread,
    /// Serial output cost, µs per byte (from the second line).
    pub serial_us_per_byte: Spread,
    /// Spawn to the first instruction (first line minus its serial cost), ms.
    pub first_instruction_ms: Spread,
    /// Raw first-line times, ms.
    pub raw_first_line_ms: Vec<f64>,
}

/// The core's costs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CoreCosts {
    /// A VM without devices.
    pub launch_no_device: Launch,
    /// A VM with one plexvm-blk device (the core spawns the backend and sets it up
    /// before the vCPU starts).
    pub launch_with_blk: Launch,
    /// Memory samples of the core (1 vCPU, 128 MiB, plexvm-blk), one per run.
    pub memory: Vec<MemorySample>,
    /// VmRSS - RssShmem, MiB.
    pub overhead_mib: Spread,
    /// RssAnon alone, MiB.
    pub anon_mib: Spread,
}

/// Measures both launch variants `reps` times, and memory during the device runs.
pub fn measure(
    bins: &Binaries,
    work: &Path,
    image: &Path,
    reps: u32,
    mut progress: impl FnMut(&str),
) -> Result<CoreCosts, GuestError> {
    let mut bare = Vec::new();
    let mut blk = Vec::new();
    let mut memory = Vec::new();
    for rep in 0..reps {
        progress(&format!("core costs: launch {}/{reps}", rep + 1));
        bare.push(run_vm(&bins.plexvm, work, &request(Device::None))?);
        let device = Device::Exec(vec![
            bins.plexvm_blk.display().to_string(),
            "--image".to_string(),
            image.display().to_string(),
        ]);
        let outcome = run_vm(&bins.plexvm, work, &request(device))?;
        memory.extend(outcome.memory);
        blk.push(outcome);
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    Ok(CoreCosts {
        launch_no_device: launch(&bare)?,
        launch_with_blk: launch(&blk)?,
        overhead_mib: Spread::of(memory.iter().map(|m| mib(m.overhead_kib()))),
        anon_mib: Spread::of(memory.iter().map(|m| mib(m.anon_kib))),
        memory,
    })
}

fn request(device: Device) -> VmRequest {
    VmRequest {
        cmdline: "probe.workload=blk-bench probe.seconds=1 probe.warmup=0".to_string(),
        device,
        kind: "blk",
        transport: "mmio",
        memory_mib: MEMORY_MIB,
        timeout: Duration::from_secs(60),
        sample_memory_at: Some(GO_LINE),
    }
}

/// Launch statistics of several runs.
fn launch(runs: &[VmOutcome]) -> Result<Launch, GuestError> {
    let mut first = Vec::new();
    let mut per_byte = Vec::new();
    let mut instruction = Vec::new();
    for run in runs {
        let (Some(one), Some(two)) = (run.lines.first(), run.lines.get(1)) else {
            return Err(run.no_result("first two serial lines"));
        };
        let one_ms = one.at.as_secs_f64() * 1000.0;
        let byte_us =
            two.at.saturating_sub(one.at).as_secs_f64() * 1e6 / (two.text.len() + 1) as f64;
        first.push(one_ms);
        per_byte.push(byte_us);
        instruction.push(one_ms - byte_us * (one.text.len() + 1) as f64 / 1000.0);
    }
    Ok(Launch {
        first_line_ms: Spread::of(first.iter().copied()),
        serial_us_per_byte: Spread::of(per_byte),
        first_instruction_ms: Spread::of(instruction),
        raw_first_line_ms: first,
    })
}
