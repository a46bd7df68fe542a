#!/usr/bin/env bash
# Installs what the TLS and SASL tests use: stunnel (Debian's stunnel4),
# which terminates TLS in front of the test broker (tansu 0.6 serves plain
# TCP only, even with --cert/--key), and the openssl command, which makes
# the tests' own CA and certificates.
set -euo pipefail
exec "$(dirname "$0")/apt-ensure.sh" "the TLS and SASL tests" \
  "stunnel openssl" stunnel4 openssl
