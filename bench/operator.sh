#!/usr/bin/env bash
# Runs the operator benchmark (bench/operator/): release builds of the
# operator and the benchmark, the test control plane's binaries (cached by
# testenv/build.sh), then one run per size on a fresh control plane.
#
#   bench/operator.sh                       both sizes (1000x500, 5000x1000);
#                                           writes bench/results/operator.md
#   bench/operator.sh 200x100 [FLAGS...]    the sizes given (NODESxSERVICES),
#                                           FLAGS passed to edgewire-opbench
#                                           (e.g. --no-peer); prints the
#                                           report and leaves the committed
#                                           one alone
#
# Each run is bounded: every wait by --phase-timeout (600 s), and the whole
# run by EDGEWIRE_BENCH_BUDGET seconds when set, or by the time of day
# EDGEWIRE_BENCH_UNTIL (e.g. "18:40 UTC", anything `date -d` reads) for all
# sizes together; a wait cut short is reported as not reached, with how far
# it got, and the steps after it as not run.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# shellcheck source=common.sh
source "$root/bench/common.sh"

cmdline="bench/operator.sh${*:+ $*}"
sizes=()
flags=()
for arg in "$@"; do
  if [[ "$arg" =~ ^[0-9]+x[0-9]+$ ]]; then sizes+=("$arg"); else flags+=("$arg"); fi
done
committed=false
if [[ $# -eq 0 ]]; then
  sizes=(1000x500 5000x1000)
  committed=true
fi
[[ ${#sizes[@]} -gt 0 ]] || { echo "usage: $0 [NODESxSERVICES...] [edgewire-opbench flags]" >&2; exit 2; }
if [[ -n "${EDGEWIRE_BENCH_BUDGET:-}" ]]; then flags+=(--budget "$EDGEWIRE_BENCH_BUDGET"); fi
until_epoch=""
if [[ -n "${EDGEWIRE_BENCH_UNTIL:-}" ]]; then until_epoch=$(date -d "$EDGEWIRE_BENCH_UNTIL" +%s); fi

release_build edgewire-operator edgewire-opbench

stage "test control plane binaries (cached)"
EDGEWIRE_TESTENV_BIN=$(bash testenv/build.sh | tail -n 1)
export EDGEWIRE_TESTENV_BIN

# Each size's report and headline figures; kept, and named at the end.
work=$(mktemp -d "${TMPDIR:-/tmp}/edgewire-opbench.XXXXXX")
bench="$target/release/edgewire-opbench"

# The results file: the sizes side by side, then each size's full report.
# Rewritten after every size, so an interrupted run keeps what it measured.
compose() {
  local summaries=()
  for size in "${sizes[@]}"; do
    [[ -s "$work/$size.json" ]] && summaries+=("$work/$size.json")
  done
  [[ ${#summaries[@]} -gt 0 ]] || return 0
  {
    echo "# The operator at scale"
    echo
    echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') on $(nproc) cores, $(free -g | awk '/^Mem:/{print $2}') GiB, Linux $(uname -r)."
    echo "Command: \`$cmdline\`${EDGEWIRE_BENCH_UNTIL:+ with EDGEWIRE_BENCH_UNTIL=\"$EDGEWIRE_BENCH_UNTIL\"}. Single runs on a small machine shared with other work: figures move by 10–20 % and more between runs."
    echo
    echo "## The sizes side by side"
    echo
    "$bench" --summarize "${summaries[@]}"
    echo
    echo "## Each size"
    for size in "${sizes[@]}"; do
      if [[ -s "$work/$size.md" ]]; then
        echo
        cat "$work/$size.md"
      fi
    done
  } >"$1"
}

for size in "${sizes[@]}"; do
  stage "benchmark: ${size/x/ nodes × } services"
  status=0
  run_flags=("${flags[@]}")
  if [[ -n "$until_epoch" ]]; then
    left=$((until_epoch - $(date +%s)))
    if [[ $left -le 60 ]]; then
      echo "not run: EDGEWIRE_BENCH_UNTIL ($EDGEWIRE_BENCH_UNTIL) leaves ${left} s" >&2
      continue
    fi
    run_flags+=(--budget "$left")
  fi
  "$bench" --operator "$target/release/edgewire-operator" \
    --nodes "${size%x*}" --services "${size#*x}" \
    --out "$work/$size.md" --summary "$work/$size.json" "${run_flags[@]}" || status=$?
  [[ $status -eq 0 ]] || echo "edgewire-opbench failed for $size (exit $status)" >&2
  if $committed; then
    compose bench/results/operator.md
    stage "results so far in bench/results/operator.md"
  fi
done
if ! $committed; then
  compose "$work/operator.md"
  cat "$work/operator.md"
fi
echo "each size's report and figures: $work" >&2
