#!/usr/bin/env bash
# Builds the test control plane's binaries from their Go modules into a cache
# outside the repo, keyed by the pinned versions. A binary already in the cache
# is kept; a missing one is built. Prints the cache's bin directory last.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

key="k8s-${KUBERNETES_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_helm-${HELM_VERSION}"
cache_root=${EDGEWIRE_TESTENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgewire/testenv}
bin="$cache_root/$key/bin"
mkdir -p "$bin"

# Never fetch a Go toolchain: the machine's own must do.
export GOTOOLCHAIN=local GOFLAGS=-trimpath CGO_ENABLED=0

log() { printf '[testenv] %s\n' "$*" >&2; }

# Builds into a temporary name and renames, so an interrupted build never
# leaves a half-written binary that a later run would take as cached.
build() { # name dir ldflags package
  local name=$1 dir=$2 ldflags=$3 pkg=$4
  if [[ -x "$bin/$name" ]]; then
    log "$name: cached"
    return
  fi
  log "$name: building $pkg"
  local start=$SECONDS
  (cd "$dir" && go build -ldflags "$ldflags" -o "$bin/.$name.tmp" "$pkg")
  mv "$bin/.$name.tmp" "$bin/$name"
  log "$name: built in $((SECONDS - start))s"
}

install_gomod() { # name module-path@version ldflags
  local name=$1 pkg=$2 ldflags=$3
  if [[ -x "$bin/$name" ]]; then
    log "$name: cached"
    return
  fi
  log "$name: building $pkg"
  local start=$SECONDS tmp
  tmp=$(mktemp -d)
  GOBIN="$tmp" go install -ldflags "$ldflags" "$pkg"
  mv "$tmp/$name" "$bin/$name"
  rm -rf "$tmp"
  log "$name: built in $((SECONDS - start))s"
}

minor=${KUBERNETES_VERSION#v1.}
minor=${minor%%.*}
k8s_ldflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
  k8s_ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done

# kubelet and kube-proxy run the real nodes (testenv/src/realnode).
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
  build "$cmd" "$here/go/kubernetes" "$k8s_ldflags" "k8s.io/kubernetes/cmd/$cmd"
done
build etcd "$here/go/etcd" "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=release-${ETCD_VERSION}" go.etcd.io/etcd/server/v3
install_gomod kwok "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" \
  "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=$KUBERNETES_VERSION"
install_gomod helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
  "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor"

# Prometheus for the end-to-end tests, built from its Go module at the
# version that go/prometheus pins: Debian's build leaves out Kubernetes
# service discovery, with which the real-node test scrapes the chart's pods
# as users do. Its version is not part of the cache key (a new one must not
# rebuild the control plane); a stamp beside it rebuilds it instead.
prom_version=$(cd "$here/go/prometheus" && go list -m -f '{{.Version}}' github.com/prometheus/prometheus)
prom_minor=${prom_version#v0.}
# Module v0.3MM.P is Prometheus 3.MM.P.
prom_release="3.$((${prom_minor%%.*} - 300)).${prom_minor#*.}"
if [[ "$(cat "$bin/prometheus.version" 2>/dev/null)" != "$prom_version" ]]; then
  rm -f "$bin/prometheus"
fi
build prometheus "$here/go/prometheus" "-s -w -X github.com/prometheus/common/version.Version=$prom_release" \
  github.com/prometheus/prometheus/cmd/prometheus
echo "$prom_version" >"$bin/prometheus.version"

# The OCI registry and the oras CLI for the Wasm module tests, built from the
# Go modules that go/registry and go/oras pin. Like Prometheus, their versions
# are not part of the cache key; a stamp beside each rebuilds it instead.
build_pinned() { # name dir module package ldflags-with-VERSION
  local name=$1 dir=$2 module=$3 pkg=$4 ldflags=$5 version
  version=$(cd "$dir" && go list -m -f '{{.Version}}' "$module")
  if [[ "$(cat "$bin/$name.version" 2>/dev/null)" != "$version" ]]; then
    rm -f "$bin/$name"
  fi
  build "$name" "$dir" "${ldflags//VERSION/$version}" "$pkg"
  echo "$version" >"$bin/$name.version"
}
build_pinned registry "$here/go/registry" github.com/distribution/distribution/v3 \
  github.com/distribution/distribution/v3/cmd/registry \
  "-s -w -X github.com/distribution/distribution/v3/version.version=VERSION"
build_pinned oras "$here/go/oras" oras.land/oras oras.land/oras/cmd/oras \
  "-s -w -X oras.land/oras/internal/version.GitTreeState=clean"

# The pod sandbox process of the real nodes' pause image: static, so the image
# holds nothing else.
if [[ -x "$bin/pause" ]]; then
  log "pause: cached"
else
  log "pause: building $here/realnode-pause.c"
  cc -Os -static -o "$bin/.pause.tmp" "$here/realnode-pause.c"
  strip "$bin/.pause.tmp"
  mv "$bin/.pause.tmp" "$bin/pause"
fi

# kwok v0.8 simulates nothing unless given its stages; take them from the
# kwok module of the pinned version rather than keeping copies here.
stages="$cache_root/$key/kwok-stages.yaml"
if [[ ! -s "$stages" ]]; then
  log "kwok stages: extracting from sigs.k8s.io/kwok@$KWOK_VERSION"
  kwok_dir=$(cd "$here/go/kubernetes" && go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [[ -d "$kwok_dir" ]] || { log "cannot find the kwok module source"; exit 1; }
  {
    for f in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
      pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
      echo "---"
      cat "$kwok_dir/kustomize/stage/$f.yaml"
    done
  } >"$stages.tmp"
  mv "$stages.tmp" "$stages"
else
  log "kwok stages: cached"
fi

echo "$bin"
