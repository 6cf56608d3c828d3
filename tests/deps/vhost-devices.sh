#!/usr/bin/env bash
# Third-party vhost-user backends the device-type tests drive: rust-vmm's vhost-device-*
# and the Rust virtiofsd, each `cargo install`ed at a pinned version into a cache folder
# (PLEXVM_BACKENDS_DIR, default ~/.cache/plexvm/backends), and Debian's virtiofsd
# (/usr/lib/qemu/virtiofsd, from qemu-system-common, installed by tests/run.sh).
#
# Idempotent and fast when cached: a binary already installed at its pinned version is
# not rebuilt (cargo install compares the version recorded in the cache's .crates.toml).
# Tests find the binaries through tests/src/third_party.rs, which looks in the same folder.
set -euo pipefail
root="${PLEXVM_BACKENDS_DIR:-$HOME/.cache/plexvm/backends}"
# crate@version (pinned: a new release is adopted by a commit that changes this line).
# A cold install of all five costs about 9 CPU-minutes (measured; common dependencies
# are built once in the shared target folder), a few minutes of wall time on an idle
# 2-core machine (tests/README.md, "Device types"); a cached run takes 0.1 s.
# vhost-device-sound is left out: it needs the ALSA/PipeWire development libraries.
CRATES=(
  vhost-device-rng@0.1.0      # virtio-rng (tests/tests/core_rng.rs)
  vhost-device-vsock@0.3.0    # virtio-vsock, hybrid Unix-socket scheme
  vhost-device-console@0.1.0  # virtio-console
  vhost-device-scsi@0.1.0     # virtio-scsi, through kind = "generic" (device ID 8)
  virtiofsd@1.14.0            # virtio-fs; needs libcap-ng-dev and libseccomp-dev
)
mkdir -p "$root"
for spec in "${CRATES[@]}"; do
  name="${spec%@*}" version="${spec#*@}"
  if [[ -x "$root/bin/$name" ]] && grep -q "\"$name $version " "$root/.crates.toml" 2>/dev/null; then
    continue
  fi
  echo "installing $name $version into $root"
  # --locked: the crate's own Cargo.lock, so the build is the one its authors tested.
  CARGO_TARGET_DIR="$root/target" cargo install --quiet --locked --root "$root" \
    --version "=$version" "$name"
done
