#!/usr/bin/env bash
# Runs the Wasm handler benchmark (bench/wasm.py) after installing what it
# needs: release builds of the agent and the load generator, the example
# components (wasm32-wasip2), and `wasmtime` (the wasmtime-cli crate at the
# version of the wasmtime the agent embeds, cached outside the repository).
# EDGEWIRE_BENCH_QUICK=1 runs a short version.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# shellcheck source=common.sh
source "$root/bench/common.sh"

release_build edgewire-agent edgewire-loadgen

stage "example components"
rustup target add wasm32-wasip2 >/dev/null
cargo build --locked --release --target wasm32-wasip2 --manifest-path examples/wasm/Cargo.toml
component="$root/examples/wasm/target/wasm32-wasip2/release/add.wasm"

stage "wasmtime serve"
version=$(awk '/^name = "wasmtime"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/edgewire/bench/wasmtime-cli-$version"
if [[ ! -x "$cache/bin/wasmtime" ]]; then
  echo "building wasmtime-cli $version into $cache (once; takes a while)"
  cargo install --locked --quiet wasmtime-cli --version "$version" --root "$cache"
fi
"$cache/bin/wasmtime" --version

stage "benchmark"
EDGEWIRE_LOADGEN="$target/release/edgewire-loadgen" \
EDGEWIRE_AGENT="$target/release/edgewire-agent" \
EDGEWIRE_WASMTIME="$cache/bin/wasmtime" \
EDGEWIRE_ADD_COMPONENT="$component" \
  python3 bench/wasm.py
