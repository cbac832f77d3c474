#!/usr/bin/env python3
"""Soak: readers over a real mount while the store and KMS misbehave (issue 19).

One `sealfs mount` of an S3 prefix (moto_server behind tests/tools/fault_proxy.py, on
127.0.0.1 only) holding M single-file models, half under KMS key A and half under key B,
read through a small chunk cache by N reader processes (each pass drops the file's pages
from the kernel's page cache first, so that it reads through the daemon):
  * sequential: the whole file in 1 MiB reads,
  * random: 16 reads of 4 KiB..4 MiB at random offsets,
  * mmap: the whole file through a private mapping (in a forked child: a page the daemon
    cannot deliver is SIGBUS, counted, not a crash of the reader),
while the proxy injects S3 503s, dropped connections and delays, KMS 503s, dropped
connections, throttling and delays, at random, and the files are republished (`seal
--force`, a new version each time) and rewrapped (`rewrap`, KMS ReEncrypt) under the readers. Half-way, `sealfs revoke --key A`
and key A disabled; at three quarters, key A enabled again.

Every file version has known content (its first 64 bytes name the file and version), so
every byte a reader gets is checked. The run fails on:
  * one wrong byte (a read that returns bytes not of the version its handle opened),
  * a read or a pass that takes longer than --hang-bound seconds (default 90: the longest
    S3/KMS call with retries is 75 s),
  * growth after warm-up (the first quarter) of the daemon's RSS (more than +25% and
    +32 MiB), open fds (+32) or threads (+16), measured once the faults stop,
  * a file not whole once the faults stop (every file read back in full, the latest
    version written or an older one whose republish did not land), or `sealfs verify`
    failing.
Errors a reader may see under faults are counted, not failures: EIO (a fetch that failed
after retries), EACCES (a revoked or disabled key's files), ESTALE, SIGBUS in mmap readers.

    scripts/soak.py --seconds 180 --readers 8      # CI (scripts/test.sh)
    scripts/soak.py --seconds 1800 --readers 32 --sealfs target/release/sealfs

Prints one JSON report (and writes it to --report). Exit 0 only if nothing failed.
"""
import argparse
import json
import mmap
import multiprocessing as mp
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = 64
MIB = 1 << 20


def content(i, v, size):
    """File i at version v: a 64-byte header naming both, then seeded random bytes."""
    head = f"soak file={i} version={v}\n".encode().ljust(HEADER, b".")
    return head + random.Random(i * 1_000_003 + v).randbytes(size - HEADER)


def version_of(head):
    """The (file, version) a header names, or None."""
    try:
        words = head.split(b"\n")[0].decode().split()
        return int(words[1].split("=")[1]), int(words[2].split("=")[1])
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(port, method, path, body=b""):
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, path, body=body)
    r = c.getresponse()
    return r.status, r.read()


# ---------------------------------------------------------------- readers


def diagnose(i, v, off, got, want, size):
    """A wrong read, described: where it first differs, and whose bytes it got instead."""
    exp = want[off:off + len(got)]
    first = next((k for k in range(len(got)) if got[k] != exp[k]), len(got))
    whose = [w for w in range(0, v + 8) if w != v and content(i, w, size)[off:off + len(got)] == got]
    return {"file": i, "version": v, "offset": off, "len": len(got),
            "first_diff_at": off + first, "zeros_there": not any(got[first:first + 4096]) if got else None,
            "bytes_of_version": whose}


def reader(idx, mode, files, mnt, size, deadline, hang_bound, out):
    """Passes over random files until the deadline; results into the queue `out`."""
    rng = random.Random(idx)
    stats = {"passes": 0, "bytes": 0, "errors": {}, "wrong": [], "slowest": 0.0}
    cache = {}

    def expected(i, v):
        if (i, v) not in cache:
            if len(cache) > 4:
                cache.pop(next(iter(cache)))
            cache[(i, v)] = content(i, v, size)
        return cache[(i, v)]

    def err(name):
        stats["errors"][name] = stats["errors"].get(name, 0) + 1

    def timed(f, *a):
        t = time.monotonic()
        r = f(*a)
        stats["slowest"] = max(stats["slowest"], time.monotonic() - t)
        return r

    while time.monotonic() < deadline:
        i = rng.choice(files)
        path = os.path.join(mnt, f"f{i}", "data.bin")
        try:
            fd = timed(os.open, path, os.O_RDONLY)
        except OSError as e:
            err(os.strerror(e.errno))
            time.sleep(0.2)
            continue
        try:
            # The kernel's page cache would answer most reads without the daemon: drop this
            # file's pages first, so every pass reads through sealfs (mmap faults too).
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            head = timed(os.pread, fd, HEADER, 0)
            named = version_of(head)
            if named is None or named[0] != i:
                stats["wrong"].append({"file": i, "offset": 0, "why": "bad header"})
                continue
            want = expected(*named)
            if mode == "seq":
                off = 0
                while off < size:
                    got = timed(os.pread, fd, MIB, off)
                    if got != want[off:off + len(got)] or not got:
                        stats["wrong"].append(diagnose(i, named[1], off, got, want, size))
                        break
                    off += len(got)
                    stats["bytes"] += len(got)
            elif mode == "random":
                for _ in range(16):
                    n = rng.randint(4096, 4 * MIB)
                    off = rng.randrange(0, size)
                    got = timed(os.pread, fd, n, off)
                    if got != want[off:off + len(got)] or (not got and off < size):
                        stats["wrong"].append(diagnose(i, named[1], off, got, want, size))
                        break
                    stats["bytes"] += len(got)
                    if len(got) < min(n, size - off):
                        # Some pages, then an error (a revoked key): POSIX's short read;
                        # the next read of the rest gets the error itself.
                        err("short read")
                        break
            else:  # mmap, in a child: SIGBUS there is an error, not the reader's end
                t = time.monotonic()
                pid = os.fork()
                if pid == 0:
                    try:
                        m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
                        ok = m[:] == want
                        os._exit(0 if ok else 3)
                    except BaseException:
                        os._exit(4)
                _, status = os.waitpid(pid, 0)
                stats["slowest"] = max(stats["slowest"], time.monotonic() - t)
                if os.WIFSIGNALED(status):
                    err("SIGBUS" if os.WTERMSIG(status) == signal.SIGBUS else f"signal {os.WTERMSIG(status)}")
                elif os.WEXITSTATUS(status) == 3:
                    stats["wrong"].append({"file": i, "version": named[1], "offset": "mmap"})
                elif os.WEXITSTATUS(status) != 0:
                    err("mmap failed")
                else:
                    stats["bytes"] += size
            stats["passes"] += 1
        except OSError as e:
            err(os.strerror(e.errno))
        finally:
            os.close(fd)
    out.put((idx, mode, stats))


# ---------------------------------------------------------------- the run


class Run:
    def __init__(self, a):
        self.a = a
        self.tmp = tempfile.mkdtemp(prefix="sealfs-soak.")
        self.procs = []
        self.mnt = os.path.join(self.tmp, "mnt")
        os.mkdir(self.mnt)
        self.daemon = None

    def start_servers(self):
        moto = free_port()
        log = open(os.path.join(self.tmp, "moto.log"), "w")
        self.procs.append(subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(moto)],
                                           stdout=log, stderr=log))
        for _ in range(200):
            try:
                http(moto, "GET", "/moto-api/")
                break
            except OSError:
                time.sleep(0.05)
        port_file = os.path.join(self.tmp, "proxy.port")
        self.procs.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests/tools/fault_proxy.py"),
             "--upstream-port", str(moto), "--port-file", port_file], stdout=subprocess.DEVNULL))
        for _ in range(200):
            if os.path.exists(port_file) and open(port_file).read().strip():
                break
            time.sleep(0.05)
        self.proxy = int(open(port_file).read())
        url = f"http://127.0.0.1:{moto}"
        import boto3
        kw = dict(endpoint_url=url, region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
        self.kms = boto3.client("kms", **kw)
        boto3.client("s3", **kw).create_bucket(Bucket="soak")
        self.keys = [self.kms.create_key()["KeyMetadata"]["KeyId"] for _ in range(2)]
        self.env = dict(os.environ, AWS_ENDPOINT_URL=f"http://127.0.0.1:{self.proxy}",
                        AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                        AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")

    def key_of(self, i):
        return f"kms:{self.keys[i % 2]}"

    def sealfs(self, *args, check=True):
        r = subprocess.run([self.a.sealfs, *args], env=self.env, capture_output=True, text=True)
        if check and r.returncode != 0:
            raise SystemExit(f"soak: sealfs {' '.join(args)} failed: {r.stderr.strip()}")
        return r

    def publish(self, i, v, check=True):
        src = os.path.join(self.tmp, "src", f"f{i}")
        os.makedirs(src, exist_ok=True)
        with open(os.path.join(src, "data.bin"), "wb") as f:
            f.write(content(i, v, self.a.size_mib * MIB))
        return self.sealfs("seal", src, f"s3://soak/m/f{i}", "--key", self.key_of(i), "--force",
                           "--model-version", str(v + 1), "--chunk-size", "256KiB", check=check)

    def mount(self):
        sock_path = os.path.join(self.tmp, "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(sock_path)
        sock.settimeout(0.2)
        log = open(os.path.join(self.tmp, "sealfs.log"), "w")
        env = dict(self.env, NOTIFY_SOCKET=sock_path, RUST_LOG="sealfs=info,fuser=error")
        self.metrics = free_port()
        self.daemon = subprocess.Popen(
            [self.a.sealfs, "mount", "--foreground", "s3://soak/m", self.mnt,
             "--key", self.key_of(0), "--key", self.key_of(1), "--cache-size", self.a.cache,
             "--list-ttl", "2s", "--revalidate", "2s", "--dek-grace", "5s",
             "--metrics-addr", f"127.0.0.1:{self.metrics}"],
            env=env, stdout=subprocess.DEVNULL, stderr=log)
        t = time.monotonic()
        while time.monotonic() - t < 60:
            try:
                if b"READY=1" in sock.recv(256):
                    return
            except socket.timeout:
                pass
            if self.daemon.poll() is not None:
                break
        raise SystemExit("soak: the mount never became ready:\n" + open(log.name).read()[-4000:])

    def faults(self, on):
        http(self.proxy, "POST", "/__proxy/reset")
        if not on:
            return
        for f in [
            {"match": "s3:GET", "error": "503", "rate": 0.03},
            {"match": "s3:GET", "error": "drop", "rate": 0.01},
            {"match": "s3:GET", "delay": 0.3, "rate": 0.05},
            {"match": "kms:Decrypt", "error": "ThrottlingException", "rate": 0.05},
            {"match": "kms:Decrypt", "delay": 0.5, "rate": 0.1},
            {"match": "kms:Decrypt", "error": "503", "rate": 0.02},
            {"match": "kms:Decrypt", "error": "drop", "rate": 0.01},
            {"match": "kms:GenerateDataKey", "error": "ThrottlingException", "rate": 0.05},
            {"match": "s3:UploadPart", "error": "503", "rate": 0.02},
        ]:
            http(self.proxy, "POST", "/__proxy/fault", json.dumps(f).encode())

    def sample(self):
        pid = self.daemon.pid
        status = open(f"/proc/{pid}/status").read()
        field = lambda k: int(next(l for l in status.splitlines() if l.startswith(k)).split()[1])
        return {"rss_mib": field("VmRSS:") / 1024, "threads": field("Threads:"),
                "fds": len(os.listdir(f"/proc/{pid}/fd"))}

    def cleanup(self, keep=False):
        if self.daemon and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(20)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
        subprocess.run(["fusermount3", "-u", "-z", self.mnt], stderr=subprocess.DEVNULL)
        for p in self.procs:
            p.kill()
            p.wait()
        if keep:
            print(f"soak: kept {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=180)
    ap.add_argument("--readers", type=int, default=8)
    ap.add_argument("--files", type=int, default=6)
    ap.add_argument("--size-mib", type=int, default=8)
    ap.add_argument("--cache", default="24MiB", help="the mount's --cache-size (small on purpose)")
    ap.add_argument("--hang-bound", type=float, default=90.0)
    ap.add_argument("--sealfs", default=os.path.join(ROOT, "target/debug/sealfs"))
    ap.add_argument("--report")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    a = ap.parse_args()
    run = Run(a)
    report = {"seconds": a.seconds, "readers": a.readers, "files": a.files,
              "size_mib": a.size_mib, "cache": a.cache, "hang_bound_s": a.hang_bound}
    failures = []
    try:
        run.start_servers()
        size = a.size_mib * MIB
        files = list(range(a.files))
        attempted = {i: {0} for i in files}
        latest = {i: 0 for i in files}
        for i in files:
            run.publish(i, 0)
        run.mount()
        run.faults(True)
        start = time.monotonic()
        deadline = start + a.seconds
        q = mp.get_context("fork").Queue()
        modes = ["seq", "random", "mmap"]
        workers = []
        for idx in range(a.readers):
            mode = modes[idx % 3]
            # mmap readers read key B's files only: a revoked file's pages are SIGBUS by design.
            mine = [i for i in files if i % 2 == 1] if mode == "mmap" else files
            p = mp.get_context("fork").Process(
                target=reader, args=(idx, mode, mine, run.mnt, size, deadline, a.hang_bound, q))
            p.start()
            workers.append(p)
        samples, events = [], {"republished": 0, "republish_failed": 0, "rewrapped": 0,
                               "rewrap_failed": 0}
        revoked = enabled_again = False
        next_pub = next_wrap = start + 5
        while time.monotonic() < deadline:
            now = time.monotonic()
            samples.append((now - start, run.sample()))
            disabled = revoked and not enabled_again
            if now >= next_pub:
                i = random.choice([i for i in files if not (disabled and i % 2 == 0)])
                v = latest[i] + 1
                attempted[i].add(v)
                ok = run.publish(i, v, check=False).returncode == 0
                events["republished" if ok else "republish_failed"] += 1
                if ok:
                    latest[i] = v
                next_pub = now + 8
            if now >= next_wrap:
                i = random.choice([i for i in files if not (disabled and i % 2 == 0)])
                k = run.key_of(i)
                r = run.sealfs("rewrap", f"s3://soak/m/f{i}", "--key", k, "--to-key", k, check=False)
                events["rewrapped" if r.returncode == 0 else "rewrap_failed"] += 1
                next_wrap = now + 11
            if not revoked and now >= start + a.seconds / 2:
                run.kms.disable_key(KeyId=run.keys[0])
                r = run.sealfs("revoke", run.mnt, "--key", run.key_of(0), check=False)
                events["revoke"] = (r.stdout + r.stderr).strip()
                revoked = True
            if revoked and not enabled_again and now >= start + 3 * a.seconds / 4:
                run.kms.enable_key(KeyId=run.keys[0])
                enabled_again = True
            time.sleep(2)
        # Readers end at the deadline; one still running past the hang bound is hung.
        results = []
        for p in workers:
            p.join(timeout=max(1.0, deadline + a.hang_bound - time.monotonic()))
        for _ in workers:
            try:
                results.append(q.get(timeout=5))
            except Exception:
                break
        hung = [p.pid for p in workers if p.is_alive()]
        for p in workers:
            if p.is_alive():
                p.kill()
        if hung:
            failures.append(f"{len(hung)} reader(s) still blocked {a.hang_bound:.0f} s after the deadline")
        proxy = json.loads(http(run.proxy, "GET", "/__proxy/counts")[1])
        run.faults(False)
        if not enabled_again:
            run.kms.enable_key(KeyId=run.keys[0])
        time.sleep(6)  # a re-list and a revalidation with the faults gone
        # Every file whole: the version it names is one written, and every byte is that version's.
        whole = {}
        for i in files:
            try:
                data = open(os.path.join(run.mnt, f"f{i}", "data.bin"), "rb").read()
                named = version_of(data[:HEADER])
                ok = named is not None and named[0] == i and named[1] in attempted[i] \
                    and named[1] >= latest[i] and data == content(i, named[1], size)
                whole[i] = named[1] if ok else f"not whole ({named})"
            except OSError as e:
                whole[i] = f"unreadable: {os.strerror(e.errno)}"
            if not isinstance(whole[i], int):
                failures.append(f"file {i}: {whole[i]}")
        r = run.sealfs("verify", "s3://soak/m", "--key", run.key_of(0), "--key", run.key_of(1),
                       check=False)
        if r.returncode != 0:
            failures.append("sealfs verify failed: " + (r.stdout + r.stderr)[-2000:])
        end = run.sample()
        warm = [s for t, s in samples if t <= a.seconds / 4] or [end]
        base = {k: max(s[k] for s in warm) for k in end}
        if end["rss_mib"] > base["rss_mib"] * 1.25 + 32:
            failures.append(f"RSS grew: {base['rss_mib']:.0f} MiB after warm-up, {end['rss_mib']:.0f} MiB at the end")
        if end["fds"] > base["fds"] + 32:
            failures.append(f"fds grew: {base['fds']} -> {end['fds']}")
        if end["threads"] > base["threads"] + 16:
            failures.append(f"threads grew: {base['threads']} -> {end['threads']}")
        total = {"passes": 0, "bytes": 0, "errors": {}, "wrong": [], "slowest": 0.0}
        for _, _, st in results:
            total["passes"] += st["passes"]
            total["bytes"] += st["bytes"]
            total["wrong"] += st["wrong"]
            total["slowest"] = max(total["slowest"], st["slowest"])
            for k, n in st["errors"].items():
                total["errors"][k] = total["errors"].get(k, 0) + n
        if len(results) != len(workers):
            failures.append(f"only {len(results)} of {len(workers)} readers reported")
        if total["wrong"]:
            failures.append(f"{len(total['wrong'])} wrong reads: {total['wrong'][:5]}")
        if total["slowest"] > a.hang_bound:
            failures.append(f"slowest read {total['slowest']:.1f} s > {a.hang_bound} s")
        if total["passes"] == 0:
            failures.append("no reader finished a pass")
        report.update({
            "passes": total["passes"], "bytes_read": total["bytes"],
            "wrong_bytes_reads": len(total["wrong"]), "errors": total["errors"],
            "slowest_read_s": round(total["slowest"], 2), "events": events,
            "versions_served_at_end": whole, "resources_after_warmup_max": base,
            "resources_at_end": end,
            "resources_max": {k: max(s[k] for _, s in samples) for k in end} if samples else end,
            "requests_through_proxy": {k: v for k, v in proxy.items() if k.startswith(("s3:", "kms:"))},
            "failures": failures,
        })
    finally:
        run.cleanup(keep=a.keep)
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if a.report:
        open(a.report, "w").write(text)
    if failures:
        print("soak: FAILED: " + "; ".join(failures), file=sys.stderr)
        sys.exit(1)
    print("soak: passed", file=sys.stderr)


if __name__ == "__main__":
    main()
