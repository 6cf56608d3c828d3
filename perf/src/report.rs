//! The run's outputs: `results.json` (every raw number) and `results.md` (tables with
//! ratios to qemu-storage-daemon and to the host ceiling).

use std::fmt::Write as _;

use serde::Serialize;

use crate::costs::{
    CoreCosts, Launch, FIRECRACKER_LAUNCH_MS, FIRECRACKER_OVERHEAD_MIB, TARGET_LAUNCH_MS,
    TARGET_OVERHEAD_MIB,
};
use crate::machine::Machine;
use crate::plan::{Plan, Scenario, Storage, Subject};
use crate::sample::{Sample, Spread, Summary};

/// One repetition's outcome, in the order it ran.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Scenario name.
    pub scenario: &'static str,
    /// Storage kind.
    pub storage: Storage,
    /// Who served the I/O.
    pub subject: Subject,
    /// Repetition, from 0.
    pub rep: u32,
    /// The measurement, when it succeeded.
    pub sample: Option<Sample>,
    /// Why it failed.
    pub error: Option<String>,
    /// The host's 1-minute load average right after it: other work on the machine
    /// shows up in the numbers.
    pub load1: f64,
}

/// Statistics of one (scenario, storage, subject).
#[derive(Debug, Clone, Serialize)]
pub struct SummaryRow {
    /// Scenario name.
    pub scenario: &'static str,
    /// Storage kind.
    pub storage: Storage,
    /// Who served the I/O.
    pub subject: Subject,
    /// Statistics.
    pub summary: Summary,
    /// Median IOPS over qemu-storage-daemon's (same cache mode).
    pub vs_qsd: Option<f64>,
    /// Median IOPS over the host ceiling's (same cache mode).
    pub vs_ceiling: Option<f64>,
}

/// Everything `results.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// The command line of the run.
    pub command: String,
    /// Local start time.
    pub started: String,
    /// Wall seconds of the whole run.
    pub wall_seconds: f64,
    /// The machine.
    pub machine: Machine,
    /// What was run.
    pub plan: Plan,
    /// Every repetition, in run order.
    pub records: Vec<Record>,
    /// Statistics per (scenario, storage, subject).
    pub summaries: Vec<SummaryRow>,
    /// The core's launch time and memory overhead.
    pub core_costs: Option<CoreCosts>,
}

/// Builds the summary rows with their ratios.
pub fn summarize(plan: &Plan, records: &[Record]) -> Vec<SummaryRow> {
    let mut rows = Vec::new();
    for scenario in &plan.scenarios {
        for &storage in &plan.storages {
            for &subject in &plan.subjects {
                let samples: Vec<&Sample> = records
                    .iter()
                    .filter(|r| {
                        r.scenario == scenario.name && r.storage == storage && r.subject == subject
                    })
                    .filter_map(|r| r.sample.as_ref())
                    .collect();
                rows.push(SummaryRow {
                    scenario: scenario.name,
                    storage,
                    subject,
                    summary: Summary::of(&samples),
                    vs_qsd: None,
                    vs_ceiling: None,
                });
            }
        }
    }
    let median = |rows: &[SummaryRow], s: &str, st: Storage, sub: Subject| {
        rows.iter()
            .find(|r| r.scenario == s && r.storage == st && r.subject == sub && r.summary.reps > 0)
            .map(|r| r.summary.iops.median)
            .filter(|&m| m > 0.0)
    };
    let ratios: Vec<(Option<f64>, Option<f64>)> = rows
        .iter()
        .map(|r| {
            let own = (r.summary.reps > 0).then_some(r.summary.iops.median);
            let vs = |other: Subject| {
                (other != r.subject)
                    .then(|| Some(own? / median(&rows, r.scenario, r.storage, other)?))
                    .flatten()
            };
            (vs(r.subject.reference()), vs(r.subject.ceiling()))
        })
        .collect();
    for (row, (q, c)) in rows.iter_mut().zip(ratios) {
        row.vs_qsd = q;
        row.vs_ceiling = c;
    }
    rows
}

fn find<'a>(
    rows: &'a [SummaryRow],
    scenario: &str,
    storage: Storage,
    subject: Subject,
) -> Option<&'a SummaryRow> {
    rows.iter()
        .find(|r| r.scenario == scenario && r.storage == storage && r.subject == subject)
        .filter(|r| r.summary.reps > 0)
}

/// A rate in thousands above 10k (`448k`), with one decimal from 1k (`4.1k`).
pub(crate) fn kiops(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

fn spread_iops(s: &Spread) -> String {
    format!("{} ({}–{})", kiops(s.median), kiops(s.min), kiops(s.max))
}

fn ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "–".to_string(), |r| format!("{r:.2}×"))
}

fn pct(r: Option<f64>) -> String {
    r.map_or_else(|| "–".to_string(), |r| format!("{:.0} %", r * 100.0))
}

/// The headline table (tmpfs, or the first storage run): one row per scenario.
pub fn headline(results: &Results) -> String {
    let rows = &results.summaries;
    let storage = results
        .plan
        .storages
        .first()
        .copied()
        .unwrap_or(Storage::Tmpfs);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| scenario ({storage}) | plexvm-blk IOPS | qsd IOPS | plexvm-blk / qsd | host ceiling IOPS | plexvm-blk / ceiling | p50 µs plexvm-blk | p50 µs qsd |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for s in &results.plan.scenarios {
        let get = |sub| find(rows, s.name, storage, sub);
        let (p, q, h) = (
            get(Subject::PlexvmBlk),
            get(Subject::Qsd),
            get(Subject::Host),
        );
        let iops =
            |r: Option<&SummaryRow>| r.map_or("–".into(), |r| kiops(r.summary.iops.median));
        let p50 = |r: Option<&SummaryRow>| {
            r.map_or("–".into(), |r| format!("{:.1}", r.summary.p50_us.median))
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            s.name,
            iops(p),
            iops(q),
            ratio(p.and_then(|r| r.vs_qsd)),
            iops(h),
            pct(p.and_then(|r| r.vs_ceiling)),
            p50(p),
            p50(q)
        );
    }
    out
}

/// `results.md`.
pub fn markdown(results: &Results) -> String {
    let mut out = String::new();
    let m = &results.machine;
    let st = &results.plan.settings;
    let _ = writeln!(out, "# plexvm I/O-path benchmark\n");
    let _ = writeln!(
        out,
        "`{}` — started {}, {:.0} s.\n",
        results.command, results.started, results.wall_seconds
    );
    let _ = writeln!(
        out,
        "**Machine:** {} × {} cores, {} MiB, Linux {}; KVM: {}; disk image on {}; {}.\n",
        m.cpu_model,
        m.cores,
        m.memory_mib,
        m.kernel,
        m.kvm,
        m.disk_fs,
        m.qsd_version
            .as_deref()
            .unwrap_or("qemu-storage-daemon not found")
    );
    let _ = writeln!(
        out,
        "**Method:** every scenario runs {} repetitions of {} s measured after {} s warm-up, \
         subjects interleaved (A B C A B C ...) so drift hits all alike; a fresh VM \
         (1 vCPU, 128 MiB, the probe guest) and a fresh backend per repetition; {} MiB image \
         filled with data. Tables show the median and (min–max) over repetitions. Guest \
         numbers are timed in the guest with the TSC (frequency from the hypervisor's CPUID \
         leaf 0x40000010); the host's wall clock timing the same interval (between the \
         probe's `bench go` and `bench stop` serial lines) is the *clock* column (host / \
         guest). The probe polls its used ring and sets no interrupts (`VIRTQ_AVAIL_F_NO_INTERRUPT`, \
         or `used_event` out of reach with EVENT_IDX) except in the `-irq` scenarios, and \
         notifies only when the device's `avail_event` asks for it. The ceiling (`host`) is \
         the same pattern run by `qd` host threads with `pread`/`pwrite` on the same file.\n",
        st.reps, st.seconds, st.warmup, st.image_mib
    );
    let load = Spread::of(results.records.iter().map(|r| r.load1));
    let _ = writeln!(
        out,
        "**Load:** the host's 1-minute load average during the run was {:.1} median \
         ({:.1}–{:.1}) on {} cores; anything above about 2 means other work shared the \
         cores with the VM and its backend.\n",
        load.median, load.min, load.max, m.cores
    );
    let _ = writeln!(out, "## Headline\n\n{}", headline(results));
    targets(&mut out, results);
    for s in &results.plan.scenarios {
        scenario_section(&mut out, results, s);
    }
    if let Some(costs) = &results.core_costs {
        core_costs(&mut out, costs);
    }
    let failed: Vec<&Record> = results
        .records
        .iter()
        .filter(|r| r.error.is_some())
        .collect();
    if !failed.is_empty() {
        let _ = writeln!(out, "## Failed repetitions\n");
        for r in failed {
            let _ = writeln!(
                out,
                "- {} {} {} rep {}: {}",
                r.scenario,
                r.storage,
                r.subject,
                r.rep,
                r.error.as_deref().unwrap_or("")
            );
        }
        out.push('\n');
    }
    out
}

fn scenario_section(out: &mut String, results: &Results, s: &Scenario) {
    let _ = writeln!(
        out,
        "## {}\n\n`probe.rw={} probe.bs={} probe.qd={} probe.irq={}`\n\n![{}]({}.svg)\n",
        s.name,
        s.rw,
        s.bs,
        s.qd,
        if s.irq { "on" } else { "off" },
        s.name,
        s.name
    );
    let _ = writeln!(
        out,
        "| storage | subject | IOPS | MiB/s | p50 µs | p99 µs | vs qsd | vs ceiling | clock (host/guest) |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for row in results.summaries.iter().filter(|r| r.scenario == s.name) {
        let sum = &row.summary;
        if sum.reps == 0 {
            let _ = writeln!(
                out,
                "| {} | {} | failed | | | | | | |",
                row.storage, row.subject
            );
            continue;
        }
        let clock = if row.subject.is_ceiling() {
            "–".to_string()
        } else {
            format!("{:.3}", sum.clock_ratio.median)
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {} | {} | {} |",
            row.storage,
            row.subject,
            spread_iops(&sum.iops),
            sum.mib_s.median,
            sum.p50_us.median,
            sum.p99_us.median,
            ratio(row.vs_qsd),
            pct(row.vs_ceiling),
            clock
        );
    }
    out.push('\n');
}

fn targets(out: &mut String, results: &Results) {
    let rows = &results.summaries;
    let storage = results
        .plan
        .storages
        .first()
        .copied()
        .unwrap_or(Storage::Tmpfs);
    let get = |s: &str, sub| find(rows, s, storage, sub);
    let mut lines = Vec::new();
    if let Some(p) = get("randread-4k-qd32", Subject::PlexvmBlk) {
        if let Some(r) = p.vs_qsd {
            lines.push((
                "plexvm-blk ≥ 1.5× qsd IOPS, 4 KiB randread QD32",
                format!("{r:.2}×"),
                r >= 1.5,
            ));
        }
        if let Some(r) = p.vs_ceiling {
            lines.push((
                "plexvm-blk ≥ 70 % of the host ceiling, QD32",
                format!("{:.0} %", r * 100.0),
                r >= 0.7,
            ));
        }
    }
    if let (Some(p), Some(q)) = (
        get("randread-4k-qd1", Subject::PlexvmBlk),
        get("randread-4k-qd1", Subject::Qsd),
    ) {
        let (a, b) = (p.summary.p50_us.median, q.summary.p50_us.median);
        lines.push((
            "plexvm-blk median latency ≤ qsd's, QD1",
            format!("{a:.1} µs vs {b:.1} µs"),
            a <= b,
        ));
    }
    if let Some(c) = &results.core_costs {
        let l = c.launch_with_blk.first_instruction_ms.median;
        lines.push((
            "launch to first guest instruction ≤ 20 ms (one blk device)",
            format!("{l:.1} ms"),
            l <= TARGET_LAUNCH_MS,
        ));
        let o = c.overhead_mib.median;
        lines.push((
            "core overhead ≤ 3 MiB (1 vCPU, 128 MiB)",
            format!("{o:.2} MiB"),
            o <= TARGET_OVERHEAD_MIB,
        ));
    }
    if lines.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "## Targets ({storage})\n\n| target | measured | met |\n|---|---:|---|"
    );
    for (what, value, met) in lines {
        let _ = writeln!(
            out,
            "| {what} | {value} | {} |",
            if met { "yes" } else { "**no**" }
        );
    }
    out.push('\n');
}

fn launch_row(out: &mut String, what: &str, l: &Launch) {
    let s = |x: &Spread| format!("{:.1} ({:.1}–{:.1})", x.median, x.min, x.max);
    let _ = writeln!(
        out,
        "| {what} | {} | {} | {:.2} | {FIRECRACKER_LAUNCH_MS:.0} ms (to guest init) |",
        s(&l.first_instruction_ms),
        s(&l.first_line_ms),
        l.serial_us_per_byte.median
    );
}

fn core_costs(out: &mut String, c: &CoreCosts) {
    let _ = writeln!(
        out,
        "## Core costs\n\nLaunch: from spawning `plexvm run` to the probe's first instruction \
         (ms, median (min–max)); estimated as the arrival of the probe's first serial line \
         minus that line's serial cost (µs per byte, measured from the second line).\n"
    );
    let _ = writeln!(
        out,
        "| VM | first instruction ms | first serial line ms | serial µs/byte | Firecracker (published) |\n|---|---:|---:|---:|---|"
    );
    launch_row(out, "no devices", &c.launch_no_device);
    launch_row(out, "one plexvm-blk device", &c.launch_with_blk);
    let mem = c.memory.first().copied().unwrap_or_default();
    let _ = writeln!(
        out,
        "\nMemory of the core process (1 vCPU, 128 MiB, plexvm-blk, sampled at `bench go`): \
         overhead = VmRSS − RssShmem (guest RAM is a memfd) = **{:.2} MiB** median \
         ({:.2}–{:.2}); RssAnon {:.2} MiB. First sample: VmRSS {} KiB = RssAnon {} + RssFile {} \
         + RssShmem {} KiB. Firecracker publishes ≤ {FIRECRACKER_OVERHEAD_MIB:.0} MiB.\n",
        c.overhead_mib.median,
        c.overhead_mib.min,
        c.overhead_mib.max,
        c.anon_mib.median,
        mem.rss_kib,
        mem.anon_kib,
        mem.file_kib,
        mem.shmem_kib
    );
}
