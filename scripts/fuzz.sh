#!/usr/bin/env bash
# Runs each fuzz target in fuzz/ for a bounded time from the committed seeds
# (fuzz/seeds/<target>). Usage: scripts/fuzz.sh [seconds per target] [target...]
# The test command runs it briefly; run it longer by hand, e.g.
#   bash scripts/fuzz.sh 600 relay_message
# New inputs go to a scratch corpus outside the repo; a crash leaves its input
# in fuzz/artifacts/<target>/ and fails the run.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root/fuzz"

seconds=${1:-15}
shift || true
targets=("$@")
if (( ${#targets[@]} == 0 )); then
  targets=(relay_message agent_config mesh_frame jwt_claims)
fi

# cargo-fuzz needs a nightly toolchain (for -Zsanitizer); the binary is cached
# outside the repo, keyed by its version.
cargo_fuzz_version=0.13.2
tools="${XDG_CACHE_HOME:-$HOME/.cache}/edgewire/tools/cargo-fuzz-$cargo_fuzz_version"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  rustup toolchain install nightly --profile minimal
fi
if [[ ! -x "$tools/bin/cargo-fuzz" ]]; then
  cargo install --locked --root "$tools" cargo-fuzz --version "$cargo_fuzz_version"
fi
export PATH="$tools/bin:$PATH"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# The parsers are safe Rust: what is hunted is a panic or a broken round
# trip, which needs no sanitizer; without one the build is quicker and a
# bounded run gets through about twice the inputs.
fuzz=(cargo +nightly fuzz)
# The fuzz build (nightly, instrumented) shares nothing with the main one;
# it is kept outside the repo like the other slow builds, keyed by toolchain.
build_dir="${XDG_CACHE_HOME:-$HOME/.cache}/edgewire/fuzz-target/$(rustup run nightly rustc --version | tr -c 'A-Za-z0-9.\n-' '_')"
opts=(--release --sanitizer none --target-dir "$build_dir")
"${fuzz[@]}" build "${opts[@]}"
for target in "${targets[@]}"; do
  mkdir -p "$scratch/$target"
  echo "fuzzing $target for ${seconds}s"
  # The scratch corpus comes first: libFuzzer writes new inputs there, never
  # into the committed seeds.
  status=0
  "${fuzz[@]}" run "${opts[@]}" "$target" "$scratch/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 \
    >"$scratch/$target.log" 2>&1 || status=$?
  grep -E 'stat::number_of_executed_units|^Done [0-9]+ runs' "$scratch/$target.log" || true
  if (( status != 0 )); then
    tail -n 60 "$scratch/$target.log" >&2
    echo "fuzz target $target failed (exit $status); its input is in fuzz/artifacts/$target/" >&2
    exit "$status"
  fi
done
