#!/usr/bin/env bash
# Installs what the TLS and SASL tests use: stunnel (Debian's stunnel4),
# which terminates TLS in front of the test broker (tansu 0.6 serves plain
# TCP only, even with --cert/--key); the openssl command, which makes
# the tests' own CA and certificates; and curl, the real HTTPS client of
# the web endpoints' TLS and basic-auth tests (tests/web.rs).
set -euo pipefail
exec "$(dirname "$0")/apt-ensure.sh" "the TLS, SASL and web tests" \
  "stunnel openssl curl" stunnel4 openssl curl
