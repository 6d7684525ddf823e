#!/usr/bin/env bash
# local-ring.sh — build MutualStore and run a ring of N peers on 127.0.0.1.
#
#   scripts/local-ring.sh up [N] [MOUNTPOINT]
#                                     build (release), start N peers (default 6), wait until
#                                     every one is alive, mount the ring at MOUNTPOINT
#                                     (created if missing; default /mnt/mutual), print how
#                                     to use and stop it
#   scripts/local-ring.sh status      the ring's status table
#   scripts/local-ring.sh down        unmount, stop the peers (SIGTERM: they leave the ring
#                                     cleanly)
#
# The ring is made with a secret (`mutualstore-fs init`): $MS_RING_DIR/ring.secret, which
# every peer, mount and command here is given; the mount's file key is $MS_RING_DIR/fs.key.
#
# Environment: MS_RING_DIR (default /tmp/mutualstore-ring) holds each peer's data
# directory, log and pid; MS_BASE_PORT (default 7001) is the first peer's port;
# MS_CAPACITY (default 2GiB) is each peer's disk image size; MS_CODE (default 4+2) is the
# ring's erasure code (k data + m parity shards per stripe).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${MS_RING_DIR:-/tmp/mutualstore-ring}
BASE=${MS_BASE_PORT:-7001}
CAP=${MS_CAPACITY:-2GiB}
CODE=${MS_CODE:-4+2}
BIN=${CARGO_TARGET_DIR:-target}/release/mutualstore-fs
SECRET=$DIR/ring.secret
KEY=$DIR/fs.key

die() { echo "local-ring: $*" >&2; exit 1; }

# Whether something listens on 127.0.0.1:PORT. Asks the kernel (ss) rather than
# connecting: a connection that never does TLS makes a peer log a refused handshake.
port_busy() {
  if command -v ss >/dev/null; then
    ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

up() {
  local n=${1:-6}
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 64 ] || die "N must be 1..64, got '$n'"
  local mnt=${2:-/mnt/mutual}
  [ -e /dev/fuse ] || die "no /dev/fuse: FUSE is not available here (modprobe fuse)"
  command -v fusermount3 >/dev/null || command -v fusermount >/dev/null || die "fusermount3 not found: install fuse3 (apt-get install -y fuse3)"
  [ -f "$DIR/pids" ] && die "a ring is already running from $DIR (scripts/local-ring.sh down first)"
  command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) first"
  echo "building (cargo build --release)..."
  cargo build --release -q || die "build failed"
  mkdir -p "$DIR"
  if [ ! -f "$SECRET" ]; then
    [ -e "$DIR/p0" ] && die "$DIR holds a ring without a secret (from an older version): rm -rf $DIR first"
    "$BIN" init --data "$DIR/p0" >"$DIR/init.out" || die "init failed: $(tail -1 "$DIR/init.out")"
    install -m 600 "$DIR/p0/ring.secret" "$SECRET"
  fi
  : >"$DIR/pids"
  local first="127.0.0.1:$BASE"
  for i in $(seq 0 $((n - 1))); do
    local port=$((BASE + i))
    port_busy "$port" && { down >/dev/null 2>&1 || true; die "port $port is busy (set MS_BASE_PORT)"; }
    local args=(peer --listen "127.0.0.1:$port" --data "$DIR/p$i" --capacity "$CAP" --secret-file "$SECRET")
    if [ "$i" -gt 0 ]; then args+=(--join "$first"); else args+=(--code "$CODE"); fi
    nohup "$BIN" "${args[@]}" >"$DIR/p$i.log" 2>&1 </dev/null &
    echo "$!" >>"$DIR/pids"
    for _ in $(seq 1 50); do port_busy "$port" && break; sleep 0.1; done
    port_busy "$port" || { tail -3 "$DIR/p$i.log" >&2; down >/dev/null 2>&1 || true; die "peer $i did not start"; }
    # One join at a time: a joiner places its vnodes from a sample of the ring, which
    # should include the peer that joined just before it.
    wait_alive "$first" $((i + 1)) || { down >/dev/null 2>&1 || true; die "peer $i did not join (logs in $DIR)"; }
  done
  sleep 2  # a couple of maintenance rounds so predecessors (and shares) settle
  "$BIN" status --join "$first" --secret-file "$SECRET"
  mkdir -p "$mnt" || { down >/dev/null 2>&1 || true; die "cannot create mountpoint $mnt"; }
  "$BIN" mount "$mnt" --join "$first" --secret-file "$SECRET" --key-file "$KEY" --log-file "$DIR/mount.log" || { down >/dev/null 2>&1 || true; die "mount at $mnt failed (log: $DIR/mount.log)"; }
  echo "$mnt" >"$DIR/mountpoint"
  cat <<MSG

A ring of $n peers is running on 127.0.0.1:$BASE..$((BASE + n - 1)), mounted at $mnt; data and logs in $DIR.
Members prove themselves with the ring secret $SECRET; files are encrypted with the key $KEY.
  use it:         cp -r ~/photos $mnt/ ; ls $mnt ; df -h $mnt
  another mount:  $BIN mount /some/dir --join $first --secret-file $SECRET --key-file $KEY
  store a file:   $BIN put FILE --join $first --secret-file $SECRET          (prints a handle)
  fetch it:       $BIN get HANDLE -o OUT --join $first --secret-file $SECRET
  look at it:     $BIN status --join $first --secret-file $SECRET
  drain a peer:   $BIN leave --join 127.0.0.1:$((BASE + 1)) --secret-file $SECRET   (moves its shards away, then it exits)
  stop it:        scripts/local-ring.sh down     (unmounts, then stops the peers)
MSG
}

wait_alive() {
  local alive=0
  for _ in $(seq 1 60); do
    alive=$("$BIN" status --join "$1" --secret-file "$SECRET" --json 2>/dev/null | grep -c '"alive": true' || true)
    [ "$alive" -ge "$2" ] && return 0
    sleep 0.25
  done
  return 1
}

down() {
  if [ -f "$DIR/mountpoint" ]; then
    local mnt; mnt=$(cat "$DIR/mountpoint")
    local mpid; mpid=$(pgrep -f -- "--log-file $DIR/mount.log" | head -1 || true)
    if mountpoint -q "$mnt" 2>/dev/null; then
      fusermount3 -u "$mnt" 2>/dev/null || fusermount -u "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || echo "local-ring: could not unmount $mnt" >&2
    fi
    # The mount publishes what it still holds as it exits: keep the peers up until then.
    if [ -n "$mpid" ]; then
      for _ in $(seq 1 300); do kill -0 "$mpid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$DIR/mountpoint"
  fi
  [ -f "$DIR/pids" ] || { echo "no ring running from $DIR"; return 0; }
  while read -r pid; do kill -TERM "$pid" 2>/dev/null || true; done <"$DIR/pids"
  for _ in $(seq 1 50); do
    local any=0
    while read -r pid; do kill -0 "$pid" 2>/dev/null && any=1; done <"$DIR/pids"
    [ "$any" = 0 ] && break
    sleep 0.1
  done
  while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done <"$DIR/pids"
  rm -f "$DIR/pids"
  echo "ring stopped; data kept in $DIR (rm -rf it to start afresh)"
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  status) "$BIN" status --join "127.0.0.1:$BASE" --secret-file "$SECRET" ;;
  *) echo "usage: $0 up [N] [MOUNTPOINT] | status | down" >&2; exit 2 ;;
esac
