#!/usr/bin/env bash
# Re-creates vendor/rdkafka-sys from the rdkafka-sys crate on crates.io:
# the registry crate as published, without the parts of librdkafka that the
# build does not use (tests/, packaging/, examples/, win32/, debian/), with
# vendor/patches/*.patch applied. Cargo.toml points rdkafka at this copy
# through [patch.crates-io]; docs/design.md (Dependencies) says why.
#
#   scripts/vendor-rdkafka-sys.sh            # re-create, patches applied
#   scripts/vendor-rdkafka-sys.sh --unpatched  # the same without the patches,
#                                            # to reproduce what they fix
#
# Needs cargo (to fetch the crate from the registry) and patch(1).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="4.10.0+2.12.1"
dest=vendor/rdkafka-sys
apply_patches=1
case "${1:-}" in
  "") ;;
  --unpatched) apply_patches=0 ;;
  *) echo "usage: $0 [--unpatched]" >&2; exit 2 ;;
esac

# Let cargo fetch the exact crate into its registry cache, from a throwaway
# project, so no download URL is written here.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/fetch/src"
cat >"$work/fetch/Cargo.toml" <<EOF
[package]
name = "fetch-rdkafka-sys"
version = "0.0.0"
edition = "2021"

[dependencies]
rdkafka-sys = { version = "=$VERSION", default-features = false }
EOF
touch "$work/fetch/src/lib.rs"
cargo fetch --quiet --manifest-path "$work/fetch/Cargo.toml"
src=$(cargo metadata --quiet --format-version 1 --manifest-path "$work/fetch/Cargo.toml" |
  python3 -c 'import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "rdkafka-sys").rsplit("/", 1)[0])')
[ -f "$src/librdkafka/src/rdkafka.h" ] || { echo "no librdkafka source in $src" >&2; exit 1; }

rm -rf "$dest"
mkdir -p "$dest"
cp -a "$src/." "$dest/"
# What `configure && make libs` never reads.
rm -rf "$dest/librdkafka/"{tests,packaging,examples,win32,debian} \
  "$dest/simple_producer.rs" "$dest/.cargo_vcs_info.json" "$dest/Cargo.lock"

if [ "$apply_patches" = 1 ]; then
  for p in vendor/patches/*.patch; do
    echo "applying $p" >&2
    patch --quiet --strip=1 --directory="$dest" --forward <"$p"
  done
fi
echo "vendored rdkafka-sys $VERSION into $dest$([ "$apply_patches" = 1 ] || echo ' (unpatched)')" >&2
