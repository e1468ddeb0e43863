#!/usr/bin/env bash
# Benchmark nbraid against a reference NBD server (nbdkit's file plugin on one plain file) with
# the fio profiles in fio-profiles/, and print IOPS, bandwidth and the nbraid/reference ratio.
#
#   bash tools/bench.sh                       # raid5 over 4 members, every profile
#   LEVEL="ec --data 4 --parity 2" MEMBERS=6 bash tools/bench.sh randwrite-4k seqwrite-1m
#   IO_SIZE=64m bash tools/bench.sh           # shorter runs (fio --io_size)
#
# Needs fio, nbdkit and python3; builds nbraid in release mode. Everything lives in a temp dir
# that is removed at the end; the servers are stopped even on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

LEVEL=${LEVEL:-raid5}
MEMBERS=${MEMBERS:-4}
MEMBER_SIZE=${MEMBER_SIZE:-512MiB}
IO_SIZE=${IO_SIZE:-}
PROFILES=("$@")
if [ ${#PROFILES[@]} -eq 0 ]; then
    PROFILES=(randread-4k randwrite-4k seqread-1m seqwrite-1m mixed-70-30)
fi

for t in fio nbdkit nbdinfo python3; do
    command -v "$t" >/dev/null || { echo "bench.sh: $t not found (apt-get install -y fio nbdkit libnbd-bin python3)" >&2; exit 1; }
done

cargo build --release --quiet
BIN=$PWD/target/release/nbraid
WORK=$(mktemp -d /tmp/nbraid-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_sock() {
    for _ in $(seq 300); do
        [ -S "$1" ] && return 0
        sleep 0.1
    done
    echo "bench.sh: $1 never appeared" >&2
    exit 1
}

members=()
for i in $(seq 0 $((MEMBERS - 1))); do members+=("$WORK/m$i"); done
# shellcheck disable=SC2086
"$BIN" create --level $LEVEL --size "$MEMBER_SIZE" --name bench "${members[@]}" >/dev/null
"$BIN" serve --listen "unix:$WORK/nbraid.sock" "${members[@]}" 2>"$WORK/nbraid.log" &
PIDS+=($!)
wait_sock "$WORK/nbraid.sock"
SIZE=$(nbdinfo --size "nbd+unix:///?socket=$WORK/nbraid.sock")

truncate -s "$SIZE" "$WORK/ref.img"
nbdkit -f --unix "$WORK/ref.sock" file "$WORK/ref.img" 2>"$WORK/nbdkit.log" &
PIDS+=($!)
wait_sock "$WORK/ref.sock"

run_fio() { # uri profile -> "iops bw_bytes"
    local extra=()
    [ -n "$IO_SIZE" ] && extra+=("--io_size=$IO_SIZE")
    NBD_URI="$1" fio --verify_state_save=0 "${extra[@]}" --output-format=json "fio-profiles/$2.fio" >"$WORK/out.json"
    python3 - "$WORK/out.json" <<'EOF'
import json, sys
s = open(sys.argv[1]).read()
d = json.loads(s[s.index('{'):])
jobs = [j for j in d["jobs"] if j["jobname"] != "prefill"]
iops = sum(j[k]["iops"] for j in jobs for k in ("read", "write"))
bw = sum(j[k]["bw_bytes"] for j in jobs for k in ("read", "write"))
print(f"{iops:.0f} {bw:.0f}")
EOF
}

echo "nbraid $LEVEL on $MEMBERS x $MEMBER_SIZE (volume $SIZE bytes) vs nbdkit file plugin"
printf '%-14s %12s %12s %12s %12s %8s\n' profile nbraid-IOPS nbraid-MiB/s ref-IOPS ref-MiB/s ratio
for p in "${PROFILES[@]}"; do
    read -r a_iops a_bw < <(run_fio "nbd+unix:///?socket=$WORK/nbraid.sock" "$p")
    read -r b_iops b_bw < <(run_fio "nbd+unix:///?socket=$WORK/ref.sock" "$p")
    python3 -c "
a_iops, a_bw, b_iops, b_bw = map(float, '$a_iops $a_bw $b_iops $b_bw'.split())
ratio = a_bw / b_bw if b_bw else float('nan')
print(f'%-14s %12.0f %12.1f %12.0f %12.1f %8.2f' % ('$p', a_iops, a_bw / 2**20, b_iops, b_bw / 2**20, ratio))
"
done
