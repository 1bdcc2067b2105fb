#!/usr/bin/env bash
# Install pinned Hyperledger Fabric binaries (peer, orderer, configtxgen, osnadmin, cryptogen),
# the chaincode-as-a-service builder (detect/build/release) and the sample core.yaml /
# orderer.yaml into a cache folder. Idempotent: a complete install is reused in milliseconds.
#
#   fabric_network/install.sh                  # prints the install folder on stdout
#   FABRIC_VERSION=v2.5.16 fabric_network/install.sh
#
# Source: the Go module proxy, by commit (`go install ...@<commit>`). Fabric's module path has no
# /v2 or /v3 suffix, so `@v3.1.5` is refused ("module path must match major version").
# CGO_ENABLED=0 (PKCS#11 is behind a build tag; nothing here needs cgo).
set -euo pipefail

FABRIC_VERSION="${FABRIC_VERSION:-v3.1.5}"
case "$FABRIC_VERSION" in
  v3.1.5)  COMMIT=86c1172bec37e6590c6b1ae6f847833df48d65fc ;;
  v2.5.16) COMMIT=f871cf92a026aba7b12e6f06d71ded3e6e659d71 ;;
  *) echo "install.sh: unknown FABRIC_VERSION '$FABRIC_VERSION' (pinned: v3.1.5, v2.5.16)" >&2; exit 2 ;;
esac

HOME_DIR="${CLINFED_FABRIC_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/clinfed/fabric/$FABRIC_VERSION}"
BIN="$HOME_DIR/bin"
CFG="$HOME_DIR/config"
BUILDER="$HOME_DIR/builders/ccaas/bin"
STAMP="$HOME_DIR/.installed-$COMMIT"  # written last: its presence means a complete install
TOOLS=(peer orderer configtxgen osnadmin cryptogen)

if [[ -f "$STAMP" ]]; then
  echo "$HOME_DIR"
  exit 0
fi

log() { echo "install.sh: $*" >&2; }
die() { log "$*"; exit 1; }
command -v go >/dev/null || die "'go' not found on PATH; Go >= 1.26.4 is needed to build Fabric $FABRIC_VERSION"
mkdir -p "$BIN" "$CFG" "$BUILDER"
export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -trimpath -buildvcs=false" GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"
start=$(date +%s)
# What `peer version` reports, as Fabric's Makefile sets it.
META=github.com/hyperledger/fabric/common/metadata
LDFLAGS="-X $META.Version=${FABRIC_VERSION#v} -X $META.CommitSHA=${COMMIT:0:7}"
work=$(mktemp -d "${TMPDIR:-/tmp}/clinfed-fabric-src.XXXXXX")
trap 'rm -rf "$work"' EXIT

pkgs=(); for t in "${TOOLS[@]}"; do pkgs+=("github.com/hyperledger/fabric/cmd/$t@$COMMIT"); done
log "go install ${TOOLS[*]} at $FABRIC_VERSION ($COMMIT) through $(go env GOPROXY)"
if ! GOBIN="$BIN" go install -ldflags "$LDFLAGS" "${pkgs[@]}" 2>"$work/err"; then
  cat "$work/err" >&2
  die "the Go module proxy did not serve github.com/hyperledger/fabric@$COMMIT (its answer is above); the Fabric network cannot be installed on this machine"
fi
cc=(); for t in detect build release; do cc+=("github.com/hyperledger/fabric/ccaas_builder/cmd/$t@$COMMIT"); done
GOBIN="$BUILDER" go install "${cc[@]}"
moddir=$(cd "$work" && go mod download -json "github.com/hyperledger/fabric@$COMMIT" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')

[[ -n "$moddir" && -f "$moddir/sampleconfig/core.yaml" ]] || die "sampleconfig/core.yaml not found (in '$moddir')"
install -m 0644 "$moddir/sampleconfig/core.yaml" "$moddir/sampleconfig/orderer.yaml" "$CFG/"
for t in "${TOOLS[@]}"; do [[ -x "$BIN/$t" ]] || die "$BIN/$t missing after the build"; done
for t in detect build release; do [[ -x "$BUILDER/$t" ]] || die "$BUILDER/$t missing after the build"; done
took=$(( $(date +%s) - start ))
echo "$FABRIC_VERSION $COMMIT built in ${took} s on $(date -u +%FT%TZ)" > "$STAMP"
log "done in ${took} s"
echo "$HOME_DIR"
