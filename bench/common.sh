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

# build_from_history NAME COMMIT PACKAGE...: release-builds each PACKAGE
# (a binary of the same name) of COMMIT from this repository's own history,
# once, into a cache outside the repo keyed by the commit, and sets $built
# to that directory; leaves it empty (and says why) when the history does
# not hold the commit, as in a shallow clone.
build_from_history() {
  local name=$1 commit=$2
  shift 2
  local cache=${XDG_CACHE_HOME:-$HOME/.cache}/edgewire/bench/$name-$commit
  built=""
  local package missing=false args=()
  for package in "$@"; do
    [[ -x "$cache/$package" ]] || missing=true
    args+=(-p "$package")
  done
  if ! $missing; then
    built=$cache
    echo "cached: $cache"
    return
  fi
  if ! git -C "$root" cat-file -e "$commit^{commit}" 2>/dev/null; then
    echo "this checkout's history lacks ${commit:0:7} (a shallow clone?): the report leaves that peer out"
    return
  fi
  # The source stays beside the binaries: a binary may read files of its
  # source tree by the path it was built at (the operator benchmark reads
  # its CRDs so).
  local src=$cache/src
  rm -rf "$src"
  mkdir -p "$src"
  git -C "$root" archive "$commit" | tar -x -C "$src"
  # Its own target directory, removed once the binaries are out: it shares
  # nothing with today's build, and would only take room.
  (cd "$src" && CARGO_TARGET_DIR="$src/target" cargo build --release --locked "${args[@]}")
  for package in "$@"; do
    mv "$src/target/release/$package" "$cache/.$package.tmp"
    mv "$cache/.$package.tmp" "$cache/$package"
  done
  rm -rf "$src/target"
  built=$cache
}

# first_round_agent: the agent of the first round (FIRST_ROUND_COMMIT),
# the build the data path's goals are judged against ("not lower than
# today"). Sets $first_round_agent to the binary, or leaves it empty.
FIRST_ROUND_COMMIT=5144c87c0db42bcb200219e32f223d62ccf3deea
first_round_agent() {
  stage "the first round's agent (${FIRST_ROUND_COMMIT:0:7}, cached)"
  build_from_history agent "$FIRST_ROUND_COMMIT" edgewire-agent
  first_round_agent=${built:+$built/edgewire-agent}
}
