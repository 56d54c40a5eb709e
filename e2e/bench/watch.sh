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
source "$(dirname "$0")/lib.sh"

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-1}
WATCHERS=${WATCHERS:-1000}
PREFIXES=${PREFIXES:-100}
CONNS=${CONNS:-64}
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench-watch}

ensure_etcd
build_and_clean

load() { # system endpoints pids(comma-separated)
  log "$1: $WATCHERS watchers over $PREFIXES prefixes, writes at $CONNS connections"
  "$BIN/raftkv-bench" --target "$1" --endpoints "$2" --conns "$CONNS" --duration "$DURATION" \
    --warmup "$WARMUP" --key-space 100000 --watchers "$WATCHERS" --prefixes "$PREFIXES" \
    --server-pids "$3" | tee -a "$BENCH_DIR/results.txt"
}

pids_csv() { local IFS=,; echo "${SYSTEM_PIDS[*]}"; }
start_etcd plain
load etcd "$endpoints" "$(pids_csv)"
stop_all
start_raftkv plain
load raftkv "$endpoints" "$(pids_csv)"
stop_all
echo "load average at the end: $(cut -d' ' -f1 /proc/loadavg) on $(nproc) CPUs" | tee -a "$BENCH_DIR/results.txt"
