//! Direct bundle tests: lifecycle states and transitions, exit codes,
//! signals, and what a failed create leaves behind.

mod common;

use std::process::Stdio;

use common::{cgroup_exists, unique_id, wait_until, Bundle, ChildGuard, Shim};

#[test]
fn create_start_kill_delete_follow_the_state_machine() {
    require_prerequisites!();
    let shim = Shim::new();
    let bundle = Bundle::new(&["sh", "-c", "while true; do sleep 1; done"], |_| {});
    let id = unique_id("life");
    let guard = shim.create(&id, &bundle);

    let state = shim.state(&id);
    assert_eq!(state["status"], "created");
    assert_eq!(state["id"], id.as_str());
    assert_eq!(state["ociVersion"], "1.2.0");
    assert!(state["pid"].as_i64().unwrap() > 0);
    assert_eq!(
        state["bundle"],
        bundle.path().canonicalize().unwrap().to_str().unwrap()
    );
    // The user program has not run yet: init still waits on the FIFO.
    let pid = state["pid"].as_i64().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains("while true"));

    // delete is refused while not stopped; a second create with the same ID too.
    assert!(!shim.run(&["delete", &id]).status.success());
    let again = shim.run(&["create", "--bundle", bundle.path().to_str().unwrap(), &id]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    shim.ok(&["start", &id]);
    assert_eq!(shim.status(&id), "running");
    wait_until("user program runs", || {
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
            .contains("while true")
    });
    // start only from created.
    let second = shim.run(&["start", &id]);
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("running"));

    let list = shim.ok(&["list", "--format", "json"]);
    assert!(list.contains(&id));
    let ps: Vec<i32> =
        serde_json::from_str(shim.ok(&["ps", "--format", "json", &id]).trim()).unwrap();
    assert!(ps.contains(&(pid as i32)));

    shim.ok(&["kill", &id, "KILL"]);
    wait_until("container stops", || shim.status(&id) == "stopped");
    // kill only created/running.
    let late = shim.run(&["kill", &id, "TERM"]);
    assert!(!late.status.success());
    assert!(String::from_utf8_lossy(&late.stderr).contains("not running"));

    let cgroup = format!("plexvm-shim/{id}");
    assert!(cgroup_exists(&cgroup));
    shim.ok(&["delete", &id]);
    assert!(!cgroup_exists(&cgroup), "cgroup left behind");
    assert!(!shim.run(&["state", &id]).status.success());
    drop(guard);
}

#[test]
fn kill_of_a_created_container_stops_it() {
    require_prerequisites!();
    let shim = Shim::new();
    let bundle = Bundle::new(&["true"], |_| {});
    let id = unique_id("created-kill");
    let _guard = shim.create(&id, &bundle);
    shim.ok(&["kill", &id]);
    wait_until("created container stops on TERM", || {
        shim.status(&id) == "stopped"
    });
    assert!(!shim.run(&["start", &id]).status.success());
    shim.ok(&["delete", &id]);
}

#[test]
fn run_exits_with_the_container_code() {
    require_prerequisites!();
    let shim = Shim::new();
    let bundle = Bundle::new(&["sh", "-c", "echo out; echo err >&2; exit 42"], |_| {});
    let (code, out, err) = shim.run_container(&unique_id("code"), &bundle);
    assert_eq!(code, 42, "stderr: {err}");
    assert_eq!(out, "out\n");
    assert_eq!(err, "err\n");

    // (Death by signal, 128 + N, is covered by the signals test: pid 1 of a
    // pid namespace cannot be killed from inside.)
    for (prog, want) in [("true", 0), ("false", 1)] {
        let bundle = Bundle::new(&[prog], |_| {});
        let (code, _, err) = shim.run_container(&unique_id("code"), &bundle);
        assert_eq!(code, want, "{prog}: {err}");
    }
    // run deletes the container afterwards.
    assert_eq!(shim.ok(&["list", "-q"]), "");
}

#[test]
fn signals_reach_the_container_by_name_and_number() {
    require_prerequisites!();
    let shim = Shim::new();
    let bundle = Bundle::new(
        &[
            "sh",
            "-c",
            "trap 'exit 42' USR1; trap 'exit 43' TERM; while true; do sleep 0.05; done",
        ],
        |_| {},
    );
    for (sig, want) in [("USR1", 42), ("15", 43), ("SIGKILL", 137)] {
        let id = unique_id("signal");
        let mut run = ChildGuard(
            shim.cmd(&["run", "--bundle", bundle.path().to_str().unwrap(), &id])
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_until("container runs", || {
            shim.run(&["state", &id]).status.success() && shim.status(&id) == "running"
        });
        // The traps are set once sh runs its loop; resend until it ends.
        let status = loop {
            shim.run(&["kill", &id, sig]);
            if let Some(status) = run.0.try_wait().unwrap() {
                break status;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert_eq!(status.code(), Some(want), "signal {sig}");
    }
}

#[test]
fn failed_create_leaves_nothing_behind() {
    require_prerequisites!();
    let shim = Shim::new();
    let cases: Vec<(&str, Bundle)> = vec![
        (
            "executable file not found",
            Bundle::new(&["/no/such/program"], |_| {}),
        ),
        (
            "bind source",
            Bundle::new(&["true"], |c| {
                c["mounts"].as_array_mut().unwrap().push(serde_json::json!(
                    {"destination": "/x", "type": "bind", "source": "/no/such/dir", "options": ["bind"]}
                ));
            }),
        ),
        (
            "cannot mount",
            Bundle::new(&["true"], |c| {
                c["mounts"].as_array_mut().unwrap().push(serde_json::json!(
                    {"destination": "/x", "type": "nosuchfs", "source": "x"}
                ));
            }),
        ),
        (
            "cannot open namespace",
            Bundle::new(&["true"], |c| {
                c["linux"]["namespaces"][1]["path"] = serde_json::json!("/no/such/netns");
            }),
        ),
    ];
    for (want, bundle) in cases {
        let id = unique_id("fail");
        let out = shim.run(&["create", "--bundle", bundle.path().to_str().unwrap(), &id]);
        assert!(!out.status.success(), "{want}: create succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{want}: {err}");
        assert!(
            !shim.root.path().join(&id).exists(),
            "{want}: state dir left"
        );
        assert!(
            !cgroup_exists(&format!("plexvm-shim/{id}")),
            "{want}: cgroup left"
        );
        assert_eq!(shim.ok(&["list", "-q"]), "");
        // No process of the container is left: none has the bundle's rootfs as root.
        let rootfs = bundle.rootfs();
        let leftover = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| std::fs::read_link(e.path().join("root")).is_ok_and(|r| r == rootfs));
        assert!(!leftover, "{want}: a process is left in the rootfs");
    }
}

#[test]
fn json_log_gets_error_lines() {
    require_prerequisites!();
    let shim = Shim::new();
    let log = shim.root.path().join("log.json");
    let out = shim
        .cmd(&[
            "--log",
            log.to_str().unwrap(),
            "--log-format",
            "json",
            "start",
            "nope",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    let text = std::fs::read_to_string(&log).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(line["level"], "error");
    assert!(line["msg"]
        .as_str()
        .unwrap()
        .contains("container nope does not exist"));
}

#[test]
fn cli_reports_version_and_features() {
    let out = std::process::Command::new(common::SHIM)
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("spec: 1.2.0"));
    let out = std::process::Command::new(common::SHIM)
        .arg("features")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ociVersionMax"], "1.2.0");
    assert_eq!(v["linux"]["seccomp"]["enabled"], true);
}
