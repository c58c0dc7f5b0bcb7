#!/usr/bin/env bash
# Bounded load test on loopback: a bare hyper server (the ceiling) and the
# gateway with Tansu behind it, driven by wagate-loadgen in the same run.
#   scripts/loadtest.sh [DURATION_SECS] [CONNECTIONS...]
# Prints a report per run; the numbers in BENCHMARKS.md come from it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
dur="${1:-10}"; shift || true
conns=("$@"); [ ${#conns[@]} -gt 0 ] || conns=(32 128 256)
dir="target/loadtest"; mkdir -p "$dir"
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
    out="$out $name $(awk -v d=$((t1 - t0)) -v hz="$hz" -v n="$n" 'BEGIN{printf "%.1f", d / hz * 1e6 / n}') us"
  done
  echo "$out"
}
# Requests the load generator completed in its last run (warm-up included:
# the tick samples cover it too).
sent() { sed -n 's/^generator .*(\([0-9]*\) requests sent in all)/\1/p' "$1"; }
# Runs the load generator (args: URL CONNECTIONS), prints its report and its
# own CPU per request: it shares the two cores with the server under test.
TIMEFORMAT='%U %S'
load() {
  # shellcheck disable=SC2086 # LOADGEN_ARGS: extra flags, e.g. "--customers 5000"
  { time $L run --url "$1" --connections "$2" --duration-secs "$dur" --warmup-secs 1 ${LOADGEN_ARGS:-} \
      >"$dir/run.out" 2>"$dir/run.err"; } 2>"$dir/run.time"
  cat "$dir/run.err" >&2; cat "$dir/run.out"
  awk -v n="$(sent "$dir/run.out")" '{printf "loadgen cpu per request: %.1f us\n", ($1 + $2) * 1e6 / n}' "$dir/run.time"
}
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; scripts/tansu.sh stop "$dir" || true; }
trap cleanup EXIT

echo "== baseline: bare hyper server (reads the body, answers 200)"
$L baseline --listen 127.0.0.1:0 --max-secs $((dur * ${#conns[@]} + 60)) >"$dir/baseline.out" &
pids+=($!)
for _ in $(seq 50); do grep -q "listening on" "$dir/baseline.out" 2>/dev/null && break; sleep 0.1; done
base=$(sed -n 's/.*listening on //p' "$dir/baseline.out" | head -1)
bp="${pids[0]}"
for c in "${conns[@]}"; do
  echo "-- baseline connections=$c"
  b0=$(ticks "$bp")
  load "http://$base/webhook" "$c"
  cost "$(sent "$dir/run.out")" "server:$bp:$b0"
done
kill "${pids[0]}" 2>/dev/null || true

echo "== gateway: wagate serve (acks=all, raw topic on) with Tansu on loopback"
brokers=$(scripts/tansu.sh start "$dir")
export WAGATE_KAFKA_BROKERS="$brokers" WAGATE_TOPIC_PREFIX="lt$(date +%s)." \
       WAGATE_LISTEN=127.0.0.1:18080 WAGATE_INTERNAL_LISTEN=127.0.0.1:19090 \
       WAGATE_EGRESS_ENABLED=false WAGATE_LOG=warn
$W topics create >/dev/null
$W serve >"$dir/gateway.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf http://127.0.0.1:19090/readyz >/dev/null 2>&1 && break; sleep 0.1; done
gp="${pids[1]}"; tp=$(cat "$dir/tansu.pid")
for c in "${conns[@]}"; do
  echo "-- gateway connections=$c"
  g0=$(ticks "$gp"); t0=$(ticks "$tp")
  load "http://127.0.0.1:18080/webhook" "$c"
  cost "$(sent "$dir/run.out")" "gateway:$gp:$g0" "tansu:$tp:$t0"
done
echo "-- gateway metrics"
curl -s http://127.0.0.1:19090/metrics | grep -E '^wagate_(webhook_requests_total|webhook_events_total|webhook_duplicates_total|kafka_produce_errors_total)' || true
