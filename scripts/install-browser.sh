#!/usr/bin/env bash
# Installs what the dashboard's browser test drives: Debian's chromium and
# chromium-driver (headless Chromium through WebDriver), and certutil
# (libnss3-tools), which puts the test's CA into the browser's trust store
# for the dashboard over HTTPS.
set -euo pipefail
exec "$(dirname "$0")/apt-ensure.sh" "the dashboard's browser test" \
  "chromium chromedriver certutil" chromium chromium-driver libnss3-tools
