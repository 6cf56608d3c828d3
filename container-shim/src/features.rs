//! `features`: what this runtime supports (runtime-spec features.md).

use crate::namespaces::proc_name;

/// The features document as JSON.
pub fn features() -> serde_json::Value {
    let namespaces: Vec<&str> = [
        oci_spec::runtime::LinuxNamespaceType::Mount,
        oci_spec::runtime::LinuxNamespaceType::Cgroup,
        oci_spec::runtime::LinuxNamespaceType::Uts,
        oci_spec::runtime::LinuxNamespaceType::Ipc,
        oci_spec::runtime::LinuxNamespaceType::User,
        oci_spec::runtime::LinuxNamespaceType::Pid,
        oci_spec::runtime::LinuxNamespaceType::Network,
    ]
    .into_iter()
    .map(|t| match proc_name(t) {
        "mnt" => "mount",
        "net" => "network",
        other => other,
    })
    .collect();
    let mut caps: Vec<String> = caps::runtime::thread_all_supported()
        .into_iter()
        .map(|c| c.to_string())
        .collect();
    caps.sort();
    serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": crate::OCI_VERSION,
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"],
        "mountOptions": [
            "async", "atime", "bind", "defaults", "dev", "diratime", "dirsync", "exec", "loud",
            "mand", "noatime", "nodev", "nodiratime", "noexec", "nomand", "norelatime",
            "nostrictatime", "nosuid", "private", "rbind", "relatime", "remount", "ro",
            "rprivate", "rshared", "rslave", "runbindable", "rw", "shared", "silent", "slave",
            "strictatime", "suid", "sync", "unbindable"
        ],
        "linux": {
            "namespaces": namespaces,
            "capabilities": caps,
            "cgroup": {"v1": true, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {
                "enabled": true,
                "actions": [
                    "SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS",
                    "SCMP_ACT_KILL_THREAD", "SCMP_ACT_LOG", "SCMP_ACT_TRACE", "SCMP_ACT_TRAP"
                ],
                "operators": [
                    "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_LE", "SCMP_CMP_LT",
                    "SCMP_CMP_MASKED_EQ", "SCMP_CMP_NE"
                ],
                "archs": [match std::env::consts::ARCH {
                    "aarch64" => "SCMP_ARCH_AARCH64",
                    "riscv64" => "SCMP_ARCH_RISCV64",
                    _ => "SCMP_ARCH_X86_64",
                }]
            },
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {"org.opencontainers.runc.checkpoint.enabled": "false"}
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn lists_namespaces_and_hooks() {
        let f = super::features();
        assert_eq!(f["ociVersionMax"], crate::OCI_VERSION);
        let ns = f["linux"]["namespaces"].as_array().unwrap();
        assert!(ns.iter().any(|n| n == "mount") && ns.iter().any(|n| n == "network"));
        assert_eq!(f["hooks"].as_array().unwrap().len(), 6);
    }
}
