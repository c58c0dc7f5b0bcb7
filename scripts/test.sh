#!/usr/bin/env bash
# The whole test suite, as the README's test command runs it: installs Tansu
# if missing, starts it on loopback, runs every test of the workspace against
# it, stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
# OpenSSL and libcurl for librdkafka, stunnel4 for tests/kafka_security.rs.
scripts/ensure-packages.sh
# Prometheus and promtool (tests/prometheus.rs, scripts/promtool-check.sh).
scripts/ensure-prometheus.sh
dir="target/test-env"
mkdir -p "$dir"
scripts/tansu.sh stop "$dir" || true
brokers=$(scripts/tansu.sh start "$dir")
trap 'scripts/tansu.sh stop "$dir"; scripts/s3.sh stop "$dir"' EXIT
# An S3-compatible server (moto, from PyPI) for tests/media_s3.rs.
scripts/s3.sh stop "$dir" || true
s3=$(scripts/s3.sh start "$dir")
echo "tansu broker on $brokers (log: $dir/tansu.log)"
echo "s3 server on $s3 (log: $dir/s3.log)"
export WAGATE_TEST_BROKERS="$brokers"
export WAGATE_TEST_S3="$s3"
status=0
cargo test --workspace --all-targets --no-fail-fast "$@" || status=$?
# Alert rules (promtool check + unit tests) and dashboards, statically.
scripts/promtool-check.sh || status=$?
exit $status
