#!/usr/bin/env bash
# Installs the test broker (tansu, an Apache-Kafka-compatible broker written
# in Rust) once into a stable location and prints the path of its binary.
# Honours TANSU_BIN (an existing binary: used as is) and TANSU_ROOT (where
# to install). A fresh 2-core machine needs about 15 minutes for this.
set -euo pipefail

TANSU_VERSION=0.6.0

if [ -n "${TANSU_BIN:-}" ]; then
  if [ -x "$TANSU_BIN" ]; then
    echo "$TANSU_BIN"
    exit 0
  fi
  echo "install-tansu: TANSU_BIN=$TANSU_BIN is not an executable file" >&2
  exit 1
fi

root="${TANSU_ROOT:-$HOME/.cache/weatherstream/tansu-$TANSU_VERSION}"
bin="$root/bin/tansu"
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
  echo "$bin"
  exit 0
fi

echo "install-tansu: building tansu $TANSU_VERSION into $root (about 15 minutes on 2 cores)" >&2
mkdir -p "$root"
cargo install tansu --version "$TANSU_VERSION" --locked \
  --features dynostore,libsql --root "$root" >&2
echo "$bin"
