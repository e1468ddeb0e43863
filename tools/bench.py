#!/usr/bin/env python3
"""nbraid against nbdkit and qemu-nbd on the same disk, in one run. Started by tools/bench.sh.

Every server gets a volume of the same size, made of files in one scratch directory: nbraid at
raid0 x4, raid1 x2, raid5 x4 and ec 4+2, `nbdkit file` (cache=none) and `qemu-nbd` (--cache=none
--aio=native) on one plain file each. Each is written once in full (fio-profiles/prefill.fio),
then every profile of fio-profiles/ runs through fio's nbd engine, interleaving the servers and
repeating the whole round --repeats times; the tables show medians. Two yardsticks from
tools/nbd-floor.c run the random-read profiles beside them: a read-only server that does
nothing but blocking preads (floor-sync) and one that sends every read to the disk at once
through io_uring (floor-uring). What they reach is about what any server can reach here.

Per run: IOPS, bandwidth, mean and p99 completion latency, and the server's CPU time per request
(utime + stime of the server process from /proc/PID/stat across the fio run, divided by the
requests fio completed). Afterwards: raid5 with one member failed (degraded random reads), a
rebuild onto a blank member against the raw sequential write speed of a plain file in the same
directory, and the daemon's peak RSS while 4 connections each push 128 requests of 32 MiB.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROFILE_DIR = os.path.join(ROOT, "fio-profiles")
MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")

# (profile, short label); the order is the table's.
PROFILES = [
    ("randread-4k-qd32", "4k rand read QD32"),
    ("randread-4k-qd1", "4k rand read QD1"),
    ("randwrite-4k-qd32", "4k rand write QD32"),
    ("randwrite-4k-qd1", "4k rand write QD1"),
    ("seqread-1m-qd8", "1M seq read QD8"),
    ("seqwrite-1m-qd8", "1M seq write QD8"),
    ("mixed-70-30", "70/30 mixed 4k-64k QD16"),
    ("randread-4k-4conn", "4k rand read, 4 conns x QD32"),
]

# name -> (create arguments, members, data shards)
NBRAID_LEVELS = {
    "raid0x4": (["--level", "raid0"], 4, 4),
    "raid1x2": (["--level", "raid1"], 2, 1),
    "raid5x4": (["--level", "raid5"], 4, 3),
    "ec4+2": (["--level", "ec", "--data", "4", "--parity", "2"], 6, 4),
    # Opt-in variants, run only when named in --servers: checksum pages written at flushes.
    "raid0x4-deferred": (["--level", "raid0", "--checksum-pages", "deferred"], 4, 4),
    "raid5x4-deferred": (["--level", "raid5", "--checksum-pages", "deferred"], 4, 3),
}
OPT_IN_LEVELS = {"raid0x4-deferred", "raid5x4-deferred"}
PEERS = ["nbdkit", "qemu-nbd"]
# tools/nbd-floor.c, read-only and one connection at a time: the least a server can do for a
# read here (sync: a blocking pread per request; uring: every read to the disk at once). They
# are yardsticks, not peers: they run only these profiles and never count as the better peer.
FLOORS = ["floor-sync", "floor-uring"]
FLOOR_PROFILES = {"randread-4k-qd32", "randread-4k-qd1"}


def log(msg):
    print(f"== {msg}", file=sys.stderr, flush=True)


def parse_size(s):
    m = re.fullmatch(r"(\d+)\s*([KMGT]?)(i?B)?", s.strip(), re.I)
    if not m:
        raise SystemExit(f"bench: cannot read size {s!r} (e.g. 1GiB, 512MiB)")
    return int(m.group(1)) << (10 * " KMGT".index((m.group(2) or " ").upper()))


def cpu_seconds(pid):
    """utime + stime of the whole process (all threads, live and exited) in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Server:
    """One NBD server process listening on a Unix socket in the scratch directory."""

    def __init__(self, name, kind, workdir):
        self.name, self.kind = name, kind
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir)
        self.sock = os.path.join(self.dir, "nbd.sock")
        self.ctl = os.path.join(self.dir, "ctl.sock")
        self.uri = f"nbd+unix:///?socket={self.sock}"
        self.proc = None
        self.members = []

    def start(self, argv):
        self.log_path = os.path.join(self.dir, "server.log")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(self.log_path, "w"), start_new_session=True)
        for _ in range(600):
            if os.path.exists(self.sock):
                try:
                    subprocess.run(["nbdinfo", "--size", self.uri], check=True, capture_output=True)
                    return
                except subprocess.CalledProcessError:
                    pass
            if self.proc.poll() is not None:
                raise SystemExit(f"bench: {self.name} exited at start:\n{open(self.log_path).read()}")
            time.sleep(0.1)
        raise SystemExit(f"bench: {self.name} never listened on {self.sock}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def pid(self):
        return self.proc.pid


def start_nbraid(nbraid, workdir, name, volume_size):
    args, count, data = NBRAID_LEVELS[name]
    s = Server(f"nbraid-{name}", "nbraid", workdir)
    # Members carry metadata (superblocks, checksum table, write-hole log) before the data area;
    # 64 MiB more than the data share leaves every volume at least volume_size bytes long.
    member_size = -(-volume_size // data) + 64 * MIB
    s.members = [os.path.join(s.dir, f"m{i}") for i in range(count)]
    subprocess.run([nbraid, "create", *args, "--size", str(member_size), "--name", name, *s.members], check=True, stdout=subprocess.DEVNULL)
    s.start([nbraid, "serve", "--listen", f"unix:{s.sock}", "--control", s.ctl, *s.members])
    s.member_size = member_size
    s.data_shards = data
    return s


def start_floor(floor_bin, workdir, name, volume_size):
    s = Server(name, "floor", workdir)
    img = os.path.join(s.dir, "disk.img")
    # Read-only: written here, in full, the way the others are prefilled.
    fio_plain_file(img, volume_size, "--rw=write", "--bs=1M", "--iodepth=8", "--end_fsync=1")
    s.start([floor_bin, name.split("-", 1)[1], s.sock, img])
    return s


def start_peer(workdir, kind, volume_size):
    s = Server(kind, kind, workdir)
    img = os.path.join(s.dir, "disk.img")
    with open(img, "wb") as f:
        f.truncate(volume_size)
    if kind == "nbdkit":
        s.start(["nbdkit", "-f", "--unix", s.sock, "file", img, "cache=none", "fadvise=random"])
    else:
        # --shared: the 4-connection profile needs that many clients at once.
        s.start(["qemu-nbd", "-f", "raw", "--cache=none", "--aio=native", "--persistent", "--shared=8", f"--socket={s.sock}", img])
    return s


def profile_text(name, size, runtime):
    """The profile as committed, with the run's region size and a fixed run time."""
    text = open(os.path.join(PROFILE_DIR, f"{name}.fio")).read()
    text = re.sub(r"(?m)^size=.*$", f"size={size}", text)
    if runtime is not None:
        text = re.sub(r"(?m)^runtime=.*$", f"runtime={runtime}", text)
        text = text.replace("[global]\n", "[global]\ntime_based=1\n", 1)
    return text


def run_fio(server, profile, size, runtime, scratch):
    """Runs one profile against one server; returns the run's measurements."""
    job = os.path.join(scratch, f"{profile}.fio")
    with open(job, "w") as f:
        f.write(profile_text(profile, size, runtime))
    env = dict(os.environ, NBD_URI=server.uri)
    cpu0 = cpu_seconds(server.pid)
    out = subprocess.run(["fio", "--output-format=json", job], env=env, capture_output=True, text=True)
    cpu1 = cpu_seconds(server.pid)
    if out.returncode != 0:
        raise SystemExit(f"bench: fio {profile} against {server.name} failed:\n{out.stderr}\n{open(server.log_path).read()[-4000:]}")
    d = parse_fio(out.stdout)
    ios = lat_sum = 0.0
    p99 = 0.0
    iops = bw = 0.0
    for j in d["jobs"]:
        for k in ("read", "write"):
            x = j[k]
            n = x["total_ios"]
            if n == 0:
                continue
            ios += n
            iops += x["iops"]
            bw += x["bw_bytes"]
            lat_sum += x["clat_ns"]["mean"] * n
            p99 = max(p99, x["clat_ns"].get("percentile", {}).get("99.000000", 0))
    if ios == 0:
        raise SystemExit(f"bench: fio {profile} against {server.name} completed no I/O")
    return {
        "iops": iops,
        "bw_MBps": bw / 1e6,
        "lat_mean_us": lat_sum / ios / 1e3,
        "lat_p99_us": p99 / 1e3,
        "cpu_us_per_req": (cpu1 - cpu0) * 1e6 / ios,
        "requests": int(ios),
    }


def median_of(runs):
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def nbraid_ctl(nbraid, server, *args):
    return subprocess.run([nbraid, *args, "--control", server.ctl], check=True, capture_output=True, text=True).stdout


def wait_optimal(nbraid, server):
    while True:
        st = json.loads(nbraid_ctl(nbraid, server, "status", "--json"))
        if st["state"] == "optimal" and not st["rebuilds"]:
            return
        if st["state"] == "failed" or server.proc.poll() is not None:
            raise SystemExit(f"bench: {server.name} failed during the rebuild")
        time.sleep(0.05)


def parse_fio(stdout):
    """fio's JSON report (fio may print notes before it)."""
    return json.loads(stdout[stdout.index("{"):])


def fio_plain_file(path, size, *options):
    """One fio job straight on a plain file with io_uring and O_DIRECT; returns its report."""
    out = subprocess.run(["fio", "--name=raw", f"--filename={path}", f"--size={size}", "--ioengine=io_uring", "--direct=1", *options, "--output-format=json"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench: fio on {path} failed:\n{out.stderr}")
    return parse_fio(out.stdout)["jobs"][0]


def raw_seq_write(directory, size):
    """Sequential write bandwidth of a plain file there: what a rebuild could at best reach."""
    path = os.path.join(directory, "raw.img")
    job = fio_plain_file(path, size, "--rw=write", "--bs=1M", "--iodepth=8", "--end_fsync=1")
    os.unlink(path)
    return job["write"]["bw_bytes"] / 1e6


def raw_random_read(path, size, qd, runtime):
    """4k random reads straight from a plain file: the disk's own latency and IOPS, the floor
    under every NBD server's."""
    r = fio_plain_file(path, size, "--rw=randread", "--bs=4k", f"--iodepth={qd}", "--norandommap", "--randrepeat=0", "--time_based",
                       f"--runtime={runtime}")["read"]
    return {"iops": r["iops"], "lat_mean_us": r["clat_ns"]["mean"] / 1e3}


# --- memory under load: a minimal NBD client that pushes requests without waiting for replies ---

NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698


def recv_exact(sock, n, into=None):
    buf = into if into is not None else bytearray(n)
    view = memoryview(buf)[:n]
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("server closed the connection")
        got += k
    return buf


def nbd_connect(path):
    """Fixed-newstyle handshake with NBD_OPT_EXPORT_NAME for the default export; simple replies."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    hello = recv_exact(s, 18)
    if hello[:8] != b"NBDMAGIC" or hello[8:16] != b"IHAVEOPT":
        raise ConnectionError("not a newstyle NBD server")
    s.sendall(struct.pack(">I", 1 | 2))  # FIXED_NEWSTYLE | NO_ZEROES
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 1, 0))
    size, _flags = struct.unpack(">QH", recv_exact(s, 10))
    return s, size


def pressure(sock_path, pid, connections, requests, length):
    """Each connection sends `requests` WRITEs of `length` bytes back to back, then as many
    READs, while its replies are drained. Returns the daemon's peak RSS meanwhile."""
    peak = [rss_bytes(pid)]
    done = threading.Event()
    errors = []

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes(pid))
            time.sleep(0.02)

    def one(conn):
        try:
            s, size = nbd_connect(sock_path)
            payload = os.urandom(length)
            slots = max(1, size // length)
            for cmd in (1, 0):  # WRITE, then READ
                def drain():
                    buf = bytearray(length)
                    for _ in range(requests):
                        magic, err, _cookie = struct.unpack(">IIQ", recv_exact(s, 16))
                        if magic != NBD_SIMPLE_REPLY_MAGIC or err:
                            errors.append(f"connection {conn}: reply magic {magic:#x} error {err}")
                            return
                        if cmd == 0:
                            recv_exact(s, length, buf)
                reader = threading.Thread(target=drain)
                reader.start()
                for i in range(requests):
                    offset = ((conn * requests + i) % slots) * length
                    s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, cmd, i, offset, length))
                    if cmd == 1:
                        s.sendall(payload)
                reader.join()
            s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, 2, 0, 0, 0))  # DISC
            s.close()
        except Exception as e:  # reported, not raised: a thread's exception would vanish
            errors.append(f"connection {conn}: {e}")

    sampler = threading.Thread(target=sample)
    sampler.start()
    base = rss_bytes(pid)
    t0 = time.monotonic()
    workers = [threading.Thread(target=one, args=(c,)) for c in range(connections)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    secs = time.monotonic() - t0
    done.set()
    sampler.join()
    if errors:
        raise SystemExit("bench: memory-pressure client failed: " + "; ".join(errors))
    moved = 2 * connections * requests * length
    return {"connections": connections, "requests_per_connection": requests, "request_bytes": length, "rss_before_MiB": round(base / MIB, 1),
            "rss_peak_MiB": round(peak[0] / MIB, 1), "in_flight_offered_MiB": connections * requests * length // MIB, "MBps": round(moved / secs / 1e6, 1)}


# --- the report ---

def fmt(x, digits=0):
    if x >= 100000:
        return f"{x / 1000:.0f}k"
    if x >= 10000:
        return f"{x / 1000:.1f}k"
    return f"{x:.{digits}f}"


def best_peer(res, profile, key, lower_is_better, among=PEERS):
    """The better value of `key` among the servers `among` (the peers unless told), and whose."""
    vals = [(res[p][profile][key], p) for p in among if p in res and profile in res[p]]
    if not vals:
        return None, None
    return (min if lower_is_better else max)(vals)


def markdown(res, extra, args):
    lines = []
    lines.append(f"Volume {args.volume_size_h} per server, files in {args.dir_h}; median of {args.repeats} interleaved runs of {args.runtime} s each.")
    lines.append("Ratios are against the better of nbdkit and qemu-nbd for the same profile (for latency and CPU lower is better). "
                 "floor-sync and floor-uring (tools/nbd-floor.c) are no peers but yardsticks: the least a server can add to a read here.")
    lines.append("")
    lines.append("| profile | server | IOPS | MB/s | mean µs | p99 µs | CPU µs/req | IOPS × peer | latency × peer | CPU × peer |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for prof, label in PROFILES:
        for srv in res:
            if prof not in res[srv]:
                continue
            m = res[srv][prof]
            cells = [label, srv, fmt(m["iops"]), fmt(m["bw_MBps"]), fmt(m["lat_mean_us"]), fmt(m["lat_p99_us"]), f"{m['cpu_us_per_req']:.1f}"]
            if srv not in PEERS:
                bi, _ = best_peer(res, prof, "iops", False)
                bl, _ = best_peer(res, prof, "lat_mean_us", True)
                bc, _ = best_peer(res, prof, "cpu_us_per_req", True)
                cells += [f"{m['iops'] / bi:.2f}×" if bi else "", f"{m['lat_mean_us'] / bl:.2f}×" if bl else "",
                          f"{m['cpu_us_per_req'] / bc:.2f}×" if bc else ""]
            else:
                cells += ["", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| target | measured | goal | | the better floor server |")
    lines.append("|---|---:|---:|---|---:|")
    for t in targets(res, extra):
        floor = f"{t['floor']:.2f}×" if t.get("floor") is not None else ""
        lines.append(f"| {t['target']} | {t['measured']:.2f}× | {t['op']} {t['goal']}× | {'met' if t['met'] else '**missed**'} | {floor} |")
    lines.append("")
    if "degraded" in extra:
        d = extra["degraded"]
        lines.append(f"Degraded raid5 x4 (one member failed), 4k random read QD32: {fmt(d['iops'])} IOPS against {fmt(d['optimal_iops'])} optimal.")
    if "rebuild" in extra:
        r = extra["rebuild"]
        lines.append(f"Rebuild of one raid5 member ({r['bytes'] // MIB} MiB), unthrottled, idle volume: {r['MBps']:.0f} MB/s; "
                     f"raw sequential write of a plain file there: {r['raw_MBps']:.0f} MB/s. The rebuild reads {r['members_read']} members and writes one, "
                     f"all on this one disk: {r['disk_traffic_MBps']:.0f} MB/s of disk traffic ({r['disk_traffic_MBps'] / r['raw_MBps']:.2f}× raw write).")
    if "raw" in extra:
        r = extra["raw"]
        lines.append(f"The disk itself (fio io_uring O_DIRECT on a plain file): 4k random read QD32 {fmt(r['qd32']['iops'])} IOPS, "
                     f"QD1 mean latency {r['qd1']['lat_mean_us']:.0f} µs.")
    if "protocol" in extra:
        r = extra["protocol"]
        lines.append(f"No disk at all (nbdkit memory plugin, same fio client): 4k random read QD32 {fmt(r['randread-4k-qd32']['iops'])} IOPS "
                     f"({r['randread-4k-qd32']['cpu_us_per_req']:.1f} µs server CPU per request), QD1 mean latency {r['randread-4k-qd1']['lat_mean_us']:.0f} µs.")
    if "memory" in extra:
        m = extra["memory"]
        lines.append(f"Memory: {m['connections']} connections × {m['requests_per_connection']} requests × {m['request_bytes'] // MIB} MiB "
                     f"({m['in_flight_offered_MiB']} MiB offered at once, writes then reads) on {m['server']}: RSS {m['rss_before_MiB']:.0f} MiB before, "
                     f"peak {m['rss_peak_MiB']:.0f} MiB, {m['MBps']:.0f} MB/s.")
    return "\n".join(lines)


def targets(res, extra):
    out = []

    def add(name, measured, op, goal, floor=None):
        if measured is not None:
            out.append({"target": name, "measured": measured, "op": op, "goal": goal, "met": measured >= goal if op == "≥" else measured <= goal,
                        "floor": floor})

    def floor_best(prof, key, lower_is_better, peer_value):
        """What the better floor server reached, as a ratio to the better peer."""
        best, _ = best_peer(res, prof, key, lower_is_better, among=FLOORS)
        return best / peer_value if best is not None and peer_value else None

    def get(srv, prof, key):
        return res.get(srv, {}).get(prof, {}).get(key)

    r0 = "nbraid-raid0x4"
    bi, _ = best_peer(res, "randread-4k-qd32", "iops", False)
    if bi and get(r0, "randread-4k-qd32", "iops"):
        add("raid0 ×4 4k random read QD32 IOPS vs best peer", get(r0, "randread-4k-qd32", "iops") / bi, "≥", 1.3,
            floor_best("randread-4k-qd32", "iops", False, bi))
    bl, _ = best_peer(res, "randread-4k-qd1", "lat_mean_us", True)
    if bl and get(r0, "randread-4k-qd1", "lat_mean_us"):
        add("raid0 ×4 4k random read QD1 mean latency vs best peer", get(r0, "randread-4k-qd1", "lat_mean_us") / bl, "≤", 0.8,
            floor_best("randread-4k-qd1", "lat_mean_us", True, bl))
    bc, _ = best_peer(res, "randread-4k-qd32", "cpu_us_per_req", True)
    if bc and get(r0, "randread-4k-qd32", "cpu_us_per_req"):
        add("raid0 ×4 server CPU per 4k read vs best peer", get(r0, "randread-4k-qd32", "cpu_us_per_req") / bc, "≤", 0.7)

    def rel(srv, prof, key, name, goal):
        a, b = get(srv, prof, key), get(r0, prof, key)
        if a and b:
            add(name, a / b, "≥", goal)

    rel("nbraid-raid5x4", "seqwrite-1m-qd8", "bw_MBps", "raid5 ×4 1M sequential write vs raid0 ×4", 0.8)
    rel("nbraid-raid5x4", "randwrite-4k-qd32", "iops", "raid5 ×4 4k random write QD32 vs raid0 ×4", 0.3)
    rel("nbraid-ec4+2", "seqwrite-1m-qd8", "bw_MBps", "ec 4+2 1M sequential write vs raid0 ×4", 0.6)
    if "degraded" in extra:
        add("degraded raid5 ×4 4k random read vs optimal", extra["degraded"]["iops"] / extra["degraded"]["optimal_iops"], "≥", 0.6)
    if "rebuild" in extra:
        add("rebuild vs raw sequential write", extra["rebuild"]["MBps"] / extra["rebuild"]["raw_MBps"], "≥", 0.8)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nbraid", default=os.path.join(ROOT, "target", "release", "nbraid"))
    ap.add_argument("--floor", default=os.path.join(ROOT, "target", "nbd-floor"), help="tools/nbd-floor.c built (bench.sh builds it)")
    ap.add_argument("--dir", default="/var/tmp", help="scratch directory parent, on the disk to measure (default /var/tmp)")
    ap.add_argument("--volume-size", default="1GiB", help="volume size of every server (default 1GiB)")
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio run (default 5)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--servers", default=",".join([f"nbraid-{n}" for n in NBRAID_LEVELS if n not in OPT_IN_LEVELS] + PEERS + FLOORS), help="comma-separated subset")
    ap.add_argument("--profiles", default=",".join(p for p, _ in PROFILES), help="comma-separated subset")
    ap.add_argument("--skip", default="", help="comma-separated subset of raw,degraded,rebuild,memory to leave out")
    ap.add_argument("--memory-requests", type=int, default=128, help="requests per connection in the memory test (default 128)")
    ap.add_argument("--json", help="also write the JSON result here")
    args = ap.parse_args()
    args.volume_size_h, args.dir_h = args.volume_size, args.dir
    volume_size = parse_size(args.volume_size)
    servers_wanted = args.servers.split(",")
    profiles = args.profiles.split(",")
    known = {p for p, _ in PROFILES}
    for p in profiles:
        if p not in known:
            raise SystemExit(f"bench: unknown profile {p} (known: {', '.join(sorted(known))})")
    skip = set(filter(None, args.skip.split(",")))

    work = tempfile.mkdtemp(prefix="nbraid-bench.", dir=args.dir)
    servers = []
    result = {"runs": {}, "medians": {}, "extra": {}}
    try:
        for name in servers_wanted:
            if name.startswith("nbraid-"):
                if name[7:] not in NBRAID_LEVELS:
                    raise SystemExit(f"bench: unknown server {name}")
                servers.append(start_nbraid(args.nbraid, work, name[7:], volume_size))
            elif name in PEERS:
                servers.append(start_peer(work, name, volume_size))
            elif name in FLOORS:
                servers.append(start_floor(args.floor, work, name, volume_size))
            else:
                raise SystemExit(f"bench: unknown server {name}")
        scratch = os.path.join(work, "jobs")
        os.makedirs(scratch)
        for s in servers:
            if s.kind != "floor":  # read-only, written at start
                log(f"prefill {s.name}")
                run_fio(s, "prefill", volume_size, None, scratch)

        def runs_profile(s, p):
            return s.kind != "floor" or p in FLOOR_PROFILES

        runs = {s.name: {p: [] for p in profiles if runs_profile(s, p)} for s in servers}
        for rep in range(args.repeats):
            for p in profiles:
                for s in servers:
                    if not runs_profile(s, p):
                        continue
                    m = run_fio(s, p, volume_size, args.runtime, scratch)
                    runs[s.name][p].append(m)
                    log(f"round {rep + 1}/{args.repeats} {p:<18} {s.name:<16} {m['iops']:9.0f} IOPS {m['bw_MBps']:8.1f} MB/s "
                        f"{m['lat_mean_us']:8.1f} µs {m['cpu_us_per_req']:6.1f} µs CPU/req")
        result["runs"] = runs
        res = {srv: {p: median_of(r) for p, r in per.items()} for srv, per in runs.items()}
        result["medians"] = res

        peer = next((s for s in servers if s.kind == "nbdkit"), None)
        if peer and "raw" not in skip:
            log("raw file: 4k random reads QD32 and QD1 (io_uring, O_DIRECT)")
            img = os.path.join(peer.dir, "disk.img")
            result["extra"]["raw"] = {f"qd{qd}": median_of([raw_random_read(img, volume_size, qd, args.runtime) for _ in range(args.repeats)]) for qd in (32, 1)}
            # The protocol's own cost, with no disk at all: fio's nbd client against nbdkit's
            # memory plugin. Its QD1 latency plus the disk's is the floor under any server.
            log("nbdkit memory: 4k random reads QD32 and QD1 (no disk)")
            mem = Server("nbdkit-memory", "nbdkit", work)
            mem.start(["nbdkit", "-f", "--unix", mem.sock, "memory", str(volume_size)])
            try:
                run_fio(mem, "prefill", volume_size, None, scratch)
                result["extra"]["protocol"] = {
                    p: median_of([run_fio(mem, p, volume_size, args.runtime, scratch) for _ in range(args.repeats)]) for p in ("randread-4k-qd32", "randread-4k-qd1")
                }
            finally:
                mem.stop()
        raid5 = next((s for s in servers if s.name == "nbraid-raid5x4"), None)
        if raid5 and "degraded" not in skip and "randread-4k-qd32" in profiles:
            log("raid5: failing member 1, degraded random reads")
            nbraid_ctl(args.nbraid, raid5, "fail", "1")
            deg = [run_fio(raid5, "randread-4k-qd32", volume_size, args.runtime, scratch) for _ in range(args.repeats)]
            result["extra"]["degraded"] = {"iops": statistics.median(d["iops"] for d in deg), "optimal_iops": res[raid5.name]["randread-4k-qd32"]["iops"],
                                           "runs": deg}
        if raid5 and "rebuild" not in skip:
            st = json.loads(nbraid_ctl(args.nbraid, raid5, "status", "--json"))
            if st["state"] == "optimal":
                nbraid_ctl(args.nbraid, raid5, "fail", "1")
            nbraid_ctl(args.nbraid, raid5, "rebuild", "--max-rate", "0")
            rebuilt = st["size"] // st["data_shards"]
            speeds, raws = [], []
            for rep in range(args.repeats):
                raws.append(raw_seq_write(raid5.dir, rebuilt))
                blank = os.path.join(raid5.dir, f"blank{rep}")
                with open(blank, "wb") as f:
                    f.truncate(raid5.member_size)
                log(f"raid5: rebuild {rep + 1}/{args.repeats} onto a blank member")
                t0 = time.monotonic()
                nbraid_ctl(args.nbraid, raid5, "add", blank)
                wait_optimal(args.nbraid, raid5)
                speeds.append(rebuilt / (time.monotonic() - t0) / 1e6)
                if rep + 1 < args.repeats:
                    nbraid_ctl(args.nbraid, raid5, "fail", "1")
            # All members share one disk here: the rebuild reads k members and writes one.
            result["extra"]["rebuild"] = {"bytes": rebuilt, "MBps": statistics.median(speeds), "raw_MBps": statistics.median(raws), "runs_MBps": speeds,
                                          "raw_runs_MBps": raws, "disk_traffic_MBps": statistics.median(speeds) * (st["data_shards"] + 1),
                                          "members_read": st["data_shards"]}
        raid0 = next((s for s in servers if s.name == "nbraid-raid0x4"), None)
        if raid0 and "memory" not in skip:
            log(f"raid0: 4 connections x {args.memory_requests} requests x 32 MiB, watching RSS")
            mem = pressure(raid0.sock, raid0.pid, 4, args.memory_requests, 32 * MIB)
            mem["server"] = raid0.name
            result["extra"]["memory"] = mem
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)

    result["targets"] = targets(result["medians"], result["extra"])
    result["config"] = {"volume_size": volume_size, "runtime_s": args.runtime, "repeats": args.repeats, "dir": args.dir}
    print(markdown(result["medians"], result["extra"], args))
    print()
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
