#!/usr/bin/env python3
"""Issue 22: what filling `--cache-dir` costs a cold read, writer against writer.

Alternates, --reps times, three new `sealfs mount`s of the 1 GiB sealed file that
`scripts/bench-restart.py` put on the shared bench's s3s-fs-1m (run that once first; it
leaves the key and the sealed object), each read once with `dd bs=1M` after drop_caches:

  cold        no cache dir
  direct      an empty --cache-dir, entries written O_DIRECT (the default)
  buffered    the same with SEALFS_CACHE_DIR_BUFFERED=1 (entries through the page cache)

and prints, per read: MB/s, daemon and server CPU s, the `sync` that follows (dirty pages
the read left), the page cache's growth (`Cached:` in /proc/meminfo), and the entries
written. --store-in-memory first reads the store's files into the page cache, so that the
disk takes only the cache dir's writes (as with S3 over a network); --perf DIR records
each read's daemon with `perf record -g` into DIR. Root only (drop_caches, mounts).
"""
import argparse
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
    ap.add_argument("--store-in-memory", action="store_true")
    ap.add_argument("--perf")
    a = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.abspath(a.bench), "lib"))
    import mp_vs_sealfs as mp

    binary = os.path.abspath(a.bin)
    work = os.path.join(mp.RUN, "restart")
    key = os.path.join(work, "k")
    store = os.path.join(mp.RUN, "s3s-fs-root", mp.BUCKET, "restart-sealed")
    if not (os.path.exists(key) and os.path.isdir(store)):
        sys.exit("run scripts/bench-restart.py once first (it seals the 1 GiB file and keeps the key)")
    started = False
    if "s3s-fs-1m up" not in mp.sh(["bash", os.path.join(mp.BENCH, "servers.sh"), "status"]).stdout:
        mp.sh(["bash", os.path.join(mp.BENCH, "servers.sh"), "start"])
        started = True
    server = int(open(os.path.join(mp.RUN, "s3s-fs-1m.pid")).read())
    mnt = os.path.join(mp.RUN, "mnt-sealfs")
    cdir = os.path.join(work, "write-bench-cache")
    base = [binary, "mount", f"s3://{mp.BUCKET}/restart-sealed", mnt, "--key", f"file:{key}",
            "--cache-size", "256MiB", "--foreground"]

    def cached_mib():
        for line in open("/proc/meminfo"):
            if line.startswith("Cached:"):
                return int(line.split()[1]) // 1024
        return 0

    def one(mode, rep):
        cmd = list(base)
        env = {}
        if mode != "cold":
            shutil.rmtree(cdir, ignore_errors=True)
            os.makedirs(cdir, mode=0o700)
            cmd += ["--cache-dir", cdir, "--cache-dir-size", "4GiB"]
        if mode == "buffered":
            env["SEALFS_CACHE_DIR_BUFFERED"] = "1"
        saved = dict(mp.ENV)
        mp.ENV.update(env)
        try:
            with mp.Mount("sealfs", cmd, mnt) as m:
                mp.drop_caches()
                if a.store_in_memory:
                    for f in os.listdir(store):
                        with open(os.path.join(store, f), "rb") as fh:
                            while fh.read(1 << 20):
                                pass
                c0, s0, k0 = mp.cpu_s(m.proc.pid), mp.cpu_s(server), cached_mib()
                perf = None
                if a.perf:
                    os.makedirs(a.perf, exist_ok=True)
                    perf = subprocess.Popen(["perf", "record", "-g", "-o", os.path.join(a.perf, f"{mode}-{rep}.data"),
                                             "-p", str(m.proc.pid)], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
                    time.sleep(0.5)
                r = mp.dd(os.path.join(m.mnt, "rand-1G.bin"))
                if perf:
                    perf.send_signal(2)
                    perf.wait()
                r["daemon_cpu_s"] = round(mp.cpu_s(m.proc.pid) - c0, 3)
                r["server_cpu_s"] = round(mp.cpu_s(server) - s0, 3)
                t = time.perf_counter()
                subprocess.run(["sync"], check=True)
                r["sync_s"] = round(time.perf_counter() - t, 3)
                r["page_cache_growth_mib"] = cached_mib() - k0
                time.sleep(2)  # the writers finish what is queued
        finally:
            mp.ENV.clear()
            mp.ENV.update(saved)
        r["entries"] = 0
        if mode != "cold":
            v1 = os.path.join(cdir, "v1")
            r["entries"] = sum(len([e for e in os.listdir(os.path.join(v1, d)) if not e.startswith(".")])
                               for d in os.listdir(v1))
        return r

    modes = ["cold", "direct", "buffered"]
    runs = {m: [] for m in modes}
    try:
        for i in range(a.reps):
            for m in modes:
                r = one(m, i)
                runs[m].append(r)
                mp.log(f"rep {i + 1} {m}: {r}")
    finally:
        if mp.mounted_in(mnt):
            subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)
        shutil.rmtree(cdir, ignore_errors=True)
        if started:
            subprocess.run(["bash", os.path.join(mp.BENCH, "servers.sh"), "stop"], capture_output=True)
    med = lambda m, k: statistics.median(r[k] for r in runs[m])
    print(f"| read (1 GiB, median of {a.reps}{', store in memory' if a.store_in_memory else ''}) "
          "| MB/s | / cold | daemon CPU s | sync after s | page cache +MiB | entries of 1023 |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for m in modes:
        print(f"| {m} | {med(m, 'mbps'):,.0f} | {med(m, 'mbps') / med('cold', 'mbps'):.2f} | "
              f"{med(m, 'daemon_cpu_s'):.2f} | {med(m, 'sync_s'):.2f} | {med(m, 'page_cache_growth_mib'):.0f} | "
              f"{' / '.join(str(r['entries']) for r in runs[m])} |")


if __name__ == "__main__":
    main()
