#!/usr/bin/env bash
# An S3-compatible server on loopback for the media tests: the server mode
# of PyPI's `moto` (moto[server]), installed into a virtualenv under
# ~/.cache/wagate/moto-venv when no `moto_server` is on the PATH.
#   scripts/s3.sh install          # the virtualenv (pip install 'moto[server]')
#   scripts/s3.sh start DIR        # starts it, writes DIR/s3.pid, DIR/s3.port; prints http://127.0.0.1:PORT
#   scripts/s3.sh stop DIR
set -euo pipefail
MOTO_VERSION="${MOTO_VERSION:-5.2.1}"
VENV="${WAGATE_MOTO_VENV:-$HOME/.cache/wagate/moto-venv}"

moto_bin() {
  if [ -x "$VENV/bin/moto_server" ]; then echo "$VENV/bin/moto_server"; return 0; fi
  if command -v moto_server >/dev/null 2>&1 && moto_server --help >/dev/null 2>&1; then
    command -v moto_server; return 0
  fi
  return 1
}

install() {
  if moto_bin >/dev/null; then return 0; fi
  echo "moto_server not found: installing moto[server]==$MOTO_VERSION into $VENV" >&2
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install --quiet "moto[server]==$MOTO_VERSION" >&2
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

start() {
  local dir="$1"; mkdir -p "$dir"
  install
  local bin; bin=$(moto_bin)
  local port; port=$(free_port)
  "$bin" -H 127.0.0.1 -p "$port" >"$dir/s3.log" 2>&1 &
  echo $! >"$dir/s3.pid"
  echo "$port" >"$dir/s3.port"
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "http://127.0.0.1:$port"; return 0
    fi
    if ! kill -0 "$(cat "$dir/s3.pid")" 2>/dev/null; then
      echo "moto_server exited; its log:" >&2; cat "$dir/s3.log" >&2; return 1
    fi
    sleep 0.1
  done
  echo "moto_server did not open port $port within 20s; its log:" >&2; cat "$dir/s3.log" >&2
  return 1
}

stop() {
  local dir="$1"
  if [ -f "$dir/s3.pid" ]; then
    kill "$(cat "$dir/s3.pid")" 2>/dev/null || true
    rm -f "$dir/s3.pid"
  fi
}

case "${1:-}" in
  install) install ;;
  start) start "${2:?usage: s3.sh start DIR}" ;;
  stop) stop "${2:?usage: s3.sh stop DIR}" ;;
  *) echo "usage: $0 install | start DIR | stop DIR" >&2; exit 2 ;;
esac
