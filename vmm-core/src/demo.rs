//! `plexvm demo`: one VM with the probe guest verifying a disk served by `plexvm-blk`,
//! everything created in a temporary folder, nothing downloaded.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use plexvm_protocol::spec::{
    BackendSource, DeviceConfig, DeviceKind, KernelSource, SerialSink, VmConfigResolved,
};

use crate::runner::{self, RunError, SerialOut};

/// Size of the demo disk.
pub const DEMO_DISK_BYTES: u64 = 64 << 20;

/// Errors of the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Temporary files could not be created.
    #[error("cannot create the demo's temporary files")]
    Temp(#[source] std::io::Error),
    /// The block backend binary is not there and could not be built.
    #[error("plexvm-blk was not found next to plexvm or on PATH ({0})")]
    BackendMissing(String),
    /// The VM failed.
    #[error("the demo VM failed")]
    Run(#[source] RunError),
    /// The guest did not report success.
    #[error("the probe guest reported failure (exit code {code}): {line}")]
    Guest {
        /// plexvm exit code.
        code: i32,
        /// The probe's result line, if any.
        line: String,
    },
}

/// What the demo measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoReport {
    /// The probe's `key=value` result fields.
    pub fields: Vec<(String, String)>,
    /// Wall time of the VM run in milliseconds.
    pub wall_ms: u128,
}

impl DemoReport {
    /// A result field by key.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Finds `plexvm-blk`; when `plexvm` runs under `cargo run` from the source tree and the
/// backend has not been built yet, builds it with the same profile first.
fn find_or_build_backend() -> Result<PathBuf, DemoError> {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let here = Path::new(".");
    if let Some(p) = plexvm_protocol::spec::resolve_program("plexvm-blk", exe_dir.as_deref(), here)
    {
        return Ok(p);
    }
    let (Some(cargo), Some(dir)) = (std::env::var_os("CARGO"), exe_dir.as_ref()) else {
        return Err(DemoError::BackendMissing(
            "build it with `cargo build --release -p plexvm-blk`".into(),
        ));
    };
    let release = dir.file_name().is_some_and(|n| n == "release");
    eprintln!("demo: building plexvm-blk (first run)...");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "plexvm-blk"]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .map_err(|e| DemoError::BackendMissing(format!("cannot run cargo: {e}")))?;
    let path = dir.join("plexvm-blk");
    if status.success() && path.exists() {
        Ok(path)
    } else {
        Err(DemoError::BackendMissing(
            "`cargo build -p plexvm-blk` failed".into(),
        ))
    }
}

/// Runs the demo and returns what the probe reported.
pub fn run_demo(seed: u64) -> Result<DemoReport, DemoError> {
    let backend = find_or_build_backend()?;
    let dir = tempfile::Builder::new()
        .prefix("plexvm-demo.")
        .tempdir()
        .map_err(DemoError::Temp)?;
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(DEMO_DISK_BYTES))
        .map_err(DemoError::Temp)?;
    let config = VmConfigResolved {
        name: "demo".into(),
        vcpus: 1,
        memory_mib: 256,
        kernel: KernelSource::Probe,
        cmdline: format!("probe.workload=blk-verify probe.seed={seed}"),
        serial: SerialSink::Stdout,
        api_socket: None,
        initrd: None,
        cpuid_mask: Vec::new(),
        devices: vec![DeviceConfig {
            id: "disk0".into(),
            kind: DeviceKind::Blk,
            backend: BackendSource::Exec(vec![
                backend.display().to_string(),
                "--image".into(),
                image.display().to_string(),
            ]),
            restart: Default::default(),
            params: Default::default(),
            transport: Default::default(),
        }],
        base_dir: dir.path().to_path_buf(),
    };
    let serial = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let outcome = runner::run(config, SerialOut::Tee(serial.clone())).map_err(DemoError::Run)?;
    let wall_ms = started.elapsed().as_millis();
    let text =
        String::from_utf8_lossy(&serial.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    let fields = plexvm_protocol::probe::parse_result(&text);
    let ok = outcome.exit_code() == 0
        && fields
            .as_ref()
            .is_some_and(|f| f.iter().any(|(k, v)| k == "status" && v == "ok"));
    match fields {
        Some(fields) if ok => Ok(DemoReport { fields, wall_ms }),
        _ => Err(DemoError::Guest {
            code: outcome.exit_code(),
            line: text
                .lines()
                .rev()
                .find(|l| l.starts_with("probe: "))
                .unwrap_or("(no probe output)")
                .to_string(),
        }),
    }
}
