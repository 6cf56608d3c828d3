#!/usr/bin/env bash
# plexvm's one test command: installs (idempotently) the system packages the tests
# need, builds every binary, checks formatting and lints, and runs every test.
# CI (.ci/run) calls exactly this on a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."
# End-to-end tests may skip only when a peer program is truly missing; here, where this
# script installs them, a missing one is a failure.
export PLEXVM_NO_SKIP=1

log() { printf '\n==> %s\n' "$*"; }

# System packages the end-to-end tests use. Installed only when missing, so a second
# run does not touch apt at all.
PACKAGES=(
  qemu-system-x86      # QEMU/TCG: a real Linux driver against our backends
  qemu-utils           # qemu-storage-daemon, qemu-img: a backend we did not write
  linux-image-amd64    # Debian's kernel and its virtio modules for the QEMU guests
  busybox-static       # the guests' and containers' userland
  acpica-tools         # iasl: disassembles the core's ACPI tables in vmm-core's unit tests
  xz-utils             # unpacks the ELF vmlinux from Debian's bzImage (Linux boot tests)
  e2fsprogs            # e2fsck/debugfs: check guest-written filesystems on the host
  curl                 # the control API through curl --unix-socket
  cpio                 # initramfs archives
  kmod                 # modinfo/depmod for building initramfs module sets
  iproute2             # network namespaces and tap devices
  dpdk-dev             # dpdk-testpmd: the reference vhost-user-net switch (perf's net smoke test)
  coreutils
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Some machine images ship a newer qemu-utils (from backports) than the archive's
  # qemu-system-x86, and the two then conflict (qemu-utils >= 8 Breaks
  # qemu-system-common < 8). The tests are written against one QEMU: install all three
  # at the version the archive offers for qemu-system-x86, downgrading if needed.
  qemu=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  pinned=()
  for p in "${missing[@]}"; do
    case "$p" in
      qemu-system-x86 | qemu-utils) ;;
      *) pinned+=("$p") ;;
    esac
  done
  if [[ " ${missing[*]} " == *" qemu-"* ]]; then
    pinned+=("qemu-system-x86=$qemu" "qemu-utils=$qemu" "qemu-system-common=$qemu")
  fi
  apt-get install -y -qq --no-install-recommends --allow-downgrades "${pinned[@]}" >/dev/null
fi
# Further per-component dependencies (each script is idempotent).
for deps in container-shim/tests/deps.sh tests/deps/vhost-devices.sh; do
  if [[ -x "$deps" ]]; then
    log "dependencies: $deps"
    "$deps"
  fi
done

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

log "build all binaries"
cargo build --workspace --bins

log "fuzz targets over their checked-in corpus (stable; see fuzz/README.md)"
cargo test --manifest-path fuzz/Cargo.toml --no-default-features

log "tests"
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
