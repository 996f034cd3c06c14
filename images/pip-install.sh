#!/bin/sh
# pip install inside an image build. The optional BuildKit secret "pipca" is a CA bundle for pip
# (a proxy that re-signs TLS); it is mounted for one RUN and never stored in a layer.
set -e
if [ -f /run/secrets/pipca ]; then
  export PIP_CERT=/run/secrets/pipca
fi
exec pip install --no-cache-dir "$@"
