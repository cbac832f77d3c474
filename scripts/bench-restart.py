#!/usr/bin/env python3
"""Issue 22: a host's restart from the local disk cache, side by side with Mountpoint for S3
reading plaintext from its own `--cache`, in one run on the shared bench's servers, medians
of --reps. Each read is `dd bs=1M` of a 1 GiB random file after drop_caches:

  disk plaintext       the plaintext file on this disk (`data/rand-1G.bin`): the disk's speed
  sealfs cold          a new `sealfs mount` of the sealed file on s3s-fs-1m, no cache dir
  sealfs cold + DIR    the same with an empty `--cache-dir` being filled behind the reads
                       (O_DIRECT writes; "buffered writes": SEALFS_CACHE_DIR_BUFFERED=1,
                       every entry through the page cache, as before)
  sealfs restart DIR   a new daemon, every chunk in DIR (the cold read's, completed by
                       `sealfs cache warm`), page cache dropped
  cat of DIR           the same sealed bytes read straight from DIR's entries: the physical
                       limit of a restart (a disk read, then a decrypt)
  Mountpoint cold      `mps3` of the plaintext object, no cache
  Mountpoint cold + cache    with `--cache MPDIR` (emptied first), filled by the read
  Mountpoint restart cache   a new `mps3` on the filled MPDIR, kept by
                       UNSTABLE_MOUNTPOINT_DISABLE_CACHE_CLEANUP=1 (it empties it otherwise)

The S3 server (s3s-fs-1m) keeps its objects on the same disk, so a cold read is a disk read
too. Run as root from the project, after `../shared/bench/setup.sh`:
  cargo build --release --bin sealfs
  python3 scripts/bench-restart.py [--reps 3] [--bench ../shared/bench] [--bin target/release/sealfs]
Writes target/bench-restart.json and prints the table (markdown).
"""
import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bench", default=os.path.join(ROOT, "..", "shared", "bench"))
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "sealfs"))
    a = ap.parse_args()
    binary = os.path.abspath(a.bin)
    sys.path.insert(0, os.path.join(os.path.abspath(a.bench), "lib"))
    import mp_vs_sealfs as mp  # the harness's servers, mounts, dd and CPU readings

    for b in ("s3bench", "mps3", "s3s-fs-1m"):
        if not os.access(os.path.join(mp.BIN, b), os.X_OK):
            sys.exit(f"missing {mp.BIN}/{b}: run {a.bench}/setup.sh")
    started = False
    if "s3s-fs-1m up" not in mp.sh(["bash", os.path.join(mp.BENCH, "servers.sh"), "status"]).stdout:
        mp.sh(["bash", os.path.join(mp.BENCH, "servers.sh"), "start"])
        started = True
    work = os.path.join(mp.RUN, "restart")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    src_file = os.path.join(mp.BENCH, "data", "rand-1G.bin")
    if not (os.path.exists(src_file) and os.path.getsize(src_file) == mp.SIZE):
        mp.sh([sys.executable, os.path.join(mp.BENCH, "gen_data.py"), "--out", os.path.dirname(src_file),
               "--sizes", "1G", "--safetensors", ""])
    src_dir, key = os.path.join(work, "src"), os.path.join(work, "k")
    os.makedirs(src_dir)
    os.link(src_file, os.path.join(src_dir, "rand-1G.bin"))
    s3b = os.path.join(mp.BIN, "s3bench")
    subprocess.run([s3b, "mb", "--endpoint", mp.S3, "--bucket", mp.BUCKET], capture_output=True, env=mp.ENV)
    mp.sh([s3b, "put", "--endpoint", mp.S3, "--bucket", mp.BUCKET, "--key", "plain/rand-1G.bin", "--file", src_file])
    shutil.rmtree(os.path.join(mp.RUN, "s3s-fs-root", mp.BUCKET, "restart-sealed"), ignore_errors=True)
    mp.sh([binary, "keygen", key])
    mp.sh([binary, "seal", src_dir, f"s3://{mp.BUCKET}/restart-sealed", "--key", f"file:{key}"])
    server = int(open(os.path.join(mp.RUN, "s3s-fs-1m.pid")).read())
    sdir, mpdir = os.path.join(work, "cache"), os.path.join(work, "mp-cache")
    sf_mnt, mp_mnt = os.path.join(mp.RUN, "mnt-sealfs"), os.path.join(mp.RUN, "mnt-mps3")
    sf = [binary, "mount", f"s3://{mp.BUCKET}/restart-sealed", sf_mnt, "--key", f"file:{key}",
          "--cache-size", "256MiB", "--foreground"]
    sf_dir = sf + ["--cache-dir", sdir, "--cache-dir-size", "4GiB"]
    mps = [os.path.join(mp.BIN, "mps3"), f"s3://{mp.BUCKET}/plain/", mp_mnt, "--endpoint-url", mp.S3,
           "--force-path-style", "--region", "us-east-1"]
    mps_cache = mps + ["--cache", mpdir, "--max-cache-size", "4096"]
    # Mountpoint empties its cache at every mount unless told not to.
    mp.ENV["UNSTABLE_MOUNTPOINT_DISABLE_CACHE_CLEANUP"] = "1"

    def through(name, cmd, before=None, env=None):
        if before:
            before()
        saved = dict(mp.ENV)
        mp.ENV.update(env or {})
        try:
            return measure(name, cmd)
        finally:
            mp.ENV.clear()
            mp.ENV.update(saved)

    def measure(name, cmd):
        with mp.Mount(name, cmd, sf_mnt if cmd[0] == binary else mp_mnt) as m:
            mp.drop_caches()
            c0, s0 = mp.cpu_s(m.proc.pid), mp.cpu_s(server)
            r = mp.dd(os.path.join(m.mnt, "rand-1G.bin"))
            r["daemon_cpu_s_per_gib"] = round(mp.cpu_s(m.proc.pid) - c0, 3)
            r["server_cpu_s"] = round(mp.cpu_s(server) - s0, 3)
            if cmd is sf_dir or cmd is mps_cache:
                time.sleep(2)  # both write behind the reads: let them finish
            r["bytes_ok"] = mp.spot_check(os.path.join(m.mnt, "rand-1G.bin"), src_file)
        return r

    def fresh(d):
        def f():
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d, mode=0o700)
        return f

    def cat_entries():
        files = [p for p in glob.glob(os.path.join(sdir, "v1", "*", "*")) if os.path.isfile(p)]
        mp.drop_caches()
        t = time.perf_counter()
        n = 0
        for p in files:
            with open(p, "rb", buffering=0) as f:
                while True:
                    b = f.read(1 << 20)
                    if not b:
                        break
                    n += len(b)
        wall = time.perf_counter() - t
        return {"mbps": round(mp.SIZE / wall / 1e6, 1), "sealed_bytes": n, "entries": len(files)}

    def disk_plain():
        mp.drop_caches()
        return mp.dd(src_file)

    reps = []
    try:
        for i in range(a.reps):
            mp.log(f"rep {i + 1}/{a.reps}")
            rep = {"disk plaintext": disk_plain(),
                   "sealfs cold": through("sealfs", sf),
                   "sealfs cold + DIR": through("sealfs", sf_dir, fresh(sdir))}
            rep["entries after the cold read"] = len(glob.glob(os.path.join(sdir, "v1", "*", "*")))
            # A/B: the writer as before O_DIRECT (every entry through the page cache).
            rep["sealfs cold + DIR, buffered writes"] = through(
                "sealfs", sf_dir, fresh(sdir), {"SEALFS_CACHE_DIR_BUFFERED": "1"})
            rep["entries after the buffered cold read"] = len(glob.glob(os.path.join(sdir, "v1", "*", "*")))
            mp.sh([binary, "cache", "warm", f"s3://{mp.BUCKET}/restart-sealed", "--cache-dir", sdir,
                   "--cache-dir-size", "4GiB"])
            rep["sealfs restart DIR"] = through("sealfs", sf_dir)
            rep["cat of DIR"] = cat_entries()
            rep["Mountpoint cold"] = through("mountpoint", mps)
            rep["Mountpoint cold + cache"] = through("mountpoint", mps_cache, fresh(mpdir))
            rep["Mountpoint restart cache"] = through("mountpoint", mps_cache)
            reps.append(rep)
            mp.log("  " + ", ".join(f"{k} {v['mbps']:.0f}" for k, v in rep.items() if isinstance(v, dict)))
    finally:
        for m in (sf_mnt, mp_mnt):
            if mp.mounted_in(m):
                subprocess.run(["fusermount3", "-uz", m], capture_output=True)
        if started:
            subprocess.run(["bash", os.path.join(mp.BENCH, "servers.sh"), "stop"], capture_output=True)
    if not all(v.get("bytes_ok", True) for r in reps for v in r.values() if isinstance(v, dict)):
        sys.exit("bytes differ")
    rows = [k for k, v in reps[0].items() if isinstance(v, dict)]
    med = {k: statistics.median(r[k]["mbps"] for r in reps) for k in rows}
    cpu = {k: statistics.median(r[k]["daemon_cpu_s_per_gib"] for r in reps) for k in rows
           if "daemon_cpu_s_per_gib" in reps[0][k]}
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "reps": reps, "median_mbps": med, "median_cpu": cpu,
           "versions": mp.versions(binary)}
    with open(os.path.join(ROOT, "target", "bench-restart.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"| read (1 GiB, median of {a.reps}) | MB/s | daemon CPU s/GiB | each rep MB/s |")
    print("|---|---:|---:|---|")
    for k in rows:
        each = " / ".join(f"{r[k]['mbps']:.0f}" for r in reps)
        print(f"| {k} | {med[k]:,.0f} | {cpu.get(k, float('nan')):.2f} | {each} |")
    ratio = lambda x, y: med[x] / med[y]
    print()
    print(f"- sealfs restart DIR / cat of DIR: **{ratio('sealfs restart DIR', 'cat of DIR'):.2f}** (target ≥ 0.8)")
    print(f"- sealfs restart DIR / Mountpoint restart cache: **{ratio('sealfs restart DIR', 'Mountpoint restart cache'):.2f}**")
    print(f"- sealfs cold + DIR / sealfs cold: **{ratio('sealfs cold + DIR', 'sealfs cold'):.2f}** (target ≥ 0.95)")
    print(f"- sealfs cold + DIR, buffered writes / sealfs cold: "
          f"**{ratio('sealfs cold + DIR, buffered writes', 'sealfs cold'):.2f}**")
    print(f"- entries after the cold read (of 1023): {[r['entries after the cold read'] for r in reps]}; "
          f"buffered: {[r['entries after the buffered cold read'] for r in reps]}")


if __name__ == "__main__":
    main()
