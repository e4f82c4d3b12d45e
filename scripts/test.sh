#!/usr/bin/env bash
# The whole test suite, on a machine that has nothing but Rust, Go and Python:
# installs what the tests need, builds the test control plane (cached outside
# the repo), then runs format and lint checks and every test of the workspace.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

started=$SECONDS
stage() { printf '\n==> [%4ss] %s\n' "$((SECONDS - started))" "$*"; }

stage "Rust toolchain"
if command -v rustup >/dev/null 2>&1; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi
cargo --version

stage "Wasm example components (wasm32-wasip2, for the wasm handler tests; cached in examples/wasm/target)"
if command -v rustup >/dev/null 2>&1; then
  rustup target add wasm32-wasip2 >/dev/null
fi
cargo build --locked --release --target wasm32-wasip2 --manifest-path examples/wasm/Cargo.toml

stage "Debian packages (faketime for the clock-skew tests; containerd, runc, CNI plugins and iptables for the real nodes)"
missing=()
[[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ]] || missing+=(faketime)
command -v containerd >/dev/null 2>&1 || missing+=(containerd)
command -v runc >/dev/null 2>&1 || missing+=(runc)
[[ -x /usr/lib/cni/bridge ]] || missing+=(containernetworking-plugins)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
# A NATS JetStream hub for the uplink tests.
command -v nats-server >/dev/null 2>&1 || [[ -x /usr/sbin/nats-server ]] || missing+=(nats-server)
if (( ${#missing[@]} )); then
  echo "installing ${missing[*]}"
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
containerd --version

stage "Python packages for the seed clients (virtualenv in target/test-venv)"
venv="$root/target/test-venv"
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r node-agent/tests/seed/requirements.txt
export EDGEWIRE_PYTHON="$venv/bin/python"

stage "Test control plane binaries, Prometheus, the OCI registry and oras (cached; first build takes several minutes)"
bin_dir=$(bash testenv/build.sh | tail -n 1)
export EDGEWIRE_TESTENV_BIN="$bin_dir"
echo "binaries in $bin_dir"

stage "cargo fmt --check"
cargo fmt --all --check
cargo fmt --all --check --manifest-path examples/wasm/Cargo.toml

stage "cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo clippy --locked --release --target wasm32-wasip2 --manifest-path examples/wasm/Cargo.toml -- -D warnings

stage "cargo build (every binary, for the tests that start them)"
cargo build --locked --workspace --bins

stage "cargo test"
cargo test --locked --workspace

stage "fuzz targets, 15 s each from the committed seeds (first run installs nightly and cargo-fuzz)"
bash scripts/fuzz.sh 15

stage "done in $((SECONDS - started))s"
