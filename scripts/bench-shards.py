#!/usr/bin/env python3
"""A sharded model (8 shards, 2 GiB) read shard after shard and by 8 concurrent readers, through
sealfs, Mountpoint for S3 and raw ranged GETs of the same bytes, in one run (issue 14, item 4).

    python3 scripts/bench-shards.py [--reps 3] [--shard-mib 256] [--out /tmp/NAME]   (root)

Uses the peer harness (../shared/bench: bin/s3s-fs-1m, bin/mps3, bin/s3bench, servers.sh, and
its lib/mp_vs_sealfs.py helpers); data and server roots stay there, never in the project.
Per repetition and reader, each mode on a fresh mount after drop_caches:
  seq  one reader: for each shard, open + 4 KiB read (that shard's TTFB), then the rest, 1 MiB reads
  par  8 threads, one shard each, started together (each its own TTFB)
Raw: `s3bench get` per shard (8 MiB parts, 16 in flight) one after another; for par, 8 processes
at once with 2 in flight each (16 streams in all, as in seq). Daemon CPU is utime+stime of the
mount process over the mode; peak RSS is its VmHWM after the mode (a fresh mount per mode).
"""
import argparse, json, os, statistics, subprocess, sys, threading, time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.abspath(os.environ.get("SHARED_BENCH", os.path.join(HERE, "..", "..", "shared", "bench")))
sys.path.insert(0, os.path.join(BENCH, "lib"))
import mp_vs_sealfs as h  # noqa: E402  (servers, mounts, CPU and RSS probes)

SHARDS = 8
CACHE = "256MiB"


def read_shard(path, out, i):
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        first = os.read(fd, 4096)
        t1 = time.perf_counter()
        n = len(first)
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            n += len(b)
    finally:
        os.close(fd)
    out[i] = {"ttfb_ms": round((t1 - t0) * 1e3, 2), "bytes": n, "secs": time.perf_counter() - t0}


def mount_mode(name, cmd, mnt, names, mode):
    with h.Mount(name, cmd, mnt) as m:
        pid = m.proc.pid
        h.drop_caches()
        c0, t0 = h.cpu_s(pid), time.perf_counter()
        res = [None] * len(names)
        if mode == "seq":
            for i, n in enumerate(names):
                read_shard(os.path.join(mnt, n), res, i)
        else:
            ts = [threading.Thread(target=read_shard, args=(os.path.join(mnt, n), res, i)) for i, n in enumerate(names)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        wall = time.perf_counter() - t0
        return {"mbps": round(sum(r["bytes"] for r in res) / wall / 1e6, 1), "secs": round(wall, 3),
                "ttfb_ms": [r["ttfb_ms"] for r in res], "bytes": sum(r["bytes"] for r in res),
                "daemon_cpu_s": round(h.cpu_s(pid) - c0, 3), "peak_rss_mib": round(h.vmhwm_mib(pid), 1)}


def raw_mode(keys, mode):
    s3b = os.path.join(h.BIN, "s3bench")
    cmd = lambda k, conc: [s3b, "get", "--endpoint", h.S3, "--bucket", h.BUCKET, "--key", k,
                           "--part-mib", "8", "--conc", str(conc)]
    h.drop_caches()
    t0 = time.perf_counter()
    if mode == "seq":
        outs = [subprocess.run(cmd(k, 16), capture_output=True, text=True, env=h.ENV, check=True).stdout for k in keys]
    else:
        ps = [subprocess.Popen(cmd(k, 2), stdout=subprocess.PIPE, text=True, env=h.ENV) for k in keys]
        outs = [p.communicate()[0] for p in ps]
    wall = time.perf_counter() - t0
    js = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    return {"mbps": round(sum(j["bytes"] for j in js) / wall / 1e6, 1), "secs": round(wall, 3),
            "ttfb_ms": [j["ttfb_ms"] for j in js], "bytes": sum(j["bytes"] for j in js)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shard-mib", type=int, default=256)
    ap.add_argument("--sealfs", default=os.path.join(HERE, "..", "target", "release", "sealfs"))
    ap.add_argument("--out", default=None, help="write NAME.json and NAME.md")
    ap.add_argument("--endpoint", default=None,
                    help="another S3 server on the same root (e.g. one that sets TCP_NODELAY, as S3 does)")
    a = ap.parse_args()
    if a.endpoint:
        h.S3 = a.endpoint
        h.ENV["AWS_ENDPOINT_URL_S3"] = a.endpoint
    sealfs = os.path.abspath(a.sealfs)
    started = "s3s-fs-1m up" not in h.sh(["bash", os.path.join(BENCH, "servers.sh"), "status"]).stdout
    if started:
        h.sh(["bash", os.path.join(BENCH, "servers.sh"), "start"])
    mp_mnt, sf_mnt = os.path.join(h.RUN, "mnt-shards-mps3"), os.path.join(h.RUN, "mnt-shards-sealfs")
    try:
        src = os.path.join(h.RUN, "shards-src")
        names = [f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors" for i in range(SHARDS)]
        size = a.shard_mib << 20
        os.makedirs(src, exist_ok=True)
        for n in names:
            p = os.path.join(src, n)
            if not (os.path.exists(p) and os.path.getsize(p) == size):
                with open(p, "wb") as f:
                    for _ in range(a.shard_mib):
                        f.write(os.urandom(1 << 20))
        import boto3
        key = boto3.client("kms", endpoint_url=h.KMS, region_name="us-east-1").create_key()["KeyMetadata"]["KeyId"]
        s3b = os.path.join(h.BIN, "s3bench")
        subprocess.run([s3b, "mb", "--endpoint", h.S3, "--bucket", h.BUCKET], capture_output=True, env=h.ENV)
        for n in names:
            h.sh([s3b, "put", "--endpoint", h.S3, "--bucket", h.BUCKET, "--key", f"shards-plain/{n}",
                  "--file", os.path.join(src, n)])
        h.sh([sealfs, "seal", src, f"s3://{h.BUCKET}/shards-sealed", "--key", f"kms:{key}", "--force"])
        mp = [os.path.join(h.BIN, "mps3"), f"s3://{h.BUCKET}/shards-plain/", mp_mnt, "--endpoint-url", h.S3,
              "--force-path-style", "--region", "us-east-1"]
        sf = [sealfs, "mount", f"s3://{h.BUCKET}/shards-sealed", sf_mnt, "--key", f"kms:{key}",
              "--cache-size", CACHE, "--foreground"]
        readers = {"raw": None, "mountpoint": mp, "sealfs": sf, "sealfs --unwrap-ahead 8": sf + ["--unwrap-ahead", "8"]}
        reps = []
        for r in range(a.reps):
            rep = {}
            for reader, cmd in readers.items():
                for mode in ("seq", "par"):
                    if cmd is None:
                        x = raw_mode([f"shards-plain/{n}" for n in names], mode)
                    else:
                        mnt = mp_mnt if reader == "mountpoint" else sf_mnt
                        x = mount_mode(reader.split()[0], cmd, mnt, names, mode)
                    if x["bytes"] != SHARDS * size:
                        raise RuntimeError(f"{reader} {mode}: read {x['bytes']} bytes")
                    rep[f"{reader} {mode}"] = x
                    h.log(f"rep {r + 1} {reader} {mode}: {x['mbps']} MB/s, TTFB median "
                          f"{statistics.median(x['ttfb_ms'])} ms, CPU {x.get('daemon_cpu_s', '-')} s, "
                          f"RSS {x.get('peak_rss_mib', '-')} MiB")
            reps.append(rep)
        rows = ["| reader | mode | aggregate MB/s | TTFB ms per shard (median, max) | daemon CPU s | peak RSS MiB |",
                "|---|---|---:|---:|---:|---:|"]
        for k in reps[0]:
            med = lambda f: statistics.median(f(rep[k]) for rep in reps)
            reader, mode = k.rsplit(" ", 1)
            cpu = med(lambda x: x["daemon_cpu_s"]) if "daemon_cpu_s" in reps[0][k] else None
            rss = med(lambda x: x["peak_rss_mib"]) if "peak_rss_mib" in reps[0][k] else None
            rows.append(f"| {reader} | {'shard after shard' if mode == 'seq' else '8 concurrent'} | "
                        f"{med(lambda x: x['mbps']):,.0f} | {med(lambda x: statistics.median(x['ttfb_ms'])):.1f}, "
                        f"{med(lambda x: max(x['ttfb_ms'])):.1f} | {'—' if cpu is None else f'{cpu:.2f}'} | "
                        f"{'—' if rss is None else f'{rss:.0f}'} |")
        table = "\n".join(rows)
        print(table)
        print(f"(medians of {a.reps}; {SHARDS} shards of {a.shard_mib} MiB; sealfs --cache-size {CACHE})")
        if a.out:
            with open(a.out + ".json", "w") as f:
                json.dump({"reps": reps, "commands": {"mountpoint": mp, "sealfs": sf}}, f, indent=1)
            with open(a.out + ".md", "w") as f:
                f.write(table + "\n")
    finally:
        for mnt in (mp_mnt, sf_mnt):
            if os.path.isdir(mnt) and h.mounted_in(mnt):
                subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        if started:
            subprocess.run(["bash", os.path.join(BENCH, "servers.sh"), "stop"], capture_output=True)


if __name__ == "__main__":
    main()
