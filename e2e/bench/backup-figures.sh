#!/usr/bin/env bash
# Backup and restore figures, on 127.0.0.1 with 256-byte values:
#   - GET /v1/snapshot of a 3-member cluster holding KEYS keys (1M: about 270 MB of keys and
#     values), taken from a follower: time and MB/s;
#   - write p50/p99 at 16 connections without a backup, while backups run back to back, and
#     while backups paced with ?max_bytes_per_sec=PACE run back to back;
#   - raftkv-node restore of that backup: time to write the data directory, then time from the
#     restored member's start to /readyz, and until two learners joined it and were promoted
#     (a ready 3-member cluster).
#
# Usage: e2e/bench/backup-figures.sh       (about 5 minutes with 1M keys)
# Environment: KEYS (1000000), DURATION (s per write point, 10), PACE (bytes/s, 33554432),
#   BENCH_DIR (default
#   target/bench-backup under the repository), NO_BUILD=1 to use the release binaries already built.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

KEYS=${KEYS:-1000000}
DURATION=${DURATION:-10}
PACE=${PACE:-33554432}
VALUE_SIZE=256
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench-backup}

build_and_clean
BASE=$(free_base 6)
# A 1M-key member takes longer to come back than the other scripts' members: up to 60 s.
READY_ATTEMPTS=3000
write_point() { # endpoints -> "p50 X ms, p99 Y ms, N writes/s"
  bench --endpoints "$1" --conns 16 --mix put --duration "$DURATION" --key-space 100000 --json |
    jq -r '"\(.ops_per_sec) writes/s, p50 \(.latency.p50_us / 1000) ms, p99 \(.latency.p99_us / 1000) ms, errors \(.errors), unknown \(.unknown)"'
}
take_backup() { # member file [query] -> "ms bytes revision keys"
  local t0 t1
  t0=$(now_ms)
  curl -fsS -D "$2.headers" -o "$2" "http://$(client "$1")/v1/snapshot${3:-}"
  t1=$(now_ms)
  header() { tr -d '\r' <"$2.headers" | awk -F': ' -v h="$1" 'tolower($1) == h {print $2}'; }
  echo "$((t1 - t0)) $(stat -c %s "$2") $(header x-raftkv-revision "$2") $(header x-raftkv-key-count "$2")"
}

RESULTS=()
cluster="1=http://$(peer 1),2=http://$(peer 2),3=http://$(peer 3)"
for i in 1 2 3; do start_member "$i" --id "$i" --initial-cluster "$cluster"; done
t0=$(now_ms)
for i in 1 2 3; do wait_ready "$t0" "$i" >/dev/null; done
ENDPOINTS="http://$(client 1),http://$(client 2),http://$(client 3)"

log "preloading $KEYS keys of $VALUE_SIZE bytes"
bench --endpoints "$ENDPOINTS" --conns 64 --key-space "$KEYS" --preload --preload-only
leader=$(status_field 1 leader_id)
follower=$((leader % 3 + 1))

log "writes without a backup"
RESULTS+=("writes at 16 conns, no backup: $(write_point "$ENDPOINTS")")

log "one backup from follower $follower, alone"
read -r ms bytes revision keys < <(take_backup "$follower" "$BENCH_DIR/backup.snap")
RESULTS+=("backup of $keys keys from a follower: $bytes bytes at revision $revision in $ms ms, $((bytes / 1000 / (ms > 0 ? ms : 1))) MB/s")

during_backups() { # label query
  log "writes while $1 backups run back to back"
  rm -f "$BENCH_DIR/during.txt"
  (
    n=0
    end=$(($(now_ms) + (DURATION + 1) * 1000))
    while (($(now_ms) < end)); do
      take_backup "$follower" "$BENCH_DIR/during-$n.snap" "$2" >>"$BENCH_DIR/during.txt"
      rm -f "$BENCH_DIR/during-$n.snap"
      n=$((n + 1))
    done
  ) &
  local backups=$!
  RESULTS+=("writes at 16 conns, $1 backups running: $(write_point "$ENDPOINTS")")
  wait "$backups"
  RESULTS+=("  $1 backups taken meanwhile: $(awk '{n++; ms += $1; b += $2} END {printf "%d, %d ms each, %d MB/s", n, ms / n, b / 1000 / ms}' "$BENCH_DIR/during.txt")")
}
during_backups unpaced ""
during_backups "paced ($PACE B/s)" "?max_bytes_per_sec=$PACE"
stop_all

log "restore"
t0=$(now_ms)
"$BIN/raftkv-node" restore --from "$BENCH_DIR/backup.snap" --data-dir "$BENCH_DIR/node-4" \
  --peer-url "http://$(peer 4)" >"$BENCH_DIR/restore.json" 2>"$BENCH_DIR/restore.log"
RESULTS+=("restore into a new data directory: $(($(now_ms) - t0)) ms ($(jq -r .keys "$BENCH_DIR/restore.json") keys)")
t0=$(now_ms)
start_member 4
RESULTS+=("restored member start to /readyz: $(wait_ready "$t0" 4) ms")
for i in 5 6; do
  start_member "$i"
  for _ in $(seq 100); do [[ -f "$BENCH_DIR/node-$i/member.json" ]] && break; sleep 0.05; done
  id=$(jq -r .id "$BENCH_DIR/node-$i/member.json")
  curl -fsS -X POST "http://$(client 4)/v1/members" -d "{\"id\":$id,\"peer_url\":\"http://$(peer "$i")\"}" >/dev/null
  for _ in $(seq 3000); do
    curl -fs -X POST "http://$(client 4)/v1/members/$id/promote" >/dev/null 2>&1 && break
    sleep 0.1
  done
done
for i in 5 6; do wait_ready "$t0" "$i" >/dev/null; done
RESULTS+=("restored member start to a ready 3-member cluster (two learners joined and promoted): $(($(now_ms) - t0)) ms")
probe=$(curl -fs "http://$(client 6)/v1/kv/bench/00000000" | wc -c)
RESULTS+=("a restored key read through a new member: $probe bytes")
stop_all

echo
echo "raftkv backup figures, $(nproc) CPUs, load average $(cut -d' ' -f1 /proc/loadavg) at the end"
printf '  %s\n' "${RESULTS[@]}"
