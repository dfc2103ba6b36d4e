#!/usr/bin/env bash
# Builds the lab's real control plane (kube-apiserver, kube-controller-manager, kube-scheduler,
# kube-proxy v1.20.2) from Debian bookworm's `kubernetes` source package, and unpacks
# etcd from Debian's `etcd-server`, into a fixed cache directory.
#
# Why from source: no reachable registry ships Kubernetes binaries; Debian's source
# package (upstream v1.20.2 with vendor/) is the only full tree we can get.
# Idempotent: when every binary is already in the cache it does nothing.
set -euo pipefail

CACHE=${KUBESHIFT_CP_CACHE:-/var/cache/kubeshift/control-plane-v1.20.2}
BIN="$CACHE/bin"
WANT=(kube-apiserver kube-controller-manager kube-scheduler kube-proxy etcd)

have_all() {
  for b in "${WANT[@]}"; do [ -x "$BIN/$b" ] || return 1; done
}
if have_all; then
  echo "control plane already built in $BIN"
  exit 0
fi

log() { echo "[build-control-plane] $*" >&2; }

# --- apt dependencies -----------------------------------------------------------
need_pkgs=(golang-1.19-go rsync dpkg-dev golang-github-modern-go-reflect2-dev make)
missing=()
for p in "${need_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi

WORK="$CACHE/work"
rm -rf "$WORK"
mkdir -p "$WORK" "$BIN"

# --- source, through a private apt configuration ------------------------------
# The system's sources only carry binary packages. We derive deb-src entries from
# them in a private configuration so the machine's own apt setup stays untouched.
APTDIR="$WORK/apt"
mkdir -p "$APTDIR/lists/partial" "$APTDIR/sources.list.d"
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  grep -q 'bookworm' "$f" || continue
  sed 's/^Types: deb$/Types: deb-src/' "$f" > "$APTDIR/sources.list.d/$(basename "$f")"
done
if [ -f /etc/apt/sources.list ]; then
  grep -E '^deb .*bookworm' /etc/apt/sources.list | sed 's/^deb /deb-src /' > "$APTDIR/sources.list" || true
else
  : > "$APTDIR/sources.list"
fi
APTOPTS=(-o "Dir::Etc::SourceList=$APTDIR/sources.list"
         -o "Dir::Etc::SourceParts=$APTDIR/sources.list.d"
         -o "Dir::State::Lists=$APTDIR/lists"
         -o "APT::Sandbox::User=root")
log "fetching the kubernetes source package"
apt-get "${APTOPTS[@]}" update -q >/dev/null
( cd "$WORK" && apt-get "${APTOPTS[@]}" source --download-only kubernetes >/dev/null )
dsc=$(ls "$WORK"/kubernetes_*.dsc | head -n 1)
( cd "$WORK" && dpkg-source --no-check -x "$dsc" src >/dev/null )

# --- GOPATH layout (1.20 only builds in GOPATH mode) ---------------------------
export GOPATH="$WORK/gopath"
mkdir -p "$GOPATH/src/k8s.io"
mv "$WORK/src" "$GOPATH/src/k8s.io/kubernetes"
K="$GOPATH/src/k8s.io/kubernetes"
export PATH="/usr/lib/go-1.19/bin:$PATH"
export GO111MODULE=off CGO_ENABLED=0 GOFLAGS= GOCACHE="$WORK/gocache"

# Go 1.19 + the vendored reflect2 crashes the apiserver on the first custom-resource
# write (SIGSEGV in UnsafeMapType.UnsafeIterate); Debian's reflect2 1.0.2 is fixed.
R2=/usr/share/gocode/src/github.com/modern-go/reflect2
rm -rf "$K/vendor/github.com/modern-go/reflect2"
mkdir -p "$K/vendor/github.com/modern-go/reflect2"
cp -r "$R2"/*.go "$K/vendor/github.com/modern-go/reflect2/"
rm -f "$K"/vendor/github.com/modern-go/reflect2/*_test.go

log "generating openapi (make gen_openapi)"
( cd "$K" && make gen_openapi >"$WORK/gen_openapi.log" 2>&1 ) || { tail -n 40 "$WORK/gen_openapi.log" >&2; exit 1; }

V=k8s.io/kubernetes/vendor/k8s.io
LD="-s -w"
for pkg in "$V/component-base/version" "$V/client-go/pkg/version"; do
  LD="$LD -X $pkg.gitVersion=v1.20.2 -X $pkg.gitMajor=1 -X $pkg.gitMinor=20 -X $pkg.gitTreeState=clean"
done

for b in kube-apiserver kube-controller-manager kube-scheduler kube-proxy; do
  log "building $b"
  ( cd "$K" && go build -ldflags "$LD" -o "$BIN/$b.tmp" "./cmd/$b" )
  mv "$BIN/$b.tmp" "$BIN/$b"
done

# --- etcd: unpack, never install (the package would start a system service) ----
log "unpacking etcd-server"
( cd "$WORK" && apt-get -o APT::Sandbox::User=root download etcd-server >/dev/null )
dpkg-deb -x "$WORK"/etcd-server_*.deb "$WORK/etcd"
cp "$WORK/etcd/usr/bin/etcd" "$BIN/etcd.tmp"
mv "$BIN/etcd.tmp" "$BIN/etcd"

rm -rf "$WORK"
log "done: $(ls "$BIN" | tr '\n' ' ')"
have_all
