#!/usr/bin/env bash
# The write path's figures, for raftkv and etcd 3.4 in one run, each as 3 members on 127.0.0.1
# with data on the same disk:
#
# - the disk: fdatasync latency of 256-byte appends, p50 and p99 (what a write must wait for);
# - one client writing to the leader: p50 and p99, and, over the three members (`perf stat -p`
#   for the whole run), CPU time and context switches per acknowledged write;
# - 64 connections spread over the members: ops/s, p50, p99, and the same per-write costs.
#
# It prints the write path's targets, each as met or missed with its figure: a single client's
# p50 within 0.3 ms of the disk's fdatasync p50; at 64 connections at least 4x etcd's writes with
# a p99 at most a third of etcd's; at most 0.3 ms of CPU and 10 context switches per write.
#
# Usage: e2e/bench/write-path.sh        (about 2 minutes; needs perf)
# Environment: DURATION (s per point, 10), VALUE_SIZE (256), KEYS (10000), NO_BUILD=1,
#   BENCH_DIR (default target/bench-write-path under the repository), JSON_OUT=file,
#   BASELINE_NODE=path: also measures that raftkv-node binary (an older build, say) in the same
#   run, as the system "baseline", to show a change's before and after.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

DURATION=${DURATION:-10}
VALUE_SIZE=${VALUE_SIZE:-256}
KEYS=${KEYS:-10000}
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench-write-path}
command -v perf >/dev/null || { echo "write-path.sh needs perf (apt-get install linux-perf)" >&2; exit 1; }

ensure_etcd
build_and_clean
RESULTS=$BENCH_DIR/results.jsonl
: >"$RESULTS"

log "disk: fdatasync latency in $BENCH_DIR"
fsync_probe 3 >"$BENCH_DIR/fsync.json"

# point system name endpoints conns [label]: runs raftkv-bench against `endpoints` under `perf stat` of
# the three members, and appends the report with the members' CPU and context switches.
point() {
  local system=$1 name=$2 endpoints=$3 conns=$4 label=${5:-$1} pids
  pids=$(IFS=,; echo "${SYSTEM_PIDS[*]}")
  log "$system: $name ($conns conns)"
  perf stat -x, -e task-clock,context-switches -p "$pids" -o "$BENCH_DIR/perf.csv" -- \
    "$BIN/raftkv-bench" --target "$system" --endpoints "$endpoints" --conns "$conns" --mix put=100 \
    --duration "$DURATION" --warmup 0 --key-space "$KEYS" --value-size "$VALUE_SIZE" --json \
    >"$BENCH_DIR/report.json"
  local cpu_ms switches
  cpu_ms=$(awk -F, '$3 ~ /^task-clock/ {print $1}' "$BENCH_DIR/perf.csv")
  switches=$(awk -F, '$3 ~ /^context-switches/ {print $1}' "$BENCH_DIR/perf.csv")
  jq -c --arg system "$label" --arg name "$name" --argjson cpu_ms "$cpu_ms" --argjson switches "$switches" \
    '. + {system: $system, point: $name, cpu_ms: $cpu_ms, switches: $switches}' "$BENCH_DIR/report.json" >>"$RESULTS"
}

# The leader's client URL, for the single-client point.
raftkv_leader() {
  local url
  for url in ${endpoints//,/ }; do
    if [[ $(curl -fs "$url/v1/status" | jq -r .role) == leader ]]; then echo "$url"; return; fi
  done
}
etcd_leader() {
  local url status
  for url in ${endpoints//,/ }; do
    status=$(curl -fs -X POST -d '{}' "$url/v3/maintenance/status")
    if [[ $(jq -r .leader <<<"$status") == $(jq -r .header.member_id <<<"$status") ]]; then echo "$url"; return; fi
  done
}

SYSTEMS=(etcd raftkv)
if [[ -n "${BASELINE_NODE:-}" ]]; then SYSTEMS+=(baseline); fi
for name in "${SYSTEMS[@]}"; do
  system=$name NODE_BIN=""
  if [[ $name == baseline ]]; then
    system=raftkv NODE_BIN=$BASELINE_NODE
    rm -rf "$BENCH_DIR/raftkv-plain"
  fi
  "start_$system" plain
  "$BIN/raftkv-bench" --target "$system" --endpoints "$endpoints" --conns 16 --key-space "$KEYS" \
    --value-size "$VALUE_SIZE" --preload --preload-only
  leader=$("${system}_leader")
  [[ -n $leader ]] || { echo "$name: no leader found among $endpoints" >&2; exit 1; }
  point "$system" "one client, to the leader" "$leader" 1 "$name"
  point "$system" "64 connections" "$endpoints" 64 "$name"
  stop_all
done

if [[ -n "${JSON_OUT:-}" ]]; then cp "$RESULTS" "$JSON_OUT"; fi

python3 - "$RESULTS" "$BENCH_DIR/fsync.json" <<'EOF'
import json, os, sys
rows = {(r["system"], r["point"]): r for r in map(json.loads, open(sys.argv[1]))}
disk = json.load(open(sys.argv[2]))
print(f"\nwrite path, 3 members each on 127.0.0.1, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end")
print(f"disk: fdatasync of a 256-byte append p50 {disk['p50_us'] / 1000:.3f} ms, p99 {disk['p99_us'] / 1000:.3f} ms ({disk['count']} calls)\n")
head = f"{'point':<26} {'system':<7} {'ops/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU ms/write':>12} {'switches/write':>14}"
print(head)
print("-" * len(head))
def per_write(r, field):
    return r[field] / r["ops"] if r["ops"] else float("nan")
for point in ("one client, to the leader", "64 connections"):
    for system in ("raftkv", "baseline", "etcd"):
        if (system, point) not in rows:
            continue
        r = rows[(system, point)]
        flag = "!" if r["errors"] or r["unknown"] else " "
        print(f"{point:<26} {system:<7} {r['ops_per_sec']:>7.0f}{flag} {r['latency']['p50_us'] / 1000:>7.2f} "
              f"{r['latency']['p99_us'] / 1000:>7.2f} {per_write(r, 'cpu_ms'):>12.3f} {per_write(r, 'switches'):>14.1f}")
one, many = rows[("raftkv", "one client, to the leader")], rows[("raftkv", "64 connections")]
etcd_many = rows[("etcd", "64 connections")]
targets = [
    ("one client's p50 <= fdatasync p50 + 0.3 ms", one["latency"]["p50_us"] / 1000,
     disk["p50_us"] / 1000 + 0.3, "ms"),
    ("64 connections: ops/s >= 4x etcd", many["ops_per_sec"] / etcd_many["ops_per_sec"], 4.0, "x"),
    ("64 connections: p99 <= etcd's / 3", many["latency"]["p99_us"] / 1000, etcd_many["latency"]["p99_us"] / 3000, "ms"),
    ("CPU per write (one client) <= 0.3 ms", per_write(one, "cpu_ms"), 0.3, "ms"),
    ("switches per write (one client) <= 10", per_write(one, "switches"), 10.0, ""),
    ("CPU per write (64 conns) <= 0.3 ms", per_write(many, "cpu_ms"), 0.3, "ms"),
    ("switches per write (64 conns) <= 10", per_write(many, "switches"), 10.0, ""),
]
print("\ntargets:")
for name, value, bound, unit in targets:
    met = value >= bound if name.startswith("64 connections: ops/s") else value <= bound
    print(f"  {'met   ' if met else 'missed'} {name}: {value:.3f}{unit} (bound {bound:.3f}{unit})")
print("\nCPU and switches are `perf stat -p` over the three members for the whole point, divided by")
print("the writes acknowledged; '!' marks a point with errors or unknown outcomes")
EOF
