#!/usr/bin/env bash
# The project's test command: installs the test broker (tansu), the
# browser of the dashboard test (Chromium, with certutil for its trust
# store), stunnel, openssl and curl for the TLS, SASL and web tests, and
# promtool for the alert rules, if this machine does not have them yet,
# then checks formatting and lints and runs every test.
# Integration tests start their own brokers on free loopback ports, or use
# KAFKA_BOOTSTRAP_SERVERS when it is set.
set -euo pipefail
cd "$(dirname "$0")/.."

TANSU_BIN="$(scripts/install-tansu.sh)"
export TANSU_BIN
echo "test broker: $TANSU_BIN ($("$TANSU_BIN" --version))"
scripts/install-browser.sh
echo "test browser: $(chromedriver --version)"
scripts/install-tls-tools.sh
echo "TLS tools: $(stunnel -version 2>&1 | grep -m1 '^stunnel'), $(openssl version)"
scripts/install-monitoring-tools.sh
echo "alert rule tests: $(promtool --version 2>&1 | head -1)"

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked "$@"
