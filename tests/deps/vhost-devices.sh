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
# Only what a test drives is installed: a cold install costs CPU-minutes on these
# 2-core machines (tests/README.md, "Device types", has the measured costs of
# vhost-device-vsock, -console, -scsi and virtiofsd for when their tests are written);
# a cached run takes 0.1 s.
CRATES=(
  vhost-device-rng@0.1.0      # virtio-rng (tests/tests/core_rng.rs)
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
