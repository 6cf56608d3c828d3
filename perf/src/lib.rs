//! plexvm's I/O-path benchmark harness.
//!
//! `plexvm-perf run` starts VMs running the probe guest's `blk-bench` workload
//! against each block backend (plexvm-blk, with and without `--direct`, and
//! qemu-storage-daemon's vhost-user-blk export), on the same image in tmpfs and on
//! disk, runs the same access pattern directly on the host as the ceiling, and
//! measures the core's own launch time and memory overhead. Repetitions are
//! interleaved; the outputs are `results.json`, `results.md` and one SVG chart per
//! scenario.
//!
//! `plexvm-perf net` does the same for the network path: two probe VMs running the
//! `net-echo` workload through plexvm-net and through `dpdk-testpmd` (`net.json`,
//! `net.md`).

pub mod ceiling;
pub mod chart;
pub mod containers;
pub mod costs;
pub mod guest;
pub mod image;
pub mod machine;
pub mod net_bench;
pub mod net_report;
pub mod plan;
pub mod process;
pub mod report;
pub mod sample;
pub mod vm_bench;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::image::Image;
use crate::machine::Machine;
use crate::plan::{Plan, PlanError, Scenario, Storage, Subject};
use crate::report::{Record, Results};
use crate::sample::Sample;
use crate::vm_bench::Binaries;

/// Errors that end a run (a failing repetition is recorded instead).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad selection or settings.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// A program the harness needs is missing.
    #[error("{0} not found: build it first (`cargo build --release -p plexvm -p plexvm-blk -p plexvm-perf`) or pass --bin-dir")]
    MissingBinary(PathBuf),
    /// Output or image files.
    #[error("{path}: {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Serialising results.
    #[error("cannot encode results.json")]
    Json(#[from] serde_json::Error),
    /// A chart.
    #[error(transparent)]
    Chart(#[from] chart::ChartError),
    /// The core-cost measurement failed.
    #[error("core costs")]
    Costs(#[source] guest::GuestError),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RunError + 'a {
    move |source| RunError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A run's inputs besides the plan.
#[derive(Debug, Clone)]
pub struct RunSetup {
    /// The plan.
    pub plan: Plan,
    /// Output folder.
    pub out: PathBuf,
    /// Programs.
    pub bins: Binaries,
    /// The command line, for the record.
    pub command: String,
}

/// The program `name` in `dir`, as an absolute path (the core resolves a relative
/// `exec` against the spec's folder); the path looked at when it is not there.
pub fn program_in(dir: &Path, name: &str) -> Result<PathBuf, PathBuf> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(path)
    }
}

/// Finds `plexvm` and `plexvm-blk` in `dir`.
pub fn find_binaries(dir: &Path, qsd: PathBuf) -> Result<Binaries, RunError> {
    let get = |name| program_in(dir, name).map_err(RunError::MissingBinary);
    Ok(Binaries {
        plexvm: get("plexvm")?,
        plexvm_blk: get("plexvm-blk")?,
        qsd,
    })
}

/// Runs the plan and writes the outputs into `setup.out`; returns the results.
pub fn run(setup: &RunSetup) -> Result<Results, RunError> {
    let started = chrono::Local::now()
        .format("%Y-%m-%d %H:%M:%S %Z")
        .to_string();
    let clock = Instant::now();
    let plan = &setup.plan;
    let out = &setup.out;
    std::fs::create_dir_all(out).map_err(io_err("cannot create the output folder", out))?;
    let work = out.join("work");
    std::fs::create_dir_all(&work).map_err(io_err("cannot create the work folder", &work))?;
    let machine = Machine::probe(&plan.disk_dir, &setup.bins.qsd);
    progress(&format!(
        "machine: {} × {}, Linux {}, KVM {}",
        machine.cpu_model, machine.cores, machine.kernel, machine.kvm
    ));
    let images = create_images(plan)?;
    let records = run_matrix(setup, &work, &images);
    let core_costs = if plan.core_costs {
        let image = images[0].1.path();
        let reps = plan.settings.launch_reps.max(1);
        Some(costs::measure(&setup.bins, &work, image, reps, progress).map_err(RunError::Costs)?)
    } else {
        None
    };
    drop(images);
    let summaries = report::summarize(plan, &records);
    let results = Results {
        command: setup.command.clone(),
        started,
        wall_seconds: clock.elapsed().as_secs_f64(),
        machine,
        plan: plan.clone(),
        records,
        summaries,
        core_costs,
    };
    write_outputs(out, &results)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(results)
}

fn create_images(plan: &Plan) -> Result<Vec<(Storage, Image)>, RunError> {
    let mut images = Vec::new();
    for &storage in &plan.storages {
        let dir = match storage {
            Storage::Tmpfs => PathBuf::from("/dev/shm"),
            Storage::Disk => plan.disk_dir.clone(),
        };
        let path = dir.join(format!("plexvm-perf-{}-{storage}.img", std::process::id()));
        progress(&format!(
            "creating {} MiB image {}",
            plan.settings.image_mib,
            path.display()
        ));
        let image = Image::create(&path, plan.settings.image_mib)
            .map_err(io_err("cannot create the image", &path))?;
        images.push((storage, image));
    }
    Ok(images)
}

/// Runs every repetition, interleaving subjects and storages within each round.
fn run_matrix(setup: &RunSetup, work: &Path, images: &[(Storage, Image)]) -> Vec<Record> {
    let plan = &setup.plan;
    let total =
        plan.scenarios.len() * plan.settings.reps as usize * images.len() * plan.subjects.len();
    let start = Instant::now();
    let mut records = Vec::with_capacity(total);
    for scenario in &plan.scenarios {
        for rep in 0..plan.settings.reps {
            for (storage, image) in images {
                for &subject in &plan.subjects {
                    let result = measure(setup, work, scenario, subject, image.path());
                    let done = records.len() + 1;
                    let eta = start.elapsed().as_secs_f64() / done as f64 * (total - done) as f64;
                    progress(&format!(
                        "[{done}/{total}] {} {storage} {subject} rep {}/{}: {} (eta {:.0} s)",
                        scenario.name,
                        rep + 1,
                        plan.settings.reps,
                        match &result {
                            Ok(s) => format!(
                                "{:.0} IOPS, {:.1} MiB/s, p50 {:.1} µs",
                                s.iops,
                                s.mib_s,
                                s.lat_ns.p50 as f64 / 1000.0
                            ),
                            Err(e) => format!("FAILED: {e}"),
                        },
                        eta
                    ));
                    let (sample, error) = match result {
                        Ok(s) => (Some(s), None),
                        Err(e) => (None, Some(e)),
                    };
                    records.push(Record {
                        scenario: scenario.name,
                        storage: *storage,
                        subject,
                        rep,
                        sample,
                        error,
                        load1: load_average(),
                    });
                }
            }
        }
    }
    records
}

/// The 1-minute load average (0 when unreadable).
pub(crate) fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// One repetition; the error is the message chain.
fn measure(
    setup: &RunSetup,
    work: &Path,
    scenario: &Scenario,
    subject: Subject,
    image: &Path,
) -> Result<Sample, String> {
    let settings = &setup.plan.settings;
    if subject.is_ceiling() {
        ceiling::run(
            image,
            scenario,
            subject.direct(),
            settings.warmup,
            settings.seconds,
        )
        .map_err(|e| chain(&e))
    } else {
        vm_bench::run(&setup.bins, work, scenario, settings, subject, image).map_err(|e| chain(&e))
    }
}

/// An error and its sources on one line.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn write_outputs(out: &Path, results: &Results) -> Result<(), RunError> {
    let json = out.join("results.json");
    let text = serde_json::to_string_pretty(results)?;
    std::fs::write(&json, text).map_err(io_err("cannot write", &json))?;
    let md = out.join("results.md");
    std::fs::write(&md, report::markdown(results)).map_err(io_err("cannot write", &md))?;
    for scenario in &results.plan.scenarios {
        let rows: Vec<_> = results
            .summaries
            .iter()
            .filter(|r| r.scenario == scenario.name)
            .cloned()
            .collect();
        let title = format!(
            "{} ({} B, QD{}, {})",
            scenario.name, scenario.bs, scenario.qd, scenario.rw
        );
        chart::draw(&out.join(format!("{}.svg", scenario.name)), &title, &rows)?;
    }
    Ok(())
}

/// A progress line on stderr.
pub fn progress(line: &str) {
    eprintln!("plexvm-perf: {line}");
}
