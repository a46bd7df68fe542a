#!/usr/bin/env bash
# Makes sure commands that the tests need exist, installing Debian packages
# with apt-get when they do not. Needs root and apt; without them it says
# which packages to install and exits 1, and the tests that need them fail
# with the same advice.
#
#   scripts/apt-ensure.sh PURPOSE "COMMAND..." PACKAGE...
set -euo pipefail
purpose=$1 commands=$2
shift 2

missing=0
for command in $commands; do
  command -v "$command" >/dev/null || missing=1
done
[ "$missing" = 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "apt-ensure: $purpose needs $commands, which are missing, and this is not root with apt-get:" >&2
  echo "  install Debian's $* packages (or your system's)" >&2
  exit 1
fi
echo "apt-ensure: installing $* with apt-get for $purpose" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq "$@" >&2
