//! Container start-up: `RUNTIME run` of `/bin/true` in a busybox bundle (create, start,
//! wait and delete in one command), plexvm-shim against runc in the same run,
//! interleaved so that machine drift hits both alike.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::sample::Spread;

/// Where Debian's busybox-static puts its binary.
const BUSYBOX: &str = "/bin/busybox";

/// One runtime's timings.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeResult {
    /// Runtime name (file name of the program).
    pub runtime: String,
    /// Program path.
    pub program: PathBuf,
    /// Wall time of each `run`, milliseconds.
    pub runs_ms: Vec<f64>,
    /// Median, min, max of `runs_ms`.
    pub spread: Spread,
}

/// Builds a bundle: a rootfs holding static busybox as `/bin/true` and a config that
/// runs it with runc's default namespaces and mounts.
pub fn build_bundle(dir: &Path) -> Result<()> {
    let bin = dir.join("rootfs/bin");
    std::fs::create_dir_all(&bin)?;
    for d in ["proc", "dev", "sys", "tmp"] {
        std::fs::create_dir_all(dir.join("rootfs").join(d))?;
    }
    std::fs::copy(BUSYBOX, bin.join("busybox"))
        .with_context(|| format!("{BUSYBOX} (Debian package busybox-static) is needed"))?;
    std::os::unix::fs::symlink("busybox", bin.join("true"))?;
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/true"],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "bench",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
        }
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    Ok(())
}

fn run_once(program: &Path, root: &Path, bundle: &Path, id: &str) -> Result<f64> {
    let start = Instant::now();
    let status = Command::new(program)
        .arg("--root")
        .arg(root)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("cannot run {}", program.display()))?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    if !status.status.success() {
        bail!(
            "{} run failed ({}): {}",
            program.display(),
            status.status,
            String::from_utf8_lossy(&status.stderr).trim()
        );
    }
    Ok(ms)
}

/// Runs `runs` measured (after `warmup` unmeasured) `run`s per runtime, interleaved.
pub fn measure(runtimes: &[PathBuf], runs: u32, warmup: u32) -> Result<Vec<RuntimeResult>> {
    let work = tempfile::Builder::new()
        .prefix("plexvm-perf-ct.")
        .tempdir()?;
    let bundle = work.path().join("bundle");
    build_bundle(&bundle)?;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); runtimes.len()];
    for i in 0..warmup + runs {
        for (r, program) in runtimes.iter().enumerate() {
            let root = work.path().join(format!("state{r}"));
            let ms = run_once(
                program,
                &root,
                &bundle,
                &format!("bench-{}-{r}-{i}", std::process::id()),
            )?;
            if i >= warmup {
                times[r].push(ms);
            }
        }
        if (i + 1) % 20 == 0 {
            eprintln!("plexvm-perf: containers: {}/{}", i + 1, warmup + runs);
        }
    }
    Ok(runtimes
        .iter()
        .zip(times)
        .map(|(program, runs_ms)| RuntimeResult {
            runtime: program
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            program: program.clone(),
            spread: Spread::of(runs_ms.iter().copied()),
            runs_ms,
        })
        .collect())
}

/// A markdown table of the results, with each runtime's median relative to the last.
pub fn markdown(results: &[RuntimeResult], machine: &str) -> String {
    let base = results.last().map_or(0.0, |r| r.spread.median);
    let mut md = format!(
        "# Container start-up: `run` of /bin/true in a busybox bundle\n\n{machine}\n\n\
         | runtime | runs | median ms | min ms | max ms | speed-up vs {} |\n|---|---|---|---|---|---|\n",
        results.last().map_or("-", |r| r.runtime.as_str())
    );
    for r in results {
        md.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.2}x |\n",
            r.runtime,
            r.runs_ms.len(),
            r.spread.median,
            r.spread.min,
            r.spread.max,
            if r.spread.median > 0.0 {
                base / r.spread.median
            } else {
                0.0
            }
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_one_row_per_runtime_and_ratio_to_the_last() {
        let r = |name: &str, v: Vec<f64>| RuntimeResult {
            runtime: name.into(),
            program: name.into(),
            spread: Spread::of(v.iter().copied()),
            runs_ms: v,
        };
        let md = markdown(
            &[
                r("plexvm-shim", vec![10.0, 12.0, 11.0]),
                r("runc", vec![44.0, 44.0]),
            ],
            "m",
        );
        assert!(
            md.contains("| plexvm-shim | 3 | 11.0 | 10.0 | 12.0 | 4.00x |"),
            "{md}"
        );
        assert!(
            md.contains("| runc | 2 | 44.0 | 44.0 | 44.0 | 1.00x |"),
            "{md}"
        );
    }
}
