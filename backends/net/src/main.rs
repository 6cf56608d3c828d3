//! `plexvm-net`: flags → [`plexvm_net::NetConfig`] → [`plexvm_net::run`] → exit code.

use std::process::ExitCode;

fn main() -> ExitCode {
    // PLEXVM_NET_LOG=info (or RUST_LOG) shows more than warnings.
    plexvm_backend_support::backend_main::<plexvm_net::Args, plexvm_net::NetConfig, _>(
        "plexvm-net",
        "PLEXVM_NET_LOG",
        plexvm_net::run,
    )
}
