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
# Then the TLS points: each system again on a fresh cluster with TLS on the client and the peer
# port, client certificates required on both (etcd --client-cert-auth and --peer-client-cert-auth;
# raftkv --client-ca-file, which also turns its role checks on, and mutual TLS between peers),
# certificates from one throwaway CA made with openssl; writes at 1 and 64 connections and both
# reads at 64. The closing note gives the cost of TLS on writes and reads for each system.
#
# Usage: e2e/bench/compare.sh            (about 6 minutes)
# Environment: DURATION (s per point, 5), WARMUP (s, 1), KEYS (100000), VALUE_SIZE (256),
#   BENCH_DIR (data and results; default target/bench-compare under the repository),
#   NO_BUILD=1 to use the release binaries already built, JSON_OUT=file for every raw report,
#   TLS=0 to skip the TLS points.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
KEYS=${KEYS:-100000}
VALUE_SIZE=${VALUE_SIZE:-256}
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench-compare}
TLS=${TLS:-1}

ensure_etcd
build_and_clean
RESULTS=$BENCH_DIR/results.jsonl
: >"$RESULTS"

rss_mb() { # pids... -> total resident set in MB
  local total=0 kb pid
  for pid in "$@"; do
    kb=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    total=$((total + kb))
  done
  echo $((total / 1024))
}

BENCH_TLS=()
point() { # system endpoints name conns mix
  local system=$1 endpoints=$2 name=$3 conns=$4 mix=$5
  log "$system: $name ($conns conns, $mix)"
  "$BIN/raftkv-bench" "${BENCH_TLS[@]}" --target "$system" --endpoints "$endpoints" --conns "$conns" --mix "$mix" \
    --duration "$DURATION" --warmup "$WARMUP" --key-space "$KEYS" --value-size "$VALUE_SIZE" --json |
    jq -c --arg system "$system" --arg name "$name" '. + {system: $system, point: $name}' >>"$RESULTS"
}

preload() { # system endpoints
  log "$1: preloading $KEYS keys"
  "$BIN/raftkv-bench" "${BENCH_TLS[@]}" --target "$1" --endpoints "$2" --conns 64 --key-space "$KEYS" \
    --value-size "$VALUE_SIZE" --preload --preload-only
}

# The TLS points: the same operations as their plaintext namesakes, on a TLS cluster.
tls_sweep() { # system endpoints
  local system=$1 endpoints=$2
  preload "$system" "$endpoints"
  for conns in 1 64; do point "$system" "$endpoints" "write (TLS)" "$conns" put; done
  point "$system" "$endpoints" "linearizable read (TLS)" 64 get
  point "$system" "$endpoints" "stale read (TLS)" 64 stale_get
}

sweep() { # system endpoints pids...
  local system=$1 endpoints=$2
  shift 2
  point "$system" "$endpoints" "http ceiling" 1 health
  point "$system" "$endpoints" "http ceiling" 64 health
  preload "$system" "$endpoints"
  for conns in 1 16 64 256; do point "$system" "$endpoints" "write" "$conns" put; done
  point "$system" "$endpoints" "linearizable read" 64 get
  point "$system" "$endpoints" "stale read" 64 stale_get
  point "$system" "$endpoints" "90% read / 10% write" 64 get=90,put=10
  jq -nc --arg system "$system" --argjson rss "$(rss_mb "$@")" \
    '{system: $system, point: "RSS, 3 members", rss_mb: $rss}' >>"$RESULTS"
}

log "disk: raw fdatasync rate in $BENCH_DIR"
fsync_probe 2 >"$BENCH_DIR/fsync.json"

# One throwaway CA; a certificate for 127.0.0.1 used by every member of both systems as server
# and as peer client (with raftkv's cluster URI SAN), and a client certificate (O=admin) for the
# load generator.
PKI=$BENCH_DIR/pki
make_pki() {
  mkdir -p "$PKI"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
    -keyout "$PKI/ca.key" -out "$PKI/ca.pem" 2>/dev/null
  issue() { # name subject extensions
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "$2" \
      -keyout "$PKI/$1.key" -out "$PKI/$1.csr" 2>/dev/null
    printf '%s\n' "$3" >"$PKI/$1.ext"
    openssl x509 -req -in "$PKI/$1.csr" -CA "$PKI/ca.pem" -CAkey "$PKI/ca.key" -CAcreateserial -days 1 \
      -extfile "$PKI/$1.ext" -out "$PKI/$1.pem" 2>/dev/null
  }
  issue member "/CN=member" "subjectAltName=IP:127.0.0.1,DNS:localhost,URI:urn:raftkv:cluster:bench
extendedKeyUsage=serverAuth,clientAuth"
  issue client "/CN=bench/O=admin" "extendedKeyUsage=clientAuth"
}

start_etcd plain
sweep etcd "$endpoints" "${SYSTEM_PIDS[@]}"
stop_all
start_raftkv plain
sweep raftkv "$endpoints" "${SYSTEM_PIDS[@]}"
stop_all

if [[ $TLS != 0 ]]; then
  make_pki
  CURL_TLS=(--cacert "$PKI/ca.pem" --cert "$PKI/client.pem" --key "$PKI/client.key")
  BENCH_TLS=(--cacert "$PKI/ca.pem" --cert "$PKI/client.pem" --key "$PKI/client.key")
  start_etcd tls
  tls_sweep etcd "$endpoints"
  stop_all
  start_raftkv tls
  tls_sweep raftkv "$endpoints"
  stop_all
  CURL_TLS=()
  BENCH_TLS=()
fi

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
head = (f"{'point':<26} {'conns':>5} | {'raftkv ops/s':>12} {'p50 ms':>7} {'p99 ms':>7} "
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
    print(f"{point[:26]:<26} {conns if conns else '':>5} | {ca} | {cb} | {ratio:>6}")
errs = [r for r in rows if r.get("errors") or r.get("unknown")]
for r in errs:
    print(f"! {r['system']} {r['point']} {r['conns']}: {r['errors']} errors, {r['unknown']} unknown: {r.get('error_samples')}")
print("\nratio = raftkv ops/s / etcd ops/s (resident set: etcd MB / raftkv MB); '!' marks a point with errors")
tls_notes = []
for system in ("raftkv", "etcd"):
    costs = []
    for (point, conns) in points:
        if not point.endswith(" (TLS)"):
            continue
        plain, tls = by.get((system, point[: -len(" (TLS)")], conns)), by.get((system, point, conns))
        if not plain or not tls or not plain["ops_per_sec"]:
            continue
        drop = 100 * (1 - tls["ops_per_sec"] / plain["ops_per_sec"])
        p50 = (tls["latency"]["p50_us"] - plain["latency"]["p50_us"]) / 1000
        change = f"{drop:.0f}% fewer ops/s" if drop >= 0 else f"{-drop:.0f}% more ops/s (noise)"
        costs.append(f"{point[: -len(' (TLS)')]} at {conns}: {change}, p50 {p50:+.2f} ms")
    if costs:
        tls_notes.append(f"  {system}: " + "; ".join(costs))
if tls_notes:
    print("cost of TLS (each TLS point against its plaintext namesake):")
    print("\n".join(tls_notes).replace("; ", "\n    "))
EOF
