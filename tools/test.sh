#!/usr/bin/env bash
# The whole test suite: installs the Debian packages the integration tests drive, checks every
# tool is there, then runs all unit and integration tests in release mode.
#
#   bash tools/test.sh            # as root on Debian
#   bash tools/test.sh --test fio # extra arguments go to `cargo test`
#
# Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(fio libnbd-bin qemu-utils fuse3 nbdkit e2fsprogs util-linux)
TOOLS=(fio nbdinfo nbdcopy nbdfuse qemu-io nbdkit fusermount3 mkfs.ext4 e2fsck losetup mount umount)

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

missing_tools() {
    local t out=()
    for t in "${TOOLS[@]}"; do
        command -v "$t" >/dev/null 2>&1 || out+=("$t")
    done
    echo "${out[@]:-}"
}

if [ "$(id -u)" -ne 0 ]; then
    echo "tools/test.sh: must run as root (it installs packages and mounts a filesystem)" >&2
    exit 1
fi

echo "== installing test dependencies: ${PACKAGES[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"; }; then
    if [ -n "$(missing_tools)" ]; then
        echo "tools/test.sh: apt-get failed and tools are missing: $(missing_tools)" >&2
        exit 1
    fi
    echo "tools/test.sh: apt-get failed, but every tool is already installed; going on" >&2
fi

echo "== checking tools"
if [ -n "$(missing_tools)" ]; then
    echo "tools/test.sh: missing tools after install: $(missing_tools)" >&2
    exit 1
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "tools/test.sh: cargo not found; install a Rust toolchain (https://rustup.rs)" >&2
    exit 1
fi
# nbdfuse needs /dev/fuse; losetup needs loop devices
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
[ -e /dev/fuse ] || { echo "tools/test.sh: /dev/fuse is missing (filesystem test needs FUSE)" >&2; exit 1; }
[ -e /dev/loop-control ] || modprobe loop 2>/dev/null || true
[ -e /dev/loop-control ] || { echo "tools/test.sh: /dev/loop-control is missing (filesystem test needs loop devices)" >&2; exit 1; }

for t in fio qemu-io nbdinfo nbdfuse nbdkit; do
    printf '   %-10s %s\n' "$t" "$("$t" --version 2>&1 | head -n1)"
done

echo "== building"
cargo test --release --no-run "$@"

echo "== running tests"
# Two test threads per binary: the integration tests each spawn a daemon and real clients, and
# the machine has two cores.
# --no-fail-fast: run every test binary and report all failures, not just the first binary's.
cargo test --release --no-fail-fast "$@" -- --test-threads=2
