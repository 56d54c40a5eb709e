#!/usr/bin/env bash
# The node's own performance figures, on 127.0.0.1 with 256-byte values:
#   - write throughput and p50/p99 latency at 64 connections, 1 member and 3 members;
#   - cold restart time (process start to /readyz 200) with 100k keys and with 1M keys;
#   - resident set with 1M keys against the live data size;
#   - how long a new learner takes to catch up with about 100 MB of data.
#
# Usage: e2e/bench/node-figures.sh       (about 5 minutes)
# Environment: DURATION (s per load point, 5), BIG_KEYS (1000000), LEARNER_KEYS (400000, about
#   100 MB of keys and values), BENCH_DIR (default target/bench-node under the repository),
#   NO_BUILD=1 to use the release binaries already built.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

DURATION=${DURATION:-5}
BIG_KEYS=${BIG_KEYS:-1000000}
LEARNER_KEYS=${LEARNER_KEYS:-400000}
VALUE_SIZE=256
KEY_SIZE=14 # bench/NNNNNNNN
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench-node}

build_and_clean
BASE=$(free_base 4)
write_point() { # label endpoints
  bench --endpoints "$2" --conns 64 --mix put --duration "$DURATION" --key-space 100000 --json |
    jq -r --arg l "$1" '"\($l): \(.ops_per_sec) writes/s, p50 \(.latency.p50_us / 1000) ms, p99 \(.latency.p99_us / 1000) ms, errors \(.errors), unknown \(.unknown)"'
}
rss_mb() { awk '/VmRSS/ {printf "%d", $2 / 1024}' "/proc/$1/status"; }

RESULTS=()

log "3 members: write throughput at 64 connections"
cluster="1=http://$(peer 1),2=http://$(peer 2),3=http://$(peer 3)"
for i in 1 2 3; do start_member "$i" --id "$i" --initial-cluster "$cluster"; done
t0=$(now_ms)
for i in 1 2 3; do wait_ready "$t0" "$i" >/dev/null; done
RESULTS+=("$(write_point "3 members, 64 conns" "http://$(client 1),http://$(client 2),http://$(client 3)")")
stop_all
rm -rf "$BENCH_DIR"/node-*

log "1 member: write throughput at 64 connections"
start_member 1 --id 1 --initial-cluster "1=http://$(peer 1)"
LEADER=$LAST_PID
wait_ready "$(now_ms)" 1 >/dev/null
RESULTS+=("$(write_point "1 member, 64 conns" "http://$(client 1)")")

restart_leader() { # label keys
  stop_pid "$LEADER"
  local t0
  t0=$(now_ms)
  start_member 1 --id 1 --initial-cluster "1=http://$(peer 1)"
  LEADER=$LAST_PID
  RESULTS+=("cold restart with $2 keys: $(wait_ready "$t0" 1) ms to /readyz 200")
}

log "1 member: preload 100k keys, restart"
bench --endpoints "http://$(client 1)" --conns 64 --key-space 100000 --preload --preload-only
restart_leader "100k" 100000

log "learner catch-up: preload $LEARNER_KEYS keys, add a learner"
bench --endpoints "http://$(client 1)" --conns 64 --key-space "$LEARNER_KEYS" --preload --preload-only
start_member 2
LEARNER=$LAST_PID
for _ in $(seq 100); do [[ -f "$BENCH_DIR/node-2/member.json" ]] && break; sleep 0.05; done
learner_id=$(jq -r .id "$BENCH_DIR/node-2/member.json")
target=$(status_field 1 commit_index)
t0=$(now_ms)
curl -fsS -X POST "http://$(client 1)/v1/members" -d "{\"id\":$learner_id,\"peer_url\":\"http://$(peer 2)\"}" >/dev/null
for _ in $(seq 1200); do
  applied=$(status_field 2 applied_index 2>/dev/null || echo 0)
  [[ "$applied" =~ ^[0-9]+$ ]] && ((applied >= target)) && break
  sleep 0.05
done
elapsed=$(($(now_ms) - t0))
mb=$((LEARNER_KEYS * (VALUE_SIZE + KEY_SIZE) / 1000000))
RESULTS+=("learner caught up with $LEARNER_KEYS keys ($mb MB of keys and values) in $elapsed ms")
curl -fsS -X DELETE "http://$(client 1)/v1/members/$learner_id" >/dev/null || true
stop_pid "$LEARNER"

log "1 member: preload $BIG_KEYS keys, resident set, restart"
bench --endpoints "http://$(client 1)" --conns 64 --key-space "$BIG_KEYS" --preload --preload-only
live=$((BIG_KEYS * (VALUE_SIZE + KEY_SIZE) / 1000000))
RESULTS+=("resident set with $BIG_KEYS keys: $(rss_mb "$LEADER") MB (live data $live MB; target under $((2 * live + 50)) MB)")
restart_leader "$BIG_KEYS" "$BIG_KEYS"
RESULTS+=("resident set after that restart: $(rss_mb "$LEADER") MB")
stop_all

echo
echo "raftkv node figures, $(nproc) CPUs, load average $(cut -d' ' -f1 /proc/loadavg) at the end"
printf '  %s\n' "${RESULTS[@]}"
