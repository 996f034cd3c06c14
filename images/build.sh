#!/usr/bin/env bash
# Build stage images from images/Dockerfile: images/build.sh REGISTRY TAG STAGE... (`make images`
# names them all). Environment:
#   BASE    base image (default python:3.11-slim-bookworm; when that cannot be found or pulled, a
#           base made from Debian packages by images/debian-base.sh; BASE=debian asks for that one)
#   PIP_CA  CA bundle handed to pip as a BuildKit secret (default: the system bundle when present;
#           empty: none)
#   FAISS   pip requirement replacing faiss-cpu in the torch images (see images/Dockerfile)
#   IMAGE_SOURCE  the org.opencontainers.image.source label
# Starts the Docker engine when it is not running (images/docker-engine.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: images/build.sh REGISTRY TAG STAGE..."
registry=${1:?$usage}
tag=${2:?$usage}
shift 2
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }
stages=("$@")
default_base=python:3.11-slim-bookworm
debian_base=vlprep-base:bookworm-py3.11-debian

bash images/docker-engine.sh

base=${BASE:-$default_base}
if [ "$base" = debian ]; then
  base=$debian_base
fi
if [ "$base" = "$debian_base" ]; then
  bash images/debian-base.sh "$base"
elif ! docker image inspect "$base" >/dev/null 2>&1 && ! docker pull -q "$base" >/dev/null 2>&1; then
  if [ -n "${BASE:-}" ]; then
    echo "base image $base: not found locally and cannot be pulled" >&2
    exit 1
  fi
  echo "cannot pull $base (no image registry reachable?): using a base made from Debian packages"
  base=$debian_base
  bash images/debian-base.sh "$base"
fi

# a client that builds with BuildKit: the buildx plugin, or an older client with BuildKit built in
build=()
for client in docker /usr/bin/docker; do
  command -v "$client" >/dev/null || continue
  if "$client" buildx version >/dev/null 2>&1; then
    build=("$client" buildx build --load)
    break
  fi
  major=$("$client" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1 || true)
  if [ -n "$major" ] && [ "$major" -lt 23 ]; then
    build=(env DOCKER_BUILDKIT=1 "$client" build)
    break
  fi
done
if [ ${#build[@]} = 0 ]; then
  echo "no Docker client that builds with BuildKit: install the buildx plugin" >&2
  exit 1
fi

pip_ca=${PIP_CA-}
if [ -z "${PIP_CA+set}" ] && [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  pip_ca=/etc/ssl/certs/ca-certificates.crt
fi
secret=()
[ -z "$pip_ca" ] || secret=(--secret "id=pipca,src=$pip_ca")

version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n1)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ "$revision" != unknown ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  revision="$revision-dirty"
fi
source_url=${IMAGE_SOURCE:-https://github.com/vlprep/vlprep}

summary=()
for stage in "${stages[@]}"; do
  image="$registry/vlprep-$stage:$tag"
  echo "== $image (base $base)"
  start=$(date +%s)
  "${build[@]}" -f images/Dockerfile --target "$stage" -t "$image" \
    --build-arg "BASE=$base" --build-arg "FAISS=${FAISS:-}" "${secret[@]}" \
    --label "org.opencontainers.image.title=vlprep-$stage" \
    --label "org.opencontainers.image.source=$source_url" \
    --label "org.opencontainers.image.revision=$revision" \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.base.name=$base" \
    .
  size=$(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}')
  summary+=("$image  $size  built in $(( $(date +%s) - start )) s")
done
# the images these tags replaced (same labels, now untagged): their layers are shared, their tops are not
docker image prune -f --filter "label=org.opencontainers.image.source=$source_url" >/dev/null
printf '%s\n' "${summary[@]}"
