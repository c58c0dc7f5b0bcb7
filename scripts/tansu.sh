#!/usr/bin/env bash
# Installs (if missing) and starts a Tansu broker on loopback for the tests.
#   scripts/tansu.sh install          # cargo install tansu (≈15 min the first time)
#   scripts/tansu.sh start DIR        # starts it, writes DIR/tansu.pid, DIR/tansu.port; prints host:port
#   scripts/tansu.sh stop DIR
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
TANSU_VERSION="${TANSU_VERSION:-0.6.0}"

install() {
  if command -v tansu >/dev/null 2>&1; then return 0; fi
  echo "tansu not found: installing it with cargo (this takes about 15 minutes the first time)" >&2
  local v=()
  if [ -n "$TANSU_VERSION" ]; then v=(--version "$TANSU_VERSION"); fi
  cargo install tansu --locked --features dynostore,libsql "${v[@]}" >&2
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

start() {
  local dir="$1"; mkdir -p "$dir"
  install
  local port; port=$(free_port)
  local url="tcp://127.0.0.1:${port}"
  # TANSU_ADVERTISED_PORT: the port clients are told to use (a TLS proxy in
  # front of Tansu, as scripts/loadtest.sh does with KAFKA_TLS=1).
  local advertised="tcp://127.0.0.1:${TANSU_ADVERTISED_PORT:-$port}"
  # Memory storage: every test run starts empty.
  tansu broker \
    --listener-url "$url" \
    --advertised-listener-url "$advertised" \
    --storage-engine "memory://tansu/" \
    >"$dir/tansu.log" 2>&1 &
  echo $! >"$dir/tansu.pid"
  echo "$port" >"$dir/tansu.port"
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "127.0.0.1:$port"; return 0
    fi
    if ! kill -0 "$(cat "$dir/tansu.pid")" 2>/dev/null; then
      echo "tansu exited; its log:" >&2; cat "$dir/tansu.log" >&2; return 1
    fi
    sleep 0.1
  done
  echo "tansu did not open port $port within 10s; its log:" >&2; cat "$dir/tansu.log" >&2
  return 1
}

stop() {
  local dir="$1"
  if [ -f "$dir/tansu.pid" ]; then
    kill "$(cat "$dir/tansu.pid")" 2>/dev/null || true
    rm -f "$dir/tansu.pid"
  fi
}

case "${1:-}" in
  install) install ;;
  start) start "${2:?dir}" ;;
  stop) stop "${2:?dir}" ;;
  *) echo "usage: $0 install | start DIR | stop DIR" >&2; exit 2 ;;
esac
