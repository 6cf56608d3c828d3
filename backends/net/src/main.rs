//! `plexvm-net`: flags → [`plexvm_net::NetConfig`] → [`plexvm_net::run`] → exit code.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use plexvm_net::{Args, NetConfig};

/// Exit status for unusable flags (as clap and most tools use).
const USAGE_ERROR: u8 = 2;

fn main() -> ExitCode {
    // Quiet by default: under plexvm every stderr line is forwarded into the core's
    // log; PLEXVM_NET_LOG=info (or RUST_LOG) shows connections.
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PLEXVM_NET_LOG")
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => {
            // One line, not clap's multi-line usage block.
            let rendered = e.render().to_string();
            let message: Vec<&str> = rendered
                .lines()
                .take_while(|line| !line.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!(
                "plexvm-net: {}",
                message.join(" ").trim_start_matches("error: ")
            );
            return ExitCode::from(USAGE_ERROR);
        }
    };
    let config = match NetConfig::try_from(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("plexvm-net: {e}");
            return ExitCode::from(USAGE_ERROR);
        }
    };
    match plexvm_net::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The error and its causes on one line.
            eprintln!("plexvm-net: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}
