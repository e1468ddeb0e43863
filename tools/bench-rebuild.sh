#!/usr/bin/env bash
# Rebuild benchmark: how fast nbraid rebuilds a failed member, and what clients get meanwhile.
#
#   bash tools/bench-rebuild.sh [--dir DIR] [--size SIZE] [--members N] [--runtime SECS]
#                               [--rate-fraction F] [--json FILE]
#
#   --dir DIR          scratch directory parent (default /var/tmp; a fresh subdirectory is made
#                      and removed afterwards). Use a directory on the disk you want measured.
#   --size SIZE        member size, fio/nbraid syntax (default 1GiB)
#   --members N        raid5 members (default 4)
#   --runtime SECS     length of the no-rebuild baseline client run (default 8)
#   --rate-fraction F  throttled run: --max-rate = F x raw write bandwidth (default 0.25)
#   --json FILE        also write the JSON result to FILE
#   NBRAID=path        nbraid binary (default target/release/nbraid, built if missing)
#
# What it measures, all in one scratch directory:
#   (a) raw sequential write bandwidth of a plain file there
#       (fio --ioengine=io_uring --direct=1 --rw=write --bs=1M),
#   (d) client 4k random-read IOPS on the optimal volume (baseline, fio --ioengine=nbd),
#   (b) unthrottled rebuild throughput: a raid5 volume filled with data, one member failed,
#       a blank member added; throughput = rebuilt bytes / time from `add` to optimal (status
#       polled every 0.1 s), with the same 4k random-read client running during the rebuild,
#   (b') the same rebuild with no client, to separate contention from the rebuild's own speed,
#   (c) the same with `nbraid rebuild --max-rate` at F x (a) (the failed member re-added).
# Prints a Markdown table, then the JSON. A full default run takes about 1.5 minutes (under
# three) on two cores. Needs fio (with the nbd engine), nbdinfo and python3. The daemon, fio
# and every file it made are removed on exit, also on failure or Ctrl-C.
set -euo pipefail

DIR_PARENT=/var/tmp
SIZE=1GiB
MEMBERS=4
RUNTIME=8
FRACTION=0.25
JSON_OUT=
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) DIR_PARENT=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --members) MEMBERS=$2; shift 2 ;;
        --runtime) RUNTIME=$2; shift 2 ;;
        --rate-fraction) FRACTION=$2; shift 2 ;;
        --json) JSON_OUT=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-rebuild: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
NBRAID=${NBRAID:-$ROOT/target/release/nbraid}
if [ ! -x "$NBRAID" ]; then
    echo "== building nbraid (release)" >&2
    (cd "$ROOT" && cargo build --release -q)
fi
for t in fio nbdinfo python3; do
    command -v "$t" >/dev/null || { echo "bench-rebuild: $t is required" >&2; exit 1; }
done

S=$(mktemp -d "$DIR_PARENT/nbraid-bench.XXXXXX")
DAEMON_PID=
FIO_PID=
cleanup() {
    set +e
    if [ -n "$FIO_PID" ]; then kill "$FIO_PID" 2>/dev/null; wait "$FIO_PID" 2>/dev/null; fi
    if [ -n "$DAEMON_PID" ]; then
        kill -TERM "$DAEMON_PID" 2>/dev/null
        for _ in $(seq 1 100); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$DAEMON_PID" 2>/dev/null
        wait "$DAEMON_PID" 2>/dev/null
    fi
    rm -rf "$S"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

SOCK=$S/nbd.sock
CTL=$S/ctl.sock
URI="nbd+unix:///?socket=$SOCK"
log() { echo "== $*" >&2; }

# JSON field from a file: py FILE EXPR (EXPR sees the parsed document as `d`)
py() { python3 - "$1" "$2" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
d = json.loads(text[text.index('{'):])
print(eval(sys.argv[2]))
EOF
}
status_json() { "$NBRAID" status --control "$CTL" --json; }

# (a) raw sequential write bandwidth
log "raw sequential write, $SIZE, io_uring O_DIRECT bs=1M"
fio --name=raw --filename="$S/raw.img" --size="$SIZE" --ioengine=io_uring --direct=1 --rw=write \
    --bs=1M --iodepth=8 --end_fsync=1 --output-format=json >"$S/raw.json"
RAW_BW=$(py "$S/raw.json" "d['jobs'][0]['write']['bw_bytes']")
rm -f "$S/raw.img"

# the volume
MEMBER_FILES=()
for i in $(seq 0 $((MEMBERS - 1))); do MEMBER_FILES+=("$S/m$i"); done
"$NBRAID" create --level raid5 --size "$SIZE" --name bench "${MEMBER_FILES[@]}" >/dev/null
"$NBRAID" serve --listen "unix:$SOCK" --control "$CTL" "${MEMBER_FILES[@]}" 2>"$S/daemon.log" &
DAEMON_PID=$!
for _ in $(seq 1 300); do
    [ -S "$SOCK" ] && status_json >/dev/null 2>&1 && break
    kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$S/daemon.log" >&2; exit 1; }
    sleep 0.1
done
VOL_SIZE=$(nbdinfo --size "$URI")
log "filling the volume ($VOL_SIZE bytes) through NBD"
fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1M --iodepth=8 --size="$VOL_SIZE" \
    --output-format=json >"$S/fill.json"

CLIENT=(--name=client --ioengine=nbd "--uri=$URI" --rw=randread --bs=4k --iodepth=16 --norandommap
        --randrepeat=0 --output-format=json)

# (d) baseline
log "baseline: 4k random reads for ${RUNTIME}s, no rebuild"
fio "${CLIENT[@]}" --time_based --runtime="$RUNTIME" >"$S/base.json"
BASE_IOPS=$(py "$S/base.json" "round(d['jobs'][0]['read']['iops'])")

# one rebuild with the client running; sets R_T0, R_T1 (add .. optimal) and R_IOPS
rebuild_run() { # $1 = member to add, $2 = tag, $3 = "idle" for no client
    if [ "${3:-}" != idle ]; then
        fio "${CLIENT[@]}" --time_based --runtime=600 >"$S/$2.json" 2>"$S/$2.err" &
        FIO_PID=$!
        sleep 1 # let the client settle before the rebuild starts
    fi
    # one poller process: `add`, then status every 0.1 s until optimal; writes "t0 t1"
    python3 - "$NBRAID" "$CTL" "$1" "$DAEMON_PID" >"$S/times" <<'EOF'
import json, os, subprocess, sys, time
nbraid, ctl, member, pid = sys.argv[1:]
t0 = time.monotonic()
subprocess.run([nbraid, "add", "--control", ctl, member], check=True, stdout=subprocess.DEVNULL)
while True:
    st = json.loads(subprocess.check_output([nbraid, "status", "--control", ctl, "--json"]))
    if st["state"] == "optimal" and not st["rebuilds"]:
        break
    if st["state"] == "failed":
        sys.exit("volume failed during the rebuild")
    os.kill(int(pid), 0)
    time.sleep(0.1)
print(t0, time.monotonic())
EOF
    read -r R_T0 R_T1 <"$S/times"
    R_IOPS=0
    if [ -n "$FIO_PID" ]; then
        kill -INT "$FIO_PID"
        wait "$FIO_PID" || true
        FIO_PID=
        R_IOPS=$(py "$S/$2.json" "round(d['jobs'][0]['read']['iops'])")
    fi
}

member_bytes() { # rebuilt bytes per member = stripes x chunk, from status
    python3 - <<EOF
import json, subprocess
st = json.loads(subprocess.check_output(["$NBRAID", "status", "--control", "$CTL", "--json"]))
k = st["data_shards"]
print(st["size"] // k)
EOF
}
REBUILD_BYTES=$(member_bytes)

# (b) unthrottled
"$NBRAID" rebuild --control "$CTL" --max-rate 0 >/dev/null
"$NBRAID" fail --control "$CTL" 1 >/dev/null
truncate -s "$SIZE" "$S/new1"
log "rebuild onto a blank member, unthrottled, client running"
rebuild_run "$S/new1" unthrottled
B0=$R_T0 B1=$R_T1 B_IOPS=$R_IOPS

# (b') the same without a client, to tell contention from the rebuild's own speed
"$NBRAID" fail --control "$CTL" 1 >/dev/null
log "rebuild again (failed m1 re-added), unthrottled, no client"
rebuild_run "$S/m1" idle idle
I0=$R_T0 I1=$R_T1

# (c) throttled at FRACTION x raw bandwidth; new1, failed, comes back as a former member
RATE=$(python3 -c "print(int($RAW_BW * $FRACTION))")
"$NBRAID" rebuild --control "$CTL" --max-rate "$RATE" >/dev/null
"$NBRAID" fail --control "$CTL" 1 >/dev/null
log "rebuild again, --max-rate $RATE bytes/s ($FRACTION x raw), client running"
rebuild_run "$S/new1" throttled
C0=$R_T0 C1=$R_T1 C_IOPS=$R_IOPS

python3 - "$RAW_BW" "$REBUILD_BYTES" "$B0" "$B1" "$B_IOPS" "$C0" "$C1" "$C_IOPS" "$BASE_IOPS" "$RATE" \
    "$SIZE" "$MEMBERS" "${JSON_OUT:-}" "$I0" "$I1" <<'EOF'
import json, sys
raw, nbytes, b0, b1, biops, c0, c1, ciops, base, rate, size, members, out, i0, i1 = sys.argv[1:]
raw, nbytes, rate = int(raw), int(nbytes), int(rate)
MB = 1e6
def run(t0, t1, iops, name, limit, client=True):
    secs = float(t1) - float(t0)
    bw = nbytes / secs
    return {"run": name, "max_rate_bytes": limit, "rebuild_bytes": nbytes, "rebuild_seconds": round(secs, 2),
            "rebuild_MBps": round(bw / MB, 1), "fraction_of_raw_write": round(bw / raw, 3),
            "client_4k_randread_iops": int(iops) if client else None,
            "client_iops_vs_baseline": round(int(iops) / int(base), 3) if client else None}
res = {
    "level": "raid5", "members": int(members), "member_size": size,
    "raw_seq_write_MBps": round(raw / MB, 1),
    "baseline_client_4k_randread_iops": int(base),
    "runs": [run(b0, b1, biops, "unthrottled", None), run(i0, i1, 0, "unthrottled, no client", None, client=False),
             run(c0, c1, ciops, "throttled", rate)],
    "note": "rebuild time is from `nbraid add` to status optimal, polled every 0.1 s",
}
print()
print(f"raid5 x{members}, members {size}; raw sequential write {res['raw_seq_write_MBps']} MB/s")
print()
print("| run | rebuild MB/s | fraction of raw write | client 4k randread IOPS | vs baseline |")
print("|---|---:|---:|---:|---:|")
print(f"| baseline (no rebuild) | - | - | {int(base)} | 1.000 |")
for r in res["runs"]:
    name = r["run"] if r["max_rate_bytes"] is None else f"throttled to {r['max_rate_bytes'] / MB:.0f} MB/s"
    iops = "-" if r["client_4k_randread_iops"] is None else r["client_4k_randread_iops"]
    rel = "-" if r["client_iops_vs_baseline"] is None else r["client_iops_vs_baseline"]
    print(f"| rebuild, {name} | {r['rebuild_MBps']} | {r['fraction_of_raw_write']} | {iops} | {rel} |")
print()
print(json.dumps(res, indent=2))
if out:
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
EOF
