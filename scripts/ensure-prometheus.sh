#!/usr/bin/env bash
# Makes sure Debian's prometheus package (the `prometheus` server and
# `promtool`) is installed: the test suite runs both. Idempotent.
set -euo pipefail
if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    exit 0
fi
echo "== prometheus/promtool missing: installing Debian's prometheus package"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends prometheus
command -v promtool >/dev/null && command -v prometheus >/dev/null
