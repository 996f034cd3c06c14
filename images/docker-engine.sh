#!/usr/bin/env bash
# Make sure a Docker engine answers on this machine; install (apt, as root) and start one if not.
# Idempotent: does nothing when `docker info` already works. Used by `make images` and CI.
set -euo pipefail

if docker info >/dev/null 2>&1; then
  exit 0
fi
if ! command -v dockerd >/dev/null; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "no Docker engine here: install Docker (https://docs.docker.com/engine/install/) and start it" >&2
    exit 1
  fi
  echo "installing docker.io (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
fi
if [ "$(id -u)" != 0 ]; then
  echo "the Docker engine is not running and only root can start it: start it (systemctl start docker)" >&2
  exit 1
fi
log=${DOCKERD_LOG:-/var/log/dockerd.log}
echo "starting dockerd (log: $log)"
nohup dockerd >"$log" 2>&1 </dev/null &
for _ in $(seq 60); do
  if docker info >/dev/null 2>&1; then
    exit 0
  fi
  sleep 1
done
echo "dockerd did not answer within 60 s; see $log" >&2
exit 1
