//! `plexvm-perf net`: runs the net-echo scenarios through each switch, interleaved
//! (A B A B), and writes `net.json` (every repetition) and `net.md` (medians, ranges,
//! the ratio to testpmd and the targets).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::machine::Machine;
use crate::net_bench::{self, NetBinaries, NetSample, NetScenario, NetSubject};
use crate::report::kiops;
use crate::sample::Spread;
use crate::{chain, load_average, program_in, progress};

/// What a net run does.
#[derive(Debug, Clone, Serialize)]
pub struct NetPlan {
    /// Scenarios in order.
    pub scenarios: Vec<NetScenario>,
    /// Switches in table order.
    pub subjects: Vec<NetSubject>,
    /// Repetitions of every (scenario, switch).
    pub reps: u32,
    /// Measured seconds per repetition.
    pub seconds: u64,
    /// Warm-up seconds before each.
    pub warmup: u64,
}

/// One repetition, in run order.
#[derive(Debug, Clone, Serialize)]
pub struct NetRecord {
    /// Scenario name.
    pub scenario: &'static str,
    /// The switch.
    pub subject: NetSubject,
    /// Repetition, from 0.
    pub rep: u32,
    /// The numbers, when it worked.
    pub sample: Option<NetSample>,
    /// Why it failed.
    pub error: Option<String>,
    /// 1-minute load average right after it.
    pub load1: f64,
}

/// Statistics of one (scenario, switch).
#[derive(Debug, Clone, Serialize)]
pub struct NetSummary {
    /// Scenario name.
    pub scenario: &'static str,
    /// The switch.
    pub subject: NetSubject,
    /// Repetitions with a sample.
    pub reps: usize,
    /// Frames per second (echoed).
    pub pps: Spread,
    /// Mbit/s of frames, one direction.
    pub mbit_s: Spread,
    /// Median round trip, µs.
    pub rtt_p50_us: Spread,
    /// 99th percentile round trip, µs.
    pub rtt_p99_us: Spread,
    /// Lost frames, all repetitions.
    pub lost: u64,
    /// Host over guest time of the measured interval.
    pub clock_ratio: Spread,
    /// Median pps over testpmd's median pps in the same scenario.
    pub vs_testpmd: Option<f64>,
}

/// Everything `net.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct NetResults {
    /// Command line.
    pub command: String,
    /// Local start time.
    pub started: String,
    /// Wall seconds of the run.
    pub wall_seconds: f64,
    /// The machine.
    pub machine: Machine,
    /// What ran.
    pub plan: NetPlan,
    /// Every repetition.
    pub records: Vec<NetRecord>,
    /// Per (scenario, switch).
    pub summaries: Vec<NetSummary>,
}

/// Runs `plan` and writes `net.json` and `net.md` into `out`.
pub fn run(
    plan: &NetPlan,
    bins: &NetBinaries,
    out: &Path,
    command: String,
) -> std::io::Result<NetResults> {
    let started = chrono::Local::now()
        .format("%Y-%m-%d %H:%M:%S %Z")
        .to_string();
    let clock = Instant::now();
    std::fs::create_dir_all(out)?;
    let work = out.join("net-work");
    let machine = Machine::probe(Path::new("/tmp"), Path::new("qemu-storage-daemon"));
    let total = plan.scenarios.len() * plan.reps as usize * plan.subjects.len();
    let mut records = Vec::with_capacity(total);
    for scenario in &plan.scenarios {
        for rep in 0..plan.reps {
            for &subject in &plan.subjects {
                let _ = std::fs::remove_dir_all(&work);
                std::fs::create_dir_all(&work)?;
                let result =
                    net_bench::run(bins, &work, scenario, subject, plan.seconds, plan.warmup);
                progress(&format!(
                    "[{}/{total}] {} {subject} rep {}/{}: {}",
                    records.len() + 1,
                    scenario.name,
                    rep + 1,
                    plan.reps,
                    match &result {
                        Ok(s) => format!(
                            "{:.0} pps, {:.0} Mbit/s, rtt p50 {:.1} µs, lost {}",
                            s.pps, s.mbit_s, s.rtt_p50_us, s.lost
                        ),
                        Err(e) => format!("FAILED: {}", chain(e)),
                    }
                ));
                let (sample, error) = match result {
                    Ok(s) => (Some(s), None),
                    Err(e) => (None, Some(chain(&e))),
                };
                records.push(NetRecord {
                    scenario: scenario.name,
                    subject,
                    rep,
                    sample,
                    error,
                    load1: load_average(),
                });
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    let results = NetResults {
        command,
        started,
        wall_seconds: clock.elapsed().as_secs_f64(),
        machine,
        plan: plan.clone(),
        summaries: summarize(plan, &records),
        records,
    };
    std::fs::write(out.join("net.json"), serde_json::to_vec_pretty(&results)?)?;
    std::fs::write(out.join("net.md"), markdown(&results))?;
    Ok(results)
}

/// Statistics per (scenario, switch), with the ratio to testpmd.
pub fn summarize(plan: &NetPlan, records: &[NetRecord]) -> Vec<NetSummary> {
    let mut rows: Vec<NetSummary> = Vec::new();
    for scenario in &plan.scenarios {
        for &subject in &plan.subjects {
            let samples: Vec<&NetSample> = records
                .iter()
                .filter(|r| r.scenario == scenario.name && r.subject == subject)
                .filter_map(|r| r.sample.as_ref())
                .collect();
            let spread = |f: fn(&NetSample) -> f64| Spread::of(samples.iter().map(|s| f(s)));
            rows.push(NetSummary {
                scenario: scenario.name,
                subject,
                reps: samples.len(),
                pps: spread(|s| s.pps),
                mbit_s: spread(|s| s.mbit_s),
                rtt_p50_us: spread(|s| s.rtt_p50_us),
                rtt_p99_us: spread(|s| s.rtt_p99_us),
                lost: samples.iter().map(|s| s.lost).sum(),
                clock_ratio: spread(|s| s.clock_ratio),
                vs_testpmd: None,
            });
        }
    }
    let testpmd: Vec<(&'static str, f64)> = rows
        .iter()
        .filter(|r| r.subject == NetSubject::Testpmd && r.reps > 0 && r.pps.median > 0.0)
        .map(|r| (r.scenario, r.pps.median))
        .collect();
    for row in rows.iter_mut().filter(|r| r.reps > 0) {
        row.vs_testpmd = testpmd
            .iter()
            .find(|(s, _)| *s == row.scenario)
            .map(|(_, pps)| row.pps.median / pps);
    }
    rows
}

fn find<'a>(rows: &'a [NetSummary], scenario: &str, subject: NetSubject) -> Option<&'a NetSummary> {
    rows.iter()
        .find(|r| r.scenario == scenario && r.subject == subject && r.reps > 0)
}

/// The headline: one row per scenario, plexvm-net beside testpmd.
pub fn headline(results: &NetResults) -> String {
    let mut out = String::from(
        "| scenario | plexvm-net pps | testpmd pps | plexvm-net / testpmd | RTT p50 µs plexvm-net | RTT p50 µs testpmd |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for s in &results.plan.scenarios {
        let p = find(&results.summaries, s.name, NetSubject::PlexvmNet);
        let t = find(&results.summaries, s.name, NetSubject::Testpmd);
        let pps = |r: Option<&NetSummary>| r.map_or("–".into(), |r| kiops(r.pps.median));
        let rtt = |r: Option<&NetSummary>| {
            r.map_or("–".into(), |r| format!("{:.1}", r.rtt_p50_us.median))
        };
        let ratio = p
            .and_then(|r| r.vs_testpmd)
            .map_or("–".into(), |v| format!("{v:.2}×"));
        let _ = writeln!(
            out,
            "| {} (size {} B, window {}) | {} | {} | {} | {} | {} |",
            s.name,
            s.size,
            s.window,
            pps(p),
            pps(t),
            ratio,
            rtt(p),
            rtt(t)
        );
    }
    out
}

/// `net.md`.
pub fn markdown(results: &NetResults) -> String {
    let m = &results.machine;
    let plan = &results.plan;
    let loads = Spread::of(results.records.iter().map(|r| r.load1));
    let mut out = String::new();
    let _ = writeln!(out, "# plexvm network I/O path: net-echo\n");
    let _ = writeln!(
        out,
        "`{}` — started {}, {:.0} s.\n",
        results.command, results.started, results.wall_seconds
    );
    let _ = writeln!(
        out,
        "**Machine:** {} × {} cores, {} MiB, Linux {}; KVM: {}.\n",
        m.cpu_model, m.cores, m.memory_mib, m.kernel, m.kvm
    );
    let _ = writeln!(
        out,
        "**Method:** two probe VMs (1 vCPU, {} MiB each) on one switch: the sender keeps \
         `window` numbered frames in flight, the echo VM swaps the MAC addresses and sends \
         each frame back; the sender checks every frame's payload and times each round trip \
         with its TSC. Switches: plexvm-net with two `--socket` ports, and `dpdk-testpmd \
         --forward-mode=io` between two vhost PMD ports (no hugepages, one forwarding lcore \
         that busy-polls). {} repetitions of {} s after {} s warm-up, switches interleaved; \
         median and (min–max). *clock* is the host's wall time of the measured interval over \
         the guest's.\n",
        net_bench::MEMORY_MIB,
        plan.reps,
        plan.seconds,
        plan.warmup
    );
    let _ = writeln!(
        out,
        "**Load:** 1-minute load average {:.1} median ({:.1}–{:.1}) on {} cores; the two \
         vCPUs poll, so above about 2 the guests, the switch and anything else share cores.\n",
        loads.median, loads.min, loads.max, m.cores
    );
    let _ = writeln!(out, "## Headline\n\n{}", headline(results));
    targets(&mut out, results);
    details(&mut out, results);
    out
}

fn targets(out: &mut String, results: &NetResults) {
    let rows = &results.summaries;
    let _ = writeln!(
        out,
        "## Targets (issue 5)\n\n| target | measured | met |\n|---|---:|---|"
    );
    for s in results.plan.scenarios.iter().filter(|s| s.window > 1) {
        if let Some(v) = find(rows, s.name, NetSubject::PlexvmNet).and_then(|r| r.vs_testpmd) {
            let _ = writeln!(
                out,
                "| plexvm-net ≥ 0.8× testpmd's packet rate, {} | {v:.2}× | {} |",
                s.name,
                if v >= 0.8 { "yes" } else { "**no**" }
            );
        }
    }
    for s in results.plan.scenarios.iter().filter(|s| s.window == 1) {
        let p = find(rows, s.name, NetSubject::PlexvmNet);
        let t = find(rows, s.name, NetSubject::Testpmd);
        if let (Some(p), Some(t)) = (p, t) {
            let (a, b) = (p.rtt_p50_us.median, t.rtt_p50_us.median);
            let _ = writeln!(
                out,
                "| plexvm-net round trip below testpmd's at low load, {} | {a:.1} µs vs {b:.1} µs | {} |",
                s.name,
                if a < b { "yes" } else { "**no**" }
            );
        }
    }
    out.push('\n');
}

fn details(out: &mut String, results: &NetResults) {
    let _ = writeln!(
        out,
        "## All numbers\n\n| scenario | switch | pps | Mbit/s | RTT p50 µs | RTT p99 µs | lost | clock |\n|---|---|---:|---:|---:|---:|---:|---:|"
    );
    for r in &results.summaries {
        if r.reps == 0 {
            let _ = writeln!(out, "| {} | {} | failed | | | | | |", r.scenario, r.subject);
            continue;
        }
        let _ = writeln!(
            out,
            "| {} | {} | {} ({}–{}) | {:.0} | {:.1} ({:.1}–{:.1}) | {:.1} | {} | {:.3} |",
            r.scenario,
            r.subject,
            kiops(r.pps.median),
            kiops(r.pps.min),
            kiops(r.pps.max),
            r.mbit_s.median,
            r.rtt_p50_us.median,
            r.rtt_p50_us.min,
            r.rtt_p50_us.max,
            r.rtt_p99_us.median,
            r.lost,
            r.clock_ratio.median
        );
    }
    let failures: Vec<&NetRecord> = results
        .records
        .iter()
        .filter(|r| r.error.is_some())
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "\n## Failed repetitions\n");
        for r in failures {
            let _ = writeln!(
                out,
                "- {} {} rep {}: {}",
                r.scenario,
                r.subject,
                r.rep + 1,
                r.error.as_deref().unwrap_or("")
            );
        }
    }
}

/// Finds `plexvm` and `plexvm-net` in `dir`.
pub fn find_binaries(dir: &Path, testpmd: PathBuf) -> Result<NetBinaries, PathBuf> {
    Ok(NetBinaries {
        plexvm: program_in(dir, "plexvm")?,
        plexvm_net: program_in(dir, "plexvm-net")?,
        testpmd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net_bench::NET_SCENARIOS;

    fn sample(pps: f64, rtt: f64) -> NetSample {
        NetSample {
            pps,
            mbit_s: pps * 64.0 * 8.0 / 1e6,
            rtt_p50_us: rtt,
            rtt_p99_us: rtt * 2.0,
            sent: 10,
            echoed: 10,
            lost: 0,
            clock_ratio: 1.0,
        }
    }

    #[test]
    fn ratios_and_targets() {
        let plan = NetPlan {
            scenarios: NET_SCENARIOS[..2].to_vec(),
            subjects: NetSubject::ALL.to_vec(),
            reps: 1,
            seconds: 1,
            warmup: 0,
        };
        let rec = |scenario, subject, s: Option<NetSample>| NetRecord {
            scenario,
            subject,
            rep: 0,
            error: s.is_none().then(|| "boom".to_string()),
            sample: s,
            load1: 1.0,
        };
        let records = vec![
            rec(
                "rtt-64",
                NetSubject::PlexvmNet,
                Some(sample(50_000.0, 10.0)),
            ),
            rec("rtt-64", NetSubject::Testpmd, Some(sample(40_000.0, 20.0))),
            rec(
                "pps-64",
                NetSubject::PlexvmNet,
                Some(sample(90_000.0, 30.0)),
            ),
            rec("pps-64", NetSubject::Testpmd, None),
        ];
        let rows = summarize(&plan, &records);
        assert_eq!(rows[0].vs_testpmd, Some(1.25));
        assert_eq!(rows[2].vs_testpmd, None);
        assert_eq!(rows[3].reps, 0);
        let results = NetResults {
            command: "plexvm-perf net".into(),
            started: "now".into(),
            wall_seconds: 1.0,
            machine: Machine::probe(Path::new("/tmp"), Path::new("/nonexistent")),
            plan,
            records,
            summaries: rows,
        };
        let md = markdown(&results);
        assert!(
            md.contains("| rtt-64 (size 64 B, window 1) | 50k | 40k | 1.25× | 10.0 | 20.0 |"),
            "{md}"
        );
        assert!(md.contains("10.0 µs vs 20.0 µs | yes"), "{md}");
        assert!(md.contains("| pps-64 | testpmd | failed"), "{md}");
        assert!(md.contains("pps-64 testpmd rep 1: boom"), "{md}");
    }
}
