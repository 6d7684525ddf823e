#!/usr/bin/env bash
# bench-one-dir.sh — many writers in one directory (a benchmark, not a test: it prints
# figures).
#
#   scripts/bench-one-dir.sh [PEERS] [CODE] [FILES_PER_WRITER]    defaults: 3 2+1 1000
#
# Starts a fresh local ring of PEERS peers with CODE (scripts/local-ring.sh, under
# /var/tmp, ports from 7601), mounts it, and has 4 Python threads each create
# FILES_PER_WRITER files of 100 bytes in one directory. Prints the total time, the
# latency of an open-write-close by quarter of the run (p50/p99/max), and the time of
# one listing. Stops the ring and removes it afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${1:-3}
CODE=${2:-2+1}
N=${3:-1000}
command -v python3 >/dev/null || { echo "bench-one-dir: python3 not found" >&2; exit 2; }
WORK=$(mktemp -d /var/tmp/msonedir.XXXXXX)
export MS_RING_DIR=$WORK/ring MS_BASE_PORT=${MS_BASE_PORT:-7601} MS_CODE=$CODE
cleanup() {
  scripts/local-ring.sh down >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
scripts/local-ring.sh up "$PEERS" "$WORK/mnt" >/dev/null
mkdir "$WORK/mnt/d"
python3 - "$WORK/mnt/d" "$N" <<'PY'
import os, sys, threading, time
d, n = sys.argv[1], int(sys.argv[2])
lat = []
lock = threading.Lock()
def writer(t):
    for i in range(n):
        a = time.monotonic()
        with open(f"{d}/w{t}-{i}", "w") as f:
            f.write("x" * 100)
        with lock:
            lat.append((a - t0, time.monotonic() - a))
t0 = time.monotonic()
ts = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
for t in ts: t.start()
for t in ts: t.join()
total = time.monotonic() - t0
print(f"files {4 * n}  seconds {total:.2f}  per_second {4 * n / total:.0f}")
lat.sort()
q = max(1, len(lat) // 4)
for s in range(0, len(lat), q):
    ls = sorted(x[1] for x in lat[s:s + q])
    print(f"  from {lat[s][0]:6.2f} s: p50 {ls[len(ls) // 2] * 1e3:7.1f} ms  p99 {ls[int(len(ls) * .99)] * 1e3:7.1f} ms  max {ls[-1] * 1e3:7.1f} ms")
a = time.monotonic()
listed = len(os.listdir(d))
print(f"listing {listed} entries: {time.monotonic() - a:.2f} s")
if listed != 4 * n:
    sys.exit(f"listed {listed}, expected {4 * n}")
PY
