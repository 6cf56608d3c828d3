//! System containers: a Debian rootfs (mmdebstrap, cached) booting systemd
//! as pid 1 under `podman --systemd=always`, with plexvm-shim and with runc
//! (the reference for every check), and containers reaching each other on
//! podman's default network.
//!
//! Long-running (systemd boots): in the `guests` nextest group.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::podman::{missing_tools, podman_lock, runtimes, text, Podman};

/// The cached bookworm rootfs, or why these tests cannot run here.
fn bookworm() -> Result<PathBuf, String> {
    debian("bookworm")
}

/// The cached rootfs of a Debian suite, or why these tests cannot run here.
fn debian(suite: &str) -> Result<PathBuf, String> {
    if let Some(why) = missing_tools(&["podman", "mmdebstrap"]) {
        return Err(why);
    }
    match common::debian::rootfs(suite) {
        Ok(dir) => Ok(dir),
        // Installed but failed: that is a failure, not a reason to skip.
        Err(why) if !why.contains("not installed") => panic!("{why}"),
        Err(why) => Err(why),
    }
}

fn name(runtime: &Path) -> String {
    runtime
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A container started by `podman run -d`, removed when dropped.
struct Container<'a> {
    podman: &'a Podman,
    id: String,
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self.podman.run(&["rm", "--force", "--time", "0", &self.id]);
    }
}

impl<'a> Container<'a> {
    /// `podman run -d ARGS`, asserting it started.
    fn run(podman: &'a Podman, args: &[&str]) -> Container<'a> {
        let mut full = vec!["run", "-d"];
        full.extend_from_slice(args);
        let (code, stdout, stderr) = text(&podman.run(&full));
        assert_eq!(
            code,
            Some(0),
            "{}: podman run: {stderr}",
            name(&podman.runtime)
        );
        Container {
            podman,
            id: stdout.trim().to_string(),
        }
    }

    /// `podman exec ID ARGS`: (exit code, stdout, stderr).
    fn exec(&self, args: &[&str]) -> (Option<i32>, String, String) {
        self.exec_with(&[], args)
    }

    /// `podman exec OPTS ID ARGS` (options go before the container).
    fn exec_with(&self, opts: &[&str], args: &[&str]) -> (Option<i32>, String, String) {
        let mut full = vec!["exec"];
        full.extend_from_slice(opts);
        full.push(self.id.as_str());
        full.extend_from_slice(args);
        text(&self.podman.run(&full))
    }

    /// `sh -c SCRIPT` inside, asserting exit 0; returns stdout.
    fn sh(&self, script: &str) -> String {
        let (code, stdout, stderr) = self.exec(&["sh", "-c", script]);
        assert_eq!(code, Some(0), "{}: {script}: {stderr}", self.rt());
        stdout
    }

    fn rt(&self) -> String {
        name(&self.podman.runtime)
    }

    /// `{{.State.Status}} {{.State.ExitCode}}`.
    fn status(&self) -> String {
        let (_, out, _) = text(&self.podman.run(&[
            "inspect",
            "--format",
            "{{.State.Status}} {{.State.ExitCode}}",
            &self.id,
        ]));
        out.trim().to_string()
    }

    /// Waits until systemd has finished booting and returns
    /// `systemctl is-system-running` (`running`, `degraded`, ...). Until
    /// systemd's private socket exists the call fails; after that `--wait`
    /// blocks until start-up is over.
    fn wait_booted(&self) -> String {
        for _ in 0..600 {
            let (_, out, _) = self.exec(&["systemctl", "is-system-running", "--wait"]);
            let state = out.trim();
            if !state.is_empty() && state != "initializing" && state != "starting" {
                return state.to_string();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{}: systemd never finished booting", self.rt());
    }
}

const LIMITS: [&str; 8] = [
    "--memory",
    "256m",
    "--memory-swap",
    "256m",
    "--pids-limit",
    "200",
    "--cpus",
    "0.5",
];

/// Boots systemd under `runtime`; returns the container and the time from
/// `podman run` to `running` (reported, not asserted: speed belongs in perf/).
fn boot<'a>(podman: &'a Podman, rootfs: &str, extra: &[&str]) -> (Container<'a>, Duration) {
    let t0 = Instant::now();
    let mut args = vec!["--systemd=always"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--rootfs", rootfs, "/sbin/init"]);
    let c = Container::run(podman, &args);
    let state = c.wait_booted();
    let took = t0.elapsed();
    let (_, failed, _) = c.exec(&["systemctl", "--failed", "--no-legend", "--plain"]);
    assert_eq!(state, "running", "{}: failed units: {failed}", c.rt());
    assert_eq!(failed.trim(), "", "{}", c.rt());
    (c, took)
}

fn check_journal_and_shell(c: &Container<'_>) {
    assert_eq!(
        c.sh("systemctl is-active systemd-journald").trim(),
        "active"
    );
    assert_eq!(c.sh("cat /proc/1/comm").trim(), "systemd", "{}", c.rt());
    c.sh("echo plexvm-journal-marker | systemd-cat -t plexvm-test");
    common::wait_until("the marker in the journal", || {
        c.exec(&["journalctl", "-b", "--no-pager", "-t", "plexvm-test"])
            .1
            .contains("plexvm-journal-marker")
    });
    // A shell on a terminal, as `podman exec -it ... bash` gives one.
    let (code, out, err) = c.exec_with(&["-t"], &["/bin/bash", "-lc", "tty; id -un"]);
    assert_eq!(code, Some(0), "{}: {err}", c.rt());
    assert!(out.starts_with("/dev/pts/"), "{}: {out:?}", c.rt());
    assert!(out.contains("root\r\n"), "{}: {out:?}", c.rt());
    // An interactive shell fed on stdin (`podman exec -i`).
    let out = exec_with_input(c, &["-i"], &["/bin/bash"], b"echo $((6 * 7)); exit 4\n");
    assert_eq!(out.status.code(), Some(4), "{}", c.rt());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n", "{}", c.rt());
    // A login session without logind: `podman exec -it ... login -f root`
    // gives root's login shell ($0 = -bash) on the terminal.
    let script = b"echo in-login-$(id -un)$0; exit 3\n";
    let out = exec_with_input(c, &["-i", "-t"], &["login", "-f", "root"], script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("in-login-root-bash"),
        "{}: {stdout:?}",
        c.rt()
    );
}

/// `podman exec OPTS ID ARGS` with `input` on its stdin.
fn exec_with_input(c: &Container<'_>, opts: &[&str], args: &[&str], input: &[u8]) -> Output {
    let mut full = vec!["exec"];
    full.extend_from_slice(opts);
    full.push(&c.id);
    full.extend_from_slice(args);
    let mut child = c
        .podman
        .cmd(&full)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// The limits podman set are the container's own cgroup files, and the
/// kernel enforces them on processes started inside.
fn check_limits(c: &Container<'_>) {
    let read = |f: &str| c.sh(&format!("cat /sys/fs/cgroup/{f}")).trim().to_string();
    assert_eq!(
        read("memory/memory.limit_in_bytes"),
        "268435456",
        "{}",
        c.rt()
    );
    assert_eq!(read("pids/pids.max"), "200", "{}", c.rt());
    assert_eq!(read("cpu/cpu.cfs_quota_us"), "50000", "{}", c.rt());
    // Memory: `tail` keeps a newline-free 512 MiB stream in memory.
    let (code, _, err) = c.exec(&["sh", "-c", "head -c 512m /dev/zero | tail"]);
    assert_eq!(
        code,
        Some(137),
        "{}: memory hog not OOM-killed: {err}",
        c.rt()
    );
    let oom = read("memory/memory.oom_control");
    let kills: u64 = oom
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(kills >= 1, "{}: {oom}", c.rt());
    assert_eq!(c.sh("systemctl is-system-running").trim(), "running");
    // pids: more sleepers than pids.max allows; dash gives up at the first
    // failed fork, and its exit trap kills them with the `kill` builtin
    // (nothing can be forked while the cgroup is full).
    let (code, _, err) = c.exec(&[
        "sh",
        "-c",
        "p=; trap 'kill $p' EXIT; i=0; \
         while [ $i -lt 300 ]; do sleep 600 & p=\"$p $!\"; i=$((i+1)); done",
    ]);
    assert_ne!(code, Some(0), "{}: 300 forks under pids.max=200", c.rt());
    assert!(err.contains("fork"), "{}: {err}", c.rt());
    common::wait_until("the sleepers to be gone", || {
        c.exec(&["pgrep", "-x", "sleep"]).0 == Some(1)
    });
    let events = read("pids/pids.events");
    assert!(!events.contains("max 0"), "{}: {events}", c.rt());
    // cpu: a second of spinning under a 50% quota is throttled.
    let stat = c.sh("timeout 1 sh -c 'while :; do :; done'; cat /sys/fs/cgroup/cpu/cpu.stat");
    let throttled: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("nr_throttled "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(throttled > 0, "{}: {stat}", c.rt());
}

/// `podman stop` sends the image's stop signal, SIGRTMIN+3 for systemd:
/// systemd then runs its shutdown and exits 0. (SIGTERM would make pid 1
/// systemd re-execute instead, and podman would SIGKILL it: exit 137.)
fn check_stop(c: &Container<'_>) {
    let (code, _, err) = text(&c.podman.run(&["stop", "--time", "30", &c.id]));
    assert_eq!(code, Some(0), "{}: {err}", c.rt());
    assert_eq!(c.status(), "exited 0", "{}", c.rt());
}

#[test]
fn debian_systemd_boots_runs_and_stops() {
    let rootfs = match bookworm() {
        Ok(dir) => format!("{}:O", dir.display()),
        Err(why) => {
            panic!("cannot run here: {why}");
        }
    };
    let _lock = podman_lock();
    let mut times = Vec::new();
    for runtime in runtimes() {
        let podman = Podman::new(&runtime);
        let (c, took) = boot(&podman, &rootfs, &LIMITS);
        check_journal_and_shell(&c);
        check_limits(&c);
        let (code, _, err) = text(&podman.run(&["restart", "--time", "30", &c.id]));
        assert_eq!(code, Some(0), "{}: restart: {err}", c.rt());
        assert_eq!(c.wait_booted(), "running", "{}: after restart", c.rt());
        check_stop(&c);
        times.push(format!("{} {} ms", c.rt(), took.as_millis()));
    }
    eprintln!("systemd boot to `running` (podman run to is-system-running): {times:?}");
}

#[test]
fn debian_systemd_true_runs_sbin_init() {
    // `--systemd=true` (the default) turns systemd mode on because the
    // command is /sbin/init.
    let rootfs = match bookworm() {
        Ok(dir) => format!("{}:O", dir.display()),
        Err(why) => {
            panic!("cannot run here: {why}");
        }
    };
    let _lock = podman_lock();
    for runtime in runtimes() {
        let podman = Podman::new(&runtime);
        let c = Container::run(
            &podman,
            &["--systemd=true", "--rootfs", &rootfs, "/sbin/init"],
        );
        assert_eq!(c.wait_booted(), "running", "{}", c.rt());
        check_stop(&c);
    }
}

#[test]
fn debian_trixie_systemd_boots_and_stops() {
    let rootfs = match debian("trixie") {
        Ok(dir) => format!("{}:O", dir.display()),
        Err(why) => {
            panic!("cannot run here: {why}");
        }
    };
    let _lock = podman_lock();
    for runtime in runtimes() {
        let podman = Podman::new(&runtime);
        let (c, _) = boot(&podman, &rootfs, &LIMITS);
        assert_eq!(
            c.sh("cat /etc/debian_version").split('.').next(),
            Some("13")
        );
        assert_eq!(
            c.sh("systemctl is-active systemd-journald").trim(),
            "active"
        );
        check_stop(&c);
    }
}

#[test]
fn two_debian_containers_side_by_side() {
    let rootfs = match bookworm() {
        Ok(dir) => format!("{}:O", dir.display()),
        Err(why) => {
            panic!("cannot run here: {why}");
        }
    };
    let _lock = podman_lock();
    let podman = Podman::new(Path::new(common::SHIM));
    let (a, _) = boot(&podman, &rootfs, &["--hostname", "deb-a"]);
    let (b, _) = boot(&podman, &rootfs, &["--hostname", "deb-b"]);
    assert_eq!(a.sh("hostname").trim(), "deb-a");
    assert_eq!(b.sh("hostname").trim(), "deb-b");
    assert_ne!(
        a.sh("cat /etc/machine-id"),
        b.sh("cat /etc/machine-id"),
        "two containers share a machine id"
    );
    // Each sees only its own processes; a file written in one is not in the other.
    a.sh("echo only-in-a > /root/mark");
    assert_ne!(b.exec(&["cat", "/root/mark"]).0, Some(0));
    let procs = |c: &Container<'_>| c.sh("ps -e -o comm=");
    assert!(!procs(&b).contains("sleep"));
    let (code, _, err) = a.exec_with(&["-d"], &["sleep", "600"]);
    assert_eq!(code, Some(0), "exec -d: {err}");
    common::wait_until("sleep in a", || procs(&a).contains("sleep"));
    assert!(!procs(&b).contains("sleep"), "b sees a's processes");
    check_stop(&a);
    assert_eq!(b.sh("systemctl is-system-running").trim(), "running");
    check_stop(&b);
}

#[test]
fn containers_reach_each_other_on_the_default_network() {
    if let Some(why) = missing_tools(&["podman"]) {
        panic!("cannot run here: {why}");
    }
    let _lock = podman_lock();
    for runtime in runtimes() {
        let podman = Podman::new(&runtime);
        let rootfs = podman.rootfs();
        let server = Container::run(
            &podman,
            &[
                "--rootfs",
                &rootfs,
                "/bin/sh",
                "-c",
                "echo pong-from-$(hostname) | nc -l -p 7777",
            ],
        );
        let (_, ip, _) = text(&podman.run(&[
            "inspect",
            "--format",
            "{{.NetworkSettings.IPAddress}}",
            &server.id,
        ]));
        let ip = ip.trim().to_string();
        assert!(
            ip.parse::<std::net::Ipv4Addr>().is_ok(),
            "{}: ip {ip:?}",
            server.rt()
        );
        let script = format!(
            "ping -c 1 -W 5 {ip} >/dev/null || exit 10; \
             for i in $(seq 100); do nc {ip} 7777 && exit 0; sleep 0.1; done; exit 11"
        );
        let (code, out, err) =
            text(&podman.run(&["run", "--rm", "--rootfs", &rootfs, "/bin/sh", "-c", &script]));
        assert_eq!(code, Some(0), "{}: {err}", server.rt());
        let short = &server.id[..12];
        assert_eq!(out.trim(), format!("pong-from-{short}"), "{}", server.rt());
    }
}

/// Kills rootless podman's pause process (it keeps the user namespace
/// alive after podman exits) and removes the test's directory.
struct RootlessDir(tempfile::TempDir);

impl Drop for RootlessDir {
    fn drop(&mut self) {
        let pid_file = self.0.path().join("xdg/libpod/tmp/pause.pid");
        if let Some(pid) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Rootless: podman as an unprivileged user (nobody), in a user namespace
/// it makes itself (single-id mapping: no /etc/subuid ranges here), runs the
/// busybox container with each runtime. No network (slirp4netns is not
/// installed) and no cgroup (v1 hierarchies are not writable rootless).
#[test]
fn rootless_podman_runs_a_container_as_an_unprivileged_user() {
    if let Some(why) = missing_tools(&["podman", "setpriv"]) {
        panic!("cannot run here: {why}");
    }
    let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces").unwrap_or_default();
    assert_ne!(max.trim(), "0", "unprivileged user namespaces are disabled");
    let _lock = podman_lock();
    for runtime in runtimes() {
        let dir = RootlessDir(
            tempfile::Builder::new()
                .prefix("plexvm-rootless")
                .tempdir()
                .unwrap(),
        );
        let d = dir.0.path();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        common::build_rootfs(&d.join("rootfs"));
        for sub in ["home", "xdg"] {
            std::fs::create_dir(d.join(sub)).unwrap();
        }
        let chown = std::process::Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(d.join("rootfs"))
            .arg(d.join("home"))
            .arg(d.join("xdg"))
            .status()
            .unwrap();
        assert!(chown.success());
        std::fs::set_permissions(d.join("xdg"), std::fs::Permissions::from_mode(0o700)).unwrap();
        let out = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "env",
                "-i",
            ])
            .arg("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .arg(format!("HOME={}", d.join("home").display()))
            .arg(format!("XDG_RUNTIME_DIR={}", d.join("xdg").display()))
            .arg("podman")
            .arg("--root")
            .arg(d.join("home/storage"))
            .arg("--runroot")
            .arg(d.join("xdg/run"))
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"])
            .arg("--runtime")
            .arg(&runtime)
            .args(["run", "--rm", "--network", "none", "--rootfs"])
            .arg(d.join("rootfs"))
            .args([
                "/bin/sh",
                "-c",
                "echo uid-$(id -u); cat /proc/self/uid_map; exit 6",
            ])
            .current_dir(d)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let (code, stdout, stderr) = text(&out);
        assert_eq!(code, Some(6), "{}: {stderr}", name(&runtime));
        let fields: Vec<&str> = stdout.split_whitespace().collect();
        // root inside is nobody outside, and only that one id is mapped.
        assert_eq!(
            fields,
            ["uid-0", "0", "65534", "1"],
            "{}: {stdout}",
            name(&runtime)
        );
    }
}
