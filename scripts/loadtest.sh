#!/usr/bin/env bash
# Bounded load test on loopback: a bare hyper server (the ceiling) and the
# gateway with Tansu behind it, driven by wagate-loadgen in the same run.
#   scripts/loadtest.sh [DURATION_SECS] [CONNECTIONS...]
# Each connection count runs with each body mix of MIXES (default: single-
# message bodies, then the load generator's mixed default), against the bare
# server and then the gateway. Prints a report per run and a summary table at
# the end; the numbers in BENCHMARKS.md come from it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
dur="${1:-10}"; shift || true
conns=("$@"); [ ${#conns[@]} -gt 0 ] || conns=(128 512)
# MIXES: body mixes (wagate-loadgen --mix), space-separated; pass other
# load generator flags in LOADGEN_ARGS (not --mix).
read -r -a mixes <<<"${MIXES:-messages=100 messages=60,statuses=30,batch=10}"
dir="target/loadtest"; mkdir -p "$dir"; rm -f "$dir"/ca.* "$dir"/*.pem "$dir"/*.key
summary="$dir/summary.txt"; : >"$summary"
# WAGATE_BIN / WAGATE_LOADGEN: other binaries (an A/B of two gateway builds
# under one load generator); the default builds and uses this checkout's.
if [ -z "${WAGATE_BIN:-}${WAGATE_LOADGEN:-}" ]; then cargo build --release --workspace --bins >&2; fi
W=${WAGATE_BIN:-target/release/wagate}; L=${WAGATE_LOADGEN:-target/release/wagate-loadgen}
export WAGATE_APP_SECRET=loadtest-secret WAGATE_VERIFY_TOKEN=v WAGATE_API_TOKEN=a WAGATE_ACCESS_TOKEN=t

pids=()
# CPU seconds (user + system) a process has used so far, in clock ticks.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
# Prints the CPU cost per request of each "name:pid" between two tick samples.
cost() { # cost REQUESTS name:pid:ticks_before ...
  local n=$1; shift; local out="cpu per request:"
  for spec in "$@"; do
    IFS=: read -r name pid t0 <<<"$spec"
    local t1; t1=$(ticks "$pid")
    local us; us=$(awk -v d=$((t1 - t0)) -v hz="$hz" -v n="$n" 'BEGIN{printf "%.1f", d / hz * 1e6 / n}')
    out="$out $name $us us"
    cpu_us="${cpu_us:-$us}"
  done
  echo "$out"
}
# One summary row: system, mix, connections, webhooks/s, p50, p99, server CPU.
row() {
  local rate p50 p99
  rate=$(sed -n 's/^requests .*(\([0-9.]*\)\/s)/\1/p' "$dir/run.out")
  p50=$(sed -n 's/^latency ms *p50 \([0-9.]*\).*/\1/p' "$dir/run.out")
  p99=$(sed -n 's/^latency ms .* p99 \([0-9.]*\) .*/\1/p' "$dir/run.out")
  printf '%-8s %-36s %5s %10s %8s %8s %8s\n' "$1" "$2" "$3" "$rate" "$p50" "$p99" "$cpu_us" >>"$summary"
}
# Requests the load generator completed in its last run (warm-up included:
# the tick samples cover it too).
sent() { sed -n 's/^generator .*(\([0-9]*\) requests sent in all)/\1/p' "$1"; }
# Runs the load generator (args: URL CONNECTIONS), prints its report and its
# own CPU per request: it shares the two cores with the server under test.
TIMEFORMAT='%U %S'
load() {
  # shellcheck disable=SC2086 # LOADGEN_ARGS: extra flags, e.g. "--customers 5000"; LOAD_EXTRA: --tls-ca
  { time $L run --url "$1" --connections "$2" --mix "$3" --duration-secs "$dur" --warmup-secs 1 ${LOADGEN_ARGS:-} ${LOAD_EXTRA:-} \
      >"$dir/run.out" 2>"$dir/run.err"; } 2>"$dir/run.time"
  cat "$dir/run.err" >&2; cat "$dir/run.out"
  awk -v n="$(sent "$dir/run.out")" '{printf "loadgen cpu per request: %.1f us\n", ($1 + $2) * 1e6 / n}' "$dir/run.time"
}
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; scripts/tansu.sh stop "$dir" || true; }
trap cleanup EXIT

echo "== baseline: bare hyper server (reads the body, answers 200)"
$L baseline --listen 127.0.0.1:0 --max-secs $(((dur + 2) * ${#conns[@]} * ${#mixes[@]} + 60)) >"$dir/baseline.out" &
pids+=($!)
for _ in $(seq 50); do grep -q "listening on" "$dir/baseline.out" 2>/dev/null && break; sleep 0.1; done
base=$(sed -n 's/.*listening on //p' "$dir/baseline.out" | head -1)
bp="${pids[0]}"
for c in "${conns[@]}"; do
  for mix in "${mixes[@]}"; do
    echo "-- baseline connections=$c mix=$mix"
    b0=$(ticks "$bp")
    load "http://$base/webhook" "$c" "$mix"
    cpu_us=; cost "$(sent "$dir/run.out")" "server:$bp:$b0"
    row bare "$mix" "$c"
  done
done
kill "${pids[0]}" 2>/dev/null || true

# KAFKA_TLS=1: the gateway reaches Tansu over TLS, through stunnel (Tansu 0.6
# serves plaintext only); HTTPS=1: the gateway's public listener speaks
# HTTPS. Certificates are made here with openssl, for loopback only.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
selfsigned() { # selfsigned NAME: $dir/NAME.pem (leaf, signed by $dir/ca.pem) and $dir/NAME.key
  if [ ! -f "$dir/ca.pem" ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=wagate loadtest CA" \
      -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
  fi
  openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$dir/$1.key" -out "$dir/$1.csr" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$dir/$1.ext"
  openssl x509 -req -in "$dir/$1.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 1 -extfile "$dir/$1.ext" -out "$dir/$1.pem" 2>/dev/null
}
tls_note="plaintext"
if [ "${KAFKA_TLS:-0}" = 1 ]; then
  selfsigned kafka
  sp=$(free_port)
  brokers=$(TANSU_ADVERTISED_PORT=$sp scripts/tansu.sh start "$dir")
  printf 'foreground = yes\npid =\n[kafka]\naccept = 127.0.0.1:%s\nconnect = %s\ncert = %s\nkey = %s\n' \
    "$sp" "$brokers" "$dir/kafka.pem" "$dir/kafka.key" >"$dir/stunnel.conf"
  stunnel "$dir/stunnel.conf" >"$dir/stunnel.log" 2>&1 &
  pids+=($!); stp=$!
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$sp") 2>/dev/null && break; sleep 0.1; done
  brokers="127.0.0.1:$sp"
  export WAGATE_KAFKA_SECURITY_PROTOCOL=ssl WAGATE_KAFKA_SSL_CA_FILE="$dir/ca.pem"
  tls_note="TLS through stunnel"
else
  brokers=$(scripts/tansu.sh start "$dir")
fi
scheme=http; tls_ca=""
if [ "${HTTPS:-0}" = 1 ]; then
  selfsigned listener
  export WAGATE_SERVER_TLS_CERT_FILE="$dir/listener.pem" WAGATE_SERVER_TLS_KEY_FILE="$dir/listener.key"
  scheme=https; tls_ca="--tls-ca $dir/ca.pem"
fi
echo "== gateway: wagate serve (acks=all, raw topic on) with Tansu on loopback, Kafka $tls_note, listener $scheme"
# LT_PORT / LT_INTERNAL_PORT: the gateway's ports (another gateway may hold
# the defaults).
pub_port=${LT_PORT:-18080}; int_port=${LT_INTERNAL_PORT:-19090}
export WAGATE_KAFKA_BROKERS="$brokers" WAGATE_TOPIC_PREFIX="lt$(date +%s)." \
       WAGATE_LISTEN=127.0.0.1:$pub_port WAGATE_INTERNAL_LISTEN=127.0.0.1:$int_port \
       WAGATE_EGRESS_ENABLED=false WAGATE_LOG=warn
$W topics create >/dev/null
$W serve >"$dir/gateway.log" 2>&1 &
pids+=($!); gp=$!
for _ in $(seq 100); do curl -sf http://127.0.0.1:$int_port/readyz >/dev/null 2>&1 && break; sleep 0.1; done
tp=$(cat "$dir/tansu.pid")
for c in "${conns[@]}"; do
  for mix in "${mixes[@]}"; do
    echo "-- gateway connections=$c mix=$mix"
    g0=$(ticks "$gp"); t0=$(ticks "$tp")
    s0=$([ -n "${stp:-}" ] && ticks "$stp" || echo 0)
    LOAD_EXTRA="$tls_ca" load "$scheme://127.0.0.1:$pub_port/webhook" "$c" "$mix"
    cpu_us=; cost "$(sent "$dir/run.out")" "gateway:$gp:$g0" "tansu:$tp:$t0" ${stp:+"stunnel:$stp:$s0"}
    row gateway "$mix" "$c"
  done
done
echo "-- gateway metrics"
curl -s http://127.0.0.1:$int_port/metrics | grep -E '^wagate_(webhook_requests_total|webhook_events_total|webhook_duplicates_total|kafka_produce_errors_total|ingress_produce_rounds_total|dedupe_shared_records_total|dedupe_shared_ids_total)' || true
echo "== summary (CPU: the server's own, µs per webhook; gateway/bare: the ratio in this run)"
printf '%-8s %-36s %5s %10s %8s %8s %8s\n' system mix conns webhooks/s p50_ms p99_ms cpu_us
cat "$summary"
awk '$1=="bare"{b[$2" "$3]=$7} $1=="gateway"{g[$2" "$3]=$7} END{for (k in g) if (b[k] > 0) printf "gateway/bare CPU per webhook  %-42s %.2fx\n", k, g[k] / b[k]}' "$summary" | sort
