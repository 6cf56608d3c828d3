//! `plexvm-net`: flags → [`plexvm_net::NetConfig`] → [`plexvm_net::run`] → exit code.

use std::process::ExitCode;

use plexvm_backend_support::{init_logging, parse_args, USAGE_ERROR};
use plexvm_net::{Args, NetConfig};

fn main() -> ExitCode {
    // Quiet by default: under plexvm every stderr line is forwarded into the core's log;
    // PLEXVM_NET_LOG=info (or RUST_LOG) shows more.
    init_logging("PLEXVM_NET_LOG");
    let args: Args = match parse_args("plexvm-net") {
        Ok(args) => args,
        Err(code) => return code,
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
