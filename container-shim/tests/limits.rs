//! Cgroup limits (pids, memory, cpu) and seccomp are enforced.

mod common;

use common::{unique_id, Bundle, Shim};
use serde_json::json;

#[test]
fn pids_limit_stops_a_fork_bomb() {
    require_prerequisites!();
    let shim = Shim::new();
    let script = "for i in $(seq 64); do sleep 30 & done; echo all-forked";
    // Without a limit all 64 children start (the script then ends and the
    // pid namespace goes away with them).
    let bundle = Bundle::new(&["sh", "-c", script], |_| {});
    let (code, out, err) = shim.run_container(&unique_id("pids-free"), &bundle);
    assert_eq!((code, out.as_str()), (0, "all-forked\n"), "stderr: {err}");
    // With pids.max = 16 fork fails, which ends busybox sh with status 2.
    let bundle = Bundle::new(&["sh", "-c", script], |c| {
        c["linux"]["resources"]["pids"] = json!({"limit": 16});
    });
    let (code, out, err) = shim.run_container(&unique_id("pids"), &bundle);
    assert_eq!(out, "", "fork bomb was not stopped");
    assert!(err.contains("can't fork"), "{err}");
    assert_eq!(code, 2);
}

#[test]
fn memory_limit_kills_a_memory_hog() {
    require_prerequisites!();
    let shim = Shim::new();
    // The shell keeps the whole 200 MB command substitution in memory.
    let script = "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived ${#x}";
    let bundle = Bundle::new(&["sh", "-c", script], |c| {
        c["linux"]["resources"]["memory"] = json!({"limit": 32 * 1024 * 1024});
    });
    let (code, out, err) = shim.run_container(&unique_id("mem"), &bundle);
    assert!(!out.contains("survived 200000000"), "hog survived: {out}");
    assert_eq!(code, 128 + 9, "not OOM-killed: out={out} err={err}");

    // Without the limit the same program completes.
    let bundle = Bundle::new(
        &[
            "sh",
            "-c",
            "x=$(head -c 2000000 /dev/zero | tr '\\0' a); echo ok ${#x}",
        ],
        |_| {},
    );
    let (code, out, _) = shim.run_container(&unique_id("mem-ok"), &bundle);
    assert_eq!((code, out.as_str()), (0, "ok 2000000\n"));
}

#[test]
fn cpu_and_memory_settings_are_visible_in_the_container_cgroup() {
    require_prerequisites!();
    let shim = Shim::new();
    let script = "if [ -e /sys/fs/cgroup/cgroup.controllers ]; then cat /sys/fs/cgroup/cpu.max /sys/fs/cgroup/memory.max; \
                  else cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/memory/memory.limit_in_bytes; fi";
    let bundle = Bundle::new(&["sh", "-c", script], |c| {
        c["linux"]["resources"]["cpu"] = json!({"quota": 50000, "period": 100000});
        c["linux"]["resources"]["memory"] = json!({"limit": 64 * 1024 * 1024});
    });
    let (code, out, err) = shim.run_container(&unique_id("cpu"), &bundle);
    assert_eq!(code, 0, "stderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("50000"), "cpu quota: {out}");
    assert_eq!(
        lines[1],
        (64 * 1024 * 1024).to_string(),
        "memory limit: {out}"
    );
}

#[test]
fn seccomp_profile_denies_listed_syscalls() {
    require_prerequisites!();
    let shim = Shim::new();
    let script = "mkdir /tmp/denied; echo mkdir=$?; touch /tmp/allowed && echo touch=ok";
    let deny_list = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let bundle = Bundle::new(&["sh", "-c", script], |c| c["linux"]["seccomp"] = deny_list);
    let (code, out, err) = shim.run_container(&unique_id("seccomp"), &bundle);
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out, "mkdir=1\ntouch=ok\n");
    assert!(err.contains("Operation not permitted"), "{err}");
    assert!(!bundle.rootfs().join("tmp/denied").exists());

    // Allow-list style (default errno), with the rule applied without no_new_privs.
    let mut names: Vec<&str> = ALLOWED.to_vec();
    names.retain(|n| *n != "mkdir" && *n != "mkdirat");
    let allow_list = json!({
        "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
        "syscalls": [{"names": names, "action": "SCMP_ACT_ALLOW"}]
    });
    let bundle = Bundle::new(&["sh", "-c", script], |c| {
        c["linux"]["seccomp"] = allow_list;
        c["process"]["noNewPrivileges"] = json!(false);
    });
    let (code, out, err) = shim.run_container(&unique_id("seccomp-allow"), &bundle);
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out, "mkdir=1\ntouch=ok\n");
    assert!(err.contains("Function not implemented"), "{err}");
}

/// Enough syscalls for busybox sh, touch and the runtime's last steps.
const ALLOWED: &[&str] = &[
    "read",
    "write",
    "open",
    "openat",
    "close",
    "stat",
    "fstat",
    "lstat",
    "newfstatat",
    "statx",
    "poll",
    "lseek",
    "mmap",
    "mprotect",
    "munmap",
    "brk",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "ioctl",
    "readv",
    "writev",
    "access",
    "pipe",
    "pipe2",
    "dup",
    "dup2",
    "dup3",
    "getpid",
    "getppid",
    "clone",
    "clone3",
    "fork",
    "vfork",
    "execve",
    "exit",
    "exit_group",
    "wait4",
    "kill",
    "uname",
    "fcntl",
    "getcwd",
    "chdir",
    "fchdir",
    "umask",
    "getuid",
    "getgid",
    "geteuid",
    "getegid",
    "setuid",
    "setgid",
    "setresuid",
    "setresgid",
    "setgroups",
    "getgroups",
    "capget",
    "capset",
    "prctl",
    "arch_prctl",
    "set_tid_address",
    "set_robust_list",
    "futex",
    "utimensat",
    "getdents64",
    "getrandom",
    "rseq",
    "prlimit64",
    "mkdir",
    "mkdirat",
    "close_range",
    "sigaltstack",
    "gettid",
    "tgkill",
    "faccessat",
    "faccessat2",
    "setpgid",
    "getpgid",
    "getpgrp",
    "setsid",
    "readlink",
    "readlinkat",
    "sysinfo",
    "nanosleep",
    "clock_nanosleep",
    "sendto",
    "recvfrom",
    "sendmsg",
    "recvmsg",
    "madvise",
    "statfs",
    "fstatfs",
    "pread64",
    "getrlimit",
    "setrlimit",
    "sched_getaffinity",
    "sched_yield",
    "clock_gettime",
    "gettimeofday",
    "time",
];
