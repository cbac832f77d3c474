#!/usr/bin/env python3
"""Issue 21: a replay of kubelet against the real `sealfs csi node` and `sealfs csi mounter`.

Runs as root (mount(2)). gRPC stubs come from the vendored proto/csi/csi.proto (grpcio-tools),
the way kubelet and the sidecars speak to the plugin. The mounter runs with only CAP_IPC_LOCK
in its bounding set, under strace: neither it nor its children may open /dev/fuse or call
mount(2). Volumes: a local directory store (key from a Secret) and, with moto_server, an S3
store with a KMS key. Every case asserts; every process and mount it starts is stopped, pass
or fail.

Usage: test_csi_kubelet.py [SEALFS_BINARY]   (default target/debug/sealfs)
"""

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEALFS = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/debug/sealfs"))

import grpc  # noqa: E402
from grpc_tools import protoc  # noqa: E402

FAILS = []
SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"


def check(cond, what):
    if not cond:
        FAILS.append(what)
        print(f"FAIL {what}", flush=True)
    else:
        print(f"ok   {what}", flush=True)


def stubs(out):
    import grpc_tools

    inc = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    os.makedirs(out, exist_ok=True)
    rc = protoc.main(["protoc", f"-I{ROOT}/proto/csi", f"-I{inc}", f"--python_out={out}",
                      f"--grpc_python_out={out}", f"{ROOT}/proto/csi/csi.proto"])
    assert rc == 0, "grpc_tools.protoc failed on proto/csi/csi.proto"
    sys.path.insert(0, out)
    import csi_pb2
    import csi_pb2_grpc

    return csi_pb2, csi_pb2_grpc


def mounts_under(path):
    with open("/proc/self/mountinfo") as f:
        out = []
        for line in f:
            parts = line.split(" ")
            mp = parts[4].replace("\\040", " ")
            if mp == path or mp.startswith(path + "/"):
                sep = parts.index("-")
                out.append((mp, parts[5], parts[sep + 1], parts[sep + 2]))
        return out


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_for(cond, what, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def children_of(pid):
    """Every descendant pid of `pid`."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = []
        # Each thread's children are listed under that thread (the mounter forks from its
        # connection threads).
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            tasks = []
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids += [int(x) for x in f.read().split()]
            except OSError:
                pass
        out += kids
        todo += kids
    return out


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


class Suite:
    def __init__(self, work):
        self.work = work
        self.kubelet = os.path.join(work, "kubelet")
        self.procs = []
        self.mounter = None
        self.node = None
        self.moto = None
        self.env = {"PATH": os.environ.get("PATH", ""), "RUST_LOG": "sealfs=info"}
        self.secret_values = []

    # ---- processes -------------------------------------------------------------------
    def start_mounter(self):
        self.mounter_sock = os.path.join(self.work, "mounter.sock")
        self.mounter_log = open(os.path.join(self.work, "mounter.log"), "ab")
        self.strace = os.path.join(self.work, f"mounter.strace.{len(self.procs)}")
        self.mounter = subprocess.Popen(
            ["strace", "-f", "-e", "trace=open,openat,mount,umount2", "-o", self.strace,
             "setpriv", "--bounding-set", "-all,+ipc_lock", "--inh-caps", "-all", "--",
             SEALFS, "csi", "mounter", "--socket", self.mounter_sock, "--pass-env", "SOFTHSM2_CONF"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=self.mounter_log)
        self.procs.append(self.mounter)
        wait_for(lambda: os.path.exists(self.mounter_sock) or self.mounter.poll() is not None, "the mounter")
        assert self.mounter.poll() is None, "the mounter exited at start: " + self.logs("mounter")

    def mounter_pid(self):
        """The sealfs process under strace and setpriv."""
        for p in [self.mounter.pid] + children_of(self.mounter.pid):
            c = cmdline(p)
            if len(c) > 2 and c[0].endswith(b"sealfs") and c[1] == b"csi":
                return p
        raise AssertionError("no sealfs csi mounter process")

    def stop_mounter(self):
        self.mounter.send_signal(signal.SIGTERM)  # strace passes it on
        try:
            pid = self.mounter_pid()
            os.kill(pid, signal.SIGTERM)
        except (AssertionError, ProcessLookupError):
            pass
        self.mounter.wait(timeout=30)

    def start_node(self):
        self.endpoint = os.path.join(self.work, "csi.sock")
        self.node_log = open(os.path.join(self.work, "node.log"), "ab")
        self.node = subprocess.Popen(
            [SEALFS, "csi", "node", "--endpoint", f"unix://{self.endpoint}", "--node-id", "node-a",
             "--mounter-socket", os.path.join(self.work, "mounter.sock"), "--kubelet-dir", self.kubelet,
             "--pkcs11-module", SOFTHSM],
            env=self.env, stdout=subprocess.DEVNULL, stderr=self.node_log)
        self.procs.append(self.node)
        wait_for(lambda: os.path.exists(self.endpoint) or self.node.poll() is not None, "the node plugin")
        assert self.node.poll() is None, "the node plugin exited at start: " + self.logs("node")
        # grpc-go (kubelet, the sidecars) sends :authority "localhost" on unix sockets; grpc's
        # C core would send the escaped path, which hyper's h2 refuses as an authority.
        self.channel = grpc.insecure_channel(f"unix://{self.endpoint}", options=[("grpc.default_authority", "localhost")])
        self.identity = self.pb_grpc.IdentityStub(self.channel)
        self.nodes = self.pb_grpc.NodeStub(self.channel)

    def stop_node(self):
        self.channel.close()
        self.node.send_signal(signal.SIGTERM)
        self.node.wait(timeout=30)

    def logs(self, which, tail=3000):
        with open(os.path.join(self.work, f"{which}.log"), "rb") as f:
            text = f.read().decode(errors="replace")
            return text if tail is None else text[-tail:]

    def cleanup(self):
        for mp, *_ in reversed(mounts_under(self.kubelet)):
            subprocess.run(["umount", "-l", mp], check=False)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        # A mounter child or the mounter under strace that outlived its parent.
        subprocess.run(["pkill", "-f", f"csi mounter --socket {self.work}"], check=False)
        subprocess.run(["pkill", "-f", "--", f"--fuse-fd .* {self.kubelet}/"], check=False)
        if self.moto:
            self.moto.terminate()
            self.moto.wait(timeout=15)

    # ---- kubelet's calls ---------------------------------------------------------------
    def target(self, pod, vol="model"):
        parent = os.path.join(self.kubelet, "pods", pod, "volumes", "kubernetes.io~csi", vol)
        os.makedirs(parent, exist_ok=True)
        return os.path.join(parent, "mount")

    def publish(self, target, attrs, secrets=None, flags=(), block=False, group="", vol_id="vol-1", pod="p1"):
        pb = self.pb
        cap = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(
            mode=pb.VolumeCapability.AccessMode.MULTI_NODE_READER_ONLY))
        if block:
            cap.block.CopyFrom(pb.VolumeCapability.BlockVolume())
        else:
            cap.mount.CopyFrom(pb.VolumeCapability.MountVolume(mount_flags=list(flags), volume_mount_group=group))
        ctx = dict(attrs)
        ctx.update({"csi.storage.k8s.io/pod.namespace": "ml", "csi.storage.k8s.io/pod.name": pod,
                    "csi.storage.k8s.io/pod.uid": f"uid-{pod}", "csi.storage.k8s.io/serviceAccount.name": "vllm",
                    "csi.storage.k8s.io/ephemeral": "false"})
        req = pb.NodePublishVolumeRequest(volume_id=vol_id, target_path=target, volume_capability=cap,
                                          readonly=True, volume_context=ctx, secrets=secrets or {})
        return self.nodes.NodePublishVolume(req, timeout=120)

    def unpublish(self, target, vol_id="vol-1"):
        return self.nodes.NodeUnpublishVolume(self.pb.NodeUnpublishVolumeRequest(volume_id=vol_id, target_path=target), timeout=60)

    def code_of(self, fn):
        try:
            fn()
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            return e.code(), e.details()

    def sealfs(self, *args, env=None):
        r = subprocess.run([SEALFS, *args], env=env or self.env, capture_output=True, text=True)
        assert r.returncode == 0, f"sealfs {' '.join(args)}: {r.stderr}"
        return r.stdout + r.stderr


def softhsm(s, keys, work):
    """A SoftHSM2 token (its files outside `work`) with a private AES key; the model sealed
    under it with a PIN file; returns the store, the volume's key URI and the PIN."""
    conf = os.path.join(keys, "softhsm2.conf")
    os.makedirs(os.path.join(keys, "tokens"))
    with open(conf, "w") as f:
        f.write(f"directories.tokendir = {keys}/tokens\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = dict(s.env, SOFTHSM2_CONF=conf)
    pin = "pin" + os.urandom(8).hex()  # a string nothing else here contains
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "csi", "--so-pin", "0000", "--pin", pin],
                   env=env, check=True, capture_output=True)
    subprocess.run(["pkcs11-tool", "--module", SOFTHSM, "--token-label", "csi", "--login", "--pin", pin,
                    "--keygen", "--key-type", "AES:32", "--private", "--label", "kek", "--id", "01"],
                   env=env, check=True, capture_output=True)
    pin_file = os.path.join(keys, "pin")
    with open(os.open(pin_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(pin)
    store = os.path.join(work, "hsm-store")
    base = f"pkcs11:token=csi;object=kek?module-path={SOFTHSM}"
    s.sealfs("seal", os.path.join(keys, "model"), store, "--key", f"{base}&pin-source=file:{pin_file}", env=env)
    s.env["SOFTHSM2_CONF"] = conf  # the mounter's environment; --pass-env hands it to children
    s.secret_values.append(pin)
    return store, f"{base}&pin-source=secret:pkcs11Pin", pin


def model(dir_):
    import numpy as np
    from safetensors.numpy import save_file

    os.makedirs(dir_)
    rng = np.random.default_rng(7)
    save_file({f"layer.{i}.weight": rng.standard_normal((256, 512), dtype=np.float32) for i in range(12)},
              os.path.join(dir_, "model.safetensors"))
    with open(os.path.join(dir_, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "hidden_size": 512}, f)
    return {n: sha(os.path.join(dir_, n)) for n in os.listdir(dir_)}


def read_back(target, want):
    from safetensors import safe_open

    got = {n: sha(os.path.join(target, n)) for n in want}
    with safe_open(os.path.join(target, "model.safetensors"), framework="numpy") as f:
        t = f.get_tensor("layer.11.weight")
    return got == want and t.shape == (256, 512)


def first_byte_latency(s, target, attrs, secrets=None):
    t0 = time.perf_counter()
    s.publish(target, attrs, secrets)
    with open(os.path.join(target, "model.safetensors"), "rb") as f:
        assert len(f.read(1)) == 1
    return (time.perf_counter() - t0) * 1000


def main():
    if os.geteuid() != 0:
        print("test_csi_kubelet.py: must run as root (mount(2))", file=sys.stderr)
        return 1
    if not os.path.exists(SEALFS):
        print(f"test_csi_kubelet.py: {SEALFS} missing (cargo build)", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="sealfs-csi-")
    keys = tempfile.mkdtemp(prefix="sealfs-csi-keys-")  # outside `work`: work is scanned for secrets
    s = Suite(work)
    try:
        s.pb, s.pb_grpc = stubs(os.path.join(work, "stubs"))
        return run(s, work, keys)
    finally:
        s.cleanup()
        subprocess.run(["rm", "-rf", keys], check=False)
        left = mounts_under(work)
        if left:
            print(f"FAIL mounts left under {work}: {left}", file=sys.stderr)
            return 1
        subprocess.run(["rm", "-rf", work], check=False)


def run(s, work, keys):
    pb = s.pb
    os.makedirs(s.kubelet)
    want = model(os.path.join(keys, "model"))
    kek = os.path.join(keys, "kek")
    s.sealfs("keygen", kek)
    s.sealfs("keygen", os.path.join(keys, "other"))
    store = os.path.join(work, "store")
    out = s.sealfs("seal", os.path.join(keys, "model"), store, "--key", f"file:{kek}")
    digest = re.search(r"digest (sha256:[0-9a-f]{64})", out).group(1)
    key_text = open(kek).read()
    other_text = open(os.path.join(keys, "other")).read()
    s.secret_values = [key_text.strip(), other_text.strip()]
    local = {"uri": store, "keys": "file:secret"}
    secret = {"keyFile": key_text}
    hsm_store, hsm_key, pin = softhsm(s, keys, work)

    s.start_mounter()
    s.start_node()

    # ---- identity ------------------------------------------------------------------
    info = s.identity.GetPluginInfo(pb.GetPluginInfoRequest())
    check(info.name == "csi.sealfs.dev" and info.vendor_version, "GetPluginInfo names csi.sealfs.dev")
    check(s.identity.Probe(pb.ProbeRequest()).ready.value is True, "Probe is ready with the mounter up")
    caps = s.nodes.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()).capabilities
    check([c.rpc.type for c in caps] == [pb.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP],
          "NodeGetCapabilities is VOLUME_MOUNT_GROUP only")
    check(s.nodes.NodeGetInfo(pb.NodeGetInfoRequest()).node_id == "node-a", "NodeGetInfo gives --node-id")
    code, _ = s.code_of(lambda: s.nodes.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id="v"), timeout=10))
    check(code == grpc.StatusCode.UNIMPLEMENTED, "NodeStageVolume is UNIMPLEMENTED")

    # ---- publish, read, idempotence ---------------------------------------------------
    t1 = s.target("p1")
    ms = first_byte_latency(s, t1, local, secret)
    print(f"publish latency (NodePublishVolume -> first byte), local store: {ms:.0f} ms", flush=True)
    m = [x for x in mounts_under(s.kubelet) if x[0] == t1]
    check(len(m) == 1 and m[0][2] == "fuse.sealfs" and m[0][3] == store, f"target is one fuse.sealfs mount of the store: {m}")
    check(all(o in m[0][1].split(",") for o in ("ro", "nosuid", "nodev")), f"mounted ro,nosuid,nodev: {m[0][1]}")
    check(read_back(t1, want), "every file reads back (sha256) and a safetensors mmap loads")
    s.publish(t1, local, secret)
    check(len([x for x in mounts_under(s.kubelet) if x[0] == t1]) == 1, "a second publish of the same target is OK, still one mount")
    code, msg = s.code_of(lambda: s.publish(t1, {"uri": os.path.join(work, "elsewhere"), "keys": "file:secret"}, secret))
    check(code == grpc.StatusCode.ALREADY_EXISTS, f"the target with another volume is ALREADY_EXISTS: {code} {msg}")

    # ---- an HSM key, its PIN from the volume's Secret ------------------------------------
    th = s.target("hsm")
    s.publish(th, {"uri": hsm_store, "keys": hsm_key}, {"pkcs11Pin": pin + "\n"}, pod="hsm")
    check(read_back(th, want), "a pkcs11: volume key logs in with the pkcs11Pin secret and reads")
    s.unpublish(th)
    code, msg = s.code_of(lambda: s.publish(th, {"uri": hsm_store, "keys": hsm_key}, {"pkcs11Pin": "999999"}, pod="hsm"))
    check(code == grpc.StatusCode.PERMISSION_DENIED and "999999" not in msg, f"a wrong PIN: PERMISSION_DENIED ({code}: {msg})")
    check(not [x for x in mounts_under(s.kubelet) if x[0] == th] and not os.path.exists(th), "nothing left after the wrong PIN")
    evil = hsm_key.replace(SOFTHSM, "/tmp/evil.so")
    code, msg = s.code_of(lambda: s.publish(th, {"uri": hsm_store, "keys": evil}, {"pkcs11Pin": pin}, pod="hsm"))
    check(code == grpc.StatusCode.INVALID_ARGUMENT and "--pkcs11-module" in msg, f"a module the driver does not list: INVALID_ARGUMENT ({code}: {msg})")

    # Two pods, one volume: two children.
    mounter = s.mounter_pid()
    before = len(children_of(mounter))
    t2 = s.target("p2")
    s.publish(t2, local, secret, pod="p2", group="2000")
    check(len(children_of(mounter)) == before + 1, "a second pod's publish starts its own child")
    st = os.stat(os.path.join(t2, "config.json"))
    check(st.st_gid == 2000, f"the volume mount group is the files' group: {st.st_gid}")
    check(read_back(t2, want), "the second pod reads the same model")

    # ---- bad input: INVALID_ARGUMENT, nothing mounted, no secret echoed -------------------
    n_mounts = len(mounts_under(s.kubelet))
    big = "x" * (8 * 1024 + 1)
    bad = [
        ("unknown attribute", dict(local, bucket="x"), secret, {}),
        ("missing uri", {"keys": "file:secret"}, secret, {}),
        ("unknown key URI", dict(local, keys="vault:x"), secret, {}),
        ("node key file", dict(local, keys=f"file:{kek}"), secret, {}),
        ("block capability", local, secret, {"block": True}),
        ("target outside the kubelet dir", local, secret, {"target": os.path.join(work, "outside", "mount")}),
        ("relative target", local, secret, {"target": "pods/p9/mount"}),
        (".. target", local, secret, {"target": s.kubelet + "/pods/p1/../p9/mount"}),
        ("secret too large", local, {"keyFile": big}, {}),
        ("secret with a control character", local, {"keyFile": key_text.strip() + "\x1b[2J\n"}, {}),
        ("unknown secret", local, {"keyFile": key_text, "password": "hunter2-secret"}, {}),
        ("mountOptions outside the allow-list", local, secret, {"flags": ["log-file=/tmp/x"]}),
    ]
    os.makedirs(os.path.join(work, "outside"), exist_ok=True)
    for what, attrs, sec, kw in bad:
        target = kw.get("target") or s.target("bad")
        code, msg = s.code_of(lambda: s.publish(target, attrs, sec, flags=kw.get("flags", ()), block=kw.get("block", False)))
        echoed = any(v.strip() and v.strip() in msg for v in sec.values())
        check(code == grpc.StatusCode.INVALID_ARGUMENT and not echoed, f"{what}: INVALID_ARGUMENT without the secret ({code}: {msg})")
        check(not os.path.exists(target), f"{what}: no target created")
    check("secret keyFile is longer than 8192 bytes" in s.code_of(lambda: s.publish(s.target("bad"), local, {"keyFile": big}))[1],
          "the size limit is named")
    check(len(mounts_under(s.kubelet)) == n_mounts, "no bad publish left a mount")

    # ---- wrong key, wrong digest: refused with the reason, nothing left -------------------
    tb = s.target("p3")
    code, msg = s.code_of(lambda: s.publish(tb, local, {"keyFile": other_text}, pod="p3"))
    check(code == grpc.StatusCode.PERMISSION_DENIED and not os.path.exists(tb), f"the wrong key is PERMISSION_DENIED, target removed ({code}: {msg})")
    code, msg = s.code_of(lambda: s.publish(tb, dict(local, modelDigest="sha256:" + "0" * 64), secret, pod="p3"))
    check(code == grpc.StatusCode.FAILED_PRECONDITION and not os.path.exists(tb),
          f"another model digest is FAILED_PRECONDITION, target removed ({code}: {msg})")
    s.publish(tb, dict(local, modelDigest=digest), secret, pod="p3")
    check(read_back(tb, want), "the pinned digest publishes and reads")
    s.unpublish(tb)
    check(len(mounts_under(s.kubelet)) == n_mounts, "no refused publish left a mount")

    # ---- the child killed: a successor takes the held connection over; readers never fail ----
    kids = [p for p in children_of(s.mounter_pid()) if t1.encode() in cmdline(p)]
    check(len(kids) == 1, f"one child serves {t1}")
    os.kill(kids[0], signal.SIGKILL)
    t0 = time.time()
    check(read_back(t1, want), "a killed child's target reads on (its successor serves)")
    waited = time.time() - t0
    wait_for(lambda: [p for p in children_of(s.mounter_pid()) if t1.encode() in cmdline(p)] not in ([], kids),
             "a successor child")
    kids2 = [p for p in children_of(s.mounter_pid()) if t1.encode() in cmdline(p)]
    check(len(kids2) == 1 and kids2 != kids, f"one new child serves {t1} ({kids} -> {kids2}, first read back {waited:.2f} s)")
    check("successor serves the connection" in s.logs("mounter", tail=None), "the mounter says a successor took over")
    s.publish(t1, local, secret)
    check(read_back(t1, want), "the next publish of that target serves it too")

    # ---- the child stopped (SIGSTOP: alive, never answering): the next publish recovers -------
    kids = [p for p in children_of(s.mounter_pid()) if t1.encode() in cmdline(p)]
    check(len(kids) == 1, f"one child serves {t1} again")
    os.kill(kids[0], signal.SIGSTOP)
    t0 = time.time()
    s.publish(t1, local, secret)
    check(read_back(t1, want), f"a hung child's target is mounted again by the next publish ({time.time() - t0:.1f} s)")
    check(not cmdline(kids[0]) or not os.path.exists(f"/proc/{kids[0]}"), "the hung child was ended")

    # ---- the node plugin restarts: live mounts stay, state from mountinfo --------------------
    s.stop_node()
    check(read_back(t2, want), "mounts outlive the node plugin")
    s.start_node()
    s.publish(t2, local, secret, pod="p2", group="2000")
    check(len([x for x in mounts_under(s.kubelet) if x[0] == t2]) == 1, "after a restart, a publish of a live target is OK, no second mount")

    # ---- the mounter down: UNAVAILABLE, nothing mounted; Probe not ready ---------------------
    s.stop_mounter()
    check(s.identity.Probe(pb.ProbeRequest()).ready.value is False, "Probe is not ready with the mounter down")
    t4 = s.target("p4")
    code, msg = s.code_of(lambda: s.publish(t4, local, secret, pod="p4"))
    check(code == grpc.StatusCode.UNAVAILABLE and not os.path.exists(t4), f"mounter down: UNAVAILABLE, nothing left ({code}: {msg})")
    s.start_mounter()
    s.publish(t1, local, secret)
    check(read_back(t1, want), "after the mounter's restart the next publish mounts again")

    # ---- S3 + KMS (moto) -------------------------------------------------------------------
    s3_latency(s, keys, want)

    # ---- unpublish ---------------------------------------------------------------------------
    for t in (t1, t2):
        s.unpublish(t)
        check(not os.path.exists(t) and not [x for x in mounts_under(s.kubelet) if x[0] == t], f"unpublish unmounts and removes {t}")
        code, msg = s.code_of(lambda: s.unpublish(t))
        check(code == grpc.StatusCode.OK, f"unpublish of a missing target is OK ({code}: {msg})")

    # ---- no secret anywhere; the mounter never opened /dev/fuse nor mounted --------------------
    for p in [s.node.pid, s.mounter_pid()] + children_of(s.mounter_pid()):
        try:
            env = open(f"/proc/{p}/environ", "rb").read()
        except OSError:
            continue
        blob = b" ".join(cmdline(p)) + env
        check(not any(v.encode() in blob for v in s.secret_values), f"no secret in argv or environ of {p}")
    leaked = []
    for dirpath, _, files in os.walk(work):
        for f in files:
            path = os.path.join(dirpath, f)
            try:
                data = open(path, "rb").read()
            except OSError:
                continue
            if any(v.encode() in data for v in s.secret_values):
                leaked.append(path)
    check(not leaked, f"no secret in any file under the test's directory (logs included): {leaked}")
    s.stop_mounter()
    traces = [os.path.join(work, f) for f in os.listdir(work) if f.startswith("mounter.strace")]
    bad_calls = []
    for t in traces:
        for line in open(t):
            if "/dev/fuse" in line or re.search(r"\b(u?mount|umount2)\(", line):
                bad_calls.append(line.strip())
    check(traces and not bad_calls, f"the mounter and its children never open /dev/fuse or mount: {bad_calls[:3]}")
    check(not FAILS, f"{len(FAILS)} failures")
    return 1 if FAILS else 0


def s3_latency(s, keys, want):
    """An S3 store and a KMS key on moto: the publish latency the closing note gives."""
    import boto3

    port = free_port()
    # The recording (tests/python: pod identity) holds the pods' tokens: outside `work`.
    s.moto = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)],
                              env=dict(os.environ, MOTO_RECORDER_FILEPATH=os.path.join(keys, "moto-recording")),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": url, "AWS_EC2_METADATA_DISABLED": "true"}
    wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, "moto_server")
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket="models")
    kms = boto3.client("kms", endpoint_url=url, region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    s.sealfs("seal", os.path.join(keys, "model"), "s3://models/llama", "--key", f"kms:{key_id}", env=dict(s.env, **aws))
    # The driver's identity: the mounter's environment, which its children inherit.
    s.stop_mounter()
    s.env.update(aws)
    s.start_mounter()
    t = s.target("s3pod")
    ms = first_byte_latency(s, t, {"uri": "s3://models/llama", "keys": f"kms:{key_id}", "region": "us-east-1"})
    print(f"publish latency (NodePublishVolume -> first byte), S3 + KMS (moto): {ms:.0f} ms", flush=True)
    check(read_back(t, want), "an S3 + KMS volume publishes and reads")
    s.unpublish(t)
    pod_identity(s, url, key_id, want)


def recorded(url):
    """moto's recording since the last reset: (action or S3, form, headers) per request."""
    import base64
    import urllib.parse
    import urllib.request

    text = urllib.request.urlopen(f"{url}/moto-api/recorder/download-recording").read().decode()
    out = []
    for line in text.splitlines():
        e = json.loads(line)
        body = e.get("body") or ""
        if e.get("body_encoded"):
            body = base64.b64decode(body).decode(errors="replace")
        form = urllib.parse.parse_qs(body) if "Action=" in body else {}
        out.append((form.get("Action", [""])[0], form, {k.lower(): v for k, v in e["headers"].items()}))
    return out


def pod_identity(s, url, key_id, want):
    """authenticationSource: pod: the child trades the pod's token (audience sts.amazonaws.com)
    for credentials of its own (AssumeRoleWithWebIdentity, session name naming the pod), gets
    none of the driver's (the mounter holds static keys), takes a fresh token on republish,
    and names the pod on its audit lines."""
    import urllib.request

    import base64

    role = "arn:aws:iam::123456789012:role/models-reader"

    def jwt(sub, sig):
        b = lambda x: base64.urlsafe_b64encode(json.dumps(x).encode()).rstrip(b"=").decode()
        return f"{b({'alg': 'RS256'})}.{b({'sub': sub, 'aud': ['sts.amazonaws.com']})}.{sig}"

    sa = "system:serviceaccount:ml:vllm"  # what publish() names: namespace ml, account vllm
    tok1, tok2, driver_tok = jwt(sa, "c2lnLW9uZQ"), jwt(sa, "c2lnLXR3bw"), jwt("system:serviceaccount:kube-system:sealfs-csi-mounter", "ZHJpdmVy")
    s.secret_values += [tok1, tok2, driver_tok]
    # The mounter as deployed: IRSA (role + token file) and more of the driver's identity,
    # without AWS_EC2_METADATA_DISABLED of its own; the pod's child must get none of it.
    driver_token_file = os.path.join(os.path.dirname(s.work.rstrip("/")), "driver-token-" + os.path.basename(s.work))
    with open(driver_token_file, "w") as f:
        f.write(driver_tok)
    driver = {"AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/driver", "AWS_WEB_IDENTITY_TOKEN_FILE": driver_token_file,
              "AWS_SESSION_TOKEN": "driver-session", "AWS_PROFILE": "driver"}
    s.stop_mounter()
    s.env.update(driver)
    s.env.pop("AWS_EC2_METADATA_DISABLED", None)
    s.start_mounter()

    def attrs(tok):
        return {"uri": "s3://models/llama", "keys": f"kms:{key_id}", "region": "us-east-1",
                "authenticationSource": "pod", "awsRoleArn": role,
                "csi.storage.k8s.io/serviceAccount.tokens": json.dumps(
                    {"sts.amazonaws.com": {"token": tok, "expirationTimestamp": "2026-12-07T10:00:00Z"}})}

    post = lambda path: urllib.request.urlopen(urllib.request.Request(f"{url}{path}", method="POST"))
    post("/moto-api/recorder/reset-recording")
    post("/moto-api/recorder/start-recording")
    t = s.target("podid")
    s.publish(t, attrs(tok1), pod="podid")
    check(read_back(t, want), "a pod-identity volume publishes and reads")
    reqs = recorded(url)
    sts = [f for a, f, _ in reqs if a == "AssumeRoleWithWebIdentity"]
    check(sts and all(f.get("RoleArn") == [role] and f.get("RoleSessionName") == ["sealfs.ml.podid"]
                      and f.get("WebIdentityToken") == [tok1] for f in sts),
          f"the child assumed the role with the pod's token, session sealfs.ml.podid ({len(sts)} calls)")
    signed = [h.get("authorization", "") for a, _, h in reqs if a != "AssumeRoleWithWebIdentity"]
    check(signed and all("Credential=" in x and "Credential=testing/" not in x for x in signed),
          f"every S3 and KMS call is signed with the pod's credentials, none with the driver's ({len(signed)} calls)")
    check(not [f for a, f, _ in reqs if driver_tok in f.get("WebIdentityToken", [])],
          "the driver's token was never sent")
    child = [p for p in children_of(s.mounter_pid()) if t.encode() in cmdline(p)]
    check(len(child) == 1, f"one child serves the pod's volume ({child})")
    env = open(f"/proc/{child[0]}/environ", "rb").read().split(b"\0") if child else []
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", *driver)
    check(env and not [v for v in env if v.split(b"=")[0].decode() in names]
          and b"AWS_EC2_METADATA_DISABLED=true" in env,
          "the pod's child inherits none of the driver's identity (keys, role, token file, session, profile) and never asks the instance role")
    blob = b" ".join(cmdline(child[0])) + b" ".join(env) if child else b""
    check(child and tok1.encode() not in blob, "the pod's token is in neither the child's argv nor its environment")

    def child_token():
        for fd in os.listdir(f"/proc/{child[0]}/fd"):
            path = f"/proc/{child[0]}/fd/{fd}"
            try:
                if "sealfs-web-identity" in os.readlink(path):
                    return open(path).read()
            except OSError:
                pass
        return None

    check(child and child_token() == tok1, "the child's token is in a memfd, not a file")
    # kubelet republishes (requiresRepublish) with a fresh token: same child, new token.
    s.publish(t, attrs(tok2), pod="podid")
    after = [p for p in children_of(s.mounter_pid()) if t.encode() in cmdline(p)]
    check(after == child and child_token() == tok2, "a republish hands the same child the fresh token")
    code, msg = s.code_of(lambda: s.publish(t, attrs("not-a-token"), pod="podid"))
    check(code == grpc.StatusCode.INVALID_ARGUMENT and "not a JWT" in msg, f"a bad token is refused ({code}: {msg})")
    # A well-formed token of another service account reaches the child, which refuses it.
    other = jwt("system:serviceaccount:ml:intruder", "b3RoZXI")
    code, msg = s.code_of(lambda: s.publish(t, attrs(other), pod="podid"))
    check(code == grpc.StatusCode.UNAVAILABLE and "not a token of the pod's service account" in msg,
          f"the child refuses a token of another service account ({code}: {msg})")
    check(child_token() == tok2, "and the child keeps its good token")
    check(read_back(t, want), "the pod's volume still reads after the refresh")
    log = open(os.path.join(s.work, "mounter.log"), "rb").read().decode(errors="replace")
    audit = [l for l in log.splitlines() if "sealfs::audit" in l and "podid" in l]
    check(audit and all("pod_namespace=ml" in l and "pod_name=podid" in l and "pod_uid=uid-podid" in l
                        and "pod_service_account=vllm" in l for l in audit),
          f"the child's audit lines name the pod ({len(audit)} lines)")
    post("/moto-api/recorder/stop-recording")
    s.unpublish(t)
    os.unlink(driver_token_file)


if __name__ == "__main__":
    sys.exit(main())
