//! `plexvm`: run a VM from a spec, run the demo, or talk to a running VM's control API.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use plexvm::api::{run_ctl, CtlArgs};
use plexvm::error_chain;
use plexvm::runner::{self, SerialOut};
use plexvm_protocol::VmSpec;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// plexvm: a microkernel-style VMM whose devices are vhost-user backend processes.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a VM described by a TOML spec until the guest ends it.
    Run {
        /// The VM spec file.
        spec: PathBuf,
    },
    /// Run the built-in demo: the probe guest verifies a 64 MiB disk served by plexvm-blk.
    Demo {
        /// Seed of the probe's pseudo-random workload.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Talk to a running VM's control API.
    Ctl(CtlArgs),
}

/// Exit code for bad input (spec, kernel file, usage).
const EXIT_BAD_INPUT: u8 = 2;

fn run(spec: &Path) -> ExitCode {
    let config = match VmSpec::load(spec) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("plexvm: {e}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let serial = match SerialOut::from_spec(&config.serial) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("plexvm: {}", error_chain(&e));
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    match runner::run(config, serial) {
        Ok(outcome) => {
            if let plexvm::devices::legacy::GuestExit::Error(msg) = &outcome.exit {
                eprintln!("plexvm: guest stopped: {msg}");
            } else if outcome.exit == plexvm::devices::legacy::GuestExit::TripleFault {
                eprintln!("plexvm: guest triple fault (shutdown)");
            } else if outcome.exit == plexvm::devices::legacy::GuestExit::Panicked {
                eprintln!("plexvm: the guest kernel panicked (pvpanic)");
            }
            ExitCode::from(outcome.exit_code().clamp(0, 255) as u8)
        }
        Err(e) => {
            eprintln!("plexvm: {}", error_chain(&e));
            ExitCode::from(if e.is_input_error() {
                EXIT_BAD_INPUT
            } else {
                1
            })
        }
    }
}

fn demo(seed: u64) -> ExitCode {
    match plexvm::demo::run_demo(seed) {
        Ok(report) => {
            let get = |k| report.field(k).unwrap_or("?");
            println!(
                "demo: ok: the probe guest wrote {} bytes in {} requests through plexvm-blk and verified {} bytes (sha256 {}) in {} ms",
                get("bytes_written"),
                get("requests"),
                get("bytes_verified"),
                get("sha256"),
                report.wall_ms
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("plexvm demo: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The variable that sets what the core logs (README: `PLEXVM_LOG=info`).
const LOG_ENV: &str = "PLEXVM_LOG";

/// The log filter from `PLEXVM_LOG`'s value: comma-separated `level` and
/// `target=level` directives (`info`, `warn,plexvm::supervisor=debug`); `warn` when it
/// is unset, empty or not understood.
///
/// A `Targets` filter, not `EnvFilter`: the same directives without span and field
/// matching, whose regex engine was ~0.45 MiB of the core's binary and ~0.35 MiB of
/// its resident memory (perf/results/NOTES.md, "Core overhead").
fn log_filter(directives: Option<&str>) -> Targets {
    let default = Targets::new().with_default(LevelFilter::WARN);
    match directives {
        Some(directives) if !directives.trim().is_empty() => {
            directives.parse().unwrap_or_else(|error| {
                eprintln!("plexvm: ignoring {LOG_ENV}={directives:?}: {error}");
                default
            })
        }
        _ => default,
    }
}

fn main() -> ExitCode {
    use std::io::IsTerminal;
    let directives = std::env::var(LOG_ENV).ok();
    tracing_subscriber::registry()
        .with(log_filter(directives.as_deref()))
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
    let cli = Cli::parse();
    match &cli.command {
        Command::Run { spec } => run(spec),
        Command::Demo { seed } => demo(*seed),
        Command::Ctl(args) => match run_ctl(args) {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("plexvm ctl: {}", error_chain(&e));
                ExitCode::FAILURE
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn log_filter_reads_level_and_target_directives() {
        let filter = log_filter(Some("info"));
        assert!(filter.would_enable("plexvm::runner", &Level::INFO));
        assert!(!filter.would_enable("plexvm::runner", &Level::DEBUG));

        let filter = log_filter(Some("warn,plexvm::supervisor=debug"));
        assert!(filter.would_enable("plexvm::supervisor", &Level::DEBUG));
        assert!(!filter.would_enable("plexvm::runner", &Level::INFO));
    }

    #[test]
    fn log_filter_falls_back_to_warn() {
        for directives in [None, Some(""), Some("[span{x=1}]=nonsense")] {
            let filter = log_filter(directives);
            assert!(
                filter.would_enable("plexvm", &Level::WARN),
                "{directives:?}"
            );
            assert!(
                !filter.would_enable("plexvm", &Level::INFO),
                "{directives:?}"
            );
        }
    }
}
