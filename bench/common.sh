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
