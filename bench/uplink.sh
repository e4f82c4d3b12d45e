#!/usr/bin/env bash
# Runs the uplink benchmark (bench/uplink.py): edgewire edge agents and
# their hub beside NATS leaf servers and their hub, after installing what it
# needs: release builds of the agent and the load generator, and
# nats-server (Debian). EDGEWIRE_BENCH_QUICK=1 runs a short version (and
# leaves bench/results/uplink.md as it was).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# shellcheck source=common.sh
source "$root/bench/common.sh"

release_build edgewire-agent edgewire-loadgen

nats_server

stage "benchmark"
# The stores live on the target directory's disk, not on a tmpfs /tmp:
# both systems' persistence is part of what is measured.
EDGEWIRE_BENCH_TMP="$target" \
EDGEWIRE_LOADGEN="$target/release/edgewire-loadgen" \
EDGEWIRE_AGENT="$target/release/edgewire-agent" \
  python3 bench/uplink.py
