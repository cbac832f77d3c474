#!/usr/bin/env python3
"""Real Python readers over a sealfs mount, compared with the source files.

  readers.py gen-safetensors OUT            write a llama-shaped safetensors file (seeded)
  readers.py safetensors MOUNTED SOURCE     safe_open(framework="numpy") (mmap): every tensor equal
  readers.py memmap MOUNTED SOURCE          np.memmap: 200 random pages, then the whole file, equal
  readers.py sha256 FILE                    print the sha256 of FILE (used by multi-process tests)

torch.load and from_pretrained are checked by frameworks.py (tests/frameworks.rs), which runs
with the venv that scripts/install-test-deps.sh creates.
"""
import hashlib
import sys

import numpy as np


def gen_safetensors(out):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1234)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((512, 256)).astype(np.float16)}
    for i in range(6):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = rng.standard_normal((256, 256)).astype(np.float16)
        tensors[p + "mlp.up_proj.weight"] = rng.standard_normal((688, 256)).astype(np.float16)
        tensors[p + "input_layernorm.weight"] = rng.standard_normal((256,)).astype(np.float32)
    save_file(tensors, out, metadata={"format": "np"})


def check_safetensors(mounted, source):
    from safetensors import safe_open

    n = 0
    with safe_open(mounted, framework="numpy") as m, safe_open(source, framework="numpy") as s:
        assert sorted(m.keys()) == sorted(s.keys()), "tensor names differ"
        for k in s.keys():
            a, b = m.get_tensor(k), s.get_tensor(k)
            assert a.dtype == b.dtype and a.shape == b.shape, k
            assert np.array_equal(a, b), f"tensor {k} differs"
            n += 1
    print(f"safetensors: {n} tensors equal")


def check_memmap(mounted, source):
    m = np.memmap(mounted, dtype=np.uint8, mode="r")
    s = np.memmap(source, dtype=np.uint8, mode="r")
    assert m.shape == s.shape, (m.shape, s.shape)
    rng = np.random.default_rng(7)
    for off in rng.integers(0, max(1, len(s) - 4096), size=200):
        assert np.array_equal(m[off:off + 4096], s[off:off + 4096]), f"page at {off} differs"
    assert hashlib.sha256(m).hexdigest() == hashlib.sha256(s).hexdigest(), "whole file differs"
    print(f"memmap: {len(s)} bytes equal")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    print(h.hexdigest())


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {
        "gen-safetensors": gen_safetensors,
        "safetensors": check_safetensors,
        "memmap": check_memmap,
        "sha256": sha256,
    }[cmd](*args)
