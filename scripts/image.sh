#!/usr/bin/env bash
# Build Kasa's image with podman (`make image`), on a Debian bookworm base made here with mmdebstrap: no
# Docker Hub needed, only Debian's mirror and the package registries (PyPI, npm).
#   scripts/image.sh                    builds $KASA_IMAGE (default kasa:latest)
#   KASA_IMAGE_BASE=python:3.11-slim-bookworm scripts/image.sh    on the public Python image instead
# The base's tarball is cached in var/image/ (delete it to make a fresh one, e.g. for Debian's point releases).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${KASA_IMAGE:-kasa:latest}
BASE=${KASA_IMAGE_BASE:-localhost/kasa-base:bookworm}
CACHE=var/image
TARBALL=$CACHE/debian-bookworm-minbase.tar
MIRROR=${KASA_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${KASA_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}

for tool in podman mmdebstrap; do
  command -v "$tool" >/dev/null 2>&1 || { echo "$tool is missing: scripts/system-deps.sh --image (as root)" >&2; exit 1; }
done

if [ "$BASE" = localhost/kasa-base:bookworm ]; then
  mkdir -p "$CACHE"
  if [ ! -s "$TARBALL" ]; then
    echo "making the Debian bookworm base with mmdebstrap ($TARBALL)"
    # bookworm with its updates and security suites: the same Debian as the machines the tests run on.
    mmdebstrap --quiet --variant=minbase bookworm "$CACHE/making.tar" \
      "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" "deb $SECURITY bookworm-security main"
    mv "$CACHE/making.tar" "$TARBALL"
    podman rmi --force "$BASE" >/dev/null 2>&1 || true
  fi
  if ! podman image exists "$BASE"; then
    podman import --quiet "$TARBALL" "$BASE" >/dev/null
  fi
fi

ca_args=()
# A TLS-inspecting egress proxy (this machine's) signs registries' certificates with its own CA: the build stages
# that fetch from PyPI and npm get the host's bundle, mounted (never copied into a layer) at a path of their own.
if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
  ca_args=(-v /etc/ssl/certs/ca-certificates.crt:/run/kasa-build-ca.crt:ro --build-arg BUILD_CA_FILE=/run/kasa-build-ca.crt)
fi
started=$(date +%s)
# --isolation=chroot: the build's RUN steps work where podman cannot create a full container (no setrlimit).
podman build --isolation=chroot --network=host --pull=missing --layers \
  --build-arg PYTHON_IMAGE="$BASE" "${ca_args[@]}" -t "$IMAGE" -f Dockerfile .
took=$(( $(date +%s) - started ))
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "image $IMAGE on $BASE: $(( size / 1000000 )) MB, built in ${took} s"
