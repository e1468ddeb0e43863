#!/usr/bin/env bash
# What integrity costs: the same raid5 volume and fio profiles with block checksums and the
# partial-parity log (write-hole log) on, the same with checksum pages deferred to flushes
# (`--checksum-pages deferred`), with checksums off, and with both off. Prints the
# median IOPS of REPEATS interleaved runs and each configuration's ratio to "both off".
#
#   bash tools/bench-integrity.sh                    # raid5 x4, randwrite-4k-qd32 seqwrite-1m-qd8
#                                                    # randread-4k-qd32
#   REPEATS=5 RUNTIME=10 bash tools/bench-integrity.sh randwrite-4k-qd32
#   LEVEL="ec --data 4 --parity 2" MEMBERS=6 bash tools/bench-integrity.sh
#
# The write-intent bitmap has no off switch; its cost is one msync per first write to a clean
# 4 MiB region, which these profiles pay a few hundred times at most.
# Needs fio, libnbd-bin (nbdinfo) and python3. Members live in a temp dir under $TMPDIR (or
# /tmp), removed at the end; the daemons are stopped even on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

LEVEL=${LEVEL:-raid5}
MEMBERS=${MEMBERS:-4}
MEMBER_SIZE=${MEMBER_SIZE:-512MiB}
REPEATS=${REPEATS:-3}
RUNTIME=${RUNTIME:-8}
PROFILES=("$@")
[ ${#PROFILES[@]} -eq 0 ] && PROFILES=(randwrite-4k-qd32 seqwrite-1m-qd8 randread-4k-qd32)

for t in fio nbdinfo python3; do
    command -v "$t" >/dev/null || { echo "bench-integrity.sh: $t not found (apt-get install -y fio libnbd-bin python3)" >&2; exit 1; }
done
cargo build --release --quiet
BIN=$PWD/target/release/nbraid
WORK=$(mktemp -d "${TMPDIR:-/tmp}/nbraid-bench-integrity.XXXXXX")
PID=
cleanup() {
    [ -n "$PID" ] && { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
    rm -rf "$WORK"
}
trap cleanup EXIT

CONFIGS=("on:on" "deferred:on" "off:on" "off:off") # checksums (on, deferred pages, off):write-hole-log
serve() { # config -> starts the daemon on $WORK/$config/sock
    local c=$1 dir=$WORK/${1/:/-}
    mkdir -p "$dir"
    local members=()
    for i in $(seq 0 $((MEMBERS - 1))); do members+=("$dir/m$i"); done
    if [ ! -e "$dir/m0" ]; then
        # shellcheck disable=SC2086
        local sums=(--checksums "${c%%:*}")
        [ "${c%%:*}" = deferred ] && sums=(--checksums on --checksum-pages deferred)
        "$BIN" create --level $LEVEL --size "$MEMBER_SIZE" "${sums[@]}" --write-hole-log "${c##*:}" --name bench "${members[@]}" >/dev/null
    fi
    "$BIN" serve --listen "unix:$dir/sock" "${members[@]}" 2>>"$dir/log" &
    PID=$!
    for _ in $(seq 300); do
        if [ -S "$dir/sock" ]; then
            # Written once, so that reads reach the disk rather than never-written blocks.
            [ -e "$dir/filled" ] || { NBD_URI="nbd+unix:///?socket=$dir/sock" fio fio-profiles/prefill.fio >/dev/null && touch "$dir/filled"; }
            return 0
        fi
        sleep 0.1
    done
    echo "bench-integrity.sh: daemon for $c never listened" >&2
    cat "$dir/log" >&2
    exit 1
}
stop() {
    kill "$PID"
    wait "$PID" || true
    PID=
}

declare -A RESULTS
for r in $(seq "$REPEATS"); do
    for p in "${PROFILES[@]}"; do
        for c in "${CONFIGS[@]}"; do
            serve "$c"
            dir=$WORK/${c/:/-}
            NBD_URI="nbd+unix:///?socket=$dir/sock" fio --runtime="$RUNTIME" --time_based --output-format=json "fio-profiles/$p.fio" >"$WORK/out.json"
            iops=$(python3 -c "
import json, sys
s = open('$WORK/out.json').read()
d = json.loads(s[s.index('{'):])
print(sum(j[k]['iops'] for j in d['jobs'] if j['jobname'] != 'prefill' for k in ('read', 'write')))")
            RESULTS[$p/$c]="${RESULTS[$p/$c]:-} $iops"
            stop
            rm -f "$dir/sock"
        done
    done
done

echo "nbraid $LEVEL x$MEMBERS, $MEMBER_SIZE members, median IOPS of $REPEATS runs of ${RUNTIME}s"
printf '%-14s %22s %22s %22s %22s\n' profile "checksums+log" "deferred pages+log" "log only" "neither"
for p in "${PROFILES[@]}"; do
    python3 - "$p" "${RESULTS[$p/on:on]}" "${RESULTS[$p/deferred:on]}" "${RESULTS[$p/off:on]}" "${RESULTS[$p/off:off]}" <<'EOF'
import statistics, sys
p, *runs = sys.argv[1:]
med = [statistics.median(map(float, r.split())) for r in runs]
base = med[-1] or float("nan")
cells = [f"{m:10.0f} ({m / base:4.2f}x)" for m in med]
print(f"{p:<14} " + " ".join(f"{c:>22}" for c in cells))
EOF
done
