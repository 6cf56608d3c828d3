//! Loading and checking the bundle's `config.json`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};

/// Errors in the bundle or its config.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The bundle directory is not usable.
    #[error("bundle {path} is not accessible")]
    Bundle {
        /// The bundle.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// config.json did not parse.
    #[error("cannot load {path}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: oci_spec::OciSpecError,
    },
    /// The config parsed but cannot describe a Linux container.
    #[error("invalid config.json: {0}")]
    Invalid(String),
}

/// A loaded bundle: the config and absolute paths.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Absolute bundle directory.
    pub dir: PathBuf,
    /// Absolute rootfs directory.
    pub rootfs: PathBuf,
    /// The parsed config.
    pub spec: Spec,
}

/// Loads `<bundle>/config.json` and checks what the runtime relies on.
pub fn load_bundle(bundle: &Path) -> Result<Bundle, SpecError> {
    let dir = bundle.canonicalize().map_err(|source| SpecError::Bundle {
        path: bundle.to_path_buf(),
        source,
    })?;
    let path = dir.join("config.json");
    let spec = Spec::load(&path).map_err(|source| SpecError::Parse { path, source })?;
    validate(&spec)?;
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| SpecError::Invalid("root is missing".into()))?;
    let rootfs = dir.join(root.path());
    let rootfs = rootfs.canonicalize().map_err(|source| SpecError::Bundle {
        path: rootfs.clone(),
        source,
    })?;
    if !rootfs.is_dir() {
        return Err(SpecError::Invalid(format!(
            "root.path {} is not a directory",
            rootfs.display()
        )));
    }
    Ok(Bundle { dir, rootfs, spec })
}

/// Checks the parts of a config that the runtime would otherwise trip over.
pub fn validate(spec: &Spec) -> Result<(), SpecError> {
    let invalid = |m: &str| Err(SpecError::Invalid(m.to_string()));
    if !spec.version().starts_with("1.") {
        return Err(SpecError::Invalid(format!(
            "unsupported ociVersion {:?} (need 1.x)",
            spec.version()
        )));
    }
    let Some(process) = spec.process() else {
        return invalid("process is missing");
    };
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return invalid("process.args is empty");
    }
    if !process.cwd().is_absolute() {
        return invalid("process.cwd must be an absolute path");
    }
    let Some(linux) = spec.linux() else {
        return invalid("linux section is missing");
    };
    let mut seen = HashSet::new();
    for ns in linux.namespaces().as_deref().unwrap_or_default() {
        if !seen.insert(ns.typ()) {
            return Err(SpecError::Invalid(format!(
                "namespace {:?} is listed twice",
                ns.typ()
            )));
        }
    }
    let has_userns = seen.contains(&LinuxNamespaceType::User);
    let has_maps = linux.uid_mappings().as_ref().is_some_and(|m| !m.is_empty());
    if has_maps && !has_userns {
        return invalid("uidMappings given without a user namespace");
    }
    for mount in spec.mounts().as_deref().unwrap_or_default() {
        if !mount.destination().is_absolute() {
            return Err(SpecError::Invalid(format!(
                "mount destination {} is not absolute",
                mount.destination().display()
            )));
        }
    }
    Ok(())
}

/// True if the config asks for a new (not joined) namespace of this type.
pub fn creates_namespace(spec: &Spec, typ: LinuxNamespaceType) -> bool {
    namespaces(spec)
        .iter()
        .any(|ns| ns.typ() == typ && ns.path().is_none())
}

/// True if the config lists a namespace of this type (new or joined).
pub fn has_namespace(spec: &Spec, typ: LinuxNamespaceType) -> bool {
    namespaces(spec).iter().any(|ns| ns.typ() == typ)
}

/// The config's namespaces (empty if none).
pub fn namespaces(spec: &Spec) -> &[oci_spec::runtime::LinuxNamespace] {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_deref())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_from(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn default_spec_is_valid() {
        let spec = Spec::default();
        validate(&spec).unwrap();
        assert!(creates_namespace(&spec, LinuxNamespaceType::Pid));
        assert!(!creates_namespace(&spec, LinuxNamespaceType::User));
    }

    #[test]
    fn rejects_bad_configs() {
        let no_args = r#"{"ociVersion":"1.0.2","process":{"user":{"uid":0,"gid":0},"cwd":"/","args":[]},
            "root":{"path":"rootfs"},"linux":{}}"#;
        assert!(validate(&spec_from(no_args)).is_err());
        let old = r#"{"ociVersion":"0.9","process":{"user":{"uid":0,"gid":0},"cwd":"/","args":["a"]},
            "root":{"path":"rootfs"},"linux":{}}"#;
        assert!(validate(&spec_from(old)).is_err());
        let dup = r#"{"ociVersion":"1.0.2","process":{"user":{"uid":0,"gid":0},"cwd":"/","args":["a"]},
            "root":{"path":"rootfs"},"linux":{"namespaces":[{"type":"pid"},{"type":"pid"}]}}"#;
        assert!(validate(&spec_from(dup)).is_err());
        let rel = r#"{"ociVersion":"1.0.2","process":{"user":{"uid":0,"gid":0},"cwd":"/","args":["a"]},
            "root":{"path":"rootfs"},"linux":{},"mounts":[{"destination":"proc","type":"proc"}]}"#;
        assert!(validate(&spec_from(rel)).is_err());
    }

    #[test]
    fn missing_bundle_is_an_error() {
        let err = load_bundle(Path::new("/nonexistent/bundle")).unwrap_err();
        assert!(matches!(err, SpecError::Bundle { .. }));
    }
}
