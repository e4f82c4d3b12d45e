#!/usr/bin/env bash
# Runs the operator benchmark (bench/operator/): release builds of the
# operator and the benchmark, the test control plane's binaries (cached by
# testenv/build.sh), then one run per size on a fresh control plane. At
# 1,000 × 500 the baseline runs too: the operator and benchmark of
# BASELINE_COMMIT, whose figures the scale goals were written against,
# built once from this repository's history (skipped in a shallow clone),
# so those goals are judged on the machine and the hour they run on.
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

# The operator whose benchmark gave "apply to Ready 28.6 s, relabel 70.7 s,
# RSS 131 MiB" at 1,000 × 500, the figures the scale goals start from.
BASELINE_COMMIT=54ef0ce34bae6a4026951bb8738fadb91ff5be82
BASELINE_SIZE=1000x500
stage "the baseline operator (${BASELINE_COMMIT:0:7}, cached)"
build_from_history operator "$BASELINE_COMMIT" edgewire-operator edgewire-opbench
baseline=$built

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
    baseline_table
    echo "## Each size"
    for size in "${sizes[@]}"; do
      if [[ -s "$work/$size.md" ]]; then
        echo
        cat "$work/$size.md"
      fi
    done
  } >"$1"
}

# figure FILE PATTERN: the first cell after the row label PATTERN in a
# report's tables ("46.7 s"), or the peak RSS of its memory sentence.
figure() {
  if [[ "$2" == peak ]]; then
    sed -n 's/.*, \([0-9.]* MiB\) at peak.*/\1/p' "$1" | head -n 1
  else
    awk -F' [|] ' -v label="$2" 'index($1, label) { print $2; exit }' "$1"
  fi
}

# The baseline's figures beside today's, at the size both ran.
baseline_table() {
  local ours="$work/$BASELINE_SIZE.md" theirs="$work/$BASELINE_SIZE.baseline.md"
  [[ -s "$ours" && -s "$theirs" ]] || return 0
  echo "## Against the baseline (${BASELINE_COMMIT:0:7}), same machine, same run"
  echo
  echo "At ${BASELINE_SIZE/x/ nodes × } services, the operator and benchmark the scale goals were written against (apply to Ready 28.6 s, relabel 70.7 s, RSS 131 MiB when they were set), run right after today's. Its benchmark is its own: agents without connection counts, no Deployment peer."
  echo
  echo "| figure | today | baseline | today/baseline | goal, as that ratio |"
  echo "| --- | --- | --- | --- | --- |"
  local row label pattern goal a b
  for row in "apply to all Ready;apply to all Ready;under 0.70 (20 s of 28.6 s)" \
    "relabel burst to settled;node relabels: to every service;under 0.21 (15 s of 70.7 s)" \
    "operator RSS at peak;peak;under 0.76 (100 MiB of 131 MiB)"; do
    IFS=';' read -r label pattern goal <<<"$row"
    a=$(figure "$ours" "$pattern")
    b=$(figure "$theirs" "$pattern")
    echo "| $label | ${a:-n/a} | ${b:-n/a} | $(ratio "$a" "$b") | $goal |"
  done
  echo
}

# ratio "46.7 s" "28.6 s": 1.63, or n/a unless both are numbers.
ratio() {
  local a=${1%% *} b=${2%% *}
  if [[ "$a" =~ ^[0-9.]+$ && "$b" =~ ^[0-9.]+$ ]]; then
    python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f'{a / b:.2f}' if b else 'n/a')" "$a" "$b"
  else
    echo n/a
  fi
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
  if [[ "$size" == "$BASELINE_SIZE" && -n "$baseline" ]]; then
    stage "baseline (${BASELINE_COMMIT:0:7}): ${size/x/ nodes × } services"
    if [[ -n "$until_epoch" && $((until_epoch - $(date +%s))) -le 300 ]]; then
      echo "not run: EDGEWIRE_BENCH_UNTIL ($EDGEWIRE_BENCH_UNTIL) leaves less than its 5 minutes" >&2
    else
      # Its benchmark predates the Deployment peer's fix and --budget.
      "$baseline/edgewire-opbench" --operator "$baseline/edgewire-operator" \
        --nodes "${size%x*}" --services "${size#*x}" --no-peer \
        --out "$work/$size.baseline.md" ||
        echo "the baseline's benchmark failed for $size (exit $?)" >&2
    fi
  fi
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
