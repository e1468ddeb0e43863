#!/usr/bin/env bash
# The performance benchmark: nbraid (raid0 x4, raid1 x2, raid5 x4, ec 4+2) against nbdkit's file
# plugin (cache=none) and qemu-nbd (--cache=none --aio=native), each on files of the same size in
# one directory, through every fio profile in fio-profiles/, interleaved and repeated; then
# degraded raid5 reads, rebuild speed against raw sequential writes, and the daemon's RSS under
# 4 connections x 128 requests of 32 MiB. Prints a Markdown table with ratios, then JSON.
#
#   bash tools/bench.sh                                  # everything, about 15 minutes
#   bash tools/bench.sh --repeats 1 --runtime 2          # a quick look
#   bash tools/bench.sh --servers nbraid-raid0x4,nbdkit,qemu-nbd --profiles randread-4k-qd32
#   bash tools/bench.sh --dir /srv --volume-size 4GiB --json /tmp/bench.json
#   bash tools/bench.sh --help                           # every option
#
# Needs fio, nbdkit, qemu-nbd, nbdinfo, python3, gcc and liburing (apt-get install -y fio nbdkit
# qemu-utils libnbd-bin python3 gcc liburing-dev); builds nbraid in release mode and the
# yardstick server tools/nbd-floor.c. Servers and files are removed at the end, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
NEEDS="apt-get install -y fio nbdkit qemu-utils libnbd-bin python3 gcc liburing-dev"
for t in fio nbdkit qemu-nbd nbdinfo python3 gcc; do
    command -v "$t" >/dev/null || { echo "bench.sh: $t not found ($NEEDS)" >&2; exit 1; }
done
cargo build --release --quiet
gcc -O2 -Wall -o target/nbd-floor tools/nbd-floor.c -luring || { echo "bench.sh: cannot build tools/nbd-floor.c (needs liburing-dev: $NEEDS)" >&2; exit 1; }
exec python3 tools/bench.py "$@"
