#!/usr/bin/env bash
# Installs only what `make demo` needs on a fresh Debian machine: fuse3 (fusermount3) and
# Python's numpy and safetensors (the demo's reader). Idempotent: nothing when present.
# The test suite's toolchain (torch venv, moto, SoftHSM, OpenBao, cargo-deb, ...) is
# scripts/install-test-deps.sh, which `make test` runs itself.
set -euo pipefail
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
if ! command -v fusermount3 >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends fuse3 >/dev/null
fi
if ! python3 -c "import numpy, safetensors" 2>/dev/null; then
  python3 -m pip install -q --disable-pip-version-check numpy safetensors 2>&1 \
    | grep -v "Running pip as the 'root' user" || true
fi
