#!/usr/bin/env bash
# bench-fs.sh — the filesystem benchmark (a benchmark, not a test: it prints figures).
#
#   scripts/bench-fs.sh [FSBENCH]      FSBENCH defaults to ../shared/bench/fsbench.sh
#
# In one sitting, on this machine: fsbench.sh on plain ext4 (a directory under /var/tmp),
# on a passthrough FUSE mount of that directory (bindfs), and on a MutualStore mount of a
# fresh 6-peer local ring (4+2, 3 GiB each). Then the memory of the mount process while
# `cp` copies a 5 GiB file onto it. Prints one block of "figure value" lines per target;
# BENCHMARKS.md records them. Needs root (drop_caches), fuse3, fio, bindfs (installed if
# missing, via apt-get).
set -euo pipefail
cd "$(dirname "$0")/.."
FSBENCH=${1:-../shared/bench/fsbench.sh}
[ -x "$FSBENCH" ] || { echo "bench-fs: $FSBENCH not found" >&2; exit 2; }
need() { command -v "$1" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need fio fio; need bindfs bindfs; need fusermount3 fuse3
cargo build --release -q
BIN=target/release/mutualstore-fs
WORK=$(mktemp -d /var/tmp/msbench.XXXXXX)
RING=$WORK/ring
cleanup() {
  for m in "$WORK/pass" "$WORK/ms"; do mountpoint -q "$m" 2>/dev/null && fusermount3 -uz "$m"; done
  MS_RING_DIR=$RING scripts/local-ring.sh down >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
mkdir -p "$WORK/ext4" "$WORK/pass" "$WORK/ms"
echo "== ext4 ($(findmnt -n -o FSTYPE -T "$WORK"))"
"$FSBENCH" "$WORK/ext4"
echo "== passthrough FUSE (bindfs over the same ext4)"
bindfs "$WORK/ext4" "$WORK/pass"
"$FSBENCH" "$WORK/pass"
fusermount3 -u "$WORK/pass"
echo "== MutualStore (6 peers, 4+2, one mount)"
MS_RING_DIR=$RING MS_BASE_PORT=${MS_BASE_PORT:-7301} MS_CAPACITY=3GiB scripts/local-ring.sh up 6 "$WORK/ms" >/dev/null
"$FSBENCH" "$WORK/ms"
echo "== mount memory while cp copies a 5 GiB file"
head -c 5G /dev/urandom >"$WORK/ext4/big"
pid=$(pgrep -f "mutualstore-fs mount $WORK/ms" | head -1)
peak=0
( while kill -0 "$pid" 2>/dev/null; do r=$(awk '/VmRSS/{print $2}' /proc/$pid/status 2>/dev/null || echo 0); [ "${r:-0}" -gt "$peak" ] && peak=$r && echo "$peak" >"$WORK/peak"; sleep 0.2; done ) &
watcher=$!
t0=$EPOCHREALTIME
cp "$WORK/ext4/big" "$WORK/ms/big"
t1=$EPOCHREALTIME
kill "$watcher" 2>/dev/null || true
echo "big_cp_MiBps $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", 5120/(b-a)}')"
echo "mount_peak_rss_MiB $(( $(cat "$WORK/peak" 2>/dev/null || echo 0) / 1024 ))"
cmp "$WORK/ext4/big" "$WORK/ms/big" && echo "big_cp_identical 1" || echo "big_cp_identical 0"
