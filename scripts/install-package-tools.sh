#!/usr/bin/env bash
# Installs what scripts/package.sh needs (idempotent; seconds when already there):
#   cargo-deb  (crates.io, `cargo install`: ~2 min of compiling on 2 cores, once per machine)
#   maturin    (PyPI, into the venv target/pkg-tools, so no system Python is touched: ~20 s)
#   apt: binutils (strip, for cargo-deb), dpkg-dev (dpkg-shlibdeps: the package's Depends), patchelf,
#        python3-venv where python3 is Debian's and lacks ensurepip.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
need=()
command -v strip >/dev/null || need+=(binutils)
command -v dpkg-shlibdeps >/dev/null || need+=(dpkg-dev)
# patchelf: maturin copies the TSS libraries (feature tpm2) into the wheel and repoints them.
command -v patchelf >/dev/null || need+=(patchelf)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# cargo-deb 3: `cargo deb --no-build` with the [package.metadata.deb] of Cargo.toml.
if ! cargo deb --version >/dev/null 2>&1; then
  cargo install --locked --quiet cargo-deb --version "^3.8"
fi
if [ ! -x target/pkg-tools/bin/maturin ]; then
  rm -rf target/pkg-tools
  python3 -m venv target/pkg-tools
  target/pkg-tools/bin/pip install -q --disable-pip-version-check "maturin>=1.9,<2"
fi
