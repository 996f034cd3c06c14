#!/usr/bin/env bash
# A Python base image made from Debian packages, for machines that cannot pull from an image
# registry but reach a Debian mirror. Usage: images/debian-base.sh [IMAGE]   (default below)
# Idempotent: when IMAGE already exists locally nothing is done (the tag is the cache key: bump it
# to rebuild). Needs root (debootstrap) and a running Docker engine.
set -euo pipefail

image=${1:-vlprep-base:bookworm-py3.11-debian}
suite=bookworm
packages=python3,python3-venv,ca-certificates,passwd

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "base image $image exists"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "debootstrap needs root: run as root or pass BASE=<an image you can pull>" >&2; exit 1; }
if ! command -v debootstrap >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

# the mirror apt uses on this machine (deb822 .sources or one-line .list), else Debian's CDN
mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)
fi
if [ -z "$mirror" ]; then
  mirror=$(grep -hsE "^deb +[^ ]+ +$suite " /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}' | head -n1 || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap $suite from $mirror -> $image"
debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
  || { tail -n 20 "$rootfs.log" >&2; exit 1; }
rm -f "$rootfs.log"
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
tar -C "$rootfs" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$image" >/dev/null
echo "built $image ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
