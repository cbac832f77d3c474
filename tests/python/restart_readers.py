#!/usr/bin/env python3
"""Issue 23: readers of one file on a sealfs mount while its daemon is killed and resumed.

  restart_readers.py MOUNTED PLAIN STOPFILE [all|nommap]

Three threads read MOUNTED until STOPFILE exists: pread at pseudo-random offsets, a
sequential pread, and an mmap reader, each dropping the file's pages first (fadvise
DONTNEED; MADV_DONTNEED on the map) so reads reach the daemon. Every read is compared with
PLAIN; STOPFILE.started is created once every reader has the file open (`nommap`: the two pread readers only, for tests where reads must fail: a failed
page-in is a SIGBUS). Prints one JSON line: reads, errors, wrong, short (right but fewer bytes), longest_ms, and the first error. Run
as a process of its own, so a reader stuck in the kernel never holds the test's process.
"""

import json
import mmap
import os
import random
import sys
import threading
import time


def main(mounted, plain, stopfile, mode="all"):
    want = open(plain, "rb").read()
    size = len(want)
    out = {"reads": 0, "errors": 0, "wrong": 0, "short": 0, "longest_ms": 0.0, "first_error": None}
    lock = threading.Lock()

    def reader(kind):
        rnd = random.Random(kind)
        fd = os.open(mounted, os.O_RDONLY)
        m = mmap.mmap(fd, size, prot=mmap.PROT_READ) if kind == 2 else None
        opened.wait()
        pos = 0
        while not os.path.exists(stopfile):
            n = rnd.randrange(4096, 256 << 10)
            if kind == 1:
                pos = (pos + n) % (size - n)
                off = pos
            else:
                off = rnd.randrange(0, size - n)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t = time.monotonic()
            err = None
            try:
                if m is not None:
                    m.madvise(mmap.MADV_DONTNEED)
                    got = m[off:off + n]
                else:
                    got = os.pread(fd, n, off)
            except Exception as e:  # an error is what the test counts
                err = repr(e)
            took = (time.monotonic() - t) * 1000
            with lock:
                out["reads"] += 1
                out["longest_ms"] = max(out["longest_ms"], took)
                if err is not None:
                    out["errors"] += 1
                    out["first_error"] = out["first_error"] or err
                elif got != want[off:off + len(got)]:
                    out["wrong"] += 1
                elif len(got) < n:
                    # A read the end of the connection cut short: what came is right.
                    out["short"] += 1
            if err is not None:
                time.sleep(0.05)
        if m is not None:
            m.close()
        try:
            os.close(fd)
        except OSError:
            pass  # a connection that ended fails the flush; the descriptor is closed all the same

    kinds = range(2) if mode == "nommap" else range(3)
    # Every reader has the file open before STOPFILE.started says so: the test kills the
    # daemon only after that, so that an open never meets a daemon that is down.
    opened = threading.Barrier(len(kinds) + 1)
    threads = [threading.Thread(target=reader, args=(k,)) for k in kinds]
    for t in threads:
        t.start()
    opened.wait()
    open(stopfile + ".started", "w").close()
    for t in threads:
        t.join()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5) or sys.argv[4:] not in ([], ["all"], ["nommap"]):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    main(*sys.argv[1:])
