#!/bin/sh
# Installs what the container-shim tests drive, and podman's configuration
# for these machines. Idempotent; run as root. tests/run.sh calls it.
#
# - podman 4.3 (+ conmon, CNI plugins, iptables for its default bridge network)
# - runc: the reference runtime the engine tests also drive
# - containerd (+ ctr, containerd-shim-runc-v2)
# - busybox-static: the container rootfs is built from it at test time
# - hyperfine: for the perf comparison (not needed by the tests)
# - mmdebstrap (+ ca-certificates): the Debian system-container rootfs,
#   made at test time (tests/system.rs)
# - golang-go, make: build the runtime-tools validation suite from
#   ../shared/vendor (tests/validation.rs)
# - util-linux (mount), procps (ldd is in libc-bin): the attack tests
set -eu

PKGS="podman conmon containernetworking-plugins iptables uidmap catatonit runc containerd busybox-static hyperfine mmdebstrap ca-certificates golang-go make util-linux procps"

missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing
fi

# podman's default ulimits fail on these machines (DESIGN.md); this is the
# setting that makes podman work with runc and plexvm-shim alike. The tests
# use their own copy via CONTAINERS_CONF; this one is for interactive use.
conf=/etc/containers/containers.conf
mkdir -p /etc/containers
if ! grep -qs '^default_ulimits' "$conf"; then
    if grep -qs '^\[containers\]' "$conf"; then
        sed -i '/^\[containers\]/a default_ulimits = ["nofile=1024:1024","nproc=1024:1024"]' "$conf"
    else
        printf '[containers]\ndefault_ulimits = ["nofile=1024:1024","nproc=1024:1024"]\n' >> "$conf"
    fi
fi
