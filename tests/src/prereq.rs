//! Host tools the end-to-end tests need, and the one rule for skipping.
//!
//! `tests/run.sh` installs every Debian package the tests use. A test whose tool is
//! missing fails and says exactly which tool and package is missing; no test skips.

use std::path::Path;

/// A program a test runs, and the Debian package that provides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    /// Program name looked up in `PATH`, or an absolute path.
    pub program: &'static str,
    /// Debian package that installs it.
    pub package: &'static str,
}

/// QEMU's x86 system emulator.
pub const QEMU_SYSTEM: Tool = Tool {
    program: "qemu-system-x86_64",
    package: "qemu-system-x86",
};
/// qemu-storage-daemon.
pub const QEMU_STORAGE_DAEMON: Tool = Tool {
    program: "qemu-storage-daemon",
    package: "qemu-utils",
};
/// Static busybox for the guests' userland.
pub const BUSYBOX_STATIC: Tool = Tool {
    program: "/bin/busybox",
    package: "busybox-static",
};
/// e2fsck, debugfs, mke2fs.
pub const E2FSPROGS: &[Tool] = &[
    Tool {
        program: "e2fsck",
        package: "e2fsprogs",
    },
    Tool {
        program: "debugfs",
        package: "e2fsprogs",
    },
    Tool {
        program: "mke2fs",
        package: "e2fsprogs",
    },
];
/// cpio for initramfs archives.
pub const CPIO: Tool = Tool {
    program: "cpio",
    package: "cpio",
};

/// Whether `program` is an existing absolute path or found in `PATH`.
pub fn has_program(program: &str) -> bool {
    if program.starts_with('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Why the tools in `tools` cannot be used (one line per missing tool); empty when all
/// are there.
pub fn missing(tools: &[Tool]) -> Vec<String> {
    tools
        .iter()
        .filter(|t| !has_program(t.program))
        .map(|t| {
            format!(
                "{} not found (Debian package {} is not installed; tests/run.sh installs it)",
                t.program, t.package
            )
        })
        .collect()
}

/// Fails `test` when `reasons` (missing tools) is not empty, naming each program and the
/// package that installs it. A test never skips: one that cannot run here fails, so a
/// missing install step in tests/run.sh can never hide behind a passing test.
pub fn require(test: &str, reasons: &[String]) {
    assert!(
        reasons.is_empty(),
        "{test}: required tools are missing (tests/run.sh installs them): {}",
        reasons.join("; ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_names_program_and_package() {
        let absent = Tool {
            program: "/nonexistent/plexvm-no-such-tool",
            package: "no-such-package",
        };
        let present = Tool {
            program: "sh",
            package: "dash",
        };
        assert!(missing(&[present]).is_empty());
        let reasons = missing(&[absent, present]);
        assert_eq!(reasons.len(), 1);
        assert!(reasons[0].contains("plexvm-no-such-tool"));
        assert!(reasons[0].contains("no-such-package"));
    }
}
