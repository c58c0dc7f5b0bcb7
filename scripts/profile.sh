#!/usr/bin/env bash
# CPU profile of the gateway under load (perf, DWARF call graphs), loopback only.
#   scripts/profile.sh [CONNECTIONS] [SECONDS]     (defaults: 512 6)
# Uses target/release/{wagate,wagate-loadgen} (or WAGATE_BIN / WAGATE_LOADGEN),
# single-message bodies, Tansu on loopback; writes target/profile/perf.data and
# prints the split by thread and the top symbols. DWARF unwinding slows the
# gateway about 2x: read the proportions, not the rates.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
c="${1:-512}"; secs="${2:-6}"
W=${WAGATE_BIN:-target/release/wagate}; L=${WAGATE_LOADGEN:-target/release/wagate-loadgen}
command -v perf >/dev/null || { echo "perf not found (Debian: linux-perf)" >&2; exit 2; }
dir=target/profile; mkdir -p "$dir"
export WAGATE_APP_SECRET=loadtest-secret WAGATE_VERIFY_TOKEN=v WAGATE_API_TOKEN=a WAGATE_ACCESS_TOKEN=t
brokers=$(scripts/tansu.sh start "$dir")
export WAGATE_KAFKA_BROKERS="$brokers" WAGATE_TOPIC_PREFIX="pf$(date +%s)." \
       WAGATE_LISTEN=127.0.0.1:18081 WAGATE_INTERNAL_LISTEN=127.0.0.1:19091 \
       WAGATE_EGRESS_ENABLED=false WAGATE_LOG=warn
$W topics create >/dev/null
$W serve >"$dir/gateway.log" 2>&1 &
gp=$!
trap 'kill $gp 2>/dev/null || true; scripts/tansu.sh stop "$dir" || true' EXIT
for _ in $(seq 100); do curl -sf http://127.0.0.1:19091/readyz >/dev/null 2>&1 && break; sleep 0.1; done
$L run --url http://127.0.0.1:18081/webhook --connections "$c" --duration-secs $((secs + 3)) \
  --warmup-secs 1 --mix messages=100 >"$dir/run.out" 2>&1 &
lp=$!
sleep 2
perf record -F 999 -g --call-graph dwarf,16384 -p "$gp" -o "$dir/perf.data" -- sleep "$secs" >/dev/null 2>&1
wait $lp || true
grep -E "^(requests|latency)" "$dir/run.out"
perf report -i "$dir/perf.data" --no-children --sort comm -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -8
perf report -i "$dir/perf.data" --no-children --sort sym -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -40
