//! `plexvm-blk`: flags → [`plexvm_blk::BlockConfig`] → [`plexvm_blk::run`] → exit code.

use std::process::ExitCode;

use plexvm_backend_support::{init_logging, parse_args, USAGE_ERROR};
use plexvm_blk::{Args, BlockConfig};

fn main() -> ExitCode {
    // Quiet by default: under plexvm every stderr line is forwarded into the core's log;
    // PLEXVM_BLK_LOG=info (or RUST_LOG) shows more.
    init_logging("PLEXVM_BLK_LOG");
    let args: Args = match parse_args("plexvm-blk") {
        Ok(args) => args,
        Err(code) => return code,
    };
    let config = match BlockConfig::try_from(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("plexvm-blk: {e}");
            return ExitCode::from(USAGE_ERROR);
        }
    };
    match plexvm_blk::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The error and its causes on one line.
            eprintln!("plexvm-blk: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}
