#!/usr/bin/env bash
# bench-erasure.sh — figures for erasure-coded storage on this machine (prints, asserts nothing).
#
#   scripts/bench-erasure.sh [SIZE_MIB]     default 1024
#
# 1. codec: encode/decode GB/s for 4+2 with 1 MiB shards on one core, next to memcpy.
# 2. a 6-peer ring (4+2) on 127.0.0.1: put and get MiB/s of a SIZE_MIB file; latency of
#    30 gets of a 4 MiB file, healthy and with one peer frozen (SIGSTOP); get MiB/s with
#    two peers killed.
# 3. a 7-peer ring with a 2 s grace period: kill one peer holding SIZE_MIB/4 of data and
#    time the repair until status shows 0 degraded stripes.
# Uses ports MS_BENCH_PORT (default 7401) and up, and a scratch directory under /tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-1024}
BASE=${MS_BENCH_PORT:-7401}
BIN=target/release/mutualstore-fs
cargo build --release -q
W=$(mktemp -d /tmp/ms-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; mkdir -p /tmp/ms-bench-logs; cp "$W"/*.log /tmp/ms-bench-logs/ 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
now() { date +%s.%N; }
mibs() { python3 -c "print(f'{$1/($3-$2):.1f}')"; }

echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(uname -r)"
echo "== codec (one core)"
"$BIN" bench-codec --code 4+2 --shard 1MiB --rounds 50

# start_ring N GRACE_S: peers p0..p(N-1) on BASE.., waits until all are alive
start_ring() {
  local n=$1 grace=$2 i
  PIDS=()
  for i in $(seq 0 $((n - 1))); do
    local args=(peer --listen "127.0.0.1:$((BASE + i))" --data "$W/r$n/p$i" --capacity 4GiB --grace-s "$grace" --upkeep-s 1 --repair-rate 0)
    [ "$i" -eq 0 ] && args+=(--code 4+2) || args+=(--join "127.0.0.1:$BASE")
    "$BIN" "${args[@]}" >"$W/r$n.p$i.log" 2>&1 </dev/null &
    PIDS+=($!)
    for _ in $(seq 1 100); do
      [ "$("$BIN" status --join "127.0.0.1:$BASE" --json 2>/dev/null | grep -c '"alive": true' || true)" -ge $((i + 1)) ] && break
      sleep 0.2
    done
  done
  sleep 3
}
stop_ring() { for p in "${PIDS[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=(); }
J=127.0.0.1:$BASE

echo "== 6-peer ring, 4+2, ${SIZE} MiB file"
start_ring 6 600
head -c $((SIZE << 20)) /dev/urandom >"$W/big"
a=$(now); h=$("$BIN" put "$W/big" --join $J 2>/dev/null | tail -1); b=$(now)
echo "put:              $(mibs "$SIZE" "$a" "$b") MiB/s"
a=$(now); "$BIN" get "$h" -o "$W/out" --join $J 2>/dev/null; b=$(now)
cmp -s "$W/big" "$W/out" || { echo "get returned different bytes"; exit 1; }
echo "get (healthy):    $(mibs "$SIZE" "$a" "$b") MiB/s"
head -c $((4 << 20)) /dev/urandom >"$W/small"
hs=$("$BIN" put "$W/small" --join $J 2>/dev/null | tail -1)
lat() {
  local out=$1; : >"$out"
  for _ in $(seq 1 30); do
    local s e; s=$(now); "$BIN" get "$hs" -o "$W/small.out" --join $J 2>/dev/null; e=$(now)
    python3 -c "print($e-$s)" >>"$out"
  done
  python3 -c "
import statistics as s; v=sorted(float(x) for x in open('$out'))
print(f'p50 {v[len(v)//2]*1000:.0f} ms  p99 {v[min(len(v)-1,int(len(v)*0.99))]*1000:.0f} ms  (n={len(v)}, whole CLI get of 4 MiB incl. process start)')"
}
echo -n "get latency, healthy:     "; lat "$W/lat0"
kill -STOP "${PIDS[3]}"
echo -n "get latency, one frozen:  "; lat "$W/lat1"
kill -CONT "${PIDS[3]}"
kill -9 "${PIDS[2]}" "${PIDS[4]}"
a=$(now); "$BIN" get "$h" -o "$W/out2" --join $J 2>"$W/get2.log" || { tail -3 "$W/get2.log"; exit 1; }; b=$(now)
cmp -s "$W/big" "$W/out2" || { echo "degraded get returned different bytes"; exit 1; }
echo "get (2 of 6 dead): $(mibs "$SIZE" "$a" "$b") MiB/s"
stop_ring

Q=$((SIZE / 4))
echo "== 7-peer ring, grace 2 s: repair after one peer dies (${Q} MiB stored)"
start_ring 7 2
head -c $((Q << 20)) /dev/urandom >"$W/q"
"$BIN" put "$W/q" --join $J >/dev/null 2>&1
sleep 3
kill -9 "${PIDS[5]}"
a=$(now)
for _ in $(seq 1 600); do
  st=$("$BIN" status --join $J --json 2>/dev/null || true)
  d=$(echo "$st" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["degraded_stripes"], s["repaired_bytes"], s["ring_size"])' 2>/dev/null || echo "x 0 0")
  set -- $d
  [ "$1" = 0 ] && [ "$2" -gt 0 ] && [ "$3" = 6 ] && break
  sleep 0.5
done
b=$(now)
echo "repair: $2 bytes rebuilt in $(python3 -c "print(f'{$b-$a:.1f}')") s after the kill (incl. detection + 2 s grace): $(python3 -c "print(f'{$2/1048576/($b-$a):.1f}')") MiB/s"
stop_ring
