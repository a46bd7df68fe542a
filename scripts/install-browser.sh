#!/usr/bin/env bash
# Installs what the dashboard's browser test drives: Debian's chromium and
# chromium-driver (headless Chromium through WebDriver).
set -euo pipefail
exec "$(dirname "$0")/apt-ensure.sh" "the dashboard's browser test" \
  "chromium chromedriver" chromium chromium-driver
