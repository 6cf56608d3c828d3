//! `plexvm-blk`: flags → [`plexvm_blk::BlockConfig`] → [`plexvm_blk::run`] → exit code.

use std::process::ExitCode;

fn main() -> ExitCode {
    // PLEXVM_BLK_LOG=info (or RUST_LOG) shows more than warnings.
    plexvm_backend_support::backend_main::<plexvm_blk::Args, plexvm_blk::BlockConfig, _>(
        "plexvm-blk",
        "PLEXVM_BLK_LOG",
        plexvm_blk::run,
    )
}
