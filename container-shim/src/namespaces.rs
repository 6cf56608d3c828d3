//! Creating and joining namespaces, and the user namespace's id maps.
//!
//! Order matters (see runc's nsexec.c): namespaces given by path are joined
//! first, the user namespace before the rest (joining a namespace owned by
//! another user namespace needs CAP_SYS_ADMIN there); then a new user namespace
//! is made and mapped by the runtime from outside; then the other new ones are
//! unshared, so they are owned by the container's user namespace.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use nix::sched::{setns, unshare, CloneFlags};
use oci_spec::runtime::{LinuxIdMapping, LinuxNamespaceType, Spec};

use crate::spec::namespaces;

/// Errors from namespace handling.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    /// A namespace file could not be opened.
    #[error("cannot open namespace {path}")]
    Open {
        /// The namespace file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// setns(2) failed.
    #[error("cannot join {typ:?} namespace {path}")]
    Join {
        /// Namespace type.
        typ: LinuxNamespaceType,
        /// The namespace file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// unshare(2) failed.
    #[error("cannot create namespaces {0:?}")]
    Unshare(CloneFlags, #[source] nix::Error),
    /// Writing uid_map/gid_map failed.
    #[error("cannot write {path}")]
    IdMap {
        /// The map file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing the time namespace's clock offsets failed.
    #[error("cannot write time namespace offsets")]
    TimeOffsets(#[source] std::io::Error),
}

type Result<T> = std::result::Result<T, NamespaceError>;

/// The clone(2) flag of a namespace type.
pub fn clone_flag(typ: LinuxNamespaceType) -> CloneFlags {
    match typ {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        // CLONE_NEWTIME is 0x80; nix 0.29 has no constant for it.
        LinuxNamespaceType::Time => CloneFlags::from_bits_retain(0x80),
    }
}

/// The name under /proc/PID/ns/.
pub fn proc_name(typ: LinuxNamespaceType) -> &'static str {
    match typ {
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Time => "time",
    }
}

/// An opened namespace to join.
#[derive(Debug)]
pub struct NsFile {
    typ: LinuxNamespaceType,
    path: PathBuf,
    fd: OwnedFd,
}

/// Join order: user first (so we have privilege in its namespaces), mount
/// last (joining it changes root and cwd).
fn join_rank(typ: LinuxNamespaceType) -> u8 {
    match typ {
        LinuxNamespaceType::User => 0,
        LinuxNamespaceType::Mount => 2,
        _ => 1,
    }
}

fn open_ns(typ: LinuxNamespaceType, path: PathBuf) -> Result<NsFile> {
    let file = File::open(&path).map_err(|source| NamespaceError::Open {
        path: path.clone(),
        source,
    })?;
    Ok(NsFile {
        typ,
        path,
        fd: file.into(),
    })
}

/// Opens the namespaces the config gives by path, in join order.
pub fn open_configured(spec: &Spec) -> Result<Vec<NsFile>> {
    let mut files = Vec::new();
    for ns in namespaces(spec) {
        if let Some(path) = ns.path() {
            files.push(open_ns(ns.typ(), path.clone())?);
        }
    }
    files.sort_by_key(|f| join_rank(f.typ));
    Ok(files)
}

/// Opens `/proc/<pid>/ns/*` for every namespace type the container has and
/// that differs from ours (for `exec`), in join order.
pub fn open_of_process(pid: i32, spec: &Spec) -> Result<Vec<NsFile>> {
    let mut files = Vec::new();
    for ns in namespaces(spec) {
        let name = proc_name(ns.typ());
        let path = PathBuf::from(format!("/proc/{pid}/ns/{name}"));
        let theirs = std::fs::metadata(&path).map_err(|source| NamespaceError::Open {
            path: path.clone(),
            source,
        })?;
        let ours = std::fs::metadata(format!("/proc/self/ns/{name}")).ok();
        if ours.is_some_and(|m| m.ino() == theirs.ino() && m.dev() == theirs.dev()) {
            continue;
        }
        files.push(open_ns(ns.typ(), path)?);
    }
    files.sort_by_key(|f| join_rank(f.typ));
    Ok(files)
}

/// Joins the opened namespaces in order.
pub fn join_all(files: &[NsFile]) -> Result<()> {
    for f in files {
        setns(&f.fd, clone_flag(f.typ)).map_err(|source| NamespaceError::Join {
            typ: f.typ,
            path: f.path.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Flags of the new namespaces other than user.
pub fn new_namespace_flags(spec: &Spec) -> Result<CloneFlags> {
    let mut flags = CloneFlags::empty();
    for ns in namespaces(spec) {
        if ns.path().is_none() && ns.typ() != LinuxNamespaceType::User {
            flags |= clone_flag(ns.typ());
        }
    }
    Ok(flags)
}

/// unshare(2) with error context.
pub fn unshare_flags(flags: CloneFlags) -> Result<()> {
    if flags.is_empty() {
        return Ok(());
    }
    unshare(flags).map_err(|e| NamespaceError::Unshare(flags, e))
}

/// Writes `linux.timeOffsets` for the time namespace just unshared: they
/// must be set before any process enters it (the next fork does).
pub fn write_time_offsets(spec: &Spec) -> Result<()> {
    let offsets = spec
        .linux()
        .as_ref()
        .and_then(|l| l.time_offsets().as_ref());
    let text: String = offsets
        .into_iter()
        .flatten()
        .map(|(clock, off)| {
            format!(
                "{clock} {} {}\n",
                off.secs().unwrap_or(0),
                off.nanosecs().unwrap_or(0)
            )
        })
        .collect();
    if text.is_empty() {
        return Ok(());
    }
    std::fs::write("/proc/self/timens_offsets", text).map_err(NamespaceError::TimeOffsets)
}

/// Writes uid_map and gid_map of `pid` from the runtime (outside) side.
pub fn write_id_maps(pid: i32, spec: &Spec) -> Result<()> {
    let linux = spec.linux().as_ref();
    let uid = linux.and_then(|l| l.uid_mappings().as_deref());
    let gid = linux.and_then(|l| l.gid_mappings().as_deref());
    write_map(pid, "uid_map", uid.unwrap_or_default())?;
    write_map(pid, "gid_map", gid.unwrap_or_default())
}

fn write_map(pid: i32, file: &str, maps: &[LinuxIdMapping]) -> Result<()> {
    if maps.is_empty() {
        return Ok(());
    }
    let path = PathBuf::from(format!("/proc/{pid}/{file}"));
    // The kernel wants the whole map in one write(2).
    std::fs::write(&path, format_map(maps)).map_err(|source| NamespaceError::IdMap { path, source })
}

fn format_map(maps: &[LinuxIdMapping]) -> String {
    maps.iter()
        .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxIdMappingBuilder;

    #[test]
    fn maps_are_formatted_one_line_each() {
        let m = LinuxIdMappingBuilder::default()
            .container_id(0u32)
            .host_id(100_000u32)
            .size(65_536u32)
            .build()
            .unwrap();
        assert_eq!(format_map(&[m, m]), "0 100000 65536\n0 100000 65536\n");
    }

    #[test]
    fn time_namespace_is_a_flag_like_the_others() {
        assert_eq!(clone_flag(LinuxNamespaceType::Time).bits(), 0x80);
    }

    #[test]
    fn default_spec_unshares_pid_mount_ipc_uts_net() {
        let flags = new_namespace_flags(&Spec::default()).unwrap();
        assert!(flags.contains(CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNS));
        assert!(!flags.contains(CloneFlags::CLONE_NEWUSER));
    }

    #[test]
    fn user_joins_first_and_mount_last() {
        let mut ranks: Vec<_> = [
            LinuxNamespaceType::Mount,
            LinuxNamespaceType::Network,
            LinuxNamespaceType::User,
        ]
        .into_iter()
        .collect();
        ranks.sort_by_key(|t| join_rank(*t));
        assert_eq!(ranks[0], LinuxNamespaceType::User);
        assert_eq!(ranks[2], LinuxNamespaceType::Mount);
    }
}
