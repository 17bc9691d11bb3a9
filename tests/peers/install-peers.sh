#!/usr/bin/env bash
# Installs, outside the repository and without touching the system's packages, the
# container tools the tests and the cold-start benchmark compare against, all from Debian
# sid (their Go binaries are static and run on bookworm):
#
#   containerd21  containerd 2.1.x (containerd, ctr, containerd-shim-runc-v2), extracted
#   soci          soci-snapshotter 0.4.x (soci, soci-snapshotter-grpc), extracted
#   stargz        ctr-remote (package stargz-snapshotter, extracted) and the
#                 containerd-stargz-grpc daemon, which Debian does not ship: built offline
#                 with sid's Go 1.26 in GOPATH mode from the upstream source tarball of
#                 Debian's source package plus Debian's golang-*-dev source packages
#
# into ${DEDUP_PEERS_CACHE:-/var/cache/dedup-snapshotter/peers}/<hash>/<component>/bin,
# where <hash> is a hash of this script (the recipe). Sid is reached through a private
# apt state directory (`apt-get download` / `apt-get source --tar-only` only; the
# system's sources, lists and dpkg database are untouched).
#
# Idempotent: prints the cached bin dir at once when it is there. Otherwise takes a
# flock per component (concurrent callers build once), builds in a temp dir next to the
# cache and renames it into place. containerd21 and soci take seconds; stargz about
# 3-6 minutes on 2 cores (300 MB of Go sources).
#
# The LAST line of stdout is the bin dir; everything else goes to stderr.
# Usage: install-peers.sh COMPONENT [--print-dir]
#   DEBIAN_MIRROR=URL overrides the mirror (default: the one the host's apt sources use).
#   Needs root to build (/var/cache); not to reuse a finished cache.
set -euo pipefail

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
HASH=$(sha256sum "$SCRIPT" | cut -c1-16)
ROOT=${DEDUP_PEERS_CACHE:-/var/cache/dedup-snapshotter/peers}
SUITE=sid
CONTAINERD_VERSION=2.1.9+ds1-5   # the closest 2.1.x in $SUITE if this one is gone
CONTAINERD_GLOB='2.1.*'
SOCI_GLOB='0.4.*'
STARGZ_GLOB='0.14.*'
GO_PACKAGE=golang-1.26

log() { printf '[install-peers %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

COMPONENT=${1:-}
case "$COMPONENT" in
  containerd21) TOOLS=(containerd ctr containerd-shim-runc-v2) ;;
  soci) TOOLS=(soci soci-snapshotter-grpc) ;;
  stargz) TOOLS=(ctr-remote containerd-stargz-grpc) ;;
  *) echo "usage: $0 containerd21|soci|stargz [--print-dir]" >&2; exit 2 ;;
esac
OUT=$ROOT/$HASH/$COMPONENT
if [[ ${2:-} == --print-dir ]]; then echo "$OUT/bin"; exit 0; fi

complete() {
  local t
  for t in "${TOOLS[@]}"; do [[ -x $OUT/bin/$t ]] || return 1; done
  [[ -f $OUT/BUILDINFO ]]
}
if complete; then echo "$OUT/bin"; exit 0; fi

[[ $(id -u) -eq 0 ]] || die "$OUT is not built yet; building needs root ($ROOT): run as root"
for bin in flock apt-get apt-cache dpkg-deb sha256sum tar; do
  command -v "$bin" >/dev/null || die "missing $bin"
done
mkdir -p "$ROOT/$HASH"
exec 9>"$ROOT/$HASH/.lock-$COMPONENT"
if ! flock -n 9; then
  log "another run is building $COMPONENT; waiting"
  flock 9
fi
if complete; then echo "$OUT/bin"; exit 0; fi
rm -rf "$ROOT/$HASH/.build-$COMPONENT".* "$OUT"
START=$SECONDS

# The Debian mirror the host's own apt sources use (deb822 or one-line format).
mirror() {
  if [[ -n ${DEBIAN_MIRROR:-} ]]; then echo "$DEBIAN_MIRROR"; return; fi
  local m f
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    m=$(awk 'BEGIN { RS = "" }
      /(^|\n)Types:[^\n]*deb([ \t\n]|$)/ && /(^|\n)Suites:[^\n]*[ \t]bookworm([ \t\n]|$)/ {
        if (match($0, /URIs:[ \t]*[^ \t\n]+/)) {
          s = substr($0, RSTART, RLENGTH); sub(/URIs:[ \t]*/, "", s); print s; exit
        }
      }' "$f")
    if [[ -n $m ]]; then echo "$m"; return; fi
  done
  m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
      | awk '$1 == "deb" && $0 !~ /security/ && $0 ~ / bookworm( |$)/ {
               for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { print $i; exit } }')
  if [[ -n $m ]]; then echo "$m"; return; fi
  echo "http://deb.debian.org/debian"
}

WORK=$(mktemp -d "$ROOT/$HASH/.build-$COMPONENT.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
LOG=$WORK/build.log
MIRROR=$(mirror)
A=$WORK/apt
mkdir -p "$A/lists/partial" "$WORK/debs" "$WORK/x" "$WORK/out/bin"
{
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $SUITE main"
  echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $SUITE main"
} >"$A/sources.list"
APT_OPTS=(
  -o "Dir::Etc::sourcelist=$A/sources.list" -o Dir::Etc::sourceparts=-
  -o "Dir::State::Lists=$A/lists" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=
  -o "Dir::Cache::archives=$WORK/debs" -o APT::Sandbox::User=root -o Acquire::Languages=none
  -o Acquire::Retries=3
)
log "apt-get update ($MIRROR $SUITE, private state in $A)"
apt-get "${APT_OPTS[@]}" update -qq >&2 || die "apt-get update of $SUITE failed"

# The version of PACKAGE to take: WANT if listed, else the highest matching GLOB.
pick_version() {
  local pkg=$1 want=$2 glob=$3 v best=""
  while read -r v; do
    [[ $v == "$want" ]] && { echo "$v"; return; }
    # shellcheck disable=SC2053
    [[ $v == $glob ]] && best=$v
  done < <(apt-cache "${APT_OPTS[@]}" madison "$pkg" | awk -F'|' '{ gsub(/ /, "", $2); print $2 }' | sort -uV)
  [[ -n $best ]] || die "no $pkg $glob in $SUITE"
  echo "$best"
}

download() {   # PKG=VERSION...
  (cd "$WORK/debs" && apt-get "${APT_OPTS[@]}" download -qq "$@") >>"$LOG" 2>&1 \
    || { tail -n 20 "$LOG" >&2; die "apt-get download $* failed"; }
}

extract_bins() {   # DEB TOOL...: copies usr/bin/TOOL of the package into out/bin
  local deb=$1 t x; shift
  x=$WORK/x/$(basename "$deb" .deb)
  dpkg-deb -x "$deb" "$x"
  for t in "$@"; do
    [[ -x $x/usr/bin/$t ]] || die "$(basename "$deb") has no usr/bin/$t"
    cp -a "$x/usr/bin/$t" "$WORK/out/bin/$t"
  done
}

INFO=()
case "$COMPONENT" in
  containerd21)
    v=$(pick_version containerd "$CONTAINERD_VERSION" "$CONTAINERD_GLOB")
    download "containerd=$v"
    extract_bins "$WORK"/debs/containerd_*.deb containerd ctr containerd-shim-runc-v2
    INFO+=("package: containerd $v ($SUITE)")
    ;;
  soci)
    v=$(pick_version soci-snapshotter "" "$SOCI_GLOB")
    download "soci-snapshotter=$v"
    extract_bins "$WORK"/debs/soci-snapshotter_*.deb soci soci-snapshotter-grpc
    INFO+=("package: soci-snapshotter $v ($SUITE)")
    ;;
  stargz)
    v=$(pick_version stargz-snapshotter "" "$STARGZ_GLOB")
    dev=golang-github-containerd-stargz-snapshotter-dev
    download "stargz-snapshotter=$v"
    extract_bins "$WORK"/debs/stargz-snapshotter_*.deb ctr-remote
    # Every golang-*-dev package the library (and bbolt, go-json, cri-api, which only
    # the daemon imports) depends on, transitively; a superset is harmless.
    mapfile -t godev < <(apt-cache "${APT_OPTS[@]}" depends --recurse --no-recommends \
        --no-suggests --no-conflicts --no-breaks --no-replaces --no-enhances \
        "$dev" golang-go.etcd-bbolt-dev golang-github-goccy-go-json-dev golang-k8s-cri-api-dev 2>/dev/null \
      | grep -E '^golang-[a-z0-9.+-]+-dev$' | sort -u)
    ((${#godev[@]} > 50)) || die "dependency closure of $dev is suspiciously small (${#godev[@]})"
    log "downloading $GO_PACKAGE and ${#godev[@]} Go source packages"
    mkdir -p "$WORK/debs/go"
    (cd "$WORK/debs/go" && apt-get "${APT_OPTS[@]}" download -qq "$GO_PACKAGE-go" "$GO_PACKAGE-src" "${godev[@]}") \
      >>"$LOG" 2>&1 || { tail -n 20 "$LOG" >&2; die "downloading the Go packages failed"; }
    G=$WORK/gopath
    mkdir -p "$G"
    for deb in "$WORK"/debs/go/*.deb; do dpkg-deb -x "$deb" "$G"; done
    GOROOT=$(find "$G/usr/lib" -maxdepth 1 -name 'go-*' -type d | sort -V | tail -n1)
    [[ -x $GOROOT/bin/go ]] || die "no go binary under $G/usr/lib"
    # The daemon's main package is not in the -dev package: take it from the upstream
    # tarball of the same source package.
    (cd "$WORK" && apt-get "${APT_OPTS[@]}" source --tar-only --download-only -qq "$dev=$v") >>"$LOG" 2>&1 \
      || (cd "$WORK" && apt-get "${APT_OPTS[@]}" source --tar-only --download-only -qq golang-github-containerd-stargz-snapshotter) >>"$LOG" 2>&1 \
      || { tail -n 20 "$LOG" >&2; die "apt-get source --tar-only stargz-snapshotter failed"; }
    tarball=$(find "$WORK" -maxdepth 1 -name '*stargz-snapshotter_*.orig.tar.*' | head -n1)
    [[ -n $tarball ]] || die "no orig tarball of stargz-snapshotter"
    mkdir -p "$WORK/upstream"
    tar -xf "$tarball" -C "$WORK/upstream" --wildcards '*/cmd/containerd-stargz-grpc/*'
    PKG=$G/usr/share/gocode/src/github.com/containerd/stargz-snapshotter
    [[ -d $PKG/fs ]] || die "$dev did not provide $PKG"
    cp -r "$(find "$WORK/upstream" -type d -path '*/cmd/containerd-stargz-grpc' | head -n1)" "$PKG/cmd/"
    # Debian has no docker/cli library, and sid's cri-api is newer than the CRI keychains
    # were written for: drop the docker-config, kubeconfig and CRI keychains (the tests'
    # registries need no credentials).
    sed -i -e '/service\/keychain\/dockerconfig"/d' -e '/service\/keychain\/kubeconfig"/d' \
      -e '/service\/keychain\/cri"/d' -e '/service\/keychain\/crialpha"/d' \
      -e '/^\truntime_alpha "/d' -e '/^\truntime "k8s.io\/cri-api/d' \
      -e 's/credsFuncs := \[\]resolver.Credential{dockerconfig.NewDockerconfigKeychain(ctx)}/var credsFuncs []resolver.Credential/' \
      -e '/if config.Config.KubeconfigKeychainConfig.EnableKeychain {/,/^\t}$/d' \
      -e '/if config.Config.CRIKeychainConfig.EnableKeychain {/,/^\t}$/d' \
      "$PKG/cmd/containerd-stargz-grpc/main.go"
    ! grep -q 'dockerconfig\.\|kubeconfig\.\|crialpha\.' "$PKG/cmd/containerd-stargz-grpc/main.go" \
      || die "patching the keychains out of containerd-stargz-grpc failed (upstream changed?)"
    log "building containerd-stargz-grpc with $("$GOROOT/bin/go" version 2>/dev/null) (GOPATH mode, offline)"
    mkdir -p "$WORK/home" "$WORK/gocache"
    (cd "$PKG/cmd/containerd-stargz-grpc" && env -i PATH="$GOROOT/bin:/usr/bin:/bin" HOME="$WORK/home" \
        GOROOT="$GOROOT" GOPATH="$G/usr/share/gocode" GO111MODULE=off GOTOOLCHAIN=local GOPROXY=off \
        GOFLAGS= CGO_ENABLED=0 GOCACHE="$WORK/gocache" \
        go build -trimpath -o "$WORK/out/bin/containerd-stargz-grpc" .) >>"$LOG" 2>&1 \
      || { tail -n 40 "$LOG" >&2; die "go build containerd-stargz-grpc failed"; }
    INFO+=("package: stargz-snapshotter $v ($SUITE; ctr-remote extracted)")
    INFO+=("built: containerd-stargz-grpc from $(basename "$tarball") + ${#godev[@]} golang-*-dev packages, $("$GOROOT/bin/go" version)")
    ;;
esac

for t in "${TOOLS[@]}"; do
  "$WORK/out/bin/$t" --version >>"$LOG" 2>&1 || "$WORK/out/bin/$t" -version >>"$LOG" 2>&1 \
    || "$WORK/out/bin/$t" --help >>"$LOG" 2>&1 || die "$t does not run on this host"
done
{
  printf '%s\n' "${INFO[@]}"
  echo "mirror: $MIRROR"
  echo "built: $(date -u +%FT%TZ) in $((SECONDS - START))s"
  echo "recipe: $SCRIPT (sha256 prefix $HASH)"
} >"$WORK/out/BUILDINFO"
cp "$LOG" "$WORK/out/build.log"
mv -T "$WORK/out" "$OUT"
log "$COMPONENT installed into $OUT in $((SECONDS - START))s"
sed 's/^/  /' "$OUT/BUILDINFO" >&2
echo "$OUT/bin"
