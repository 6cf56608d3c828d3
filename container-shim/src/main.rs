//! `plexvm-shim`: parse the runc-style command line, run the command, print
//! errors (and log them in runc's JSON shape with `--log-format json`).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use plexvm_shim::cli::{Cli, Command};
use plexvm_shim::state::StateRoot;
use plexvm_shim::{cloned_exe, create, exec, features, log, ops};

fn run(cli: &Cli) -> anyhow::Result<i32> {
    let root = StateRoot::new(&cli.root_dir());
    match &cli.command {
        Command::Create(a) => {
            create::create(&root, &a.id, &a.opts, cli.systemd_cgroup).map(drop)?
        }
        Command::Start(a) => ops::start(&root, &a.id)?,
        Command::State(a) => println!("{}", ops::state(&root, &a.id)?),
        Command::Kill(a) => ops::kill_container(&root, &a.id, &a.signal, a.all)?,
        Command::Delete(a) => ops::delete(&root, &a.id, a.force)?,
        Command::Run(a) => return Ok(ops::run(&root, a, cli.systemd_cgroup)?),
        Command::Exec(a) => return Ok(exec::exec(&root, a)?),
        Command::List(a) => print!("{}", ops::list(&root, a.format, a.quiet)?),
        Command::Ps(a) => println!("{}", ops::ps(&root, &a.id, a.format)?),
        Command::Pause(a) => ops::set_paused(&root, &a.id, true)?,
        Command::Resume(a) => ops::set_paused(&root, &a.id, false)?,
        Command::Features => println!(
            "{}",
            serde_json::to_string_pretty(&features::features()).context("features")?
        ),
    }
    Ok(0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that put processes into a container run from a sealed copy
    // of the binary (CVE-2019-5736, see cloned_exe.rs).
    if matches!(
        cli.command,
        Command::Create(_) | Command::Run(_) | Command::Exec(_)
    ) {
        if let Err(e) = cloned_exe::reexec_from_sealed_copy() {
            eprintln!("plexvm-shim: {:#}", anyhow::Error::from(e));
            return ExitCode::from(1);
        }
    }
    if let Some(path) = &cli.log {
        if let Err(e) = log::init(path, cli.log_format, cli.debug) {
            eprintln!("plexvm-shim: cannot open log file {}: {e}", path.display());
        }
    }
    match run(&cli) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(255)),
        Err(e) => {
            let msg = format!("{e:#}");
            log::log(log::Level::Error, &msg);
            eprintln!("plexvm-shim: {msg}");
            ExitCode::from(1)
        }
    }
}
