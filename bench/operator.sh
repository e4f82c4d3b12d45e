#!/usr/bin/env bash
# Runs the operator benchmark (bench/operator/): release builds of the
# operator and the benchmark, the test control plane's binaries (cached by
# testenv/build.sh), then 1,000 kwok nodes and 500 EdgeServices on a real
# control plane. Writes bench/results/operator.md. Arguments go to
# edgewire-opbench (e.g. --nodes 100 --services 50 for a short run); a run
# with arguments prints its report and leaves the committed one alone.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# shellcheck source=common.sh
source "$root/bench/common.sh"

release_build edgewire-operator edgewire-opbench

stage "test control plane binaries (cached)"
EDGEWIRE_TESTENV_BIN=$(bash testenv/build.sh | tail -n 1)
export EDGEWIRE_TESTENV_BIN

stage "benchmark"
args=("$@")
[[ $# -gt 0 ]] || args=(--out bench/results/operator.md)
"$target/release/edgewire-opbench" --operator "$target/release/edgewire-operator" "${args[@]}"
