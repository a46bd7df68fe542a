#!/usr/bin/env bash
# Builds the release binaries (producer, consumer, debug, plot, demo) into
# target/release. The Dockerfile runs this same script.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bins
