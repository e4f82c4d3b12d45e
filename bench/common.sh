# Sourced by the benchmark scripts: stage lines and release builds.

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
