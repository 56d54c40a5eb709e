# Shared by the benchmark scripts beside it (sourced, not run): the process bookkeeping that
# stops every server a script started however it exits, the release build, the free-port
# search, and the waits on a server's HTTP answer. Each script sets its own figures and loads.
#
# Before sourcing: BENCH_DIR (the script's data and results directory, emptied here).
# After: ROOT, BIN, PIDS (append every started server's pid), BASE (from `free_base`), and the
# functions below.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=$ROOT/target/release

PIDS=()
# Stops one server: TERM, up to 10 s to exit, then KILL.
stop_pid() {
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 200); do kill -0 "$1" 2>/dev/null || break; sleep 0.05; done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
# Stops every server in PIDS: TERM to all at once, then each is given up to 10 s.
stop_all() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  PIDS=()
}
trap stop_all EXIT
trap 'exit 130' INT TERM

log() { echo "== $*" >&2; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }

# Installs etcd 3.4 from Debian when it is missing.
ensure_etcd() {
  if ! command -v etcd >/dev/null; then
    log "installing etcd-server from Debian"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
  fi
}

# Builds the release binaries, unless NO_BUILD is set; then empties BENCH_DIR.
build_and_clean() {
  if [[ -z "${NO_BUILD:-}" ]]; then
    log "building raftkv-node and raftkv-bench (release)"
    (cd "$ROOT" && cargo build -q --release -p raftkv-node --bins -p raftkv-bench)
  fi
  rm -rf "$BENCH_DIR"
  mkdir -p "$BENCH_DIR"
}

# fsync_probe seconds: appends 256-byte blocks to a file under BENCH_DIR for that long, each
# followed by fdatasync, and prints the disk's figures as JSON: calls per second, mean, p50 and
# p99 latency in microseconds, and the number of calls.
fsync_probe() {
  python3 - "$BENCH_DIR/fsync-probe" "$1" <<'PY'
import json, os, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
block = b"x" * 256
took = []
start = time.perf_counter()
while time.perf_counter() - start < seconds:
    t = time.perf_counter()
    os.write(fd, block)
    os.fdatasync(fd)
    took.append(time.perf_counter() - t)
elapsed = time.perf_counter() - start
os.close(fd)
os.unlink(path)
took.sort()
print(json.dumps({
    "fdatasync_per_sec": round(len(took) / elapsed),
    "fdatasync_us": round(elapsed / len(took) * 1e6),
    "p50_us": round(took[len(took) // 2] * 1e6),
    "p99_us": round(took[len(took) * 99 // 100] * 1e6),
    "count": len(took),
}))
PY
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# free_base N: a base port B with B+1..B+N (client ports) and B+101..B+100+N (peer ports) free.
free_base() {
  local base i ok
  for _ in $(seq 50); do
    base=$((20000 + RANDOM % 20000))
    ok=1
    for i in $(seq "$1"); do
      port_free $((base + i)) && port_free $((base + 100 + i)) || { ok=0; break; }
    done
    if ((ok)); then echo "$base"; return; fi
  done
  echo "no free ports found" >&2
  exit 1
}

# Extra curl flags of `wait_http` (a TLS CA and client certificate, say).
CURL_TLS=()
wait_http() { # url, expected body fragment
  for _ in $(seq 300); do
    if curl -fsS --max-time 1 "${CURL_TLS[@]}" "$1" 2>/dev/null | grep -q "$2"; then return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for $1" >&2
  exit 1
}

# Three-member clusters of each system on 127.0.0.1, for the side-by-side scripts. Each sets
# `endpoints` (comma-separated client URLs) and SYSTEM_PIDS, and waits until every member
# answers; $1 = tls (with the certificates under $PKI) or plain.

# etcd: three members, default tuning, data under $BENCH_DIR/etcd[-tls]; $1 = tls or plain.
start_etcd() {
  local mode=$1 scheme=http tls_flags=() i c p
  if [[ $mode == tls ]]; then
    scheme=https
    tls_flags=(--cert-file "$PKI/member.pem" --key-file "$PKI/member.key" --client-cert-auth
      --trusted-ca-file "$PKI/ca.pem" --peer-cert-file "$PKI/member.pem" --peer-key-file "$PKI/member.key"
      --peer-client-cert-auth --peer-trusted-ca-file "$PKI/ca.pem")
  fi
  base=$(free_base 3)
  local cluster=""
  for i in 1 2 3; do cluster+="${cluster:+,}e$i=$scheme://127.0.0.1:$((base + 100 + i))"; done
  endpoints=""
  SYSTEM_PIDS=()
  for i in 1 2 3; do
    c=$((base + i)) p=$((base + 100 + i))
    etcd --name "e$i" --data-dir "$BENCH_DIR/etcd-$mode/e$i" "${tls_flags[@]}" \
      --listen-client-urls "$scheme://127.0.0.1:$c" --advertise-client-urls "$scheme://127.0.0.1:$c" \
      --listen-peer-urls "$scheme://127.0.0.1:$p" --initial-advertise-peer-urls "$scheme://127.0.0.1:$p" \
      --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token raftkv-bench \
      --logger zap --log-level warn >"$BENCH_DIR/etcd-$mode-$i.log" 2>&1 &
    PIDS+=($!)
    SYSTEM_PIDS+=($!)
    endpoints+="${endpoints:+,}$scheme://127.0.0.1:$c"
  done
  log "etcd $(etcd --version | head -1 | awk '{print $3}') on $endpoints"
  for i in 1 2 3; do wait_http "$scheme://127.0.0.1:$((base + i))/health" '"health":"true"'; done
}

# raftkv: three members with static bootstrap, default tuning, data under $BENCH_DIR/raftkv[-tls].
start_raftkv() {
  local mode=$1 scheme=http tls_flags=() i c p
  if [[ $mode == tls ]]; then
    scheme=https
    tls_flags=(--client-cert-file "$PKI/member.pem" --client-key-file "$PKI/member.key"
      --client-ca-file "$PKI/ca.pem" --peer-cert-file "$PKI/member.pem" --peer-key-file "$PKI/member.key"
      --peer-ca-file "$PKI/ca.pem" --peer-cluster-name bench)
  fi
  base=$(free_base 3)
  local cluster=""
  for i in 1 2 3; do cluster+="${cluster:+,}$i=$scheme://127.0.0.1:$((base + 100 + i))"; done
  endpoints=""
  SYSTEM_PIDS=()
  for i in 1 2 3; do
    c=$((base + i)) p=$((base + 100 + i))
    RUST_LOG=warn "${NODE_BIN:-$BIN/raftkv-node}" --id "$i" --data-dir "$BENCH_DIR/raftkv-$mode/node-$i" "${tls_flags[@]}" \
      --client-addr "127.0.0.1:$c" --peer-addr "127.0.0.1:$p" --initial-cluster "$cluster" \
      >"$BENCH_DIR/raftkv-$mode-$i.log" 2>&1 &
    PIDS+=($!)
    SYSTEM_PIDS+=($!)
    endpoints+="${endpoints:+,}$scheme://127.0.0.1:$c"
  done
  log "raftkv on $endpoints"
  for i in 1 2 3; do wait_http "$scheme://127.0.0.1:$((base + i))/readyz" ready; done
}

# raftkv members on BASE's ports (set BASE=$(free_base N) first).
client() { echo "127.0.0.1:$((BASE + $1))"; }
peer() { echo "127.0.0.1:$((BASE + 100 + $1))"; }

# start_member i [flags...]: starts member i on its ports and data directory; sets LAST_PID.
start_member() {
  local i=$1
  shift
  RUST_LOG=warn "$BIN/raftkv-node" --data-dir "$BENCH_DIR/node-$i" --client-addr "$(client "$i")" \
    --peer-addr "$(peer "$i")" "$@" >>"$BENCH_DIR/node-$i.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}
# wait_ready started_ms member: prints the milliseconds from started_ms until the member's
# /readyz answered 200; gives up after READY_ATTEMPTS tries 20 ms apart.
READY_ATTEMPTS=1200
wait_ready() {
  local started=$1 i=$2
  for _ in $(seq "$READY_ATTEMPTS"); do
    if curl -fs --max-time 1 "http://$(client "$i")/readyz" >/dev/null 2>&1; then
      echo $(($(now_ms) - started))
      return
    fi
    sleep 0.02
  done
  echo "member $i not ready; log:" >&2
  tail -20 "$BENCH_DIR/node-$i.log" >&2
  exit 1
}
status_field() { curl -fs "http://$(client "$1")/v1/status" | jq -r ".$2"; }
bench() { "$BIN/raftkv-bench" --value-size "$VALUE_SIZE" "$@"; }
