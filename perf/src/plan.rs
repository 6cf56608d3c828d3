//! What a run measures: scenarios (access patterns), backends, storage, and the
//! method settings (repetitions, durations).

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

/// Errors in the selection given on the command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// `--scenario` names no known scenario.
    #[error("unknown scenario {0:?} (known: {known})", known = scenario_names())]
    UnknownScenario(String),
    /// `--backend` names no known backend.
    #[error("unknown backend {0:?} (known: plexvm-blk, plexvm-blk-direct, plexvm-blk-pci, qsd, qsd-direct, host)")]
    UnknownBackend(String),
    /// `--storage` names no known storage.
    #[error("unknown storage {0:?} (known: tmpfs, disk)")]
    UnknownStorage(String),
    /// A duration or count of zero.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
}

/// One access pattern, run the same way against every subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Scenario {
    /// Name used on the command line and in results.
    pub name: &'static str,
    /// The probe's `probe.rw=` value.
    pub rw: &'static str,
    /// Bytes per request.
    pub bs: u32,
    /// Requests in flight.
    pub qd: u16,
    /// Whether the guest asks for used-buffer notifications (it polls either way).
    pub irq: bool,
    /// Part of `--quick` runs.
    pub quick: bool,
}

impl Scenario {
    /// Whether the pattern writes.
    pub fn writes(&self) -> bool {
        self.rw.contains("write") || self.rw.starts_with("mix")
    }

    /// Whether offsets are random.
    pub fn random(&self) -> bool {
        self.rw.starts_with("rand") || self.rw.starts_with("mix")
    }

    /// Percentage of reads (100 for reads, 0 for writes).
    pub fn read_pct(&self) -> u8 {
        match self.rw.strip_prefix("mix:") {
            Some(pct) => pct.parse().unwrap_or(50),
            None if self.writes() => 0,
            None => 100,
        }
    }
}

/// The scenarios of the issue, plus interrupts-on variants (full runs only).
pub const SCENARIOS: &[Scenario] = &[
    scenario("randread-4k-qd1", "randread", 4096, 1, false, true),
    scenario("randread-4k-qd32", "randread", 4096, 32, false, true),
    scenario("randwrite-4k-qd32", "randwrite", 4096, 32, false, true),
    scenario("read-128k-qd8", "read", 128 * 1024, 8, false, true),
    scenario("write-128k-qd8", "write", 128 * 1024, 8, false, true),
    scenario("randread-4k-qd1-irq", "randread", 4096, 1, true, false),
    scenario("randread-4k-qd32-irq", "randread", 4096, 32, true, false),
];

const fn scenario(
    name: &'static str,
    rw: &'static str,
    bs: u32,
    qd: u16,
    irq: bool,
    quick: bool,
) -> Scenario {
    Scenario {
        name,
        rw,
        bs,
        qd,
        irq,
        quick,
    }
}

fn scenario_names() -> String {
    SCENARIOS
        .iter()
        .map(|s| s.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Who serves the I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Subject {
    /// plexvm's backend, page cache.
    PlexvmBlk,
    /// plexvm's backend with `--direct` (O_DIRECT).
    PlexvmBlkDirect,
    /// plexvm's backend, page cache, the disk on virtio-pci instead of virtio-mmio.
    PlexvmBlkPci,
    /// qemu-storage-daemon's vhost-user-blk export, `cache.direct=off`.
    Qsd,
    /// qemu-storage-daemon with `cache.direct=on`.
    QsdDirect,
    /// The ceiling: the same pattern from host threads, page cache.
    Host,
    /// The ceiling with O_DIRECT.
    HostDirect,
}

impl Subject {
    /// Every subject, in table order.
    pub const ALL: [Subject; 7] = [
        Subject::PlexvmBlk,
        Subject::PlexvmBlkDirect,
        Subject::PlexvmBlkPci,
        Subject::Qsd,
        Subject::QsdDirect,
        Subject::Host,
        Subject::HostDirect,
    ];

    /// Name in results and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Subject::PlexvmBlk => "plexvm-blk",
            Subject::PlexvmBlkDirect => "plexvm-blk-direct",
            Subject::PlexvmBlkPci => "plexvm-blk-pci",
            Subject::Qsd => "qsd",
            Subject::QsdDirect => "qsd-direct",
            Subject::Host => "host",
            Subject::HostDirect => "host-direct",
        }
    }

    /// Whether the image is opened with O_DIRECT.
    pub fn direct(self) -> bool {
        matches!(
            self,
            Subject::PlexvmBlkDirect | Subject::QsdDirect | Subject::HostDirect
        )
    }

    /// The virtio transport of the VM's disk.
    pub fn transport(self) -> &'static str {
        match self {
            Subject::PlexvmBlkPci => "pci",
            _ => "mmio",
        }
    }

    /// Whether this is the host-side ceiling rather than a VM.
    pub fn is_ceiling(self) -> bool {
        matches!(self, Subject::Host | Subject::HostDirect)
    }

    /// The ceiling with the same cache mode.
    pub fn ceiling(self) -> Subject {
        if self.direct() {
            Subject::HostDirect
        } else {
            Subject::Host
        }
    }

    /// qemu-storage-daemon with the same cache mode (the reference for ratios).
    pub fn reference(self) -> Subject {
        if self.direct() {
            Subject::QsdDirect
        } else {
            Subject::Qsd
        }
    }

    /// Parses a `--backend` value; `host` selects both ceilings.
    pub fn parse(name: &str) -> Result<Vec<Subject>, PlanError> {
        match name {
            "host" => Ok(vec![Subject::Host, Subject::HostDirect]),
            _ => Subject::ALL
                .into_iter()
                .find(|s| s.name() == name)
                .map(|s| vec![s])
                .ok_or_else(|| PlanError::UnknownBackend(name.to_string())),
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the image lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Storage {
    /// `/dev/shm` (tmpfs: memory only).
    Tmpfs,
    /// A file system on a block device (`--disk-dir`).
    Disk,
}

impl Storage {
    /// Both, in table order.
    pub const ALL: [Storage; 2] = [Storage::Tmpfs, Storage::Disk];

    /// Name in results and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Storage::Tmpfs => "tmpfs",
            Storage::Disk => "disk",
        }
    }

    /// Parses a `--storage` value.
    pub fn parse(name: &str) -> Result<Storage, PlanError> {
        Storage::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| PlanError::UnknownStorage(name.to_string()))
    }
}

impl fmt::Display for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Method settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Settings {
    /// Repetitions of every (scenario, storage, subject).
    pub reps: u32,
    /// Measured seconds per repetition.
    pub seconds: u64,
    /// Unmeasured warm-up seconds before each measurement.
    pub warmup: u64,
    /// Image size in MiB.
    pub image_mib: u64,
    /// Repetitions of the launch-time measurement.
    pub launch_reps: u32,
    /// Whether this is a `--quick` run.
    pub quick: bool,
}

impl Settings {
    /// Defaults for a full or a quick run.
    pub fn defaults(quick: bool) -> Settings {
        if quick {
            Settings {
                reps: 2,
                seconds: 2,
                warmup: 1,
                image_mib: 256,
                launch_reps: 5,
                quick,
            }
        } else {
            Settings {
                reps: 5,
                seconds: 5,
                warmup: 1,
                image_mib: 1024,
                launch_reps: 20,
                quick,
            }
        }
    }

    /// Checks counts and durations.
    pub fn check(&self) -> Result<(), PlanError> {
        if self.reps == 0 {
            return Err(PlanError::Zero("--reps"));
        }
        if self.seconds == 0 {
            return Err(PlanError::Zero("--seconds"));
        }
        if self.image_mib == 0 {
            return Err(PlanError::Zero("--image-mib"));
        }
        Ok(())
    }
}

/// Everything a run does.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Scenarios in order.
    pub scenarios: Vec<Scenario>,
    /// Subjects in table order.
    pub subjects: Vec<Subject>,
    /// Storage kinds.
    pub storages: Vec<Storage>,
    /// Method settings.
    pub settings: Settings,
    /// Whether to measure the core's launch time and memory overhead.
    pub core_costs: bool,
    /// Folder for the disk image.
    pub disk_dir: PathBuf,
}

/// Picks scenarios by name (none given: the default set for the run kind).
pub fn select_scenarios(names: &[String], quick: bool) -> Result<Vec<Scenario>, PlanError> {
    if names.is_empty() {
        return Ok(SCENARIOS
            .iter()
            .filter(|s| s.quick || !quick)
            .copied()
            .collect());
    }
    names
        .iter()
        .map(|n| {
            SCENARIOS
                .iter()
                .find(|s| s.name == n)
                .copied()
                .ok_or_else(|| PlanError::UnknownScenario(n.clone()))
        })
        .collect()
}

/// Picks subjects by name (none given: all), in table order, without duplicates.
pub fn select_subjects(names: &[String]) -> Result<Vec<Subject>, PlanError> {
    if names.is_empty() {
        return Ok(Subject::ALL.to_vec());
    }
    let mut wanted = Vec::new();
    for name in names {
        wanted.extend(Subject::parse(name)?);
    }
    Ok(Subject::ALL
        .into_iter()
        .filter(|s| wanted.contains(s))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_selection_and_names() {
        let quick = select_scenarios(&[], true).unwrap();
        assert_eq!(quick.len(), 5);
        assert!(quick.iter().all(|s| !s.irq));
        assert_eq!(select_scenarios(&[], false).unwrap().len(), SCENARIOS.len());
        let one = select_scenarios(&["read-128k-qd8".into()], true).unwrap();
        assert_eq!((one[0].bs, one[0].qd, one[0].rw), (131072, 8, "read"));
        assert_eq!(
            select_scenarios(&["nope".into()], false),
            Err(PlanError::UnknownScenario("nope".into()))
        );
    }

    #[test]
    fn subjects_in_table_order() {
        let picked = select_subjects(&["host".into(), "plexvm-blk".into()]).unwrap();
        assert_eq!(
            picked,
            [Subject::PlexvmBlk, Subject::Host, Subject::HostDirect]
        );
        assert!(select_subjects(&["qemu".into()]).is_err());
        assert_eq!(Subject::PlexvmBlkDirect.ceiling(), Subject::HostDirect);
        assert_eq!(Subject::PlexvmBlk.reference(), Subject::Qsd);
        for subject in Subject::ALL {
            assert_eq!(
                serde_json::to_value(subject).unwrap(),
                serde_json::json!(subject.name())
            );
        }
        assert_eq!(serde_json::to_value(Storage::Tmpfs).unwrap(), "tmpfs");
    }

    #[test]
    fn pattern_properties() {
        let s = |rw| scenario("x", rw, 4096, 1, false, true);
        assert!(s("randwrite").writes() && s("randwrite").random());
        assert!(!s("read").writes() && !s("read").random());
        assert_eq!(s("mix:70").read_pct(), 70);
        assert_eq!(s("write").read_pct(), 0);
        assert_eq!(s("randread").read_pct(), 100);
    }
}
