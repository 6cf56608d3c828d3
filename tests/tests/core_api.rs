//! The control API of a running VM, through `plexvm ctl` and through curl.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use plexvm_tests::{bin, create_image, wait_for, ChildGuard};

fn ctl(api: &Path, args: &[&str]) -> Output {
    Command::new(bin("plexvm"))
        .arg("ctl")
        .arg("--api")
        .arg(api)
        .args(args)
        .output()
        .unwrap()
}

fn status_json(api: &Path) -> serde_json::Value {
    let out = ctl(api, &["status"]);
    assert!(
        out.status.success(),
        "ctl status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn status_pause_resume_stop() {
    let dir = tempfile::tempdir().unwrap();
    create_image(&dir.path().join("disk.raw"), 16 << 20).unwrap();
    let api = dir.path().join("vm.api");
    std::fs::write(
        dir.path().join("vm.toml"),
        "[vm]\nname = \"apivm\"\nvcpus = 2\nmemory_mib = 128\nkernel = \"probe\"\n\
         cmdline = \"probe.workload=blk-verify probe.seconds=120\"\nserial = \"file:serial.log\"\n\
         api_socket = \"vm.api\"\n\n[[device]]\nid = \"disk0\"\nkind = \"blk\"\n\
         exec = [\"plexvm-blk\", \"--image\", \"disk.raw\"]\n",
    )
    .unwrap();
    let mut vm = ChildGuard::spawn(
        "plexvm",
        Command::new(bin("plexvm"))
            .args(["run", "vm.toml"])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stderr(Stdio::piped()),
    )
    .unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || api.exists()),
        "API socket never appeared"
    );

    let info = status_json(&api);
    assert_eq!(info["name"], "apivm");
    assert_eq!(info["state"], "running");
    assert_eq!(info["vcpus"], 2);
    assert_eq!(info["memory_mib"], 128);
    assert_eq!(info["pid"], vm.pid());
    let dev = &info["devices"][0];
    assert_eq!(dev["id"], "disk0");
    assert_eq!(dev["kind"], "blk");
    let backend_pid = dev["backend_pid"]
        .as_u64()
        .expect("spawned backend has a pid");
    assert!(Path::new(&format!("/proc/{backend_pid}")).exists());

    let out = ctl(&api, &["pause"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status_json(&api)["state"], "paused");
    // While paused the guest makes no progress: its serial output stands still.
    let len = || {
        std::fs::metadata(dir.path().join("serial.log"))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let before = len();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(len(), before, "guest printed while paused");
    // Pausing twice is a conflict, not a crash.
    let out = ctl(&api, &["pause"]);
    assert!(!out.status.success());

    let out = ctl(&api, &["resume"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status_json(&api)["state"], "running");

    // The same API through curl, as a user would call it.
    let curl = Command::new("curl")
        .args([
            "-sS",
            "--unix-socket",
            api.to_str().unwrap(),
            "http://localhost/vm",
        ])
        .output()
        .expect("curl is installed by tests/run.sh");
    assert!(curl.status.success());
    let via_curl: serde_json::Value = serde_json::from_slice(&curl.stdout).unwrap();
    assert_eq!(via_curl["name"], "apivm");
    let bad = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "PUT",
            "--data",
            "{\"state\":\"sideways\"}",
            "--unix-socket",
            api.to_str().unwrap(),
            "http://localhost/vm/state",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&bad.stdout), "400");

    let out = ctl(&api, &["stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = vm.wait_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0));
    // The core stopped the backend it spawned and removed its sockets.
    assert!(wait_for(Duration::from_secs(5), || !Path::new(&format!(
        "/proc/{backend_pid}"
    ))
    .exists()));
    assert!(!api.exists(), "API socket left behind");
}
