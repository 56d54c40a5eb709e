#!/usr/bin/env bash
# Watch load on a 3-member raftkv and a 3-member etcd 3.4 on this machine: 1,000 watchers over
# 100 prefixes while writers put at 64 connections (raftkv-bench --watchers). For each system:
# write throughput without and with the watchers, events delivered per second, the p50/p99
# delay from a write's acknowledgement to its event at a watcher, and resident memory per
# watcher. raftkv watchers are /v1/watch streams over h2c; etcd watchers are /v3/watch streams
# of its JSON gateway (HTTP/1.1, one connection each: etcd sends all HTTP/2 to gRPC).
#
# Usage: e2e/bench/watch.sh            (about 2 minutes)
# Environment: DURATION (s per phase, 10), WARMUP (s, 1), WATCHERS (1000), PREFIXES (100),
#   CONNS (64), BENCH_DIR (default target/bench-watch), NO_BUILD=1 to use the release binaries
#   already built.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-1}
WATCHERS=${WATCHERS:-1000}
PREFIXES=${PREFIXES:-100}
CONNS=${CONNS:-64}
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench-watch}
BIN=$ROOT/target/release

PIDS=()
stop_all() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  PIDS=()
}
trap stop_all EXIT
trap 'exit 130' INT TERM
log() { echo "== $*" >&2; }

if ! command -v etcd >/dev/null; then
  log "installing etcd-server from Debian"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
fi
if [[ -z "${NO_BUILD:-}" ]]; then
  log "building raftkv-node and raftkv-bench (release)"
  (cd "$ROOT" && cargo build -q --release -p raftkv-node --bins -p raftkv-bench)
fi
rm -rf "$BENCH_DIR"
mkdir -p "$BENCH_DIR"

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_base() {
  local base i ok
  for _ in $(seq 50); do
    base=$((20000 + RANDOM % 20000))
    ok=1
    for i in 1 2 3 101 102 103; do port_free $((base + i)) || { ok=0; break; }; done
    if ((ok)); then echo "$base"; return; fi
  done
  echo "no free ports found" >&2
  exit 1
}
wait_http() {
  for _ in $(seq 300); do
    if curl -fsS --max-time 1 "$1" 2>/dev/null | grep -q "$2"; then return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for $1" >&2
  exit 1
}
load() { # system endpoints pids(comma-separated)
  log "$1: $WATCHERS watchers over $PREFIXES prefixes, writes at $CONNS connections"
  "$BIN/raftkv-bench" --target "$1" --endpoints "$2" --conns "$CONNS" --duration "$DURATION" \
    --warmup "$WARMUP" --key-space 100000 --watchers "$WATCHERS" --prefixes "$PREFIXES" \
    --server-pids "$3" | tee -a "$BENCH_DIR/results.txt"
}

base=$(free_base)
cluster="" endpoints="" pids=""
for i in 1 2 3; do cluster+="${cluster:+,}e$i=http://127.0.0.1:$((base + 100 + i))"; done
for i in 1 2 3; do
  c=$((base + i)) p=$((base + 100 + i))
  etcd --name "e$i" --data-dir "$BENCH_DIR/etcd/e$i" \
    --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
    --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token raftkv-bench \
    --logger zap --log-level warn >"$BENCH_DIR/etcd-$i.log" 2>&1 &
  PIDS+=($!)
  pids+="${pids:+,}$!"
  endpoints+="${endpoints:+,}http://127.0.0.1:$c"
done
for i in 1 2 3; do wait_http "http://127.0.0.1:$((base + i))/health" '"health":"true"'; done
load etcd "$endpoints" "$pids"
stop_all

base=$(free_base)
cluster="" endpoints="" pids=""
for i in 1 2 3; do cluster+="${cluster:+,}$i=http://127.0.0.1:$((base + 100 + i))"; done
for i in 1 2 3; do
  c=$((base + i)) p=$((base + 100 + i))
  RUST_LOG=warn "$BIN/raftkv-node" --id "$i" --data-dir "$BENCH_DIR/raftkv/node-$i" \
    --client-addr "127.0.0.1:$c" --peer-addr "127.0.0.1:$p" --initial-cluster "$cluster" \
    >"$BENCH_DIR/raftkv-$i.log" 2>&1 &
  PIDS+=($!)
  pids+="${pids:+,}$!"
  endpoints+="${endpoints:+,}http://127.0.0.1:$c"
done
for i in 1 2 3; do wait_http "http://127.0.0.1:$((base + i))/readyz" ready; done
load raftkv "$endpoints" "$pids"
stop_all
echo "load average at the end: $(cut -d' ' -f1 /proc/loadavg) on $(nproc) CPUs" | tee -a "$BENCH_DIR/results.txt"
