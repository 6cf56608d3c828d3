//! The lab: real (not nested-PVM) KVM inside a QEMU/TCG machine, so that real Linux
//! guests run on plexvm's own core in every test run (shared/DESIGN.md, "The lab").
//!
//! TCG emulates AMD SVM, so `qemu-system-x86_64 -accel tcg -cpu max` gives its guest
//! `svm`/`npt`, and Debian's own `kvm_amd` turns that into an ordinary /dev/kvm. plexvm
//! runs there at TCG speed, which is far faster for guest kernel code than these hosts'
//! nested KVM (which emulates every CPL0 instruction).
//!
//! Shape (tests/README.md, "The lab"):
//! - The lab boots Debian's installed kernel with a tiny busybox initramfs whose only job
//!   is to mount the **host's root file system read-only over 9p** (`-virtfs`) and
//!   `chroot` into it, with fresh proc/sys/dev and tmpfs on /tmp and /run. So the lab
//!   runs exactly the host's programs and libraries — the freshly built `plexvm`
//!   binaries, qemu-storage-daemon, the kernel modules for `kvm_amd` — and nothing is
//!   copied or packed per run.
//! - The test's own work folder (under /tmp on the host) is a second, writable 9p export
//!   mounted at the same path inside, so the specs, initramfses and scripts a test writes
//!   and the logs and results the lab writes are at the same path on both sides.
//!   Sockets and disk images live in the lab's tmpfs (`$LAB_SCRATCH`): 9p cannot carry
//!   Unix sockets, and the images are copied out at the end when the host checks them.
//! - A scenario is a bash script run inside the lab with `set -euo pipefail` after
//!   `lab-lib.sh` (helpers: start a VM, wait for a line, kill a backend, ...). What it
//!   prints goes to the lab's console, which the fixture streams into the test's output
//!   (shown by the harness when the test fails) and keeps in `console.log`. Results come
//!   back as `LAB-RESULT key=value ...` lines and as files in the work folder.
//! - Everything is bounded: the lab by the test's timeout (QEMU is then killed and
//!   reaped by its [`ChildGuard`]), and every wait inside a scenario by its own limit.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::initramfs::{GuestKernel, InitramfsSpec};
use crate::prereq;
use crate::qemu::{opt_value, QemuGuest, QEMU};
use crate::{bin_dir, ChildGuard};

/// Modules the lab's initramfs loads to reach the host's files: the virtio-pci transport
/// and 9p over virtio. Everything else (kvm_amd, tun, veth) is loaded from the host's
/// module tree once the lab runs inside it.
const LAB_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

/// The line the lab prints when its scenario ended: `LAB-SCENARIO-EXIT <code>`.
const SCENARIO_EXIT: &str = "LAB-SCENARIO-EXIT ";

/// Prefix of the result lines a scenario prints with `lab_result`.
pub const RESULT: &str = "LAB-RESULT ";

/// The helpers every scenario can use (sourced before it runs).
const LAB_LIB: &str = include_str!("lab-lib.sh");

/// The lab's vCPU count. With two (MTTCG, a host thread each) the lab's own kernel
/// now and then crashed (a page-fault loop on a bad GS base in a plexvm vCPU thread)
/// and guests triple-faulted while KVM guests ran inside; `thread=single` with two
/// vCPUs makes every cross-CPU wait a TCG time slice. tests/README.md ("One lab vCPU")
/// has what was seen. Guests with 1 and 2 vCPUs run on the one lab CPU; 4-vCPU guests
/// do not boot reliably in any lab yet (tests/README.md).
pub const LAB_VCPUS: u32 = 1;

/// A lab machine for one test: its work folder, shared with the lab at the same path.
#[derive(Debug)]
pub struct Lab {
    work: tempfile::TempDir,
    kernel: GuestKernel,
    test: String,
    /// The lab's vCPUs. One: see [`LAB_VCPUS`].
    pub vcpus: u32,
    /// The lab's RAM in MiB; its /tmp (images, VM memory is separate) lives in it.
    pub memory_mib: u64,
}

impl Lab {
    /// A lab for `test`, booting the newest installed Debian kernel. Fails the test when
    /// QEMU or the kernel is missing (tests/run.sh installs them).
    pub fn new(test: &str) -> Result<Lab> {
        prereq::require(
            test,
            &prereq::missing(&[prereq::QEMU_SYSTEM, prereq::BUSYBOX_STATIC, prereq::CPIO]),
        );
        let kernel = crate::kernel_image::debian_kernel(test);
        // Under /tmp on purpose: the lab mounts a tmpfs on /tmp and the work folder at
        // the same path on top, so the path must be one it can create there.
        let mut work = tempfile::Builder::new()
            .prefix("plexvm-lab-")
            .tempdir_in("/tmp")
            .context("create the lab's work folder")?;
        // PLEXVM_LAB_KEEP=1 keeps the folder (scenario, logs, images) for a look.
        work.disable_cleanup(std::env::var_os("PLEXVM_LAB_KEEP").is_some());
        Ok(Lab {
            work,
            kernel,
            test: test.to_string(),
            vcpus: LAB_VCPUS,
            memory_mib: 3072,
        })
    }

    /// The work folder: the same path on the host and inside the lab.
    pub fn work(&self) -> &Path {
        self.work.path()
    }

    /// The Debian kernel the lab boots (also the one its Linux guests boot).
    pub fn kernel(&self) -> &GuestKernel {
        &self.kernel
    }

    /// Writes `contents` to `name` in the work folder and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.work().join(name);
        fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }

    /// Boots the lab, runs `scenario` (bash) inside it and powers it off. Fails when the
    /// lab does not finish within `timeout`; the scenario's own exit code is in the run.
    pub fn run(&self, scenario: &str, timeout: Duration) -> Result<LabRun> {
        let work = self.work();
        fs::write(work.join("lab-lib.sh"), LAB_LIB)?;
        fs::write(work.join("scenario.sh"), scenario)?;
        let boot = work.join("lab-boot");
        fs::create_dir_all(&boot)?;
        let initrd = InitramfsSpec::new(self.kernel.clone(), LAB_MODULES, &self.chroot_script())
            .build(&boot)
            .context("build the lab's initramfs")?;
        let mut guest = QemuGuest::new(&self.kernel.image, &initrd);
        guest.memory_mib = self.memory_mib;
        guest.vcpus = self.vcpus;
        // An oops in the lab's own kernel ends the lab at once (panic=-1
        // and -no-reboot), instead of leaving a scenario to its time-out.
        guest.extra_cmdline = "oops=panic".to_string();
        guest.extra_args = [
            "-cpu".to_string(),
            "max".to_string(),
            "-virtfs".to_string(),
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
                .to_string(),
            "-virtfs".to_string(),
            format!(
                "local,path={},mount_tag=work,security_model=none,multidevs=remap",
                opt_value(work)
            ),
        ]
        .to_vec();
        let console = work.join("console.log");
        let log = work.join("qemu.log");
        let mut cmd = Command::new(QEMU);
        cmd.args(guest.args(&console))
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log)?)
            .stderr(fs::File::create(&log)?);
        let started = Instant::now();
        let mut qemu = ChildGuard::spawn(QEMU, &mut cmd)?;
        let mut tail = ConsoleTail::new(&console);
        let status = loop {
            tail.stream();
            if let Some(status) = qemu.child_mut().try_wait()? {
                break Some(status);
            }
            if started.elapsed() > timeout {
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        tail.stream();
        let run = LabRun {
            console: String::from_utf8_lossy(&fs::read(&console).unwrap_or_default()).into_owned(),
            qemu_log: fs::read_to_string(&log).unwrap_or_default(),
            work: work.to_path_buf(),
            wall: started.elapsed(),
            test: self.test.clone(),
        };
        eprintln!("lab: {} ran for {:.1} s", self.test, run.wall.as_secs_f64());
        if status.is_none() {
            bail!(
                "the lab did not finish within {timeout:?}\n{}",
                run.diagnostics()
            );
        }
        Ok(run)
    }

    /// The initramfs script: mount the host's root and the work folder, chroot, run the
    /// scenario, report its exit code.
    fn chroot_script(&self) -> String {
        let work = self.work().display().to_string();
        let bins = bin_dir().display().to_string();
        // The lab's /tmp is its own tmpfs; a build under the host's /tmp (a CI clone
        // there) stays visible through a bind mount of the host's folder.
        let binds = match bin_dir()
            .ancestors()
            .nth(2)
            .and_then(|ws| ws.strip_prefix("/tmp").ok())
        {
            Some(rel) if !rel.as_os_str().is_empty() => format!(
                "mkdir -p '/host/tmp/{r}' && mount --bind '/hosttmp/{r}' '/host/tmp/{r}'",
                r = rel.display()
            ),
            _ => String::new(),
        };
        format!(
            r#"
ro=trans=virtio,version=9p2000.L,msize=512000
mkdir -p /host
mount -t 9p -o $ro,ro,cache=loose hostroot /host || {{ echo "{SCENARIO_EXIT}90 (no host root)"; exit 90; }}
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs shm /host/dev/shm
mkdir -p /hosttmp
mount --bind /host/tmp /hosttmp
mount -t tmpfs tmp /host/tmp
mount -t tmpfs run /host/run
{binds}
mkdir -p '/host{work}'
mount -t 9p -o $ro,cache=none work '/host{work}' || {{ echo "{SCENARIO_EXIT}91 (no work folder)"; exit 91; }}
chroot /host /usr/bin/env -i HOME=/root TERM=dumb \
  PATH='{bins}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  LAB_WORK='{work}' LAB_SCRATCH=/tmp/lab LAB_BIN='{bins}' \
  /bin/bash -c 'cd "$LAB_WORK" && source ./lab-lib.sh && lab_init && source ./scenario.sh'
rc=$?
sync
echo "{SCENARIO_EXIT}$rc"
exit $rc
"#
        )
    }
}

/// Streams new complete lines of the lab's console file to the test's stderr (the
/// harness shows them when the test fails, or always with `--nocapture`).
struct ConsoleTail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl ConsoleTail {
    fn new(path: &Path) -> ConsoleTail {
        ConsoleTail {
            path: path.to_path_buf(),
            offset: 0,
            partial: Vec::new(),
        }
    }

    fn stream(&mut self) {
        let Ok(mut f) = fs::File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return;
        }
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        while let Some(pos) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line);
            // eprintln, not a raw stderr write: the harness captures it per test.
            eprintln!("lab| {}", text.trim_end_matches(['\r', '\n']));
        }
    }
}

/// What a finished lab left behind.
#[derive(Debug)]
pub struct LabRun {
    /// Everything the lab printed on its console (its kernel, the scenario).
    pub console: String,
    /// QEMU's own messages.
    pub qemu_log: String,
    /// The work folder (results, logs, copied-out images).
    pub work: PathBuf,
    /// Wall time from QEMU's start to its exit.
    pub wall: Duration,
    test: String,
}

impl LabRun {
    /// The scenario's exit code, from the lab's last line (None: it never finished).
    pub fn scenario_exit(&self) -> Option<i32> {
        self.console.lines().rev().find_map(|l| {
            let rest = l.trim_end_matches('\r').strip_prefix(SCENARIO_EXIT)?;
            rest.split_whitespace().next()?.parse().ok()
        })
    }

    /// Fails (with the console and every log of the work folder) unless the scenario
    /// ended with exit code 0.
    pub fn expect_success(&self) -> &LabRun {
        if self.scenario_exit() != Some(0) {
            panic!(
                "{}: the lab's scenario failed (exit {:?})\n{}",
                self.test,
                self.scenario_exit(),
                self.diagnostics()
            );
        }
        self
    }

    /// The `key=value` fields of every `LAB-RESULT` line whose first field is `tag`.
    pub fn results(&self, tag: &str) -> Vec<Vec<(String, String)>> {
        self.console
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix(RESULT))
            .filter(|l| l.split_whitespace().next() == Some(tag))
            .map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .collect()
    }

    /// The one `LAB-RESULT <tag>` line as a map; fails when there is not exactly one.
    pub fn result(&self, tag: &str) -> std::collections::BTreeMap<String, String> {
        let all = self.results(tag);
        assert_eq!(
            all.len(),
            1,
            "{}: expected one `LAB-RESULT {tag}` line\n{}",
            self.test,
            self.diagnostics()
        );
        all.into_iter()
            .next()
            .unwrap_or_default()
            .into_iter()
            .collect()
    }

    /// A file the scenario left in the work folder.
    pub fn file(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }

    /// The text of a file the scenario left in the work folder ("" when missing).
    pub fn text(&self, name: &str) -> String {
        String::from_utf8_lossy(&fs::read(self.file(name)).unwrap_or_default()).into_owned()
    }

    /// The console's last lines, then the last lines of every log in the work folder
    /// (guest serial consoles, plexvm's and the backends' stderr), for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut out = format!(
            "--- lab console (last 120 lines) ---\n{}\n--- qemu ---\n{}\n",
            last_lines(&self.console, 120),
            self.qemu_log.trim_end()
        );
        let mut logs: Vec<PathBuf> = fs::read_dir(&self.work)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.sort();
        for p in logs {
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let is_log = name.ends_with(".log") || name.ends_with(".err");
            if !is_log || name == "console.log" || name == "qemu.log" {
                continue;
            }
            let text = String::from_utf8_lossy(&fs::read(&p).unwrap_or_default()).into_owned();
            out.push_str(&format!(
                "--- {name} (last 60 lines) ---\n{}\n",
                last_lines(&text, 60)
            ));
        }
        out
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
