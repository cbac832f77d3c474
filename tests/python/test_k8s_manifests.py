#!/usr/bin/env python3
"""Checks every manifest under deploy/kubernetes (issue 21, part 4).

  python3 tests/python/test_k8s_manifests.py      (scripts/test.sh runs it; exit 1 on failure)
  python3 -m pytest tests/python/test_k8s_manifests.py   (the same checks, one test each)

1. Every document of every *.yaml under deploy/kubernetes (examples/ included) is validated
   against the Kubernetes OpenAPI schemas by kubernetes-validate, strict mode (an unknown
   or misspelt field fails), for the oldest and the newest Kubernetes release supported.
   Duplicate keys in a mapping fail too (YAML keeps the last one silently).
2. A kind those schemas do not know fails, except the ones checked here by hand:
   kustomization.yaml (Kustomization: every resource exists, every manifest outside
   examples/ is listed, image tags pinned) and KServe's InferenceService (a CRD: its
   required fields by hand, and its predictor's pod fields validated as a Pod's spec).
3. The issue's must-haves: the CSIDriver's fields; the node plugin privileged with
   /var/lib/kubelet Bidirectional, /dev/fuse, the plugin and mounter socket dirs, the
   registrar and livenessprobe sidecars; the mounter with capabilities exactly [IPC_LOCK],
   no /dev, no kubelet directory, OnDelete, system-node-critical, an IRSA service account;
   every image pinned (no `latest`, no missing tag); the examples' volume attributes from
   the allow-list only; the Dockerfile's stages; docs/KUBERNETES.md naming each attribute
   and secret.
"""
import pathlib
import re
import sys
import traceback

import yaml

# Pinned (scripts/install-test-deps.sh installs exactly this): its schemas go up to 1.37.
KUBERNETES_VALIDATE = "1.37.0"
# The oldest Kubernetes the manifests must load on (ValidatingAdmissionPolicy v1 is 1.30),
# and the newest this kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", "1.37.0")

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
DRIVER = "csi.sealfs.dev"
# The issue's allow-list of volume attributes, and the secrets' keys.
ATTRIBUTES = {"uri", "keys", "trustSigner", "modelDigest", "cacheSize", "region",
              "endpointUrl", "authenticationSource", "awsRoleArn"}
SECRETS = {"keyFile", "pkcs11Pin", "transitToken"}
MOUNTER_SOCKET = "/run/sealfs/mounter.sock"
KUBELET = "/var/lib/kubelet"
# Kinds checked by hand instead of by the schemas (see the docstring).
HAND_CHECKED = {("kustomize.config.k8s.io/v1beta1", "Kustomization"),
                ("serving.kserve.io/v1beta1", "InferenceService")}
# InferenceService predictor fields that are KServe's own, not a PodSpec's.
KSERVE_PREDICTOR_ONLY = {
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType",
    "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher",
    "labels", "annotations", "deploymentStrategy", "autoScaling", "workerSpec", "model",
    "sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface", "pmml",
    "lightgbm", "paddle", "storageUri", "storage", "kind",
}


# ---- loading ---------------------------------------------------------------------------

class StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys."""


def _mapping(loader, node, deep=False):
    seen = set()
    for k, _ in node.value:
        key = loader.construct_object(k, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", k.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def manifest_files():
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
    assert files, f"no manifests under {DEPLOY}"
    return files


_DOCS = None


def documents():
    """[(path, index, doc)] of every non-empty document of every manifest."""
    global _DOCS
    if _DOCS is None:
        out = []
        for p in manifest_files():
            for i, d in enumerate(yaml.load_all(p.read_text(), Loader=StrictLoader)):
                if d is None:
                    continue
                assert isinstance(d, dict), f"{rel(p)} document {i}: not a mapping"
                out.append((p, i, d))
        _DOCS = out
    return _DOCS


def rel(p):
    return str(p.relative_to(ROOT))


def where(p, i, d):
    name = (d.get("metadata") or {}).get("name", "?")
    return f"{rel(p)} document {i} ({d.get('kind')}/{name})"


def find(kind, name=None, under=None):
    hits = [(p, i, d) for p, i, d in documents()
            if d.get("kind") == kind
            and (name is None or d.get("metadata", {}).get("name") == name)
            and (under is None or p.parent == under)]
    assert hits, f"no {kind}{' ' + name if name else ''} under {rel(under or DEPLOY)}"
    return hits


def one(kind, name, under=DEPLOY):
    hits = find(kind, name, under)
    assert len(hits) == 1, f"{len(hits)} {kind}/{name} under {rel(under)}"
    return hits[0][2]


def pod_specs():
    """(where, pod spec) of every workload, InferenceService predictors included."""
    for p, i, d in documents():
        k = d.get("kind")
        if k == "Pod":
            yield where(p, i, d), d["spec"]
        elif k in ("Deployment", "DaemonSet", "StatefulSet", "Job", "ReplicaSet"):
            yield where(p, i, d), d["spec"]["template"]["spec"]
        elif k == "InferenceService":
            yield where(p, i, d), predictor_pod_spec(d)


def containers(spec):
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def argv(c):
    return list(c.get("command") or []) + [str(a) for a in c.get("args") or []]


def has_args(c, *seq):
    """Whether `seq` appears in order, contiguous, in the container's argv."""
    a = argv(c)
    return any(a[j:j + len(seq)] == list(seq) for j in range(len(a)))


def memory_bytes(q):
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(q))
    assert m, f"memory quantity {q!r} not in Ki/Mi/Gi/Ti"
    return int(m.group(1)) * {None: 1, "Ki": 1 << 10, "Mi": 1 << 20,
                              "Gi": 1 << 30, "Ti": 1 << 40}[m.group(2)]


def predictor_pod_spec(isvc):
    pred = isvc["spec"]["predictor"]
    return {k: v for k, v in pred.items() if k not in KSERVE_PREDICTOR_ONLY}


# ---- 1 and 2: the schemas ----------------------------------------------------------------

def test_kubernetes_validate_is_the_pinned_version():
    import importlib.metadata
    v = importlib.metadata.version("kubernetes-validate")
    assert v == KUBERNETES_VALIDATE, (
        f"kubernetes-validate {v} installed, {KUBERNETES_VALIDATE} pinned: "
        "run scripts/install-test-deps.sh")


def test_every_document_validates_against_the_kubernetes_schemas():
    import kubernetes_validate as kv
    errors, checked = [], 0
    for p, i, d in documents():
        for field in ("apiVersion", "kind"):
            assert d.get(field), f"{where(p, i, d)}: no {field}"
        if (d["apiVersion"], d["kind"]) in HAND_CHECKED:
            continue
        for version in K8S_VERSIONS:
            try:
                kv.validate(d, version, strict=True)
                checked += 1
            except kv.SchemaNotFoundError:
                errors.append(f"{where(p, i, d)}: no Kubernetes {version} schema for "
                              f"{d['apiVersion']} {d['kind']} (a CRD? check it by hand here)")
            except kv.ValidationError as e:
                path = "/".join(str(x) for x in e.path)
                errors.append(f"{where(p, i, d)}: Kubernetes {version}: {path}: {e.message}")
    assert not errors, "\n".join(errors)
    assert checked >= 2 * 10, f"only {checked} validations ran"


def test_inference_service_by_hand():
    import kubernetes_validate as kv
    hits = find("InferenceService")
    for p, i, d in hits:
        w = where(p, i, d)
        assert d["apiVersion"] == "serving.kserve.io/v1beta1", w
        unknown = set(d) - {"apiVersion", "kind", "metadata", "spec"}
        assert not unknown, f"{w}: unknown top-level fields {unknown}"
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"]), \
            f"{w}: metadata.name must be a DNS-1035 label"
        assert set(d["spec"]) <= {"predictor", "transformer", "explainer"}, f"{w}: spec"
        pred = d["spec"]["predictor"]
        frameworks = [k for k in ("model", "containers", "sklearn", "xgboost", "tensorflow",
                                  "pytorch", "triton", "onnx", "huggingface", "pmml",
                                  "lightgbm", "paddle") if k in pred]
        assert len(frameworks) == 1, \
            f"{w}: the predictor needs exactly one of model, containers or a framework: {frameworks}"
        text = yaml.safe_dump(d)
        assert "storageUri" not in text, f"{w}: the model comes from the sealfs volume, not storageUri"
        # The predictor's pod fields are a PodSpec: validate them as one (strict).
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": d["metadata"]["name"], "namespace": "x"},
               "spec": predictor_pod_spec(d)}
        for version in K8S_VERSIONS:
            try:
                kv.validate(pod, version, strict=True)
            except kv.ValidationError as e:
                raise AssertionError(
                    f"{w}: predictor as a PodSpec, Kubernetes {version}: "
                    f"{'/'.join(str(x) for x in e.path)}: {e.message}") from None


def test_kustomization_lists_every_manifest_and_pins_the_image():
    k = yaml.load((DEPLOY / "kustomization.yaml").read_text(), Loader=StrictLoader)
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    listed = set(k["resources"])
    for r in listed:
        assert (DEPLOY / r).is_file(), f"kustomization.yaml: resource {r} does not exist"
    top = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == top, f"kustomization.yaml resources {sorted(listed)} != manifests {sorted(top)}"
    for img in k.get("images") or []:
        tag = str(img.get("newTag", ""))
        assert tag and tag != "latest" or img.get("digest"), f"kustomization image {img}: pin a tag"


# ---- 3: the must-haves ---------------------------------------------------------------------

def test_csidriver():
    d = one("CSIDriver", DRIVER)
    s = d["spec"]
    assert s["attachRequired"] is False
    assert s["podInfoOnMount"] is True
    assert s["requiresRepublish"] is True
    assert s["tokenRequests"] == [{"audience": "sts.amazonaws.com", "expirationSeconds": 3600}]
    assert sorted(s["volumeLifecycleModes"]) == ["Ephemeral", "Persistent"]
    # File: kubelet passes fsGroup for ROX and inline volumes (delegated: VOLUME_MOUNT_GROUP).
    assert s["fsGroupPolicy"] == "File"


def node_daemonset():
    return one("DaemonSet", "sealfs-csi-node")


def mounter_daemonset():
    return one("DaemonSet", "sealfs-csi-mounter")


def volume_by_name(spec, name):
    for v in spec.get("volumes") or []:
        if v["name"] == name:
            return v
    raise AssertionError(f"no volume {name}")


def test_node_plugin():
    ds = node_daemonset()
    spec = ds["spec"]["template"]["spec"]
    assert ds["metadata"]["namespace"] == "kube-system"
    assert spec["priorityClassName"] == "system-node-critical"
    assert not spec.get("hostNetwork"), "the node plugin needs no host network (unix sockets only)"
    assert spec.get("automountServiceAccountToken") is False
    by = {c["name"]: c for c in spec["containers"]}
    node = [c for c in spec["containers"] if has_args(c, "csi", "node")]
    assert len(node) == 1, "one container runs `sealfs csi node`"
    node = node[0]
    assert has_args(node, "--endpoint", "unix:///csi/csi.sock")
    assert has_args(node, "--node-id", "$(NODE_NAME)")
    assert has_args(node, "--mounter-socket", MOUNTER_SOCKET)
    env = {e["name"]: e for e in node.get("env") or []}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert node["securityContext"]["privileged"] is True
    assert node["livenessProbe"]["httpGet"]["path"] == "/healthz"
    mounts = {m["mountPath"]: m for m in node["volumeMounts"]}
    kubelet = mounts[KUBELET]
    assert kubelet.get("mountPropagation") == "Bidirectional"
    assert volume_by_name(spec, kubelet["name"])["hostPath"]["path"] == KUBELET
    assert volume_by_name(spec, mounts["/dev/fuse"]["name"])["hostPath"] == \
        {"path": "/dev/fuse", "type": "CharDevice"}
    assert volume_by_name(spec, mounts["/csi"]["name"])["hostPath"]["path"].rstrip("/") == \
        f"{KUBELET}/plugins/{DRIVER}"
    assert volume_by_name(spec, mounts["/run/sealfs"]["name"])["hostPath"]["path"] == "/run/sealfs"
    # Only the node plugin's own container propagates mounts.
    for c in spec["containers"]:
        if c is not node:
            for m in c.get("volumeMounts") or []:
                assert m.get("mountPropagation") in (None, "None"), f"{c['name']}: {m}"
            assert not (c.get("securityContext") or {}).get("privileged"), \
                f"{c['name']}: only the node plugin is privileged"
    reg = by["node-driver-registrar"]
    assert reg["image"].startswith("registry.k8s.io/sig-storage/csi-node-driver-registrar:")
    assert f"--kubelet-registration-path={KUBELET}/plugins/{DRIVER}/csi.sock" in argv(reg)
    reg_dir = {m["mountPath"]: m["name"] for m in reg["volumeMounts"]}["/registration"]
    assert volume_by_name(spec, reg_dir)["hostPath"]["path"].rstrip("/") == \
        f"{KUBELET}/plugins_registry"
    probe = by["livenessprobe"]
    assert probe["image"].startswith("registry.k8s.io/sig-storage/livenessprobe:")
    assert "--csi-address=/csi/csi.sock" in argv(probe)


def test_mounter():
    ds = mounter_daemonset()
    spec = ds["spec"]["template"]["spec"]
    assert ds["metadata"]["namespace"] == "kube-system"
    assert ds["spec"]["updateStrategy"] == {"type": "OnDelete"}, \
        "an upgrade must never restart the mounter under live mounts"
    assert spec["priorityClassName"] == "system-node-critical"
    for f in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(f), f"mounter: {f}"
    main = [c for c in spec["containers"] if has_args(c, "csi", "mounter")]
    assert len(main) == 1, "one container runs `sealfs csi mounter`"
    main = main[0]
    assert has_args(main, "--socket", MOUNTER_SOCKET)
    assert main["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    # uid 0 on purpose and stated (mounter.yaml): never left to the image's USER.
    assert main["securityContext"]["runAsUser"] == 0
    for c in containers(spec):
        sc = c.get("securityContext") or {}
        w = f"mounter container {c['name']}"
        assert sc.get("allowPrivilegeEscalation") is False, w
        assert sc.get("readOnlyRootFilesystem") is True, w
        assert not sc.get("privileged"), w
        caps = sc.get("capabilities") or {}
        assert caps.get("drop") == ["ALL"], w
        assert set(caps.get("add") or []) <= {"IPC_LOCK"}, f"{w}: capabilities {caps}"
        assert not c.get("volumeDevices"), w
        for m in c.get("volumeMounts") or []:
            assert not m["mountPath"].startswith(("/dev", KUBELET)), f"{w}: mounts {m['mountPath']}"
            assert m.get("mountPropagation") in (None, "None"), f"{w}: {m}"
    for v in spec.get("volumes") or []:
        hp = (v.get("hostPath") or {}).get("path", "")
        assert not hp.startswith(("/dev", KUBELET, "/proc", "/sys")), f"mounter volume {v}"
        assert "csi" not in v, f"mounter volume {v}"
    assert [v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v] == ["/run/sealfs"]
    env = {e["name"]: e.get("value") for e in main.get("env") or []}
    assert env.get("AWS_EC2_METADATA_DISABLED") == "true", \
        "children must not fall back to the node's instance role"
    # Locked memory is charged to the limit: at least one default volume's cache (256 MiB)
    # + a mount's overhead (64 MiB) + the mounter's (64 MiB).
    limit = memory_bytes(main["resources"]["limits"]["memory"])
    assert limit >= (256 + 64 + 64) << 20, f"mounter memory limit {limit}"
    # The driver's identity: an IRSA service account.
    sa = one("ServiceAccount", spec["serviceAccountName"])
    arn = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", arn), arn
    assert spec.get("automountServiceAccountToken") is False


def test_driver_pods_have_resources_and_no_rbac():
    for ds in (node_daemonset(), mounter_daemonset()):
        for c in containers(ds["spec"]["template"]["spec"]):
            r = c.get("resources") or {}
            w = f"{ds['metadata']['name']}/{c['name']}"
            assert "memory" in (r.get("requests") or {}) and "cpu" in r["requests"], w
            assert "memory" in (r.get("limits") or {}), w
    kinds = {d.get("kind") for _, _, d in documents()}
    assert not kinds & {"ClusterRole", "Role", "ClusterRoleBinding", "RoleBinding"}, \
        "no component calls the API server: no RBAC"


def test_every_image_is_pinned():
    refs = []
    for w, spec in pod_specs():
        for c in containers(spec):
            refs.append((f"{w} container {c.get('name')}", c.get("image", "")))
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        m = re.match(r"\s*FROM\s+(?:--platform=\S+\s+)?(\S+)", line, re.I)
        if m:
            refs.append(("Dockerfile", m.group(1)))
    assert len(refs) >= 8, refs
    for w, ref in refs:
        assert ref, f"{w}: no image"
        if "@sha256:" in ref:
            continue
        last = ref.rsplit("/", 1)[-1]
        assert ":" in last, f"{w}: {ref} has no tag (that is latest)"
        tag = last.split(":", 1)[1]
        assert tag and tag != "latest", f"{w}: {ref}: pin a version, not latest"


def sealfs_volumes():
    """(where, csi source, kind) of every csi.sealfs.dev volume: PVs and inline."""
    out = []
    for p, i, d in documents():
        if d.get("kind") == "PersistentVolume" and (d["spec"].get("csi") or {}).get("driver") == DRIVER:
            out.append((where(p, i, d), d["spec"]["csi"], "pv", d))
    for w, spec in pod_specs():
        for v in spec.get("volumes") or []:
            if (v.get("csi") or {}).get("driver") == DRIVER:
                out.append((f"{w} volume {v['name']}", v["csi"], "inline", v))
    return out


def test_examples_volume_attributes():
    vols = sealfs_volumes()
    kinds = {k for _, _, k, _ in vols}
    assert kinds == {"pv", "inline"}, f"examples need a PV and an inline volume: {kinds}"
    used = set()
    for w, csi, kind, obj in vols:
        attrs = csi.get("volumeAttributes") or {}
        bad = {k for k in attrs if k not in ATTRIBUTES and not k.startswith("csi.storage.k8s.io/")}
        assert not bad, f"{w}: attributes outside the allow-list: {bad}"
        assert attrs.get("uri"), f"{w}: uri is required"
        for k, v in attrs.items():
            assert isinstance(v, str), f"{w}: {k} must be a string"
        assert attrs.get("authenticationSource", "driver") in ("driver", "pod"), w
        if attrs.get("authenticationSource") == "pod":
            assert re.fullmatch(r"arn:aws:iam::\d{12}:role/\S+", attrs.get("awsRoleArn", "")), \
                f"{w}: authenticationSource: pod needs awsRoleArn"
        if "modelDigest" in attrs:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", attrs["modelDigest"]), w
        for k in attrs.get("keys", "").split():
            assert re.match(r"(file|kms|pkcs11|transit|shares|tpm2|kbs):", k), f"{w}: key {k}"
        if "file:secret" in attrs.get("keys", "").split():
            assert csi.get("nodePublishSecretRef", {}).get("name"), \
                f"{w}: keys file:secret needs a nodePublishSecretRef"
        assert csi.get("readOnly") is True, f"{w}: sealfs volumes are read-only"
        if kind == "pv":
            assert csi.get("volumeHandle"), w
            assert obj["spec"]["accessModes"] == ["ReadOnlyMany"], w
            for o in obj["spec"].get("mountOptions") or []:
                assert re.fullmatch(r"[a-z][a-z0-9_-]*(=[^\s/;|&$`'\"\\]+)?", o), \
                    f"{w}: mount option {o!r}: a long option, never a path or a shell word"
        else:
            # Inline volumes use the pod's identity (restrict-inline-volumes.yaml).
            assert attrs.get("authenticationSource") == "pod", w
        used |= set(attrs)
    want = {"uri", "keys", "trustSigner", "modelDigest", "cacheSize", "region",
            "authenticationSource", "awsRoleArn"}
    assert want <= used, f"the examples never show {want - used}"
    assert any("nodePublishSecretRef" in csi for _, csi, _, _ in vols)


def test_sealfs_mounts_are_read_only_and_models_reach_vllm_and_kserve():
    pvcs = {(d["metadata"].get("namespace"), d["metadata"]["name"]): d
            for _, _, d in documents() if d.get("kind") == "PersistentVolumeClaim"}
    pvs = {d["metadata"]["name"]: d for _, _, d in documents() if d.get("kind") == "PersistentVolume"}
    for p, i, d in documents():
        if d.get("kind") == "PersistentVolumeClaim" and d["spec"].get("volumeName"):
            pv = pvs.get(d["spec"]["volumeName"])
            assert pv, f"{where(p, i, d)}: no PV {d['spec']['volumeName']}"
            ref = pv["spec"].get("claimRef")
            assert ref is None or ref.get("name") == d["metadata"]["name"], where(p, i, d)
    seen = {}
    for p, i, d in documents():
        kind = d.get("kind")
        if kind not in ("Deployment", "InferenceService", "Pod"):
            continue
        w = where(p, i, d)
        spec = predictor_pod_spec(d) if kind == "InferenceService" else (
            d["spec"] if kind == "Pod" else d["spec"]["template"]["spec"])
        ns = d["metadata"].get("namespace")
        sealed = set()
        for v in spec.get("volumes") or []:
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
            if claim:
                pvc = pvcs.get((ns, claim))
                assert pvc, f"{w}: no PVC {ns}/{claim} in the examples"
                pv = pvs[pvc["spec"]["volumeName"]]
                if (pv["spec"].get("csi") or {}).get("driver") == DRIVER:
                    sealed.add(v["name"])
                    assert v["persistentVolumeClaim"].get("readOnly") is True, f"{w}: {v}"
            if (v.get("csi") or {}).get("driver") == DRIVER:
                sealed.add(v["name"])
        for c in containers(spec):
            for m in c.get("volumeMounts") or []:
                if m["name"] in sealed:
                    assert m.get("readOnly") is True, f"{w} {c['name']}: mount {m['mountPath']} readOnly"
                    seen.setdefault(kind, []).append((c, m["mountPath"]))
    assert set(seen) == {"Deployment", "InferenceService", "Pod"}, seen.keys()
    for kind in ("Deployment", "InferenceService"):
        c, path = seen[kind][0]
        assert c["image"].startswith("vllm/vllm-openai:"), f"{kind}: {c['image']}"
        assert path == "/models/llama3"
        assert has_args(c, "--model", "/models/llama3"), f"{kind}: --model /models/llama3"
        assert has_args(c, "--load-format", "safetensors"), f"{kind}: --load-format safetensors"


def test_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(froms) == 2, f"multi-stage: a build and a runtime stage: {froms}"
    assert froms[1].startswith("debian:bookworm-slim"), froms[1]
    assert "cargo build --release --features tpm2 --locked" in text
    assert re.search(r"^USER\s+\d+", text, re.M), "the image's default user is not root"
    assert (DEPLOY / "Dockerfile.dockerignore").read_text().count("target") >= 1


def test_docs_name_every_attribute_and_secret():
    doc = (ROOT / "docs" / "KUBERNETES.md").read_text()
    for name in sorted(ATTRIBUTES | SECRETS | {DRIVER, "fsGroupPolicy", "OnDelete"}):
        assert f"`{name}`" in doc, f"docs/KUBERNETES.md does not name `{name}`"


def main():
    tests = [(n, f) for n, f in sorted(globals().items(), key=lambda kv: kv[1].__code__.co_firstlineno
                                        if callable(kv[1]) and hasattr(kv[1], "__code__") else 0)
             if n.startswith("test_") and callable(f)]
    failed = 0
    for name, f in tests:
        try:
            f()
            print(f"ok    {name}")
        except Exception as e:  # noqa: BLE001 - report every failure, then exit 1
            failed += 1
            frame = traceback.extract_tb(e.__traceback__)[-1]
            print(f"FAIL  {name}: {type(e).__name__}: {e}\n      at line {frame.lineno}: {frame.line}")
    n = len(documents())
    print(f"test_k8s_manifests: {len(tests) - failed}/{len(tests)} passed, "
          f"{n} documents in {len(manifest_files())} files, Kubernetes {' and '.join(K8S_VERSIONS)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
