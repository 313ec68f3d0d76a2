#!/usr/bin/env bash
# Builds the real Kubernetes control plane the tests run against (kube-apiserver,
# kube-controller-manager, etcd) from their Go modules, pinned in
# tools/controlplane/go.mod, and links them into ./.tools/bin.
#
# The binaries are kept in a per-user cache keyed by version and by the pinned
# module files, so a fresh clone on the same machine does not build again:
#   ${SLIPSTREAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/slipstream}/controlplane/<key>/
# First build on a 2-core machine: see README ("The real control plane").
set -euo pipefail

K8S_VERSION=v1.35.4
ETCD_VERSION=v3.6.5

root="$(cd "$(dirname "$0")/.." && pwd)"
src="$root/tools/controlplane"
bin="$root/.tools/bin"
binaries=(kube-apiserver kube-controller-manager etcd)
mkdir -p "$bin"

say() { echo "build-controlplane: $*" >&2; }

# Go's own install location, for shells whose PATH does not name it.
if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  PATH="/usr/local/go/bin:$PATH"
fi
if ! command -v go >/dev/null 2>&1; then
  say "Go is not installed (needed: go >= 1.25 and its module proxy)."
  say "The tests run against a real kube-apiserver $K8S_VERSION, kube-controller-manager and etcd $ETCD_VERSION built from source."
  say "Install Go >= 1.25 (its official release, or a distribution package of that version) and run 'make tools' again."
  exit 1
fi

grep -q "k8s.io/kubernetes $K8S_VERSION" "$src/go.mod" && grep -q "go.etcd.io/etcd/server/v3 $ETCD_VERSION" "$src/go.mod" || {
  say "tools/controlplane/go.mod does not pin k8s.io/kubernetes $K8S_VERSION and etcd $ETCD_VERSION; update both together"
  exit 1
}


pkg=k8s.io/component-base/version
minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
ldflags="-s -w -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
# The cache key: the versions, the pinned module files and how they are built.
digest="$(cat "$src/go.mod" "$src/go.sum" "$src/cmd/etcd/main.go" <(echo "$ldflags CGO_ENABLED=0 -trimpath") | sha256sum | cut -c1-12)"
cache="${SLIPSTREAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/slipstream}/controlplane/k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_${digest}"

linked() {
  for b in "${binaries[@]}"; do
    [ "$(readlink "$bin/$b" 2>/dev/null)" = "$cache/$b" ] || return 1
  done
}
built() {
  for b in "${binaries[@]}"; do [ -x "$cache/$b" ] || return 1; done
}

if ! built; then
  mkdir -p "$cache"
  exec 9>"$cache.lock"
  flock 9
  if ! built; then
    start=$SECONDS
    export GOTOOLCHAIN=local GOFLAGS=-mod=readonly CGO_ENABLED=0
    say "go $(go env GOVERSION): downloading modules for kube-apiserver $K8S_VERSION and etcd $ETCD_VERSION"
    (cd "$src" && go mod download)
    say "building kube-apiserver, kube-controller-manager and etcd into $cache"
    say "(about 8 minutes on 2 cores the first time; later clones on this machine reuse it)"
    tmp="$(mktemp -d "$cache.tmp.XXXXXX")"
    (cd "$src" && go build -trimpath -ldflags "$ldflags" -o "$tmp/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager ./cmd/etcd)
    for b in "${binaries[@]}"; do mv "$tmp/$b" "$cache/$b"; done
    rmdir "$tmp"
    say "built in $((SECONDS - start)) s"
  fi
fi

if ! linked; then
  for b in "${binaries[@]}"; do ln -sfn "$cache/$b" "$bin/$b"; done
fi
