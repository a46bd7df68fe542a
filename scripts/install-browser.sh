#!/usr/bin/env bash
# Installs what the dashboard's browser test drives: Debian's chromium and
# chromium-driver (headless Chromium through WebDriver). Needs root and apt;
# without them it says so and exits 1, and the browser test then fails
# with the same advice.
set -euo pipefail

if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install-browser: chromium and chromedriver are missing, and this is not root with apt-get:" >&2
  echo "  install Debian's chromium and chromium-driver packages (or your system's) to run the browser test" >&2
  exit 1
fi
echo "install-browser: installing chromium and chromium-driver with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq chromium chromium-driver >&2
