#!/usr/bin/env python3
"""Issue 22: the loaders inference servers use, reading through a sealfs mount.

  loaders.py gen OUT SEED          write model.safetensors (f32, f16, bf16, int8, a
                                   scalar-ish and an empty tensor) and model.tensors (the
                                   same state dict, tensorizer-serialized) under OUT
  loaders.py check MOUNTED SOURCE  load both with every loader from MOUNTED and SOURCE
                                   (the plaintext copy) and compare tensor by tensor

Loaders: safetensors (mmap `safe_open` and eager `load`), Run:ai Model Streamer
(`SafetensorsStreamer`), fastsafetensors (its CPU path, no GDS), tensorizer
(`TensorDeserializer` from a file path, verify_hash on). Each must give every tensor,
bit-identical, from the mount; each prints one `ok LOADER N tensors` line. Any difference
or exception exits 1.
"""

import os
import sys

import torch


def fail(msg):
    print(f"FAIL {msg}", file=sys.stderr)
    sys.exit(1)


def gen(out, seed):
    from safetensors.torch import save_file
    from tensorizer import TensorSerializer

    g = torch.Generator().manual_seed(int(seed))
    sd = {
        "embed.weight": torch.randn(512, 256, generator=g),
        "layers.0.attn.q.weight": torch.randn(256, 256, generator=g).to(torch.float16),
        "layers.0.attn.k.weight": torch.randn(256, 256, generator=g).to(torch.bfloat16),
        "layers.0.mlp.up.weight": torch.randint(-128, 127, (1024, 256), generator=g, dtype=torch.int8),
        "layers.0.norm.weight": torch.randn(256, generator=g),
        "lm_head.bias": torch.randn(1, generator=g),
        "empty": torch.zeros(0, 8),
    }
    os.makedirs(out, exist_ok=True)
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    s = TensorSerializer(os.path.join(out, "model.tensors"))
    s.write_state_dict(sd)
    s.close()


def raw(t):
    """The tensor's bytes (bit-identical, NaN payloads and -0.0 included)."""
    return t.contiguous().view(-1).view(torch.uint8) if t.numel() else t


def same(a, b, loader):
    if a.keys() != b.keys():
        fail(f"{loader}: tensor names differ: {sorted(a.keys() ^ b.keys())}")
    for k in a:
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(raw(x), raw(y)):
            fail(f"{loader}: tensor {k} differs ({x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)})")
    print(f"ok {loader} {len(a)} tensors", flush=True)


def st_mmap(d):
    from safetensors import safe_open

    with safe_open(os.path.join(d, "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}


def st_eager(d):
    from safetensors.torch import load

    with open(os.path.join(d, "model.safetensors"), "rb") as f:
        return load(f.read())


def runai(d):
    from runai_model_streamer import SafetensorsStreamer

    out = {}
    with SafetensorsStreamer() as s:
        s.stream_file(os.path.join(d, "model.safetensors"))
        for name, t in s.get_tensors():
            out[name] = t.clone()
    return out


def fastst(d):
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup

    path = os.path.join(d, "model.safetensors")
    loader = SafeTensorsFileLoader(SingleGroup(), "cpu", nogds=True, set_numa=False)
    try:
        loader.add_filenames({0: [path]})
        fb = loader.copy_files_to_device()
        try:
            return {k: fb.get_tensor(k).clone() for k in loader.get_keys()}
        finally:
            fb.close()
    finally:
        loader.close()


def tensorizer_load(d):
    from tensorizer import TensorDeserializer

    with TensorDeserializer(os.path.join(d, "model.tensors"), device="cpu", verify_hash=True) as t:
        return {k: v.clone() for k, v in t.items()}


def check(mounted, source):
    for name, load in [
        ("safetensors-mmap", st_mmap),
        ("safetensors-eager", st_eager),
        ("runai-model-streamer", runai),
        ("fastsafetensors", fastst),
        ("tensorizer", tensorizer_load),
    ]:
        try:
            got, want = load(mounted), load(source)
        except Exception as e:  # noqa: BLE001 - any loader failure is the test's failure
            fail(f"{name}: {type(e).__name__}: {e}")
        same(got, want, name)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "gen":
        gen(*args)
    elif cmd == "check":
        check(*args)
    else:
        fail(f"unknown command {cmd}")
