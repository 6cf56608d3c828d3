//! One benchmark repetition inside a VM: the probe's blk-bench workload against
//! plexvm-blk (spawned by the core) or qemu-storage-daemon (started here, attached by
//! socket).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::guest::{run_vm, Device, GuestError, VmRequest};
use crate::plan::{Scenario, Settings, Subject};
use crate::process::{ChildGuard, ProcessError};
use crate::sample::{from_probe_fields, parse_histogram, Sample};

/// Guest RAM of benchmark VMs (the 1 vCPU / 128 MiB).
pub const MEMORY_MIB: u64 = 128;
/// Serial line the probe prints when the measured time starts.
pub const GO_LINE: &str = "probe: bench go";
/// Serial line the probe prints when the measured time ends.
pub const STOP_LINE: &str = "probe: bench stop";
const RESULT_PREFIX: &str = "probe: result workload=blk-bench ";
const HISTOGRAM_PREFIX: &str = "probe: histogram ";

/// Programs the harness starts.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The core.
    pub plexvm: PathBuf,
    /// plexvm's block backend.
    pub plexvm_blk: PathBuf,
    /// `qemu-storage-daemon` (may be missing: qsd subjects then fail with a message).
    pub qsd: PathBuf,
}

/// Errors of a VM repetition.
#[derive(Debug, thiserror::Error)]
pub enum VmBenchError {
    /// qemu-storage-daemon did not come up.
    #[error("qemu-storage-daemon")]
    Qsd(#[source] ProcessError),
    /// The VM run failed.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// The guest's result says failure.
    #[error("guest reports status={status} errors={errors} (exit code {code:?})")]
    Failed {
        /// `status=` of the result line.
        status: String,
        /// `errors=`.
        errors: String,
        /// plexvm's exit code.
        code: Option<i32>,
    },
    /// Not a VM subject.
    #[error("{0} does not run in a VM")]
    NotAVm(Subject),
}

/// The probe command line for `scenario`.
pub fn probe_cmdline(scenario: &Scenario, settings: &Settings, irq: bool) -> String {
    format!(
        "probe.workload=blk-bench probe.rw={} probe.bs={} probe.qd={} probe.seconds={} \
         probe.warmup={} probe.irq={}",
        scenario.rw,
        scenario.bs,
        scenario.qd,
        settings.seconds,
        settings.warmup,
        if irq { "on" } else { "off" }
    )
}

/// Starts qemu-storage-daemon exporting `image` on `socket`.
pub fn start_qsd(
    qsd: &Path,
    image: &Path,
    socket: &Path,
    direct: bool,
    log: &Path,
) -> Result<ChildGuard, ProcessError> {
    let _ = std::fs::remove_file(socket);
    let log = std::fs::File::create(log).ok();
    let blockdev = format!(
        "driver=file,node-name=f,filename={},cache.direct={}",
        image.display(),
        if direct { "on" } else { "off" }
    );
    let export = format!(
        "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues=1",
        socket.display()
    );
    let mut command = Command::new(qsd);
    command
        .arg("--blockdev")
        .arg(blockdev)
        .arg("--export")
        .arg(export)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if let Some(log) = log {
        command.stderr(log);
    }
    let mut child = ChildGuard::spawn("qemu-storage-daemon", &mut command)?;
    child.wait_for_socket(socket, Duration::from_secs(10))?;
    Ok(child)
}

/// Runs one repetition of `scenario` in a VM whose disk is `image`, served by `subject`.
pub fn run(
    bins: &Binaries,
    work: &Path,
    scenario: &Scenario,
    settings: &Settings,
    subject: Subject,
    image: &Path,
) -> Result<Sample, VmBenchError> {
    let socket = work.join("qsd.sock");
    let (device, qsd) = match subject {
        Subject::PlexvmBlk | Subject::PlexvmBlkDirect | Subject::PlexvmBlkPci => {
            let mut argv = vec![
                bins.plexvm_blk.display().to_string(),
                "--image".to_string(),
                image.display().to_string(),
            ];
            if subject.direct() {
                argv.push("--direct".to_string());
            }
            (Device::Exec(argv), None)
        }
        Subject::Qsd | Subject::QsdDirect => {
            let qsd = start_qsd(
                &bins.qsd,
                image,
                &socket,
                subject.direct(),
                &work.join("qsd.log"),
            )
            .map_err(VmBenchError::Qsd)?;
            (Device::Socket(socket.clone()), Some(qsd))
        }
        Subject::Host | Subject::HostDirect => return Err(VmBenchError::NotAVm(subject)),
    };
    let request = VmRequest {
        cmdline: probe_cmdline(scenario, settings, scenario.irq),
        device,
        kind: "blk",
        transport: subject.transport(),
        memory_mib: MEMORY_MIB,
        timeout: Duration::from_secs(settings.warmup + settings.seconds + 60),
        sample_memory_at: None,
    };
    let outcome = run_vm(&bins.plexvm, work, &request);
    if let Some(mut qsd) = qsd {
        qsd.terminate(Duration::from_secs(5));
    }
    let outcome = outcome?;
    let fields = outcome.fields(RESULT_PREFIX)?;
    let histogram = outcome
        .line(HISTOGRAM_PREFIX)
        .map(|l| parse_histogram(&l.text[HISTOGRAM_PREFIX.len()..]))
        .unwrap_or_default();
    let host_seconds = match (outcome.line(GO_LINE), outcome.line(STOP_LINE)) {
        (Some(go), Some(stop)) => stop.at.saturating_sub(go.at).as_secs_f64(),
        _ => 0.0,
    };
    let status = fields.get("status").cloned().unwrap_or_default();
    if status != "ok" || outcome.code != Some(0) {
        return Err(VmBenchError::Failed {
            status,
            errors: fields.get("errors").cloned().unwrap_or_default(),
            code: outcome.code,
        });
    }
    from_probe_fields(&fields, histogram, host_seconds)
        .ok_or_else(|| VmBenchError::Guest(GuestError::BadResult(format!("{fields:?}"))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{select_scenarios, Settings};

    #[test]
    fn cmdline_for_a_scenario() {
        let s = select_scenarios(&["write-128k-qd8".into()], true).unwrap()[0];
        let line = probe_cmdline(&s, &Settings::defaults(true), false);
        assert_eq!(
            line,
            "probe.workload=blk-bench probe.rw=write probe.bs=131072 probe.qd=8 \
             probe.seconds=2 probe.warmup=1 probe.irq=off"
        );
    }
}
