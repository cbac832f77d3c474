#!/usr/bin/env python3
"""Load time of transformers `from_pretrained` for a ~1 GB sharded model, one run:

  mount cold      a fresh `sealfs mount` of the sealed model (page cache dropped first)
  mount warm      the same mount again, right away (page cache)
  unseal->shm     `sealfs unseal` to /dev/shm (page cache dropped first), then the load
                  from /dev/shm: the decrypt-to-tmpfs baseline, with sealfs's own crypto
  disk cold       the plain files on the local disk (page cache dropped first)
  tmpfs           the plain files on /dev/shm: the ceiling

Each load is a fresh Python process (torch and transformers imported before the clock
starts). "load" is `AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16)`;
"touch" then reads one element of every 4 KiB page of every weight (transformers keeps
safetensors shards mapped, so pages not touched are never read); "total" is the setup
(mount until READY=1, or unseal) + load + touch. The touch also fingerprints the weights,
and every mode must give the same fingerprint.

Run as root (it writes /proc/sys/vm/drop_caches) with the test venv's python and a release
build:

  cargo build --release --bin sealfs
  target/pyenv/bin/python scripts/bench-load.py [--reps 3] [--kms] [--bin target/release/sealfs]

--kms wraps the DEKs under a KMS key on moto_server (127.0.0.1, started and stopped here;
boto3 from the system python3 creates the key) instead of a key file. The data stay on the
local disk (the local-directory store), and with --s3 ENDPOINT (an S3 server on 127.0.0.1,
e.g. the shared bench's s3s-fs-1m, `../shared/bench/servers.sh start`: http://127.0.0.1:9102,
credentials test/test) also in bucket `bench-load` there, which adds the rows
"S3 mount cold", "S3 mount warm" and "S3 unseal->shm" (the decrypt-to-tmpfs baseline from
the same server). The model and its sealed copy are
made once under target/bench-load/ and reused.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "target", "bench-load")
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


# --- the child: one load in a fresh process ---------------------------------------------

def child(path):
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, local_files_only=True)
    t1 = time.perf_counter()
    fp = 0.0
    with torch.no_grad():
        for p in model.parameters():
            flat = p.detach().reshape(-1)
            step = max(1, 4096 // flat.element_size())
            fp += flat[::step].float().sum().item()
    t2 = time.perf_counter()
    print(json.dumps({"load": t1 - t0, "touch": t2 - t1, "fingerprint": fp}))


# --- the parent --------------------------------------------------------------------------

def run(cmd, env=None, **kw):
    return subprocess.run(cmd, check=True, env=env, **kw)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def gen_model(out):
    """A Llama with 8 layers, hidden 2048 (TinyLlama's widths): 492 M params, 984 MB bf16,
    saved in 200 MB shards."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                      num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4,
                      max_position_embeddings=2048, dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02))
    model.save_pretrained(out, max_shard_size="200MB")


def env_for(kms_port):
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root")}
    if kms_port:
        env.update({
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{kms_port}",
            "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        })
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    def __init__(self):
        self.port = free_port()
        self.log = open(os.path.join(WORK, "moto.log"), "w")
        self.proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=self.log)
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit("moto_server exited; see target/bench-load/moto.log")
                time.sleep(0.1)
        else:
            raise SystemExit("moto_server not ready after 60 s")
        out = subprocess.run(
            ["python3", "-c",
             "import boto3; k = boto3.client('kms', endpoint_url='http://127.0.0.1:%d', "
             "region_name='us-east-1', aws_access_key_id='test', aws_secret_access_key='test'); "
             "print(k.create_key()['KeyMetadata']['KeyId'])" % self.port],
            check=True, capture_output=True, text=True)
        self.key = "kms:" + out.stdout.strip()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Mount:
    """`sealfs mount --foreground`, ready on READY=1 at our $NOTIFY_SOCKET; stopped by PID."""

    def __init__(self, binary, sealed, mnt, key, env):
        self.mnt = mnt
        sock_path = os.path.join(tempfile.mkdtemp(dir=WORK), "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(sock_path)
        sock.settimeout(0.2)
        self.log = open(os.path.join(WORK, "mount.log"), "a")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [binary, "mount", "--foreground", sealed, mnt, "--key", key],
            env={**env, "NOTIFY_SOCKET": sock_path, "RUST_LOG": "sealfs=warn"},
            stdout=subprocess.DEVNULL, stderr=self.log)
        try:
            while True:
                try:
                    if b"READY=1" in sock.recv(256):
                        break
                except socket.timeout:
                    pass
                if self.proc.poll() is not None:
                    raise SystemExit("mount exited before READY=1; see target/bench-load/mount.log")
                if time.perf_counter() - t0 > 60:
                    raise SystemExit("mount not ready after 60 s")
        except BaseException:
            self.stop()
            raise
        finally:
            sock.close()
            os.unlink(sock_path)
            os.rmdir(os.path.dirname(sock_path))
        self.ready_s = time.perf_counter() - t0

    def cpu_s(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", self.mnt])
        self.log.close()


def load(path):
    out = run([sys.executable, os.path.abspath(__file__), "--child", path],
              env={**env_for(None), **CHILD_ENV}, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kms", action="store_true")
    ap.add_argument("--s3", help="an S3 endpoint on 127.0.0.1 (e.g. http://127.0.0.1:9102)")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "sealfs"))
    a = ap.parse_args()
    if a.child:
        return child(a.child)

    binary = os.path.abspath(a.bin)
    os.makedirs(WORK, exist_ok=True)
    plain = os.path.join(WORK, "model")
    if not os.path.exists(os.path.join(plain, "model.safetensors.index.json")):
        t = time.perf_counter()
        gen_model(plain)
        print(f"generated {plain} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    size = sum(os.path.getsize(os.path.join(plain, f)) for f in os.listdir(plain))
    shards = len([f for f in os.listdir(plain) if f.endswith(".safetensors")])

    moto = Moto() if a.kms else None
    shm = tempfile.mkdtemp(prefix="sealfs-bench-", dir="/dev/shm")
    mnt = tempfile.mkdtemp(prefix="mnt-", dir=WORK)
    mounts = []
    try:
        env = env_for(moto.port if moto else None)
        s3_env = None
        if a.s3:
            s3_env = {**env, "AWS_ENDPOINT_URL_S3": a.s3, "AWS_ACCESS_KEY_ID": "test",
                      "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                      "AWS_EC2_METADATA_DISABLED": "true"}
            run(["python3", "-c",
                 "import boto3\ns3 = boto3.client('s3', endpoint_url=%r, region_name='us-east-1', "
                 "aws_access_key_id='test', aws_secret_access_key='test')\n"
                 "try:\n  s3.create_bucket(Bucket='bench-load')\n"
                 "except (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):\n  pass" % a.s3])
        if moto:
            key = moto.key
        else:
            key = "file:" + os.path.join(WORK, "k")
            if not os.path.exists(key[5:]):
                run([binary, "keygen", key[5:]], stdout=subprocess.DEVNULL)
        sealed = os.path.join(WORK, "sealed-kms" if moto else "sealed-file")
        t = time.perf_counter()
        run([binary, "seal", plain, sealed, "--key", key, "--force"], env=env,
            stdout=subprocess.DEVNULL)
        seal_s = time.perf_counter() - t
        s3_uri = "s3://bench-load/model"
        if s3_env:
            run([binary, "seal", plain, s3_uri, "--key", key, "--force"], env=s3_env,
                stdout=subprocess.DEVNULL)
        shutil.copytree(plain, os.path.join(shm, "plain"))

        names = ["mount cold", "mount warm", "unseal->shm", "disk cold", "tmpfs"]
        if s3_env:
            names = ["S3 mount cold", "S3 mount warm", "S3 unseal->shm"] + names
        rows = {m: [] for m in names}
        for rep in range(a.reps):
            # tmpfs: the ceiling (RAM; nothing to drop)
            rows["tmpfs"].append({"setup": 0.0, **load(os.path.join(shm, "plain"))})
            # disk cold
            drop_caches()
            rows["disk cold"].append({"setup": 0.0, **load(plain)})
            def mounted_and_unsealed(uri, env_, prefix):
                """Mount cold, then warm on that mount; then unseal to /dev/shm and load."""
                drop_caches()
                m = Mount(binary, uri, mnt, key, env_)
                mounts.append(m)
                r = load(mnt)
                r.update(setup=m.ready_s, daemon_cpu=m.cpu_s())
                rows[prefix + "mount cold"].append(r)
                r = load(mnt)
                r.update(setup=0.0, daemon_cpu=m.cpu_s() - rows[prefix + "mount cold"][-1]["daemon_cpu"])
                rows[prefix + "mount warm"].append(r)
                m.stop()
                mounts.remove(m)
                dest = os.path.join(shm, "unsealed")
                drop_caches()
                t = time.perf_counter()
                run([binary, "unseal", uri, dest, "--key", key], env=env_, stdout=subprocess.DEVNULL)
                rows[prefix + "unseal->shm"].append({"setup": time.perf_counter() - t, **load(dest)})
                shutil.rmtree(dest)

            # S3 (the server's page cache is dropped too: same machine), then the local store
            if s3_env:
                mounted_and_unsealed(s3_uri, s3_env, "S3 ")
            mounted_and_unsealed(sealed, env, "")
            print(f"rep {rep + 1}/{a.reps} done", file=sys.stderr)
    finally:
        for m in mounts:
            m.stop()
        if moto:
            moto.stop()
        shutil.rmtree(shm, ignore_errors=True)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt])
        os.rmdir(mnt)

    fps = {round(r["fingerprint"], 3) for rs in rows.values() for r in rs}
    if len(fps) != 1:
        raise SystemExit(f"BYTES DIFFER: fingerprints {fps}")
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    key_kind = "KMS key on moto" if moto else "key file"
    print(f"\nmodel: {size / 1e6:.0f} MB in {shards} safetensors shards; sealed with a {key_kind} "
          f"(1 MiB chunks) in {seal_s:.1f} s; {a.reps} reps, medians; every mode read the same "
          f"weights (fingerprint {fps.pop():.3f})\n")
    print("| source | setup s | from_pretrained s | touch every page s | total s | MB/s (total) | daemon CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rs in rows.items():
        tot = statistics.median(r["setup"] + r["load"] + r["touch"] for r in rs)
        cpu = f"{med(rs, 'daemon_cpu'):.2f}" if "daemon_cpu" in rs[0] else "—"
        print(f"| {name} | {med(rs, 'setup'):.2f} | {med(rs, 'load'):.2f} | {med(rs, 'touch'):.2f} "
              f"| **{tot:.2f}** | {size / tot / 1e6:,.0f} | {cpu} |")
    with open(os.path.join(WORK, "results.json"), "w") as f:
        json.dump({"size": size, "shards": shards, "kms": bool(moto), "seal_s": seal_s,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
