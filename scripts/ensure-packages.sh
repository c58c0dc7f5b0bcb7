#!/usr/bin/env bash
# Makes sure the Debian packages the build and the tests need are installed.
# Idempotent; installs only what is missing.
#   libssl-dev            librdkafka's TLS and SASL (SCRAM, OAUTHBEARER) use the system OpenSSL
#   libcurl4-openssl-dev  librdkafka's OAUTHBEARER/OIDC token fetch (without it at build time,
#                         kafka.sasl_mechanism = "OAUTHBEARER" is refused at start)
#   stunnel4              a real TLS endpoint in front of Tansu for tests/kafka_security.rs
#                         (Tansu 0.6 accepts --cert/--key but serves plaintext)
# A change to the first two needs a rebuild of rdkafka-sys to take effect.
set -euo pipefail
need=()
dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)
dpkg -s libcurl4-openssl-dev >/dev/null 2>&1 || need+=(libcurl4-openssl-dev)
command -v stunnel4 >/dev/null 2>&1 || command -v stunnel >/dev/null 2>&1 || need+=(stunnel4)
[ ${#need[@]} -eq 0 ] && exit 0
echo "== installing Debian packages: ${need[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${need[@]}"
