//! Lifecycle hooks (runtime-spec "POSIX-platform Hooks"): each hook runs with
//! the container's state JSON on stdin and, if it sets one, under a timeout.

use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::{Hook, Hooks, Spec};

/// Errors from running a hook.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The hook could not be started.
    #[error("cannot run {kind} hook {path}")]
    Spawn {
        /// Hook kind.
        kind: HookKind,
        /// The program.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The hook failed.
    #[error("{kind} hook {path} failed: {status}")]
    Failed {
        /// Hook kind.
        kind: HookKind,
        /// The program.
        path: PathBuf,
        /// Exit status or "timed out".
        status: String,
    },
}

/// The hook points of the runtime-spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    /// Deprecated; runs with createRuntime.
    Prestart,
    /// After namespaces exist, before pivot_root, runtime namespace.
    CreateRuntime,
    /// Before pivot_root, container namespace.
    CreateContainer,
    /// Before the user program, container namespace.
    StartContainer,
    /// After the user program started, runtime namespace.
    Poststart,
    /// After the container was deleted, runtime namespace.
    Poststop,
}

impl std::fmt::Display for HookKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            HookKind::Prestart => "prestart",
            HookKind::CreateRuntime => "createRuntime",
            HookKind::CreateContainer => "createContainer",
            HookKind::StartContainer => "startContainer",
            HookKind::Poststart => "poststart",
            HookKind::Poststop => "poststop",
        };
        f.write_str(s)
    }
}

/// The hooks of one kind in a config.
pub fn hooks_of(spec: &Spec, kind: HookKind) -> &[Hook] {
    let Some(hooks) = spec.hooks().as_ref() else {
        return &[];
    };
    let list: &Option<Vec<Hook>> = match kind {
        HookKind::Prestart => {
            #[allow(deprecated)]
            let p = Hooks::prestart(hooks);
            p
        }
        HookKind::CreateRuntime => hooks.create_runtime(),
        HookKind::CreateContainer => hooks.create_container(),
        HookKind::StartContainer => hooks.start_container(),
        HookKind::Poststart => hooks.poststart(),
        HookKind::Poststop => hooks.poststop(),
    };
    list.as_deref().unwrap_or_default()
}

/// Runs all hooks of `kind` in order; stops at the first failure.
pub fn run_hooks(spec: &Spec, kind: HookKind, state_json: &str) -> Result<(), HookError> {
    for hook in hooks_of(spec, kind) {
        run_hook(hook, kind, state_json)?;
    }
    Ok(())
}

fn run_hook(hook: &Hook, kind: HookKind, state_json: &str) -> Result<(), HookError> {
    let path = hook.path().clone();
    let mut cmd = Command::new(&path);
    if let Some(args) = hook.args() {
        if let Some((arg0, rest)) = args.split_first() {
            cmd.arg0(arg0).args(rest);
        }
    }
    cmd.env_clear();
    for kv in hook.env().as_deref().unwrap_or_default() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| HookError::Spawn {
        kind,
        path: path.clone(),
        source,
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is fine: ignore EPIPE.
        let _ = stdin.write_all(state_json.as_bytes());
    }
    let deadline = hook
        .timeout()
        .filter(|t| *t > 0)
        .map(|t| Instant::now() + Duration::from_secs(t as u64));
    let failed = |status: String| HookError::Failed {
        kind,
        path: path.clone(),
        status,
    };
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let text = match (status.code(), status.signal()) {
                    (Some(c), _) => format!("exit code {c}"),
                    (None, Some(s)) => format!("killed by signal {s}"),
                    _ => status.to_string(),
                };
                return Err(failed(text));
            }
            Ok(None) => {}
            Err(e) => return Err(failed(e.to_string())),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed("timed out".into()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(json: &str) -> Hook {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn hook_gets_state_on_stdin_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let h = hook(&format!(
            r#"{{"path":"/bin/sh","args":["sh","-c","cat > {} && echo $FOO >> {}"],"env":["FOO=bar"]}}"#,
            out.display(),
            out.display()
        ));
        run_hook(&h, HookKind::Poststop, "{\"id\":\"x\"}").unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "{\"id\":\"x\"}bar\n"
        );
    }

    #[test]
    fn failing_and_missing_hooks_are_errors() {
        let h = hook(r#"{"path":"/bin/sh","args":["sh","-c","exit 3"]}"#);
        let err = run_hook(&h, HookKind::Prestart, "{}").unwrap_err();
        assert!(err.to_string().contains("exit code 3"), "{err}");
        let h = hook(r#"{"path":"/nonexistent/hook"}"#);
        assert!(matches!(
            run_hook(&h, HookKind::Prestart, "{}"),
            Err(HookError::Spawn { .. })
        ));
    }

    #[test]
    fn timeout_kills_the_hook() {
        let h = hook(r#"{"path":"/bin/sh","args":["sh","-c","exec sleep 30"],"timeout":1}"#);
        let err = run_hook(&h, HookKind::CreateRuntime, "{}").unwrap_err();
        assert!(err.to_string().contains("timed out"), "{err}");
    }
}
