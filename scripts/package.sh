#!/usr/bin/env bash
# Builds what sealfs installs from, from ONE release build of target/release/sealfs:
#   target/dist/            man pages + completions (`sealfs __generate`, from the clap
#                           definitions) and sealfs@.service with ExecStart=/usr/bin/sealfs
#   target/debian/*.deb     cargo deb --no-build (Cargo.toml [package.metadata.deb])
#   target/wheels/*.whl     maturin build (pyproject.toml, bindings = "bin")
# Needs cargo-deb and maturin (in target/pkg-tools): scripts/install-package-tools.sh (which
# `make deps` and `make package` run). Prints each step's seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "package.sh: $*" >&2; exit 1; }
step() { # step NAME CMD...: runs CMD, prints how long it took
  local name=$1 t0=$SECONDS; shift
  "$@" || fail "$name failed (exit $?)"
  echo "package.sh: $name: $((SECONDS - t0)) s"
}
cargo deb --version >/dev/null 2>&1 || fail "cargo-deb missing: run scripts/install-package-tools.sh"
[ -x target/pkg-tools/bin/maturin ] || fail "maturin missing in target/pkg-tools: run scripts/install-package-tools.sh"

step "release build" cargo build --release --locked --features tpm2 --bin sealfs

dist=target/dist
rm -rf "$dist"
mkdir -p "$dist"
step "man pages and completions" sh -c "target/release/sealfs __generate $dist >/dev/null"
for f in man/sealfs.1 man/sealfs-mount.1 completions/sealfs.bash completions/_sealfs completions/sealfs.fish; do
  [ -s "$dist/$f" ] || fail "$dist/$f was not generated"
done

# The repository's unit names /usr/local/bin/sealfs (a source install, tests/ops.rs); the
# package installs /usr/bin/sealfs and its man pages. Each rewrite must hit exactly once.
unit=$dist/sealfs@.service
sed -e 's|^ExecStart=/usr/local/bin/sealfs |ExecStart=/usr/bin/sealfs |' \
    -e 's|^Documentation=|Documentation=man:sealfs-mount(1) |' systemd/sealfs@.service >"$unit"
[ "$(grep -c '^ExecStart=/usr/bin/sealfs mount ' "$unit")" = 1 ] \
  || fail "systemd/sealfs@.service: ExecStart= no longer starts with /usr/local/bin/sealfs: update this rewrite"
[ "$(grep -c '^Documentation=man:sealfs-mount(1) ' "$unit")" = 1 ] \
  || fail "systemd/sealfs@.service: expected one Documentation= line"
! grep -q /usr/local "$unit" || fail "$unit still names /usr/local"

rm -rf target/debian
step "cargo deb" cargo deb --no-build --locked --strip --quiet
deb=$(ls target/debian/sealfs_*.deb) || fail "cargo deb wrote no package"

rm -rf target/wheels
step "maturin build" target/pkg-tools/bin/maturin build --release --locked --quiet --out target/wheels
wheel=$(ls target/wheels/sealfs-*.whl) || fail "maturin wrote no wheel"
# maturin reuses the compiled crates and only relinks the binary stripped (its own cargo unit,
# seconds), but leaves that copy at target/release/sealfs: put cargo's back (no rebuild).
cargo build --release --locked --features tpm2 --quiet --bin sealfs

echo "package.sh: $deb ($(du -h "$deb" | cut -f1)), $wheel ($(du -h "$wheel" | cut -f1))"
