#!/usr/bin/env bash
# Installs promtool (Debian's prometheus package), which checks and
# unit-tests the alert rules in monitoring/ and the PromQL of the Grafana
# dashboard there (tests/monitoring.rs). The package's server is not used.
set -euo pipefail
exec "$(dirname "$0")/apt-ensure.sh" "the alert rule tests" "promtool" prometheus
