//! What the container sees: its own processes, mounts, hostname, network and
//! users; read-only and masked paths; hooks; exec; the console socket.

mod common;

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::process::Stdio;

use common::{unique_id, wait_until, Bundle, ChildGuard, Shim};
use serde_json::json;

#[test]
fn container_sees_only_its_own_processes_mounts_hostname_and_network() {
    require_prerequisites!();
    let shim = Shim::new();
    let script = "set -- /proc/[0-9]*; echo procs=$#; hostname; ls /sys/class/net; \
                  cut -d' ' -f5 /proc/self/mountinfo";
    let bundle = Bundle::new(&["sh", "-c", script], |_| {});
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let (code, out, err) = shim.run_container(&unique_id("iso"), &bundle);
    assert_eq!(code, 0, "stderr: {err}");
    let mut lines = out.lines();
    // Only the shell itself (pid 1) and at most the process listing /proc.
    let procs: usize = lines
        .next()
        .unwrap()
        .strip_prefix("procs=")
        .unwrap()
        .parse()
        .unwrap();
    assert!(procs <= 2, "container sees {procs} processes");
    assert_eq!(lines.next(), Some("plexvm-test"));
    assert_eq!(
        lines.next(),
        Some("lo"),
        "new network namespace has only lo"
    );
    let mountpoints: Vec<&str> = lines.collect();
    assert!(mountpoints.contains(&"/") && mountpoints.contains(&"/proc"));
    for mp in &mountpoints {
        assert!(
            *mp == "/" || ["/proc", "/dev", "/sys"].iter().any(|p| mp.starts_with(p)),
            "host mount {mp} is visible in the container"
        );
    }
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        host_name
    );
}

#[test]
fn readonly_root_masked_and_readonly_paths() {
    require_prerequisites!();
    let shim = Shim::new();
    let script = "touch /newfile 2>/dev/null && echo root-writable; \
                  wc -c < /etc/secret; ls /etc/secretdir; \
                  echo x > /proc/sys/kernel/domainname 2>/dev/null && echo sys-writable; \
                  touch /dev/shm/ok && echo shm-writable";
    let bundle = Bundle::new(&["sh", "-c", script], |c| {
        c["root"]["readonly"] = json!(true);
        c["linux"]["maskedPaths"] = json!(["/etc/secret", "/etc/secretdir", "/no/such/path"]);
    });
    std::fs::write(bundle.rootfs().join("etc/secret"), "top secret").unwrap();
    std::fs::create_dir(bundle.rootfs().join("etc/secretdir")).unwrap();
    std::fs::write(bundle.rootfs().join("etc/secretdir/key"), "k").unwrap();
    let (code, out, err) = shim.run_container(&unique_id("ro"), &bundle);
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out, "0\nshm-writable\n");
    assert!(!bundle.rootfs().join("newfile").exists());
}

#[test]
fn user_namespace_maps_root_to_an_unprivileged_host_uid() {
    require_prerequisites!();
    let shim = Shim::new();
    let script = "cat /proc/self/uid_map /proc/self/gid_map; id -u; hostname";
    let bundle = Bundle::new(&["sh", "-c", script], |c| {
        let map = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        c["linux"]["uidMappings"] = map.clone();
        c["linux"]["gidMappings"] = map;
        c["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "user"}));
    });
    // The mapped root must be able to reach its rootfs.
    std::fs::set_permissions(bundle.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, out, err) = shim.run_container(&unique_id("userns"), &bundle);
    assert_eq!(code, 0, "stderr: {err}");
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(
        words,
        [
            "0",
            "100000",
            "65536",
            "0",
            "100000",
            "65536",
            "0",
            "plexvm-test"
        ]
    );
}

#[test]
fn hooks_run_at_their_points_with_the_state_on_stdin() {
    require_prerequisites!();
    let shim = Shim::new();
    let dir = tempfile::tempdir().unwrap();
    let runtime_out = dir.path().join("create-runtime.json");
    let poststop_out = dir.path().join("poststop.json");
    let hook = |out: &std::path::Path| json!({"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}", out.display())]});
    let bundle = Bundle::new(&["cat", "/tmp/started"], |c| {
        c["hooks"] = json!({
            "createRuntime": [hook(&runtime_out)],
            "startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "echo started > /tmp/started"]}],
            "poststop": [hook(&poststop_out)],
        });
    });
    let id = unique_id("hooks");
    let (code, out, err) = shim.run_container(&id, &bundle);
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out, "started\n", "startContainer ran inside the container");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&runtime_out).unwrap()).unwrap();
    assert_eq!(state["id"], id.as_str());
    assert_eq!(state["status"], "creating");
    assert!(state["pid"].as_i64().unwrap() > 0);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&poststop_out).unwrap()).unwrap();
    assert_eq!(state["status"], "stopped");

    let failing = Bundle::new(&["true"], |c| {
        c["hooks"] = json!({"createRuntime": [{"path": "/bin/false"}]});
    });
    let id = unique_id("hook-fail");
    let out = shim.run(&["create", "--bundle", failing.path().to_str().unwrap(), &id]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("createRuntime hook"));
    assert!(!shim.root.path().join(&id).exists());
}

#[test]
fn exec_runs_in_the_container_and_returns_its_code() {
    require_prerequisites!();
    let shim = Shim::new();
    let bundle = Bundle::new(
        &[
            "sh",
            "-c",
            "echo marker > /tmp/m; while true; do sleep 1; done",
        ],
        |_| {},
    );
    let id = unique_id("exec");
    let _guard = shim.create(&id, &bundle);
    shim.ok(&["start", &id]);
    wait_until("marker", || bundle.rootfs().join("tmp/m").exists());

    let out = shim.run(&["exec", &id, "sh", "-c", "cat /tmp/m; hostname; exit 9"]);
    assert_eq!(out.status.code(), Some(9));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "marker\nplexvm-test\n"
    );

    let dir = tempfile::tempdir().unwrap();
    let process = dir.path().join("process.json");
    let pid_file = dir.path().join("pid");
    std::fs::write(
        &process,
        json!({"user": {"uid": 65534, "gid": 65534}, "args": ["sh", "-c", "id -u > /tmp/who"],
               "cwd": "/", "env": ["PATH=/bin"]})
        .to_string(),
    )
    .unwrap();
    shim.ok(&[
        "exec",
        "--detach",
        "--process",
        process.to_str().unwrap(),
        "--pid-file",
        pid_file.to_str().unwrap(),
        &id,
    ]);
    assert!(
        std::fs::read_to_string(&pid_file)
            .unwrap()
            .parse::<i32>()
            .unwrap()
            > 0
    );
    wait_until("detached exec ran", || {
        std::fs::read_to_string(bundle.rootfs().join("tmp/who")).is_ok_and(|s| s == "65534\n")
    });

    let missing = shim.run(&["exec", &id, "/no/such/binary"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));

    shim.ok(&["kill", &id, "KILL"]);
    wait_until("stopped", || shim.status(&id) == "stopped");
    let stopped = shim.run(&["exec", &id, "true"]);
    assert!(String::from_utf8_lossy(&stopped.stderr).contains("stopped"));
}

/// Receives one fd sent with SCM_RIGHTS.
fn recv_fd(sock: &std::os::unix::net::UnixStream) -> OwnedFd {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    let mut buf = [0u8; 256];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .unwrap();
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: the fd was just received and nobody else owns it.
            return unsafe { OwnedFd::from_raw_fd(fds[0]) };
        }
    }
    panic!("no fd received");
}

#[test]
fn terminal_master_goes_to_the_console_socket() {
    require_prerequisites!();
    let shim = Shim::new();
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("console.sock");
    let listener = UnixListener::bind(&sock_path).unwrap();
    let bundle = Bundle::new(&["sh", "-c", "tty; test -t 0 && echo stdin-is-tty"], |c| {
        c["process"]["terminal"] = json!(true);
    });
    let id = unique_id("tty");
    let _guard = common::ContainerGuard {
        shim: &shim,
        id: id.clone(),
    };
    let create = ChildGuard(
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
    let (conn, _) = listener.accept().unwrap();
    let master = std::fs::File::from(recv_fd(&conn));
    let mut create = create;
    assert!(create.0.wait().unwrap().success());
    shim.ok(&["start", &id]);
    let mut text = String::new();
    let mut reader = std::io::BufReader::new(master);
    for _ in 0..2 {
        std::io::BufRead::read_line(&mut reader, &mut text).unwrap();
    }
    assert!(text.starts_with("/dev/pts/"), "{text:?}");
    assert!(text.contains("stdin-is-tty"), "{text:?}");

    // Without a console socket a terminal config is refused.
    let out = shim.run(&[
        "create",
        "--bundle",
        bundle.path().to_str().unwrap(),
        &unique_id("tty2"),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("console-socket"));
}
