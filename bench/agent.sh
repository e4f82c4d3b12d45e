#!/usr/bin/env bash
# Runs the agent benchmarks (bench/agent.py) after installing what they need:
# release builds of the agent and the load generator, nats-server (Debian),
# the Node.js ws peer (npm), the seed server's Python package (virtualenv),
# and the first round's agent (built once from this repository's history).
# EDGEWIRE_BENCH_QUICK=1 runs a short version of each workload;
# EDGEWIRE_BENCH_ONLY=mesh runs the mesh workloads alone.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# shellcheck source=common.sh
source "$root/bench/common.sh"

release_build edgewire-agent edgewire-loadgen

nats_server

first_round_agent

stage "node ws peer"
(cd bench/peers/node-ws && npm install --no-audit --no-fund --silent)

stage "python seed server"
venv="$target/bench-venv"
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r bench/peers/seed/requirements.txt

stage "benchmarks"
# N idle connections need N descriptors in the server and in the client:
# take the hard limit; agent.py skips the sizes that do not fit under it.
ulimit -n "$(ulimit -Hn)"
echo "open files limit: $(ulimit -n)"
EDGEWIRE_LOADGEN="$target/release/edgewire-loadgen" \
EDGEWIRE_AGENT="$target/release/edgewire-agent" \
EDGEWIRE_FIRST_ROUND_AGENT="$first_round_agent" \
EDGEWIRE_FIRST_ROUND_COMMIT="$FIRST_ROUND_COMMIT" \
EDGEWIRE_SEED_PYTHON="$venv/bin/python" \
  python3 bench/agent.py
