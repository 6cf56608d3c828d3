//! `linux.seccomp` compiled to BPF with rust-vmm's `seccompiler` (pure Rust,
//! no libseccomp C library needed to build or run).
//!
//! seccompiler builds filters with one match action and one mismatch action,
//! while an OCI profile gives each rule its own action. The kernel runs every
//! installed filter and keeps the result with the highest precedence
//! (KILL_PROCESS > KILL_THREAD > TRAP > ERRNO > TRACE > LOG > ALLOW, see
//! seccomp(2)), so a profile becomes:
//! - one filter per distinct non-allow rule action A: rules of A → A, else ALLOW;
//! - if the default action D is not ALLOW, one filter: any rule → ALLOW, else D.
//!
//! A call matching a rule of action A gets A from the first kind and ALLOW from
//! the second, hence A; a call matching no rule gets D. Syscall names come from
//! the `syscalls` crate's table for the build architecture; names unknown on
//! it are skipped, as runc does.

use std::collections::BTreeMap;
use std::str::FromStr;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag,
    LinuxSeccompOperator,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use syscalls::Sysno;

/// Errors while compiling or installing a profile.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The profile uses something this runtime cannot do.
    #[error("unsupported seccomp profile: {0}")]
    Unsupported(String),
    /// seccompiler rejected a rule or filter.
    #[error("cannot compile seccomp filter")]
    Compile(#[source] seccompiler::BackendError),
    /// seccomp(2) failed.
    #[error("cannot install seccomp filter")]
    Install(#[source] std::io::Error),
}

type Result<T> = std::result::Result<T, SeccompError>;

/// Rules per syscall; `None` means the call matches whatever its arguments.
type RuleMap = BTreeMap<i64, Option<Vec<SeccompRule>>>;

/// A compiled profile: filters in install order plus seccomp(2) flags.
#[derive(Debug, Clone, Default)]
pub struct CompiledProfile {
    programs: Vec<BpfProgram>,
    flags: libc::c_ulong,
}

fn target_arch() -> Result<TargetArch> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SeccompError::Unsupported(format!("architecture {}", std::env::consts::ARCH)))
}

fn map_action(action: LinuxSeccompAction, errno: Option<u32>) -> Result<SeccompAction> {
    Ok(match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActErrno => {
            SeccompAction::Errno(errno.unwrap_or(libc::EPERM as u32))
        }
        LinuxSeccompAction::ScmpActTrace => {
            SeccompAction::Trace(errno.unwrap_or(libc::EPERM as u32))
        }
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(SeccompError::Unsupported("SCMP_ACT_NOTIFY".into()))
        }
    })
}

fn condition(arg: &LinuxSeccompArg) -> Result<SeccompCondition> {
    let index = u8::try_from(arg.index())
        .map_err(|_| SeccompError::Unsupported(format!("argument index {}", arg.index())))?;
    let (op, value) = match arg.op() {
        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
        // libseccomp: (arg & value) == valueTwo.
        LinuxSeccompOperator::ScmpCmpMaskedEq => (
            SeccompCmpOp::MaskedEq(arg.value()),
            arg.value_two().unwrap_or(0),
        ),
    };
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value).map_err(SeccompError::Compile)
}

/// Rules for one syscall entry. Several conditions on the same argument
/// become separate (OR-ed) rules, as runc does for libseccomp.
fn rules_for(args: &[LinuxSeccompArg]) -> Result<Option<Vec<SeccompRule>>> {
    if args.is_empty() {
        return Ok(None);
    }
    let conds = args.iter().map(condition).collect::<Result<Vec<_>>>()?;
    let mut indices: Vec<usize> = args.iter().map(|a| a.index()).collect();
    indices.sort_unstable();
    indices.dedup();
    let rules = if indices.len() == args.len() {
        vec![SeccompRule::new(conds).map_err(SeccompError::Compile)?]
    } else {
        conds
            .into_iter()
            .map(|c| SeccompRule::new(vec![c]).map_err(SeccompError::Compile))
            .collect::<Result<Vec<_>>>()?
    };
    Ok(Some(rules))
}

fn add_rules(map: &mut RuleMap, nr: i64, rules: Option<Vec<SeccompRule>>) {
    match (map.get_mut(&nr), rules) {
        (None, rules) => {
            map.insert(nr, rules);
        }
        // Already unconditional: stays so.
        (Some(None), _) => {}
        (Some(existing), None) => *existing = None,
        (Some(Some(existing)), Some(mut more)) => existing.append(&mut more),
    }
}

fn finish(map: RuleMap) -> BTreeMap<i64, Vec<SeccompRule>> {
    map.into_iter()
        .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
        .collect()
}

fn check_architectures(profile: &LinuxSeccomp) -> Result<()> {
    let native = match std::env::consts::ARCH {
        "x86_64" => Arch::ScmpArchX86_64,
        "aarch64" => Arch::ScmpArchAarch64,
        "riscv64" => Arch::ScmpArchRiscv64,
        other => return Err(SeccompError::Unsupported(format!("architecture {other}"))),
    };
    let archs = profile.architectures().as_deref().unwrap_or_default();
    if !archs.is_empty() && !archs.contains(&native) && !archs.contains(&Arch::ScmpArchNative) {
        return Err(SeccompError::Unsupported(format!(
            "architectures {archs:?} do not include the native one"
        )));
    }
    Ok(())
}

fn filter_flags(profile: &LinuxSeccomp) -> libc::c_ulong {
    let mut flags = 0;
    for f in profile.flags().as_deref().unwrap_or_default() {
        flags |= match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            // TSYNC is moot for a single-threaded init; the rest are not needed.
            _ => 0,
        };
    }
    flags
}

/// Compiles an OCI seccomp profile.
pub fn compile(profile: &LinuxSeccomp) -> Result<CompiledProfile> {
    check_architectures(profile)?;
    let arch = target_arch()?;
    let default = map_action(profile.default_action(), profile.default_errno_ret())?;
    let mut by_action: Vec<(SeccompAction, RuleMap)> = Vec::new();
    let mut any_rule = RuleMap::new();
    for entry in profile.syscalls().as_deref().unwrap_or_default() {
        let action = map_action(entry.action(), entry.errno_ret())?;
        let rules = rules_for(entry.args().as_deref().unwrap_or_default())?;
        for name in entry.names() {
            let Ok(sysno) = Sysno::from_str(name) else {
                continue;
            };
            let nr = sysno.id() as i64;
            add_rules(&mut any_rule, nr, rules.clone());
            if action == SeccompAction::Allow {
                continue;
            }
            let pos = match by_action.iter().position(|(a, _)| *a == action) {
                Some(p) => p,
                None => {
                    by_action.push((action.clone(), RuleMap::new()));
                    by_action.len() - 1
                }
            };
            add_rules(&mut by_action[pos].1, nr, rules.clone());
        }
    }
    let mut programs = Vec::new();
    for (action, map) in by_action {
        if action == default && default == SeccompAction::Allow {
            continue;
        }
        let filter = SeccompFilter::new(finish(map), SeccompAction::Allow, action, arch)
            .map_err(SeccompError::Compile)?;
        programs.push(BpfProgram::try_from(filter).map_err(SeccompError::Compile)?);
    }
    if default != SeccompAction::Allow {
        let filter = SeccompFilter::new(finish(any_rule), default, SeccompAction::Allow, arch)
            .map_err(SeccompError::Compile)?;
        programs.push(BpfProgram::try_from(filter).map_err(SeccompError::Compile)?);
    }
    Ok(CompiledProfile {
        programs,
        flags: filter_flags(profile),
    })
}

impl CompiledProfile {
    /// Number of BPF filters the profile became.
    pub fn filter_count(&self) -> usize {
        self.programs.len()
    }

    /// Installs the filters on the calling thread. The caller must have set
    /// no_new_privs or hold CAP_SYS_ADMIN.
    pub fn install(&self) -> Result<()> {
        for prog in &self.programs {
            let len = u16::try_from(prog.len())
                .map_err(|_| SeccompError::Unsupported("filter too long".into()))?;
            let fprog = libc::sock_fprog {
                len,
                // seccompiler's sock_filter is #[repr(C)] with the same fields
                // as the kernel's struct sock_filter.
                filter: prog.as_ptr() as *mut libc::sock_filter,
            };
            // SAFETY: `fprog` points at `prog`, which lives across the call;
            // the kernel copies the program and does not keep the pointer.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    self.flags,
                    &fprog as *const libc::sock_fprog,
                )
            };
            if rc != 0 {
                return Err(SeccompError::Install(std::io::Error::last_os_error()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn allow_list_with_errno_default_makes_one_filter() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":38,
                "architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86"],
                "syscalls":[{"names":["read","write","no_such_call_xyz"],"action":"SCMP_ACT_ALLOW"}]}"#,
        );
        assert_eq!(compile(&p).unwrap().filter_count(), 1);
    }

    #[test]
    fn mixed_actions_make_a_filter_per_action() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO",
                "syscalls":[
                  {"names":["socket"],"action":"SCMP_ACT_ERRNO","errnoRet":22,
                   "args":[{"index":0,"value":16,"op":"SCMP_CMP_EQ"},{"index":2,"value":9,"op":"SCMP_CMP_EQ"}]},
                  {"names":["socket"],"action":"SCMP_ACT_ALLOW","args":[{"index":2,"value":9,"op":"SCMP_CMP_NE"}]},
                  {"names":["personality"],"action":"SCMP_ACT_ALLOW",
                   "args":[{"index":0,"value":0,"op":"SCMP_CMP_EQ"},{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]},
                  {"names":["mkdir"],"action":"SCMP_ACT_KILL_PROCESS"}]}"#,
        );
        assert_eq!(compile(&p).unwrap().filter_count(), 3);
    }

    #[test]
    fn deny_list_with_allow_default_has_no_default_filter() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW",
                "syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO"}]}"#,
        );
        assert_eq!(compile(&p).unwrap().filter_count(), 1);
    }

    #[test]
    fn notify_and_foreign_arch_are_refused() {
        let p = profile(r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#);
        assert!(matches!(compile(&p), Err(SeccompError::Unsupported(_))));
        let p =
            profile(r#"{"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_S390X"]}"#);
        assert!(matches!(compile(&p), Err(SeccompError::Unsupported(_))));
    }

    #[test]
    fn unconditional_rule_wins_over_conditional() {
        let mut map = RuleMap::new();
        let cond =
            rules_for(&[
                serde_json::from_str(r#"{"index":0,"value":1,"op":"SCMP_CMP_EQ"}"#).unwrap(),
            ])
            .unwrap();
        add_rules(&mut map, 1, cond.clone());
        add_rules(&mut map, 1, None);
        add_rules(&mut map, 1, cond);
        assert_eq!(finish(map).get(&1).map(Vec::len), Some(0));
    }
}
