//! `plexvm-perf`: the I/O-path benchmark harness (see the crate README).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use plexvm_perf::plan::{self, Plan, Settings, Storage, SCENARIOS};
use plexvm_perf::{find_binaries, RunSetup};

/// plexvm's I/O-path benchmark harness: backends side by side, against the host's own limit.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the benchmarks and write results.json, results.md and one SVG per scenario.
    Run(Box<RunArgs>),
    /// Container start-up: `run` of /bin/true, plexvm-shim against runc.
    Containers(ContainersArgs),
    /// Network path: two probe VMs exchanging frames through plexvm-net and dpdk-testpmd.
    Net(NetArgs),
    /// List the scenarios and backends.
    List,
}

#[derive(Debug, Args)]
struct ContainersArgs {
    /// Measured runs per runtime.
    #[arg(long, default_value_t = 100)]
    runs: u32,
    /// Unmeasured runs first.
    #[arg(long, default_value_t = 5)]
    warmup: u32,
    /// Runtimes to compare; the last is the baseline (default: plexvm-shim next to this
    /// program, then runc from PATH).
    #[arg(long = "runtime", value_name = "PATH")]
    runtimes: Vec<PathBuf>,
    /// Output folder for containers.md and containers.json (default perf/out/<timestamp>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

fn containers(args: ContainersArgs) -> Result<()> {
    let runtimes = if args.runtimes.is_empty() {
        vec![this_dir()?.join("plexvm-shim"), PathBuf::from("runc")]
    } else {
        args.runtimes
    };
    let results = plexvm_perf::containers::measure(&runtimes, args.runs, args.warmup)?;
    let m =
        plexvm_perf::machine::Machine::probe(Path::new("/tmp"), Path::new("qemu-storage-daemon"));
    let machine = format!(
        "Machine: {}, {} cores, {} MiB, kernel {}, load average at start: {}",
        m.cpu_model,
        m.cores,
        m.memory_mib,
        m.kernel,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let md = plexvm_perf::containers::markdown(&results, &machine);
    let out = args.out.unwrap_or_else(default_out);
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("containers.md"), &md)?;
    std::fs::write(
        out.join("containers.json"),
        serde_json::to_vec_pretty(&results)?,
    )?;
    println!("{md}");
    Ok(())
}

#[derive(Debug, Args)]
struct NetArgs {
    /// Fewer repetitions and shorter runs.
    #[arg(long)]
    quick: bool,
    /// Scenario (repeatable): rtt-64, pps-64, pps-1500. Default: all.
    #[arg(long = "scenario", value_name = "NAME")]
    scenarios: Vec<String>,
    /// Switch (repeatable): plexvm-net, testpmd. Default: both.
    #[arg(long = "backend", value_name = "NAME")]
    backends: Vec<String>,
    /// Repetitions (default 5, --quick 2).
    #[arg(long)]
    reps: Option<u32>,
    /// Measured seconds per repetition (default 5, --quick 2).
    #[arg(long)]
    seconds: Option<u64>,
    /// Warm-up seconds (default 1).
    #[arg(long)]
    warmup: Option<u64>,
    /// Output folder for net.md and net.json (default perf/out/<timestamp>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Folder holding plexvm and plexvm-net (default: this program's folder).
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// dpdk-testpmd program (Debian package dpdk-dev).
    #[arg(long, value_name = "PATH", default_value = "dpdk-testpmd")]
    testpmd: PathBuf,
}

fn this_dir() -> Result<PathBuf> {
    Ok(std::env::current_exe()
        .context("cannot find this program's path")?
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default())
}

fn net(args: NetArgs) -> Result<()> {
    use plexvm_perf::{net_bench, net_report};
    let plan = net_report::NetPlan {
        scenarios: net_bench::select_scenarios(&args.scenarios)?,
        subjects: net_bench::select_subjects(&args.backends)?,
        reps: args.reps.unwrap_or(if args.quick { 2 } else { 5 }),
        seconds: args.seconds.unwrap_or(if args.quick { 2 } else { 5 }),
        warmup: args.warmup.unwrap_or(1),
    };
    anyhow::ensure!(
        plan.reps > 0 && plan.seconds > 0,
        "--reps and --seconds must be at least 1"
    );
    let dir = match args.bin_dir {
        Some(d) => d,
        None => this_dir()?,
    };
    let bins = net_report::find_binaries(&dir, args.testpmd).map_err(|p| {
        anyhow::anyhow!(
            "{} not found: build it first (`cargo build --release -p plexvm -p plexvm-net -p plexvm-perf`) or pass --bin-dir",
            p.display()
        )
    })?;
    let out = args.out.unwrap_or_else(default_out);
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let results = net_report::run(&plan, &bins, &out, command)
        .with_context(|| format!("cannot write results into {}", out.display()))?;
    let failed = results.records.iter().filter(|r| r.error.is_some()).count();
    eprintln!(
        "plexvm-perf: wrote {}/net.json and net.md ({failed} failed repetitions)",
        out.display()
    );
    println!("{}", net_report::headline(&results));
    Ok(())
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Fewer repetitions, shorter runs, a smaller image (under 5 minutes).
    #[arg(long)]
    quick: bool,
    /// Scenario to run (repeatable; default: all, or the quick set with --quick).
    #[arg(long = "scenario", value_name = "NAME")]
    scenarios: Vec<String>,
    /// Backend to measure (repeatable): plexvm-blk, plexvm-blk-direct, plexvm-blk-pci (the disk on virtio-pci), qsd, qsd-direct,
    /// host (the ceiling; also host-direct). Default: all.
    #[arg(long = "backend", value_name = "NAME")]
    backends: Vec<String>,
    /// Storage for the image (repeatable): tmpfs, disk. Default: both (--quick: tmpfs).
    #[arg(long = "storage", value_name = "NAME")]
    storages: Vec<String>,
    /// Output folder (default perf/out/<timestamp>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Repetitions (default 5, --quick 2).
    #[arg(long)]
    reps: Option<u32>,
    /// Measured seconds per repetition (default 5, --quick 2).
    #[arg(long)]
    seconds: Option<u64>,
    /// Warm-up seconds before each measurement (default 1).
    #[arg(long)]
    warmup: Option<u64>,
    /// Image size in MiB (default 1024, --quick 256).
    #[arg(long, value_name = "MIB")]
    image_mib: Option<u64>,
    /// Repetitions of the launch-time measurement (default 20, --quick 5; 0 skips the
    /// core-cost measurements).
    #[arg(long, value_name = "N")]
    launch_reps: Option<u32>,
    /// Folder holding plexvm and plexvm-blk (default: this program's folder).
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// qemu-storage-daemon program.
    #[arg(long, value_name = "PATH", default_value = "qemu-storage-daemon")]
    qsd: PathBuf,
    /// Folder for the on-disk image.
    #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
    disk_dir: PathBuf,
}

fn settings(args: &RunArgs) -> Settings {
    let mut s = Settings::defaults(args.quick);
    s.reps = args.reps.unwrap_or(s.reps);
    s.seconds = args.seconds.unwrap_or(s.seconds);
    s.warmup = args.warmup.unwrap_or(s.warmup);
    s.image_mib = args.image_mib.unwrap_or(s.image_mib);
    s.launch_reps = args.launch_reps.unwrap_or(s.launch_reps);
    s
}

fn default_out() -> PathBuf {
    let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S").to_string();
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("out")
        .join(stamp)
}

fn run(args: RunArgs) -> Result<()> {
    let settings = settings(&args);
    settings.check()?;
    let storages = if args.storages.is_empty() && args.quick {
        vec![Storage::Tmpfs]
    } else if args.storages.is_empty() {
        Storage::ALL.to_vec()
    } else {
        args.storages
            .iter()
            .map(|s| Storage::parse(s))
            .collect::<Result<_, _>>()?
    };
    let plan = Plan {
        scenarios: plan::select_scenarios(&args.scenarios, args.quick)?,
        subjects: plan::select_subjects(&args.backends)?,
        storages,
        core_costs: settings.launch_reps > 0,
        settings,
        disk_dir: args.disk_dir.clone(),
    };
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => this_dir()?,
    };
    let bins = find_binaries(&bin_dir, args.qsd.clone())?;
    let out = args.out.clone().unwrap_or_else(default_out);
    let setup = RunSetup {
        plan,
        out: out.clone(),
        bins,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    let results = plexvm_perf::run(&setup)?;
    let failed = results.records.iter().filter(|r| r.error.is_some()).count();
    eprintln!(
        "plexvm-perf: wrote {}/results.json, results.md and {} charts ({failed} failed repetitions)",
        out.display(),
        results.plan.scenarios.len()
    );
    println!("{}", plexvm_perf::report::headline(&results));
    Ok(())
}

fn list() {
    println!("scenarios (* = in --quick):");
    for s in SCENARIOS {
        println!(
            "  {:<22} rw={} bs={} qd={} irq={}{}",
            s.name,
            s.rw,
            s.bs,
            s.qd,
            if s.irq { "on" } else { "off" },
            if s.quick { " *" } else { "" }
        );
    }
    println!("backends: plexvm-blk plexvm-blk-direct qsd qsd-direct host host-direct");
    println!("storage: tmpfs disk");
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Containers(args) => containers(args),
        Command::Net(args) => net(args),
        Command::List => {
            list();
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("plexvm-perf: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
