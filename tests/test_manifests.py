"""Deploy artifacts: the kustomize overlays in k8s/, the Dockerfiles and the compose file in docker/.

Overlays are rendered by a small kustomize subset below (the fields our kustomizations use; any other
field fails the test rather than being ignored). Where `kubectl` is installed its built-in kustomize
renders them too and both renderings must agree. Core kinds are validated against the Kubernetes
OpenAPI schemas (kubernetes-validate); CRD kinds and the cross-object wiring are checked by hand.
"""
from __future__ import annotations

import ast
import copy
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DOCKER = ROOT / "docker"
OVERLAYS = ["cpu", "gpu", "gpu-keda"]
GPU_OVERLAYS = {"gpu", "gpu-keda"}
NAMESPACE = "loraplex"
SERVER_PORT = 8000
METRICS_PORT = 9464  # LORAPLEX_METRICS_PORT: /metrics only, never on the public Service
APP_UID = 10001
# Oldest Kubernetes we support and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ["1.29.0", "latest"]
# Kinds from CRDs: no upstream schema, checked field by field in the tests below.
CRD_KINDS = {"ServiceMonitor", "ScaledObject", "InferencePool", "InferenceModel", "HTTPRoute"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
# The server's metric contract (what the endpoint picker and the autoscalers read).
PICKER_METRICS = {
    "--total-queued-requests-metric": "vllm:num_requests_waiting",
    "--kv-cache-usage-percentage-metric": "vllm:gpu_cache_usage_perc",
    "--lora-info-metric": "vllm:lora_requests_info",
}
QUEUE_METRIC = "loraplex_num_requests_waiting"
# Settings the deploy contract names before service/loraplex/config.py declares them.
# --- a kustomize subset ---------------------------------------------------------------------------
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "components", "images", "patches"}
# Strategic-merge keys of the lists we patch; any other list is replaced, as kustomize does for
# lists without a patchMergeKey (tolerations, args, envFrom).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath"}


def load_yaml(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render(kdir: Path, docs: list[dict] | None = None) -> list[dict]:
    """Build the kustomization in `kdir`; a Component is built on top of `docs`."""
    kust = load_yaml(kdir / "kustomization.yaml")[0]
    unsupported = set(kust) - KUSTOMIZATION_FIELDS
    assert not unsupported, f"{kdir}: the test renderer does not implement {unsupported}"
    docs = copy.deepcopy(docs or [])
    for ref in kust.get("resources", []):
        path = kdir / ref
        docs += render(path) if path.is_dir() else load_yaml(path)
    for ref in kust.get("components", []):
        docs = render(kdir / ref, docs)
    for patch in kust.get("patches", []):
        assert set(patch) == {"path"}, f"{kdir}: only file patches are implemented: {patch}"
        docs = apply_patch(docs, load_yaml(kdir / patch["path"])[0])
    for image in kust.get("images", []):
        for container in all_containers(docs):
            if container["image"].split(":")[0] == image["name"]:
                container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    if "namespace" in kust:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = kust["namespace"]
    return docs


def apply_patch(docs: list[dict], patch: dict) -> list[dict]:
    hits = [i for i, d in enumerate(docs) if (d["kind"], name(d)) == (patch["kind"], name(patch))]
    assert len(hits) == 1, f"patch {patch['kind']}/{name(patch)} matches {len(hits)} resources"
    if patch.get("$patch") == "delete":
        return docs[: hits[0]] + docs[hits[0] + 1 :]
    docs[hits[0]] = strategic_merge(docs[hits[0]], patch)
    return docs


def strategic_merge(base, patch, field: str = ""):
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = strategic_merge(base[key], value, key) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key, merged = MERGE_KEYS[field], list(base)
        for item in patch:
            at = next((i for i, b in enumerate(merged) if b[key] == item[key]), None)
            if item.get("$patch") == "delete":
                merged = [b for b in merged if b[key] != item[key]]
            elif at is None:
                merged.append(item)
            else:
                merged[at] = strategic_merge(merged[at], item)
        return merged
    return patch


# --- lookups --------------------------------------------------------------------------------------
def name(doc: dict) -> str:
    return doc["metadata"]["name"]


def index(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], name(d)): d for d in docs}


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in {"Deployment", "StatefulSet"}]


def all_containers(docs: list[dict]) -> list[dict]:
    return [c for w in workloads(docs) for c in pod_spec(w)["containers"] + pod_spec(w).get("initContainers", [])]


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def server(docs: list[dict]) -> dict:
    return index(docs)[("Deployment", "loraplex-server")]


def container(workload: dict, cname: str) -> dict:
    return next(c for c in pod_spec(workload)["containers"] if c["name"] == cname)


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(K8S / "overlays" / request.param)


# --- rendering and schemas ------------------------------------------------------------------------
@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl (built-in kustomize) not installed")
@pytest.mark.parametrize("kdir", [f"overlays/{o}" for o in OVERLAYS] + ["base", "prometheus-adapter"])
def test_renderer_agrees_with_kubectl_kustomize(kdir: str) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / kdir)], capture_output=True, text=True, check=True)
    expected = {(d["kind"], name(d)): d for d in yaml.safe_load_all(out.stdout) if d}
    assert index(render(K8S / kdir)) == expected


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_kinds_match_the_kubernetes_schema(overlay, version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    version = kv.latest_version() if version == "latest" else version
    errors = []
    for doc in (d for d in overlay[1] if d["kind"] not in CRD_KINDS):
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as err:
            errors.append(f"{doc['kind']}/{name(doc)} on {version}: {err.message} at {list(err.path)}")
    assert not errors, "\n".join(errors)


def test_only_known_crd_kinds(overlay) -> None:
    """A kind with no upstream schema must be one of CRD_KINDS, whose fields the tests check."""
    kv = pytest.importorskip("kubernetes_validate")
    unknown = []
    for doc in (d for d in overlay[1] if d["kind"] not in CRD_KINDS):
        try:
            kv.validate(doc, kv.latest_version())
        except kv.SchemaNotFoundError:
            unknown.append(f"{doc['apiVersion']} {doc['kind']}")
    assert not unknown, f"no schema for {unknown}: add to CRD_KINDS and check their fields"


def test_every_object_lands_in_the_namespace(overlay) -> None:
    for doc in overlay[1]:
        expected = None if doc["kind"] in CLUSTER_SCOPED else NAMESPACE
        assert doc["metadata"].get("namespace") == expected, f"{doc['kind']}/{name(doc)}"
    assert not [d for d in overlay[1] if "$patch" in json.dumps(d)], "a patch directive leaked"


# --- the server pod -------------------------------------------------------------------------------
def check_server(docs: list[dict]) -> None:
    srv = container(server(docs), "server")
    assert srv["args"] == ["loraplex", "serve", "--host", "0.0.0.0"]
    assert {p["name"]: p["containerPort"] for p in srv["ports"]} == {"http": SERVER_PORT, "metrics": METRICS_PORT}
    probes = {p: srv[p]["httpGet"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {p: g["path"] for p, g in probes.items()} == {
        "startupProbe": "/startupz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    assert all(g["port"] in ("http", SERVER_PORT) for g in probes.values())
    sleep = srv["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) > 0
    assert pod_spec(server(docs))["terminationGracePeriodSeconds"] > int(sleep[1]) + 30
    mounts = {m["mountPath"]: m["name"] for m in srv["volumeMounts"]}
    assert {"/data/adapters", "/models", "/tmp"} <= set(mounts)
    volumes = {v["name"]: v for v in pod_spec(server(docs))["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    claim = volumes[mounts["/data/adapters"]]["persistentVolumeClaim"]["claimName"]
    pvc = index(docs)[("PersistentVolumeClaim", claim)]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "adapters are shared by trainer and all replicas"


def check_references(docs: list[dict]) -> None:
    """Every name a pod spec, Service, PDB or autoscaler points at exists and selects something."""
    idx = index(docs)
    for w in workloads(docs):
        spec = pod_spec(w)
        assert selects(w["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])
        vol_names = {v["name"] for v in spec.get("volumes", [])}
        vol_names |= {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for c in spec["containers"]:
            assert {m["name"] for m in c.get("volumeMounts", [])} <= vol_names, name(w)
            for src in c.get("envFrom", []):
                kind = "ConfigMap" if "configMapRef" in src else "Secret"
                ref = src.get("configMapRef") or src["secretRef"]
                assert (kind, ref["name"]) in idx, f"{name(w)} reads missing {kind}/{ref['name']}"
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in idx
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", spec["serviceAccountName"]) in idx
    pods = [(w, w["spec"]["template"]["metadata"]["labels"]) for w in workloads(docs)]
    for svc in of_kind(docs, "Service"):
        backing = [w for w, labels in pods if selects(svc["spec"]["selector"], labels)]
        assert len(backing) == 1, f"Service/{name(svc)} selects {len(backing)} workloads"
        port_names = {p.get("name") for c in pod_spec(backing[0])["containers"] for p in c.get("ports", [])}
        port_nums = {p["containerPort"] for c in pod_spec(backing[0])["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names | port_nums, f"Service/{name(svc)} -> {port['targetPort']}"
    server_labels = server(docs)["spec"]["template"]["metadata"]["labels"]
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        assert selects(pdb["spec"]["selector"]["matchLabels"], server_labels)
    for policy in of_kind(docs, "NetworkPolicy"):
        selector = policy["spec"]["podSelector"].get("matchLabels")
        assert selector is None or any(selects(selector, labels) for _, labels in pods), name(policy)


def check_autoscaling(docs: list[dict]) -> None:
    hpas, scaled = of_kind(docs, "HorizontalPodAutoscaler"), of_kind(docs, "ScaledObject")
    assert len(hpas) + len(scaled) == 1, "exactly one autoscaler may own the server's replica count"
    assert "replicas" not in server(docs)["spec"], "the autoscaler owns replicas; apply would fight it"
    for hpa in hpas:
        target = hpa["spec"]["scaleTargetRef"]
        assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "loraplex-server"}
        assert [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]] == [QUEUE_METRIC]
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for obj in scaled:
        assert obj["spec"]["scaleTargetRef"]["name"] == "loraplex-server"
        trigger = obj["spec"]["triggers"][0]
        assert trigger["type"] == "prometheus" and QUEUE_METRIC in trigger["metadata"]["query"]
        assert float(trigger["metadata"]["threshold"]) > 0 and obj["spec"]["minReplicaCount"] >= 1


def check_security(docs: list[dict]) -> None:
    """The restricted Pod Security profile the namespace enforces, plus a read-only root."""
    ns = index(docs)[("Namespace", NAMESPACE)]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for w in workloads(docs):
        spec = pod_spec(w)
        assert spec["securityContext"]["runAsNonRoot"] is True, name(w)
        assert spec["securityContext"].get("runAsUser", 1) != 0, name(w)
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name(w)
        for c in spec["containers"]:
            ctx = c["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"], c["name"]
            assert ctx["readOnlyRootFilesystem"] is True, c["name"]
            assert "limits" in c["resources"] and "requests" in c["resources"], c["name"]
        if w["spec"]["template"]["spec"]["containers"][0]["image"].split(":")[0].endswith("loraplex"):
            assert spec["securityContext"]["runAsUser"] == APP_UID, "must match the Dockerfile's user"
            assert spec["enableServiceLinks"] is False, "service links inject LORAPLEX_*_PORT env vars"


def check_gpu(docs: list[dict], expect_gpu: bool) -> None:
    for cname, w in (("server", server(docs)), ("trainer", index(docs)[("Deployment", "loraplex-trainer")])):
        limit = container(w, cname)["resources"]["limits"].get("nvidia.com/gpu")
        if expect_gpu:
            assert limit == 1, f"{cname} needs a GPU limit"
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(w)["tolerations"]
            assert pod_spec(w)["nodeSelector"]
        else:
            assert limit is None and "tolerations" not in pod_spec(w)
    assert ("nvidia.com/gpu" in json.dumps(docs)) == expect_gpu
    device = index(docs)[("ConfigMap", "loraplex-config")]["data"]["LORAPLEX_DEVICE"]
    assert device == ("cuda" if expect_gpu else "cpu")


def check_metrics_port(docs: list[dict]) -> None:
    """/metrics names every tenant's adapters: served on its own port, which the public Service leaves out."""
    config = index(docs)[("ConfigMap", "loraplex-config")]["data"]
    assert int(config["LORAPLEX_METRICS_PORT"]) == METRICS_PORT
    public = index(docs)[("Service", "loraplex-server")]
    assert [p["targetPort"] for p in public["spec"]["ports"]] == ["http"]
    annotations = server(docs)["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == METRICS_PORT


def check_crds(docs: list[dict]) -> None:
    idx = index(docs)
    server_labels = server(docs)["spec"]["template"]["metadata"]["labels"]
    for mon in of_kind(docs, "ServiceMonitor"):
        assert mon["apiVersion"] == "monitoring.coreos.com/v1"
        (scraped,) = [s for s in of_kind(docs, "Service") if selects(mon["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert name(scraped) != "loraplex-server" and selects(scraped["spec"]["selector"], server_labels)
        assert [(p["name"], p["targetPort"]) for p in scraped["spec"]["ports"]] == [("metrics", "metrics")]
        assert [(e["port"], e["path"]) for e in mon["spec"]["endpoints"]] == [("metrics", "/metrics")]
    for pool in of_kind(docs, "InferencePool"):
        assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
        assert selects(pool["spec"]["selector"]["matchLabels"], server_labels)
        assert [p["number"] for p in pool["spec"]["targetPorts"]] == [SERVER_PORT]
        picker_ref = pool["spec"]["endpointPickerRef"]
        epp_svc = idx[("Service", picker_ref["name"])]
        epp_labels = epp_svc["spec"]["selector"]
        epp = next(w for w in workloads(docs) if selects(epp_labels, w["spec"]["template"]["metadata"]["labels"]))
        args = container(epp, "epp")["args"]
        flags = dict(zip(args[::2], args[1::2]))
        assert flags["--pool-name"] == name(pool) and flags["--pool-namespace"] == NAMESPACE
        assert {f: flags[f] for f in PICKER_METRICS} == PICKER_METRICS
        assert int(flags["--model-server-metrics-port"]) == METRICS_PORT  # the LoRA labels, off the API port
        assert int(flags["--grpc-port"]) == picker_ref["port"]["number"]
        assert picker_ref["port"]["number"] in {p["port"] for p in epp_svc["spec"]["ports"]}
    pools = {name(p) for p in of_kind(docs, "InferencePool")}
    for model in of_kind(docs, "InferenceModel"):
        assert model["spec"]["poolRef"]["name"] in pools and model["spec"]["modelName"]
    for route in of_kind(docs, "HTTPRoute"):
        refs = [b for r in route["spec"]["rules"] for b in r["backendRefs"]]
        assert all(b["kind"] == "InferencePool" and b["name"] in pools for b in refs)


def test_server_pod(overlay) -> None:
    check_server(overlay[1])


def test_references_resolve(overlay) -> None:
    check_references(overlay[1])


def test_autoscaling(overlay) -> None:
    check_autoscaling(overlay[1])


def test_security(overlay) -> None:
    check_security(overlay[1])


def test_gpu_only_in_gpu_overlays(overlay) -> None:
    check_gpu(overlay[1], overlay[0] in GPU_OVERLAYS)


def test_crd_objects(overlay) -> None:
    check_crds(overlay[1])


def test_metrics_stay_off_the_public_service(overlay) -> None:
    check_metrics_port(overlay[1])


def test_gpu_overlays_route_and_monitor() -> None:
    for o in GPU_OVERLAYS:
        kinds = {d["kind"] for d in render(K8S / "overlays" / o)}
        assert {"ServiceMonitor", "InferencePool"} <= kinds, o
    assert {"ScaledObject"} <= {d["kind"] for d in render(K8S / "overlays" / "gpu-keda")}


def test_settings_names_are_real(overlay) -> None:
    """A misspelt LORAPLEX_* key is silently ignored by pydantic-settings; catch it here."""
    fields = settings_fields()
    for kind, ref in (("ConfigMap", "loraplex-config"), ("Secret", "loraplex-api-keys")):
        obj = index(overlay[1])[(kind, ref)]
        for key in {**obj.get("data", {}), **obj.get("stringData", {})}:
            if key.startswith("LORAPLEX_"):
                assert key.removeprefix("LORAPLEX_").lower() in fields, key
    assert set(index(overlay[1])[("Secret", "loraplex-api-keys")]["stringData"].values()) == {"REPLACE_ME"}


def test_console_is_off_in_production(overlay) -> None:
    """The web console (on by default in `loraplex serve`) is off in every deployed overlay unless enabled."""
    assert index(overlay[1])[("ConfigMap", "loraplex-config")]["data"]["LORAPLEX_CONSOLE"] == "false"


def test_prometheus_adapter_serves_the_hpa_metric() -> None:
    (cm,) = render(K8S / "prometheus-adapter")
    rules = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    served = {re.match(r"(\w+)\{", r["seriesQuery"]).group(1) for r in rules if r["name"]["as"] == "${1}"}
    assert QUEUE_METRIC in served
    assert all(set(r["resources"]["overrides"]) == {"namespace", "pod"} for r in rules)


@pytest.mark.parametrize("mutate", [
    lambda d: container(server(d), "server")["startupProbe"]["httpGet"].update(path="/healthz"),
    lambda d: pod_spec(server(d)).update(terminationGracePeriodSeconds=5),
    lambda d: index(d)[("Service", "loraplex-server")]["spec"]["selector"].update(app="other"),
    lambda d: index(d)[("PodDisruptionBudget", "loraplex-server")]["spec"]["selector"]["matchLabels"].update(x="y"),
    lambda d: of_kind(d, "InferencePool")[0]["spec"].update(targetPorts=[{"number": 9000}]),
    lambda d: container(server(d), "server")["resources"]["limits"].pop("nvidia.com/gpu"),
    lambda d: container(server(d), "server")["securityContext"].update(readOnlyRootFilesystem=False),
    lambda d: of_kind(d, "HorizontalPodAutoscaler")[0]["spec"]["scaleTargetRef"].update(name="nope"),
    lambda d: index(d)[("Service", "loraplex-server")]["spec"]["ports"].append({"name": "metrics", "port": 9464, "targetPort": "metrics"}),
], ids=["probe-path", "grace", "svc-selector", "pdb-selector", "pool-port", "gpu-limit", "ro-root", "hpa-target", "public-metrics"])
def test_checks_catch_broken_manifests(mutate) -> None:
    docs = render(K8S / "overlays" / "gpu")
    mutate(docs)
    with pytest.raises((AssertionError, KeyError, StopIteration)):
        for check in (check_server, check_references, check_autoscaling, check_security, check_crds, check_metrics_port):
            check(docs)
        check_gpu(docs, expect_gpu=True)


def settings_fields() -> set[str]:
    tree = ast.parse((ROOT / "service" / "loraplex" / "config.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}


# --- Dockerfiles ----------------------------------------------------------------------------------
def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(l.split(None, 1)[0].upper(), l.split(None, 1)[1].strip()) for l in text.splitlines() if l.strip()]


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_dockerfile(variant: str) -> None:
    instructions = dockerfile(DOCKER / f"Dockerfile.{variant}")
    froms = [args for op, args in instructions if op == "FROM"]
    assert len(froms) >= 2 and all(" AS " in f.upper() for f in froms), "multi-stage, named stages"
    runtime = final_stage(instructions)
    ops = {op: args for op, args in runtime}  # the last of each instruction wins, as in Docker
    assert ops["USER"].split(":")[0] not in {"root", "0"}
    assert re.search(rf"--uid \$\{{UID\}}", ops["RUN"]) and f"ARG UID={APP_UID}" in {f"{o} {a}" for o, a in runtime}
    # Exec form must be valid JSON: Docker silently runs anything else through /bin/sh.
    probe = json.loads(ops["HEALTHCHECK"].split(" CMD ", 1)[1])
    assert probe[0] == "python" and "/healthz" in probe[-1]
    assert ops["EXPOSE"] == str(SERVER_PORT)
    assert json.loads(ops["CMD"]) == ["loraplex", "serve", "--host", "0.0.0.0"]
    assert set(json.loads(ops["VOLUME"])) == {"/data/adapters", "/models"}
    env = dict(kv.split("=", 1) for op, args in runtime if op == "ENV" for kv in shlex.split(args))
    assert env["LORAPLEX_DATA_DIR"] == "/data/adapters" and env["HF_HOME"] == "/models"
    build = " ".join(f"{op} {args}" for op, args in instructions)
    assert "ARG TORCH_VERSION=2.13.0" in build and 'pip install "torch==${TORCH_VERSION}"' in build
    assert 'pip install ".[redis]"' in build, "the worker and the job queue need the redis extra"
    if variant == "cpu":
        assert "download.pytorch.org/whl/cpu" in build
    else:
        assert all(f.startswith("nvidia/cuda:${CUDA_VERSION}") for f in froms)
        assert "download.pytorch.org/whl/${TORCH_CUDA}" in build and "ARG TORCH_CUDA=cu" in build


# --- compose --------------------------------------------------------------------------------------
def test_compose_stack() -> None:
    services = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())["services"]
    assert set(services) == {"server", "worker", "redis"}
    srv, worker, redis = services["server"], services["worker"], services["redis"]
    assert srv["command"] == ["loraplex", "serve", "--host", "0.0.0.0"]
    assert worker["command"] == ["loraplex", "worker"]
    assert "/healthz" in " ".join(srv["healthcheck"]["test"]) and redis["healthcheck"]["test"][-1] == "ping"
    for svc in (srv, worker):
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "adapters:/data/adapters" in svc["volumes"] and "models:/models" in svc["volumes"]
        assert svc["environment"]["LORAPLEX_REDIS_URL"] == "redis://redis:6379/0"
        settings = {k.removeprefix("LORAPLEX_").lower() for k in svc["environment"] if k.startswith("LORAPLEX_")}
        assert settings <= settings_fields()
    gpu = yaml.safe_load((DOCKER / "docker-compose.gpu.yml").read_text())["services"]
    for svc in ("server", "worker"):
        (device,) = gpu[svc]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and gpu[svc]["build"]["dockerfile"] == "docker/Dockerfile.cuda"
