#!/usr/bin/env bash
# A local Kubernetes control plane (and, for the node tests, a kubelet with containerd) built from
# Debian packages alone: no registry ships kube-apiserver binaries, but Debian bookworm's
# `kubernetes` source package is the whole upstream v1.20.2 tree with vendor/, and bullseye's Go
# 1.15 builds it offline. Everything lands in $LLMOPS_K8S_CACHE; re-running does only what is
# missing, so the first run takes minutes (the Go build) and later ones a fraction of a second.
set -euo pipefail
CACHE=${LLMOPS_K8S_CACHE:-/var/cache/llmops-k8s}
# The Debian revision of the source package (1.20.2 upstream) and the binaries we build from it.
K8S_SRC=kubernetes=1.20.5+really1.20.2-1.1+deb12u1
TARGETS="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kubectl"
# Binary packages unpacked (never installed) under $CACHE/root: the Go toolchain for the build,
# etcd for the API server, and what a node needs to run pods.
DEBS="golang-1.15-go/bullseye golang-1.15-src/bullseye etcd-server/bookworm containerd/bookworm
      runc/bookworm containernetworking-plugins/bookworm busybox-static/bookworm"

log() { printf 'k8s-local: %s\n' "$*" >&2; }
all_built() { for t in $TARGETS; do [ -x "$CACHE/bin/${t##*/}" ] || return 1; done; [ -x "$CACHE/bin/pause" ]; }
if all_built && [ -x "$CACHE/root/usr/bin/etcd" ] && [ -x "$CACHE/root/usr/bin/containerd" ]; then
  exit 0
fi
mkdir -p "$CACHE"/{apt/lists/partial,apt/archives/partial,debs,root,bin,src}
# dpkg-source unpacks the source package; gcc compiles the pause binary.
for tool in dpkg-source:dpkg-dev gcc:gcc; do
  command -v "${tool%%:*}" >/dev/null || { log "apt-get install ${tool#*:}"
    apt-get -qq update && DEBIAN_FRONTEND=noninteractive apt-get -qq install -y "${tool#*:}"; }
done

# A private apt configuration so the system's sources stay untouched: the system's mirror plus
# deb-src for bookworm and bullseye's main for Go 1.15.
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)}
mirror=${mirror:-http://deb.debian.org/debian}
cat >"$CACHE/apt/sources.list" <<SRC
deb $mirror bookworm main
deb-src $mirror bookworm main
deb $mirror bullseye main
SRC
cat >"$CACHE/apt/apt.conf" <<CONF
Dir::Etc::SourceList "$CACHE/apt/sources.list";
Dir::Etc::SourceParts "$CACHE/apt/sources.list.d";
Dir::State::Lists "$CACHE/apt/lists";
Dir::Cache "$CACHE/apt";
Acquire::http::Timeout "60";
APT::Sandbox::User "root";
CONF
mkdir -p "$CACHE/apt/sources.list.d"
export APT_CONFIG="$CACHE/apt/apt.conf"
if ! ls "$CACHE/apt/lists" | grep -q Packages; then
  log "apt-get update (private lists)"; apt-get -qq update
fi

cd "$CACHE/debs"
for spec in $DEBS; do
  name=${spec%/*}
  ls "${name}"_*.deb >/dev/null 2>&1 || { log "download $spec"; apt-get -qq download "$spec"; }
done
for deb in *.deb; do
  [ -e "$CACHE/root/.unpacked.$deb" ] || { dpkg -x "$deb" "$CACHE/root"; touch "$CACHE/root/.unpacked.$deb"; }
done

src="$CACHE/src/kubernetes"
if ! all_built && [ ! -d "$src" ]; then
  log "fetch the kubernetes source package"
  (cd "$CACHE/src" && apt-get -qq source --download-only "$K8S_SRC" \
     && dpkg-source -x --no-check kubernetes_*.dsc "$src" >/dev/null)
fi

missing=""
for t in $TARGETS; do [ -x "$CACHE/bin/${t##*/}" ] || missing="$missing $t"; done
if [ -n "$missing" ]; then
  log "go build$missing (a few minutes; log in $CACHE/build.log)"
  start=$(date +%s)
  (
    cd "$src"
    export GOROOT="$CACHE/root/usr/lib/go-1.15" GOCACHE="$CACHE/gocache" GOPROXY=off GOFLAGS=-mod=vendor
    export CGO_ENABLED=0 PATH="$CACHE/root/usr/lib/go-1.15/bin:$PATH"
    # The build stamps versions from git, which a source package has not: say them.
    export KUBE_GIT_VERSION=v1.20.2 KUBE_GIT_TREE_STATE=clean KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20
    mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
    # nice: the build takes both cores for minutes; whatever else runs keeps its share.
    GOPATH="$PWD/.go" nice -n 10 make WHAT="${missing# }" >"$CACHE/build.log" 2>&1
  ) || { tail -30 "$CACHE/build.log" >&2; exit 1; }
  for t in $missing; do cp "$src/_output/bin/${t##*/}" "$CACHE/bin/"; done
  log "built in $(( $(date +%s) - start )) s"
fi
# The pod sandbox ("pause") image's one binary, compiled from the same tree.
[ -x "$CACHE/bin/pause" ] || gcc -Os -static -o "$CACHE/bin/pause" "$src/build/pause/linux/pause.c"
# The sources and Go caches are only needed to build: drop them (about 3 GB).
all_built && rm -rf "$src" "$CACHE/gocache" "$CACHE"/src/kubernetes_*
log "ready in $CACHE"
