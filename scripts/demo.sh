#!/usr/bin/env bash
# The main job on the embedded default (a local directory store and a local key file):
# make a sample model, seal it, mount it, read it back through Python, unmount.
set -euo pipefail
cd "$(dirname "$0")/.."
# Only what the demo needs (fuse3, numpy, safetensors): seconds, not the test toolchain.
scripts/install-demo-deps.sh
cargo build --quiet --bin sealfs
SEALFS="$PWD/target/debug/sealfs"
work=$(mktemp -d /tmp/sealfs-demo.XXXXXX)
mnt="$work/mnt"
cleanup() {
  if grep -q " $mnt " /proc/mounts 2>/dev/null; then fusermount3 -u "$mnt" || fusermount3 -u -z "$mnt"; fi
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/model" "$mnt"

echo "== 1. a sample model (safetensors, 12 tensors) and a config"
python3 tests/python/readers.py gen-safetensors "$work/model/model.safetensors"
echo '{"architectures": ["LlamaForCausalLM"], "hidden_size": 256}' > "$work/model/config.json"

echo "== 2. a local key file (mode 0600) and sealing into a local directory store"
"$SEALFS" keygen "$work/kek"
"$SEALFS" seal "$work/model" "$work/sealed" --key "file:$work/kek" --context model=demo
ls -l "$work/sealed"
"$SEALFS" inspect "$work/sealed/model.safetensors"

echo "== 3. mount (the command returns once the mount answers)"
"$SEALFS" mount "$work/sealed" "$mnt" --key "file:$work/kek" --cache-size 64MiB
ls -l "$mnt"

echo "== 4. read it back through Python: safetensors (mmap) and a byte compare"
python3 tests/python/readers.py safetensors "$mnt/model.safetensors" "$work/model/model.safetensors"
python3 - "$mnt" "$work/model" <<'PY'
import hashlib, sys
for name in ("model.safetensors", "config.json"):
    a = hashlib.sha256(open(f"{sys.argv[1]}/{name}", "rb").read()).hexdigest()
    b = hashlib.sha256(open(f"{sys.argv[2]}/{name}", "rb").read()).hexdigest()
    assert a == b, name
    print(f"{name}: sha256 {a[:16]}… matches the original")
PY

echo "== 5. unmount"
fusermount3 -u "$mnt"
echo "demo: OK"
