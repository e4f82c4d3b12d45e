# Sourced by the benchmark scripts: stage lines, release builds and nats-server.

stage() { printf '\n==> %s\n' "$*"; }

# release_build PACKAGE...: builds them in release mode and sets $target to
# the workspace's target directory.
release_build() {
  stage "release builds"
  local args=()
  for package in "$@"; do args+=(-p "$package"); done
  cargo build --release --locked "${args[@]}"
  target=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys;print(json.load(sys.stdin)["target_directory"])')
}

# nats_server: Debian's nats-server, installed when it is not on PATH.
nats_server() {
  stage "nats-server"
  if ! command -v nats-server >/dev/null 2>&1; then
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nats-server >/dev/null
  fi
  nats-server --version
}

# first_round_agent: the agent of the first round (FIRST_ROUND_COMMIT),
# the build the data path's goals are judged against ("not lower than
# today"), built once into a cache outside the repo keyed by the commit,
# from this repository's own history. Sets $first_round_agent to the binary,
# or leaves it empty (and says why) when the history does not hold the
# commit, as in a shallow clone.
FIRST_ROUND_COMMIT=5144c87c0db42bcb200219e32f223d62ccf3deea
first_round_agent() {
  stage "the first round's agent (${FIRST_ROUND_COMMIT:0:7}, cached)"
  local cache=${XDG_CACHE_HOME:-$HOME/.cache}/edgewire/bench/agent-$FIRST_ROUND_COMMIT
  first_round_agent=""
  if [[ -x "$cache/edgewire-agent" ]]; then
    first_round_agent="$cache/edgewire-agent"
    echo "cached: $first_round_agent"
    return
  fi
  if ! git -C "$root" cat-file -e "$FIRST_ROUND_COMMIT^{commit}" 2>/dev/null; then
    echo "this checkout's history lacks ${FIRST_ROUND_COMMIT:0:7} (a shallow clone?): the report leaves that peer out"
    return
  fi
  local src
  src=$(mktemp -d "${TMPDIR:-/tmp}/edgewire-first-round.XXXXXX")
  git -C "$root" archive "$FIRST_ROUND_COMMIT" | tar -x -C "$src"
  # Its own target directory, removed once the binary is out: it shares
  # nothing with today's build, and would only take room.
  (cd "$src" && CARGO_TARGET_DIR="$src/target" cargo build --release --locked -p edgewire-agent)
  mkdir -p "$cache"
  mv "$src/target/release/edgewire-agent" "$cache/.edgewire-agent.tmp"
  mv "$cache/.edgewire-agent.tmp" "$cache/edgewire-agent"
  rm -rf "$src"
  first_round_agent="$cache/edgewire-agent"
}
