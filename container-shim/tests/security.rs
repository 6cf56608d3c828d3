//! runc's security history, replayed against plexvm-shim: for each CVE the
//! attack as its description and runc's fix describe it (a malicious rootfs,
//! config or racing process), then a check that the host is untouched.
//! The table in container-shim/README.md ("Security") maps CVE → test.

mod common;

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{unique_id, wait_until, Bundle, ChildGuard, Shim};
use serde_json::json;

/// Removes the config's /dev tmpfs, so the image's own /dev is used (the
/// attacks below plant symlinks there); devpts, shm and mqueue stay.
fn use_image_dev(c: &mut serde_json::Value) {
    let mounts = c["mounts"].as_array_mut().unwrap();
    mounts.retain(|m| m["destination"] != "/dev");
}

/// Copies the dynamic loader and libraries `binary` needs (per ldd) into
/// the same paths under `rootfs`.
fn copy_shared_libraries(binary: &Path, rootfs: &Path) {
    let out = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .unwrap();
    for word in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if word.starts_with('/') {
            let src = std::fs::canonicalize(word).unwrap();
            let dest = rootfs.join(word.trim_start_matches('/'));
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            if !dest.exists() {
                std::fs::copy(&src, &dest).unwrap();
            }
        }
    }
}

/// CVE-2019-5736: the image makes the runtime execute `/proc/self/exe`
/// (here /bin/evil → /proc/self/exe, the CVE used `#!/proc/self/exe`), which
/// is the runtime's own binary; the container (pid 1 here) opens it through
/// /proc/PID/exe and writes it once the process is gone. The runtime under
/// attack is a copy, so a vulnerable runtime only destroys the copy.
#[test]
fn cve_2019_5736_container_cannot_overwrite_the_runtime_binary() {
    require_prerequisites!();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("plexvm-shim");
    std::fs::copy(common::SHIM, &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let original = std::fs::read(&copy).unwrap();
    let shim = Shim::with_binary(&copy);
    // The attacker: find a process whose executable is not busybox (the
    // runtime's exec child, then the image's /bin/evil), hold its exe,
    // unblock it, and try to write through the held handle until it is free.
    let attack = r#"
        while :; do
          for p in /proc/[0-9]*; do
            case "$(readlink $p/exe)" in *busybox*|"") continue;; esac
            exec 3< $p/exe && break 2
          done
        done
        readlink /proc/self/fd/3 > /tmp/held
        exec 4< /fifo
        i=0
        while [ $i -lt 100 ]; do
          if (printf 'PWNED' > /proc/self/fd/3) 2>/dev/null; then echo written > /tmp/result; break; fi
          i=$((i+1)); sleep 0.05
        done
        echo done >> /tmp/result
        sleep 1000
    "#;
    let bundle = Bundle::new(&["sh", "-c", attack], |_| {});
    symlink("/proc/self/exe", bundle.rootfs().join("bin/evil")).unwrap();
    // The runtime is dynamically linked: the image ships the loader and
    // libraries it needs (as a distribution image does).
    copy_shared_libraries(&copy, &bundle.rootfs());
    nix::unistd::mkfifo(
        &bundle.rootfs().join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o666),
    )
    .unwrap();
    let id = unique_id("cve5736");
    let _guard = shim.create(&id, &bundle);
    shim.ok(&["start", &id]);
    // Running /bin/evil runs the runtime binary inside the container; it
    // blocks opening its --log FIFO until the attacker holds its exe.
    let trigger = ChildGuard(
        shim.cmd(&["exec", &id, "/bin/evil", "--log", "/fifo", "state", "x"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let result = bundle.rootfs().join("tmp/result");
    wait_until("the attack to finish", || {
        std::fs::read_to_string(&result).is_ok_and(|s| s.contains("done"))
    });
    drop(trigger);
    let held = std::fs::read_to_string(bundle.rootfs().join("tmp/held")).unwrap();
    // The attack did get hold of the runtime's executable...
    assert!(held.starts_with("/memfd:plexvm-shim"), "held {held:?}");
    // ...but the host binary is untouched and no write went through.
    assert!(
        std::fs::read(&copy).unwrap() == original,
        "runtime binary modified"
    );
    assert_eq!(std::fs::read_to_string(&result).unwrap(), "done\n");
}

/// CVE-2019-16884: a volume over /proc (here a bind of a host directory)
/// gives the runtime a fake procfs, so its writes to /proc (AppArmor labels
/// then; sysctls here) land in files the attacker chose. runc's fix (and
/// this runtime) only allow procfs on /proc.
#[test]
fn cve_2019_16884_fake_proc_mount_is_refused() {
    require_prerequisites!();
    let shim = Shim::new();
    let host = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(host.path().join("sys/kernel")).unwrap();
    let src = host.path().display().to_string();
    for (typ, source, opts) in [
        ("bind", src.as_str(), json!(["rbind"])),
        ("tmpfs", "tmpfs", json!([])),
    ] {
        let bundle = Bundle::new(&["true"], |c| {
            let mounts = c["mounts"].as_array_mut().unwrap();
            mounts.retain(|m| m["destination"] != "/proc");
            mounts.insert(
                0,
                json!({"destination": "/proc", "type": typ, "source": source, "options": opts}),
            );
            c["linux"]["sysctl"] = json!({"kernel.domainname": "pwned"});
        });
        let (code, _, err) = shim.run_container(&unique_id("cve16884"), &bundle);
        assert_ne!(code, 0, "{typ} on /proc accepted");
        assert!(err.contains("only procfs may be mounted on /proc"), "{err}");
    }
    // Below /proc only the lxcfs-style files may be covered.
    let bundle = Bundle::new(&["true"], |c| {
        c["mounts"].as_array_mut().unwrap().push(
            json!({"destination": "/proc/sys/kernel/domainname", "type": "bind", "source": src, "options": ["bind"]}),
        );
    });
    let (code, _, err) = shim.run_container(&unique_id("cve16884b"), &bundle);
    assert_ne!(code, 0);
    assert!(err.contains("not allowed"), "{err}");
    let left: Vec<_> = std::fs::read_dir(host.path().join("sys/kernel"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "the runtime wrote into the fake /proc");
}

/// CVE-2023-27561 (and CVE-2023-28642): the image's /proc (or /sys) is a
/// symlink, so procfs lands elsewhere and /proc is what the image wants.
#[test]
fn cve_2023_27561_symlinked_proc_or_sys_is_refused() {
    require_prerequisites!();
    let shim = Shim::new();
    for dir in ["proc", "sys"] {
        let bundle = Bundle::new(&["true"], |_| {});
        let rootfs = bundle.rootfs();
        std::fs::remove_dir(rootfs.join(dir)).unwrap();
        std::fs::create_dir(rootfs.join("fake")).unwrap();
        symlink("/fake", rootfs.join(dir)).unwrap();
        let (code, _, err) = shim.run_container(&unique_id("cve27561"), &bundle);
        assert_ne!(code, 0, "/{dir} symlink accepted");
        assert!(err.contains("is a symlink"), "{err}");
        assert_eq!(std::fs::read_dir(rootfs.join("fake")).unwrap().count(), 0);
    }
}

/// CVE-2021-30465: a racing process swaps a path component of a mount
/// destination between a directory and a symlink out of the rootfs, so a
/// check-then-mount runtime creates and mounts on a host path. Destinations
/// are resolved and mounted through one openat2(RESOLVE_IN_ROOT) handle.
#[test]
fn cve_2021_30465_symlink_exchange_race_stays_in_the_rootfs() {
    require_prerequisites!();
    let shim = Shim::new();
    let host = tempfile::tempdir().unwrap();
    let bundle = Bundle::new(&["true"], |c| {
        c["mounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"destination": "/mnt/evil/target", "type": "tmpfs", "source": "tmpfs"}));
    });
    let mnt = bundle.rootfs().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    std::fs::create_dir(mnt.join("evil")).unwrap();
    symlink(host.path(), mnt.join("link")).unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let _ = nix::fcntl::renameat2(
                    None,
                    &mnt.join("evil"),
                    None,
                    &mnt.join("link"),
                    nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                );
            }
        });
        for _ in 0..30 {
            // Either outcome is fine for the runtime; the host must not change.
            let _ = shim.run_container(&unique_id("cve30465"), &bundle);
        }
        stop.store(true, Ordering::Relaxed);
    });
    let entries: Vec<_> = std::fs::read_dir(host.path()).unwrap().collect();
    assert!(
        entries.is_empty(),
        "the runtime created {entries:?} on the host"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&host.path().display().to_string()));
}

/// The capability sets of a process, from /proc/PID/status inside.
fn cap_lines(out: &str) -> Vec<&str> {
    out.lines().filter(|l| l.starts_with("Cap")).collect()
}

/// CVE-2022-29162: runc gave processes a non-empty inheritable set (`exec
/// --cap`, and configs without `inheritable`), so a program with file
/// inheritable capabilities gained them. Inheritable stays what the config
/// says; here: nothing.
#[test]
fn cve_2022_29162_inheritable_capabilities_stay_empty() {
    require_prerequisites!();
    let shim = Shim::new();
    let bundle = Bundle::new(
        &["sh", "-c", "grep CapInh /proc/self/status; sleep 1000"],
        |c| {
            let caps = &mut c["process"]["capabilities"];
            caps.as_object_mut().unwrap().remove("ambient");
            caps.as_object_mut().unwrap().remove("inheritable");
        },
    );
    let id = unique_id("cve29162");
    let _guard = shim.create(&id, &bundle);
    shim.ok(&["start", &id]);
    let out = shim.ok(&["exec", &id, "cat", "/proc/self/status"]);
    assert!(
        cap_lines(&out).contains(&"CapInh:\t0000000000000000"),
        "{out}"
    );
    let out = shim.ok(&[
        "exec",
        "--cap",
        "CAP_NET_RAW",
        &id,
        "cat",
        "/proc/self/status",
    ]);
    assert!(
        cap_lines(&out).contains(&"CapInh:\t0000000000000000"),
        "{out}"
    );
    // The requested cap is granted (bit 13), only not inheritable.
    let eff = cap_lines(&out)
        .into_iter()
        .find_map(|l| l.strip_prefix("CapEff:\t"))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap();
    assert_ne!(eff & (1 << 13), 0, "{out}");
}

/// CVE-2024-21626: a runtime fd (runc: an O_PATH handle on /sys/fs/cgroup)
/// leaked into the container, and process.cwd = /proc/self/fd/N put the
/// container's process in a host directory, from where `..` reaches the
/// host's root. Every fd is close-on-exec and cwd is resolved in the root.
#[test]
fn cve_2024_21626_no_leaked_fd_reaches_the_host() {
    require_prerequisites!();
    let shim = Shim::new();
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("host-marker");
    std::fs::write(&marker, "host\n").unwrap();
    let rel = marker.strip_prefix("/").unwrap().display().to_string();
    let script = format!(
        "cd ../../../../../../../../..; \
         if test -e {rel}; then echo ESCAPED; echo pwned > {rel}; fi; \
         ls /proc/self/fd | tr '\\n' ' '"
    );
    for n in 3..16 {
        let bundle = Bundle::new(&["sh", "-c", &script], |c| {
            c["process"]["cwd"] = json!(format!("/proc/self/fd/{n}"));
        });
        let (_, out, _) = shim.run_container(&unique_id("cve21626"), &bundle);
        assert!(!out.contains("ESCAPED"), "cwd /proc/self/fd/{n}: {out}");
    }
    // The same through `exec --cwd`, and no runtime fd in the container.
    let bundle = Bundle::new(&["sleep", "1000"], |_| {});
    let id = unique_id("cve21626e");
    let _guard = shim.create(&id, &bundle);
    shim.ok(&["start", &id]);
    for n in 3..16 {
        let cwd = format!("/proc/self/fd/{n}");
        let out = shim.run(&["exec", "--cwd", &cwd, &id, "sh", "-c", &script]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("ESCAPED"), "exec --cwd {cwd}: {text}");
    }
    let fds = shim.ok(&["exec", &id, "ls", "/proc/self/fd"]);
    let fds: Vec<&str> = fds.split_whitespace().collect();
    // ls's own directory fd is the only one beyond stdio.
    assert!(fds.len() <= 4, "leaked fds: {fds:?}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "host\n");
}

/// CVE-2025-31133: the image's /dev/null is a symlink to a /proc file, so
/// masking (bind /dev/null over a masked path) bind-mounts that file,
/// writable, instead. Here the symlink points at the (namespaced) hostname
/// sysctl: a vulnerable runtime lets the container write it through the
/// "masked" /proc/timer_list. The default devices replace whatever the image
/// has at their paths, and masking checks /dev/null is the 1:3 device.
#[test]
fn cve_2025_31133_dev_null_symlink_does_not_unmask() {
    require_prerequisites!();
    let shim = Shim::new();
    let script = "echo pwned > /proc/timer_list 2>/dev/null; hostname; \
                  wc -c < /proc/timer_list; ls -l /dev/null";
    let bundle = Bundle::new(&["sh", "-c", script], use_image_dev);
    let dev = bundle.rootfs().join("dev");
    symlink("/proc/sys/kernel/hostname", dev.join("null")).unwrap();
    let (code, out, err) = shim.run_container(&unique_id("cve31133"), &bundle);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0], "plexvm-test",
        "masked path wrote the hostname: {out}"
    );
    assert_eq!(
        lines[1].trim(),
        "0",
        "/proc/timer_list is not masked: {out}"
    );
    assert!(
        lines[2].starts_with('c'),
        "/dev/null is not a device: {out}"
    );
}

/// CVE-2025-52565: the image's /dev/console is a symlink, and the runtime
/// bind-mounts the container's pty over whatever it points to (here
/// /proc/sys/kernel/hostname, which then is no longer the procfs file; in
/// the CVE a /proc file the masks and read-only paths were to protect).
#[test]
fn cve_2025_52565_dev_console_symlink_is_not_followed() {
    use std::os::unix::net::UnixListener;
    require_prerequisites!();
    let shim = Shim::new();
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("console.sock");
    let listener = UnixListener::bind(&sock_path).unwrap();
    let script = "stat -c %F /dev/console /proc/sys/kernel/hostname > /tmp/kinds 2>&1; echo end >> /tmp/kinds";
    let bundle = Bundle::new(&["sh", "-c", script], |c| {
        use_image_dev(c);
        c["process"]["terminal"] = json!(true);
    });
    symlink(
        "/proc/sys/kernel/hostname",
        bundle.rootfs().join("dev/console"),
    )
    .unwrap();
    let id = unique_id("cve52565");
    let _guard = common::ContainerGuard {
        shim: &shim,
        id: id.clone(),
    };
    let mut create = ChildGuard(
        shim.cmd(&[
            "create",
            "--bundle",
            bundle.path().to_str().unwrap(),
            "--console-socket",
            sock_path.to_str().unwrap(),
            &id,
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap(),
    );
    let (_conn, _) = listener.accept().unwrap();
    assert!(create.0.wait().unwrap().success());
    shim.ok(&["start", &id]);
    let kinds = bundle.rootfs().join("tmp/kinds");
    wait_until("the container to report", || {
        std::fs::read_to_string(&kinds).is_ok_and(|s| s.ends_with("end\n"))
    });
    let kinds = std::fs::read_to_string(&kinds).unwrap();
    assert_eq!(
        kinds, "character special file\nregular empty file\nend\n",
        "the pty went elsewhere"
    );
}

/// CVE-2025-52881: something in the container's mount namespace (a racing
/// container with a shared mount in the CVE; a createContainer hook here)
/// mounts a host file over the /proc/sys file the runtime is about to write,
/// redirecting the write. sysctls are written through a private procfs
/// instance that crosses no mount, so the host file keeps its content.
#[test]
fn cve_2025_52881_procfs_writes_are_not_redirected() {
    require_prerequisites!();
    let shim = Shim::new();
    let host = tempfile::tempdir().unwrap();
    let decoy = host.path().join("decoy");
    std::fs::write(&decoy, "host file\n").unwrap();
    let bundle = Bundle::new(&["cat", "/proc/sys/kernel/domainname"], |_| {});
    let target = bundle.rootfs().join("proc/sys/kernel/domainname");
    let hook = format!("mount --bind {} {}", decoy.display(), target.display());
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.path().join("config.json")).unwrap())
            .unwrap();
    config["hooks"] = json!({"createContainer": [{"path": "/bin/sh", "args": ["sh", "-c", hook]}]});
    config["linux"]["sysctl"] = json!({"kernel.domainname": "written-by-runtime"});
    std::fs::write(bundle.path().join("config.json"), config.to_string()).unwrap();
    let (code, out, err) = shim.run_container(&unique_id("cve52881"), &bundle);
    assert_eq!(
        std::fs::read_to_string(&decoy).unwrap(),
        "host file\n",
        "write redirected"
    );
    // The container still sees the hook's overmount (so the attack was in
    // place); the runtime's write went to its own procfs instance instead.
    if code == 0 {
        assert_eq!(out, "host file\n", "{err}");
    }
}
