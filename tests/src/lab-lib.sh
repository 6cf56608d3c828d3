# Helpers for lab scenarios (tests/src/lab.rs). Sourced inside the lab, in the host's
# root file system (chroot), with the work folder as the current directory:
#   $LAB_WORK     the test's work folder (same path as on the host; 9p, no sockets)
#   $LAB_SCRATCH  the lab's tmpfs for sockets and disk images
#   $LAB_BIN      the workspace's binaries (also first in PATH)
set -euo pipefail

lab_log() { echo "lab: $*"; }
# lab_result TAG key=value ...: a line the test reads back (LabRun::result).
lab_result() { echo "LAB-RESULT $*"; }
lab_fail() {
  echo "LAB-FAIL $*"
  exit 1
}

# Loads kvm_amd (TCG emulates SVM with nested paging), tun and veth from the host's
# module tree, and brings up loopback.
lab_init() {
  mkdir -p "$LAB_SCRATCH" /run/user/0
  export XDG_RUNTIME_DIR=/run/user/0 TMPDIR=$LAB_SCRATCH
  ip link set lo up
  modprobe kvm_amd npt=1 avic=0 || lab_fail "cannot load kvm_amd"
  [ -c /dev/kvm ] || lab_fail "no /dev/kvm after loading kvm_amd"
  modprobe tun
  modprobe veth
  lab_log "ready: $(nproc) CPUs, kernel $(uname -r), /dev/kvm"
}

# vm_start NAME SPEC: `plexvm run SPEC` in the background; its stdout and stderr go to
# NAME.out / NAME.err in the work folder.
vm_start() {
  local name=$1 spec=$2
  plexvm run "$spec" >"$LAB_WORK/$name.out" 2>"$LAB_WORK/$name.err" &
  echo $! >"$LAB_SCRATCH/$name.pid"
  lab_log "started VM $name (pid $!) from $spec"
}

# vm_pid NAME: the core's pid.
vm_pid() { cat "$LAB_SCRATCH/$1.pid"; }

# vm_wait NAME SECONDS: waits for the VM to end and sets VM_EXIT to its exit code, or to
# "timeout" (after killing it) when it runs longer than SECONDS. Not for `$(...)`: only
# the shell that started the VM can reap it and learn its exit code.
vm_wait() {
  local name=$1 secs=$2 pid
  pid=$(vm_pid "$name")
  local end=$((SECONDS + secs))
  VM_EXIT=0
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS > end)); then
      lab_log "VM $name still running after ${secs}s: killing it"
      kill -9 "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
      VM_EXIT=timeout
      return 0
    fi
    sleep 0.2
  done
  wait "$pid" 2>/dev/null || VM_EXIT=$?
}

# wait_for FILE TEXT SECONDS [PID]: waits until FILE contains TEXT; fails the scenario
# after SECONDS, or as soon as process PID (a VM) has ended.
wait_for() {
  local file=$1 text=$2 secs=$3 pid=${4:-}
  local end=$((SECONDS + secs))
  until grep -qF -- "$text" "$file" 2>/dev/null; do
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
      lab_fail "process $pid ended before $file showed '$text'"
    fi
    ((SECONDS <= end)) || lab_fail "$file did not show '$text' within ${secs}s"
    sleep 0.2
  done
}

# GET /vm is read with one `plexvm ctl status` and bash's own regex matching, not jq:
# every process costs real time under TCG, and these run in polling loops.
# vm_field API FIELD: a top-level field of GET /vm, e.g. state.
vm_field() {
  local json re="\"$2\": \"?([^\",}[:space:]]*)"
  json=$(plexvm ctl --api "$1" status) || return 1
  [[ $json =~ $re ]] && echo "${BASH_REMATCH[1]}"
}
# dev_field API DEVICE FIELD: a field of one device in GET /vm, e.g. backend_pid (the
# device's fields up to `restarts` hold no braces, so [^}] stays inside the device).
dev_field() {
  local json re="\"id\": \"$2\"[^}]*\"$3\": \"?([^\",}[:space:]]*)"
  json=$(plexvm ctl --api "$1" status) || return 1
  [[ $json =~ $re ]] && echo "${BASH_REMATCH[1]}"
}

# wait_dev_field API DEVICE FIELD VALUE SECONDS: waits until dev_field shows VALUE.
wait_dev_field() {
  local end=$((SECONDS + $5)) v=""
  while true; do
    v=$(dev_field "$1" "$2" "$3" 2>/dev/null || true)
    [ "$v" = "$4" ] && return 0
    ((SECONDS <= end)) || lab_fail "$3 of $2 ($1) is '$v', not '$4', after $5 s"
    sleep 0.2
  done
}

# wait_vm_field API FIELD VALUE SECONDS: waits until vm_field shows VALUE.
wait_vm_field() {
  local end=$((SECONDS + $4)) v=""
  while true; do
    v=$(vm_field "$1" "$2" 2>/dev/null || true)
    [ "$v" = "$3" ] && return 0
    ((SECONDS <= end)) || lab_fail "$2 of $1 is '$v', not '$3', after $4 s"
    sleep 0.2
  done
}

# wait_socket PATH SECONDS [NETNS]: waits until a Unix socket is listening at PATH.
# /proc/net/unix lists the sockets of one network namespace: name the one the server
# runs in (NETNS) if it is not the lab's own.
wait_socket() {
  local end=$((SECONDS + $2)) ns=()
  [ -n "${3:-}" ] && ns=(ip netns exec "$3")
  until "${ns[@]}" grep -qF " $1" /proc/net/unix 2>/dev/null; do
    ((SECONDS <= end)) || lab_fail "nobody listens on $1 after $2 s"
    sleep 0.1
  done
}

# copy_out FILE: copies a scratch file (a disk image) into the work folder, sparse, so
# the host can check it after the lab ended.
copy_out() {
  cp --sparse=always "$1" "$LAB_WORK/$(basename "$1")"
}
