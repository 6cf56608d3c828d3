//! `plexvm-shim`: parse the runc-style command line, run the command, print
//! errors (and log them in runc's JSON shape with `--log-format json`).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use plexvm_shim::cli::{Cli, Command};
use plexvm_shim::state::StateRoot;
use plexvm_shim::{create, exec, features, log, ops};

fn run(cli: &Cli) -> anyhow::Result<i32> {
    let root = StateRoot::new(&cli.root);
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
