#!/usr/bin/env bash
# Side-by-side benchmark of a 3-member raftkv and a 3-member etcd 3.4 on this machine.
#
# Both clusters run on 127.0.0.1 with their data under one directory (so on the same disk), and
# both are driven by the same load generator (raftkv-bench, --target raftkv or --target etcd) with
# the same connections spread over the three members. The sweep: writes at 1, 16, 64 and 256
# connections; linearizable reads, stale (serializable) reads and a 90% read / 10% write mix at
# 64 connections; 256-byte values over 100k keys, preloaded before any point. Beside it, the
# physical limits the figures should be read against: the disk's raw fdatasync rate and the
# loopback HTTP ceiling (a trivial endpoint of each system: raftkv /healthz, etcd /version).
#
# Usage: e2e/bench/compare.sh            (about 4 minutes)
# Environment: DURATION (s per point, 5), WARMUP (s, 1), KEYS (100000), VALUE_SIZE (256),
#   BENCH_DIR (data and results; default target/bench-compare under the repository),
#   NO_BUILD=1 to use the release binaries already built, JSON_OUT=file for every raw report.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
KEYS=${KEYS:-100000}
VALUE_SIZE=${VALUE_SIZE:-256}
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench-compare}
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
RESULTS=$BENCH_DIR/results.jsonl
: >"$RESULTS"

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# A base port B with B+1..B+3 and B+101..B+103 free.
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

wait_http() { # url, expected body fragment
  for _ in $(seq 300); do
    if curl -fsS --max-time 1 "$1" 2>/dev/null | grep -q "$2"; then return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for $1" >&2
  exit 1
}

rss_mb() { # pids... -> total resident set in MB
  local total=0 kb pid
  for pid in "$@"; do
    kb=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    total=$((total + kb))
  done
  echo $((total / 1024))
}

point() { # system endpoints name conns mix
  local system=$1 endpoints=$2 name=$3 conns=$4 mix=$5
  log "$system: $name ($conns conns, $mix)"
  "$BIN/raftkv-bench" --target "$system" --endpoints "$endpoints" --conns "$conns" --mix "$mix" \
    --duration "$DURATION" --warmup "$WARMUP" --key-space "$KEYS" --value-size "$VALUE_SIZE" --json |
    jq -c --arg system "$system" --arg name "$name" '. + {system: $system, point: $name}' >>"$RESULTS"
}

sweep() { # system endpoints pids...
  local system=$1 endpoints=$2
  shift 2
  point "$system" "$endpoints" "http ceiling" 1 health
  point "$system" "$endpoints" "http ceiling" 64 health
  log "$system: preloading $KEYS keys"
  "$BIN/raftkv-bench" --target "$system" --endpoints "$endpoints" --conns 64 --key-space "$KEYS" \
    --value-size "$VALUE_SIZE" --preload --preload-only
  for conns in 1 16 64 256; do point "$system" "$endpoints" "write" "$conns" put; done
  point "$system" "$endpoints" "linearizable read" 64 get
  point "$system" "$endpoints" "stale read" 64 stale_get
  point "$system" "$endpoints" "90% read / 10% write" 64 get=90,put=10
  jq -nc --arg system "$system" --argjson rss "$(rss_mb "$@")" \
    '{system: $system, point: "RSS, 3 members", rss_mb: $rss}' >>"$RESULTS"
}

log "disk: raw fdatasync rate in $BENCH_DIR"
python3 - "$BENCH_DIR/fsync-probe" >"$BENCH_DIR/fsync.json" <<'EOF'
import json, os, sys, time
path = sys.argv[1]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
block = b"x" * 256
count, start = 0, time.perf_counter()
while time.perf_counter() - start < 2.0:
    os.write(fd, block)
    os.fdatasync(fd)
    count += 1
elapsed = time.perf_counter() - start
os.close(fd)
os.unlink(path)
print(json.dumps({"fdatasync_per_sec": round(count / elapsed), "fdatasync_us": round(elapsed / count * 1e6)}))
EOF

# etcd: three members, default tuning, data under $BENCH_DIR/etcd.
base=$(free_base)
cluster=""
for i in 1 2 3; do cluster+="${cluster:+,}e$i=http://127.0.0.1:$((base + 100 + i))"; done
endpoints=""
ETCD_PIDS=()
for i in 1 2 3; do
  c=$((base + i)) p=$((base + 100 + i))
  etcd --name "e$i" --data-dir "$BENCH_DIR/etcd/e$i" \
    --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
    --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token raftkv-bench \
    --logger zap --log-level warn >"$BENCH_DIR/etcd-$i.log" 2>&1 &
  PIDS+=($!)
  ETCD_PIDS+=($!)
  endpoints+="${endpoints:+,}http://127.0.0.1:$c"
done
log "etcd $(etcd --version | head -1 | awk '{print $3}') on $endpoints"
for i in 1 2 3; do wait_http "http://127.0.0.1:$((base + i))/health" '"health":"true"'; done
sweep etcd "$endpoints" "${ETCD_PIDS[@]}"
stop_all

# raftkv: three members with static bootstrap, default tuning, data under $BENCH_DIR/raftkv.
base=$(free_base)
cluster=""
for i in 1 2 3; do cluster+="${cluster:+,}$i=http://127.0.0.1:$((base + 100 + i))"; done
endpoints=""
RAFTKV_PIDS=()
for i in 1 2 3; do
  c=$((base + i)) p=$((base + 100 + i))
  RUST_LOG=warn "$BIN/raftkv-node" --id "$i" --data-dir "$BENCH_DIR/raftkv/node-$i" \
    --client-addr "127.0.0.1:$c" --peer-addr "127.0.0.1:$p" --initial-cluster "$cluster" \
    >"$BENCH_DIR/raftkv-$i.log" 2>&1 &
  PIDS+=($!)
  RAFTKV_PIDS+=($!)
  endpoints+="${endpoints:+,}http://127.0.0.1:$c"
done
log "raftkv on $endpoints"
for i in 1 2 3; do wait_http "http://127.0.0.1:$((base + i))/readyz" ready; done
sweep raftkv "$endpoints" "${RAFTKV_PIDS[@]}"
stop_all

if [[ -n "${JSON_OUT:-}" ]]; then cp "$RESULTS" "$JSON_OUT"; fi

python3 - "$RESULTS" "$BENCH_DIR/fsync.json" <<'EOF'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
disk = json.load(open(sys.argv[2]))
by = {(r["system"], r["point"], r.get("conns")): r for r in rows}
points = []
for r in rows:
    k = (r["point"], r.get("conns"))
    if k not in points:
        points.append(k)
load = os.getloadavg()[0]
print(f"\nraftkv vs etcd, 3 members each on 127.0.0.1, {os.cpu_count()} CPUs, load average {load:.2f} at the end")
print(f"disk: {disk['fdatasync_per_sec']} fdatasync/s ({disk['fdatasync_us']} us each, 256-byte appends)\n")
head = (f"{'point':<22} {'conns':>5} | {'raftkv ops/s':>12} {'p50 ms':>7} {'p99 ms':>7} "
        f"| {'etcd ops/s':>12} {'p50 ms':>7} {'p99 ms':>7} | {'ratio':>6}")
print(head)
print("-" * len(head))
def cols(r):
    if not r:
        return f"{'-':>12} {'-':>7} {'-':>7}", None
    if "rss_mb" in r:
        return f"{r['rss_mb']:>9} MB {'':>7} {'':>7}", r["rss_mb"]
    lat = r["latency"]
    flag = "!" if r["errors"] or r["unknown"] else " "
    return f"{r['ops_per_sec']:>11.0f}{flag} {lat['p50_us'] / 1000:>7.2f} {lat['p99_us'] / 1000:>7.2f}", r["ops_per_sec"]
for point, conns in points:
    a, b = by.get(("raftkv", point, conns)), by.get(("etcd", point, conns))
    (ca, xa), (cb, xb) = cols(a), cols(b)
    if "rss_mb" in (a or b):
        xa, xb = xb, xa
    ratio = f"{xa / xb:.2f}x" if xa and xb else "-"
    print(f"{point[:22]:<22} {conns if conns else '':>5} | {ca} | {cb} | {ratio:>6}")
errs = [r for r in rows if r.get("errors") or r.get("unknown")]
for r in errs:
    print(f"! {r['system']} {r['point']} {r['conns']}: {r['errors']} errors, {r['unknown']} unknown: {r.get('error_samples')}")
print("\nratio = raftkv ops/s / etcd ops/s (resident set: etcd MB / raftkv MB); '!' marks a point with errors")
EOF
