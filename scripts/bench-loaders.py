#!/usr/bin/env python3
"""Issue 22: the loaders inference servers use, loading the same ~1 GiB of weights from a
sealfs mount and from plaintext copies, side by side in one run, medians of --reps.

Loaders (as tests/python/loaders.py runs them): safetensors mmap (`safe_open`, every
tensor read), safetensors eager (`load(f.read())`), Run:ai Model Streamer
(`SafetensorsStreamer`), fastsafetensors (CPU path, no GDS) and tensorizer
(`TensorDeserializer` from a path; its own file of the same tensors).

Sources, each load a fresh Python process (torch and the loader imported before the clock):
  disk          the plaintext files on this machine's disk, page cache dropped
  tmpfs         the plaintext files on /dev/shm (the ceiling)
  mount cold    a new `sealfs mount` of the sealed files in S3 (the shared bench's
                s3s-fs-1m on 127.0.0.1:9102), no cache dir, page cache dropped
  mount DIR     a new daemon with `--cache-dir` already holding every chunk (`sealfs cache
                warm`), page cache dropped: a host's restart
  mount warm    the same daemon again at once (the kernel's page cache)
  runai S3      Run:ai's own S3 backend (`runai-model-streamer-s3`) reading the plaintext
                object from the same server, page cache dropped: the anchor
"load" is the loader's call plus a touch of one byte per 4 KiB page of every tensor (so an
mmap loader reads what it maps); every source must give the same fingerprint.

Run as root (drop_caches, mount) with the test venv and a release build:
  cargo build --release --bin sealfs
  ../shared/bench/servers.sh start
  target/pyenv/bin/pip install runai-model-streamer-s3==0.17.1   # the S3 anchor only
  target/pyenv/bin/python scripts/bench-loaders.py [--reps 3] [--bin target/release/sealfs]
Writes target/bench-loaders/result.json and prints the table (markdown).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "target", "bench-loaders")
S3 = "http://127.0.0.1:9102"
BUCKET = "bench-loaders"
ENV = dict(os.environ)
for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE"):
    ENV.pop(k, None)
ENV.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_REGION="us-east-1",
           AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
           AWS_ENDPOINT_URL_S3=S3, AWS_ENDPOINT_URL=S3, RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING="0")
LOADERS = ["safetensors-mmap", "safetensors-eager", "runai-model-streamer", "fastsafetensors", "tensorizer"]
TENSORS, SHAPE = 32, (4096, 4096)  # bf16: 32 MiB each, 1 GiB in all


# --- the child: one load in a fresh process ----------------------------------------------

def child(loader, d):
    import torch

    def touch(ts):
        fp = 0
        for k in sorted(ts):
            t = ts[k]
            b = t.contiguous().view(-1).view(torch.uint8)
            fp = (fp * 1000003 + int(b[::4096].to(torch.int64).sum())) % (1 << 61)
        return fp

    st = os.path.join(d, "model.safetensors") if not d.startswith("s3://") else d + "/model.safetensors"
    if loader == "safetensors-mmap":
        from safetensors import safe_open
        t0 = time.perf_counter()
        with safe_open(st, framework="pt") as f:
            fp = touch({k: f.get_tensor(k) for k in f.keys()})
    elif loader == "safetensors-eager":
        from safetensors.torch import load
        t0 = time.perf_counter()
        with open(st, "rb") as f:
            fp = touch(load(f.read()))
    elif loader == "runai-model-streamer":
        from runai_model_streamer import SafetensorsStreamer
        t0 = time.perf_counter()
        out = {}
        with SafetensorsStreamer() as s:
            s.stream_file(st)
            for name, t in s.get_tensors():
                out[name] = t.clone()
        fp = touch(out)
    elif loader == "fastsafetensors":
        from fastsafetensors import SafeTensorsFileLoader, SingleGroup
        t0 = time.perf_counter()
        ld = SafeTensorsFileLoader(SingleGroup(), "cpu", nogds=True, set_numa=False)
        ld.add_filenames({0: [st]})
        fb = ld.copy_files_to_device()
        fp = touch({k: fb.get_tensor(k) for k in ld.get_keys()})
        fb.close()
        ld.close()
    elif loader == "tensorizer":
        from tensorizer import TensorDeserializer
        t0 = time.perf_counter()
        with TensorDeserializer(os.path.join(d, "model.tensors"), device="cpu") as t:
            fp = touch(dict(t.items()))
    else:
        sys.exit(f"unknown loader {loader}")
    print(json.dumps({"secs": time.perf_counter() - t0, "fp": fp}))


# --- the parent ------------------------------------------------------------------------

def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env=ENV, **kw)


def drop_caches():
    subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=True)


def gen(src):
    """model.safetensors and model.tensors of the same bf16 tensors, once."""
    if os.path.exists(os.path.join(src, "model.tensors")):
        return
    import torch
    from safetensors.torch import save_file
    from tensorizer import TensorSerializer
    os.makedirs(src, exist_ok=True)
    g = torch.Generator().manual_seed(22)
    sd = {f"layers.{i}.weight": torch.randn(*SHAPE, generator=g).to(torch.bfloat16) for i in range(TENSORS)}
    save_file(sd, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    s = TensorSerializer(os.path.join(src, "model.tensors"))
    s.write_state_dict(sd)
    s.close()


def mounted(mnt):
    with open("/proc/mounts") as f:
        return any(line.split()[1] == mnt for line in f)


class Mount:
    def __init__(self, binary, key, mnt, extra=()):
        self.cmd = [binary, "mount", f"s3://{BUCKET}/sealed", mnt, "--key", f"file:{key}", "--foreground",
                    "--cache-size", "256MiB", *extra]
        self.mnt = mnt

    def __enter__(self):
        os.makedirs(self.mnt, exist_ok=True)
        self.log = open(os.path.join(WORK, "daemon.log"), "a")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self.log, env=ENV)
        t = time.time()
        while not mounted(self.mnt):
            if self.proc.poll() is not None or time.time() - t > 60:
                raise RuntimeError(f"mount failed; see {WORK}/daemon.log")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            subprocess.run(["fusermount3", "-uz", self.mnt], capture_output=True)
        self.log.close()


def load(loader, path):
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", loader, path],
                       capture_output=True, text=True, env=ENV, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{loader} from {path} failed: {r.stderr[-800:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "sealfs"))
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    binary = os.path.abspath(a.bin)
    import boto3
    s3 = boto3.client("s3", endpoint_url=S3, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    try:
        s3.head_bucket(Bucket=BUCKET)
    except Exception:  # noqa: BLE001 - absent: made here
        s3.create_bucket(Bucket=BUCKET)
    src, key, mnt, cache = (os.path.join(WORK, n) for n in ("src", "k", "mnt", "cache"))
    shm = "/dev/shm/sealfs-bench-loaders"
    os.makedirs(WORK, exist_ok=True)
    gen(src)
    if not os.path.exists(key):
        run([binary, "keygen", key])
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="sealed/").get("KeyCount", 0)
    if not listed:
        run([binary, "seal", src, f"s3://{BUCKET}/sealed", "--key", f"file:{key}"])
    s3.upload_file(os.path.join(src, "model.safetensors"), BUCKET, "plain/model.safetensors")
    shutil.rmtree(shm, ignore_errors=True)
    shutil.copytree(src, shm)
    shutil.rmtree(cache, ignore_errors=True)
    os.makedirs(cache, mode=0o700)
    cache_args = ["--cache-dir", cache, "--cache-dir-size", "4GiB"]
    run([binary, "cache", "warm", f"s3://{BUCKET}/sealed", *cache_args])
    has_s3_anchor = subprocess.run([sys.executable, "-c", "import runai_model_streamer_s3"],
                                   capture_output=True).returncode == 0
    res = {}  # (loader, source) -> [secs]
    fps = {}

    def note(loader, source, r):
        res.setdefault(f"{loader}|{source}", []).append(r["secs"])
        fps.setdefault(loader, set()).add(r["fp"])
        log(f"  {loader:22} {source:12} {r['secs']:.2f} s")

    try:
        for rep in range(a.reps):
            log(f"rep {rep + 1}/{a.reps}")
            for loader in LOADERS:
                drop_caches()
                note(loader, "disk", load(loader, src))
                note(loader, "tmpfs", load(loader, shm))
                drop_caches()
                with Mount(binary, key, mnt):
                    note(loader, "mount cold", load(loader, mnt))
                drop_caches()
                with Mount(binary, key, mnt, cache_args):
                    note(loader, "mount DIR", load(loader, mnt))
                    note(loader, "mount warm", load(loader, mnt))
                if loader == "runai-model-streamer" and has_s3_anchor:
                    drop_caches()
                    note(loader, "runai S3", load(loader, f"s3://{BUCKET}/plain"))
    finally:
        if mounted(mnt):
            subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)
        shutil.rmtree(shm, ignore_errors=True)
    bad = {k: v for k, v in fps.items() if len(v) != 1}
    if bad:
        sys.exit(f"fingerprints differ between sources: {bad}")
    size = os.path.getsize(os.path.join(src, "model.safetensors")) / 1e9
    med = {k: statistics.median(v) for k, v in res.items()}
    json.dump({"reps": a.reps, "times": res, "medians": med, "model_gb": size,
               "date": time.strftime("%Y-%m-%d %H:%M"), "nproc": os.cpu_count()},
              open(os.path.join(WORK, "result.json"), "w"), indent=1)
    sources = ["disk", "tmpfs", "mount cold", "mount DIR", "mount warm", "runai S3"]
    print(f"| loader ({size:.2f} GB, median of {a.reps} s) | " + " | ".join(sources)
          + " | speed: mount DIR vs disk | mount warm vs tmpfs |")
    print("|---|" + "---:|" * (len(sources) + 2))
    for loader in LOADERS:
        cells = [f"{med[f'{loader}|{s}']:.2f}" if f"{loader}|{s}" in med else "—" for s in sources]
        r1 = med[f"{loader}|disk"] / med[f"{loader}|mount DIR"]
        r2 = med[f"{loader}|tmpfs"] / med[f"{loader}|mount warm"]
        print(f"| {loader} | " + " | ".join(cells) + f" | {r1:.2f}× | {r2:.2f}× |")


if __name__ == "__main__":
    main()
