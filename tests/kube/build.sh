#!/usr/bin/env bash
# Builds etcd, kube-apiserver and kubectl of the release pinned in go.mod, once per machine, into
# $FLEETLB_KUBE_DIR (default: ~/.cache/fleetlb/kube-<release>) and prints that directory.
# Go's module and build caches are reused when present, never required.
set -euo pipefail
cd "$(dirname "$0")"
release=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2; exit}' go.mod)
etcd=$(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2; exit}' go.mod)
dir=${FLEETLB_KUBE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fleetlb/kube-$release}
if [ -x "$dir/etcd" ] && [ -x "$dir/kube-apiserver" ] && [ -x "$dir/kubectl" ]; then
  echo "$dir"
  exit 0
fi
command -v go >/dev/null || { echo "tests/kube/build.sh: go is missing" >&2; exit 69; }
mkdir -p "$dir"
minor=${release#v1.}; minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$release -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done
export CGO_ENABLED=0
echo "tests/kube/build.sh: building etcd $etcd, kube-apiserver and kubectl $release into $dir (once per machine)" >&2
go build -trimpath -ldflags "-s -w" -o "$dir/etcd.tmp" go.etcd.io/etcd/server/v3
go build -trimpath -ldflags "$ldflags" -o "$dir/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver
go build -trimpath -ldflags "$ldflags" -o "$dir/kubectl.tmp" k8s.io/kubernetes/cmd/kubectl
for b in etcd kube-apiserver kubectl; do mv "$dir/$b.tmp" "$dir/$b"; done
echo "$dir"
