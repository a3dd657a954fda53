"""The chart on a real Kubernetes API server (v1.20, started per session by tests/deploy/kube.py),
installed, upgraded, rolled back and uninstalled by Helm's own engine as platform teams do it,
for the default values and each realistic value set. What rendering cannot check is checked
here: admission and server-side validation, immutable fields on upgrade, secrets kept by
`lookup`, the Prometheus Operator's objects against its CRDs, a failed upgrade's rollback and
what an uninstall leaves behind."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.deploy.chart import CHART_DIR, RELEASE, Manifest
from tests.deploy.kube import Cluster, ClusterError, control_plane, wait_until
from tests.deploy.values_sets import VALUE_SETS

CRDS = Path(__file__).parent / "data" / "prometheus-operator"
FULLNAME = f"{RELEASE}-llmops"
INSTANCE = f"app.kubernetes.io/instance={RELEASE}"
# Every namespaced kind the chart makes, or that controllers make from what it makes.
KINDS = ("deployments,statefulsets,replicasets,pods,controllerrevisions,services,endpoints,"
         "configmaps,secrets,serviceaccounts,persistentvolumeclaims,networkpolicies,"
         "poddisruptionbudgets,horizontalpodautoscalers,ingresses,servicemonitors,podmonitors,"
         "prometheusrules")
# Fields the API server or controllers write: not part of what a release restores.
VOLATILE = ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields",
            "selfLink")
CONTROLLER_ANNOTATIONS = ("deployment.kubernetes.io/revision",)

value_sets = pytest.mark.parametrize("name", VALUE_SETS)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    try:
        with control_plane(tmp_path_factory.mktemp("k8s")) as running:
            running.kubectl("create", "-f", str(CRDS))
            running.kubectl("wait", "--for=condition=Established", "crd", "--all",
                            "--timeout=60s")
            yield running
    except ClusterError as e:
        pytest.fail(str(e))


# --- helm, as `helm install/upgrade/rollback/uninstall -n NAMESPACE` -----------------------

def install(cluster: Cluster, ns: str, values: dict[str, Any],
            chart: Path = CHART_DIR) -> dict[str, Any]:
    with cluster.helm(ns) as h:
        return h.install(helm.Chart.load(chart), RELEASE, values, namespace=ns,
                         create_namespace=True, timeout=120)


def upgrade(cluster: Cluster, ns: str, values: dict[str, Any],
            chart: Path = CHART_DIR) -> dict[str, Any]:
    with cluster.helm(ns) as h:
        return h.upgrade(helm.Chart.load(chart), RELEASE, values, namespace=ns, timeout=120)


def status(cluster: Cluster, ns: str, revision: int | None = None) -> dict[str, Any]:
    with cluster.helm(ns) as h:
        return h.status(RELEASE, revision=revision)


def released(release: dict[str, Any]) -> list[Manifest]:
    return [d for d in yaml.safe_load_all(release["manifest"]) if d]


# --- what is live -------------------------------------------------------------------------

def ref(doc: Manifest) -> str:
    """kind.version.group/name: in the version the chart sent, not the server's preferred one
    (autoscaling/v1 would hide an HPA's metrics)."""
    group, _, version = doc["apiVersion"].rpartition("/")
    kind = f"{doc['kind']}.{version}.{group}" if group else doc["kind"]
    return f"{kind}/{doc['metadata']['name']}"


def live(cluster: Cluster, ns: str, docs: list[Manifest]) -> dict[str, Manifest]:
    """The live objects of a release's manifest, without what the server and controllers
    write (status, versions, the Deployment controller's revision count)."""
    items = json.loads(cluster.kubectl("get", "-n", ns, "-o", "json",
                                       *[ref(d) for d in docs]).stdout)
    found = items["items"] if items.get("kind") == "List" else [items]
    state = {}
    for obj in found:
        obj.pop("status", None)
        meta = obj["metadata"]
        for key in VOLATILE:
            meta.pop(key, None)
        for key in CONTROLLER_ANNOTATIONS:
            meta.get("annotations", {}).pop(key, None)
        state[f"{obj['kind']}/{meta['name']}"] = obj
    return state


def generated_secrets(cluster: Cluster, ns: str) -> dict[str, dict[str, str]]:
    return {s["metadata"]["name"]: s["data"] for s in cluster.get("secrets", ns, INSTANCE)
            if s["metadata"]["name"].startswith(FULLNAME)
            and not s["metadata"]["name"].endswith("-external")}


def replicas(cluster: Cluster, ns: str, kind: str, name: str) -> int:
    obj = json.loads(cluster.kubectl("get", kind, name, "-n", ns, "-o", "json").stdout)
    count: int = obj["spec"]["replicas"]
    return count


# --- the values of each step ---------------------------------------------------------------

def first_pool_name(values: dict[str, Any], fallback: dict[str, Any]) -> str:
    model = (values.get("models") or fallback["models"])[0]
    slug = model["name"].lower().replace(".", "-")[:24].rstrip("-")
    return f"{FULLNAME}-{slug}-{model['pools'][0]['device']}"


def changed(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """What a platform team changes in a routine upgrade: one more replica in the first pool, a
    new pool for an existing model, a new model, tighter guardrails."""
    v = copy.deepcopy(values)
    models = v.setdefault("models", copy.deepcopy(defaults["models"]))
    models[0]["pools"][0]["replicas"] += 1
    for model in models:
        devices = {p["device"] for p in model["pools"]}
        if model["kind"] == "chat" and len(devices) == 1:
            extra = "cpu" if "gpu" in devices else "gpu"
            model["pools"].append({"device": extra, "replicas": 1, "priority": 5})
            break
    models.append({"name": "smollm2-360m-instruct", "kind": "chat", "context_length": 2048,
                   "hfId": "HuggingFaceTB/SmolLM2-360M-Instruct", "lora": {"enabled": False},
                   "pools": [{"device": "cpu", "replicas": 1}]})
    gateway = v.setdefault("gateway", {})
    gateway.setdefault("config", {})["guardrails"] = {
        "default": {"max_prompt_chars": 200000, "max_messages": 256}}
    return v


def autoscaled(values: dict[str, Any]) -> dict[str, Any]:
    v = copy.deepcopy(values)
    v.setdefault("vllm", {})["autoscaling"] = {"enabled": True, "maxReplicas": 6}
    return v


def bad(values: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """An upgrade that renders and passes the values schema but that the API server refuses,
    together with a change applied before the refusal (the guardrails ConfigMap)."""
    v = copy.deepcopy(values)
    v["gateway"]["config"]["guardrails"]["default"]["max_messages"] = 8
    if v.get("postgresql", {}).get("enabled", True):
        # The classic: a StatefulSet's volume claim templates cannot change after install.
        v.setdefault("postgresql", {})["persistence"] = {"size": "50Gi"}
        return v, "Forbidden"
    v["gateway"]["extraEnv"] = [{"name": "1-not-a-variable", "value": "x"}]
    return v, "Invalid value"


def next_version(tmp: Path) -> Path:
    """The chart as its next release: same templates, version bumped (labels change)."""
    chart = tmp / "llmops"
    shutil.copytree(CHART_DIR, chart)  # follows files/'s links into observability/
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    meta["version"], meta["appVersion"] = "0.2.0", "0.2.0"
    (chart / "Chart.yaml").write_text(yaml.safe_dump(meta))
    return chart


def survivors(values: dict[str, Any], defaults: dict[str, Any]) -> set[str]:
    """What `helm uninstall` must leave (docs/deploying.md): the admin key and the database
    password (helm.sh/resource-policy: keep), the chart's data and model-cache claims (keep),
    and the StatefulSets' claims (Kubernetes never deletes those with their StatefulSet)."""
    def on(key: str, sub: str = "enabled") -> Any:
        return values.get(key, {}).get(sub, defaults[key][sub])
    kept = set()
    if not on("auth", "existingSecret"):
        kept.add(f"Secret/{FULLNAME}-admin-key")
    if on("postgresql") and not on("postgresql", "existingSecret"):
        kept.add(f"Secret/{FULLNAME}-postgresql")
    for volume, key in (("data", "data"), ("model-cache", "modelCache")):
        persistence = {**defaults[key]["persistence"], **values.get(key, {}).get("persistence", {})}
        if persistence["enabled"] and not persistence["existingClaim"]:
            kept.add(f"PersistentVolumeClaim/{FULLNAME}-{volume}")
    if on("postgresql"):
        kept.add(f"PersistentVolumeClaim/data-{FULLNAME}-postgresql-0")
    if on("redis") and on("redis", "persistence")["enabled"]:
        kept.add(f"PersistentVolumeClaim/data-{FULLNAME}-redis-0")
    if on("qdrant"):
        kept.add(f"PersistentVolumeClaim/storage-{FULLNAME}-qdrant-0")
    return kept


# --- the tests -----------------------------------------------------------------------------

@value_sets
def test_every_object_passes_server_side_dry_run(cluster: Cluster, name: str) -> None:
    """Rendered for this cluster (its API versions, `lookup`), every object goes through
    admission and validation with nothing stored, autoscaled engines included."""
    ns = f"dry-{name}"
    cluster.kubectl("create", "namespace", ns)
    with cluster.helm(ns) as h:
        release = h.install(helm.Chart.load(CHART_DIR), RELEASE, autoscaled(VALUE_SETS[name]),
                            namespace=ns, dry_run="server")
    docs = released(release)
    served = cluster.api_versions()
    assert {d["apiVersion"] for d in docs} <= served
    done = cluster.kubectl("create", "--dry-run=server", "-n", ns, "-o", "name", "-f", "-",
                           stdin=release["manifest"], check=False)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) == len(docs)
    kinds = {d["kind"] for d in docs}
    assert {"NetworkPolicy", "HorizontalPodAutoscaler", "ServiceAccount"} <= kinds
    if name == "gpu-cluster":
        assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "PodDisruptionBudget",
                "Ingress"} <= kinds


def test_api_versions_follow_the_cluster(cluster: Cluster) -> None:
    """Kubernetes 1.20 serves PDBs and HPAs only as betas: the chart asks the cluster."""
    served = cluster.api_versions()
    assert "policy/v1" not in served and "autoscaling/v2" not in served
    with cluster.helm("default") as h:
        release = h.install(helm.Chart.load(CHART_DIR), RELEASE, autoscaled({}),
                            namespace="default", dry_run="server")
    versions = {d["kind"]: d["apiVersion"] for d in released(release)}
    assert versions["PodDisruptionBudget"] == "policy/v1beta1"
    assert versions["HorizontalPodAutoscaler"] == "autoscaling/v2beta2"


@value_sets
def test_install_upgrade_roll_back_and_uninstall(cluster: Cluster, name: str,
                                                 tmp_path: Path) -> None:
    values = VALUE_SETS[name]
    defaults = helm.Chart.load(CHART_DIR).values
    ns = f"live-{name}"

    # Install: every object admitted and stored; generated secrets made once.
    release = install(cluster, ns, values)
    assert release["status"] == "deployed"
    docs = released(release)
    assert len(live(cluster, ns, docs)) == len(docs)
    secrets = generated_secrets(cluster, ns)
    if name != "external":
        assert f"{FULLNAME}-admin-key" in secrets

    # A routine upgrade: replicas, a new pool, a new model, guardrails.
    first = first_pool_name(values, defaults)
    before = replicas(cluster, ns, "statefulset", first)
    routine = changed(values, defaults)
    upgraded = upgrade(cluster, ns, routine)
    assert upgraded["status"] == "deployed" and upgraded["revision"] == 2
    assert replicas(cluster, ns, "statefulset", first) == before + 1
    new_pool = f"{FULLNAME}-smollm2-360m-instruct-cpu"
    assert replicas(cluster, ns, "statefulset", new_pool) == 1
    config = cluster.get("configmaps", ns, INSTANCE)
    assert any("max_prompt_chars: 200000" in c["data"].get("config.yaml", "") for c in config)
    assert generated_secrets(cluster, ns) == secrets

    # The next chart version (every label's chart and app version change; selectors must
    # not), with the engines autoscaled. An autoscaler has scaled the gateway meanwhile: the
    # upgrade keeps its count (neither the chart's minimum nor the API server's default of 1).
    scaled_gateway = routine.get("gateway", {}).get("autoscaling", {}).get(
        "enabled", defaults["gateway"]["autoscaling"]["enabled"])
    if scaled_gateway:
        cluster.kubectl("scale", "deployment", f"{FULLNAME}-gateway", "-n", ns, "--replicas=7")
    target = autoscaled(routine)
    upgraded = upgrade(cluster, ns, target, chart=next_version(tmp_path))
    assert upgraded["status"] == "deployed" and upgraded["chart_version"] == "0.2.0"
    assert replicas(cluster, ns, "statefulset", first) == before + 1
    if scaled_gateway:
        assert replicas(cluster, ns, "deployment", f"{FULLNAME}-gateway") == 7
    hpas = {h["metadata"]["name"]: h for h in cluster.get(
        "horizontalpodautoscalers.v2beta2.autoscaling", ns, INSTANCE)}
    assert first in hpas and new_pool in hpas
    metric = hpas[first]["spec"]["metrics"][0]["external"]
    assert metric["metric"]["name"] == "vllm:num_requests_waiting"
    assert metric["metric"]["selector"]["matchLabels"] == {"llmops_io_pool": first}
    assert hpas[first]["spec"]["minReplicas"] == before + 1
    assert generated_secrets(cluster, ns) == secrets
    good = live(cluster, ns, released(upgraded))

    # A bad upgrade fails part-way; rolling back restores the previous revision exactly.
    broken, error = bad(target)
    with pytest.raises(helm.HelmError, match=error):
        upgrade(cluster, ns, broken, chart=next_version(tmp_path / "again"))
    assert status(cluster, ns)["status"] == "failed"
    with cluster.helm(ns) as h:
        h.rollback(RELEASE, version=3, timeout=120)
    restored = status(cluster, ns)
    assert restored["revision"] == 5 and restored["status"] == "deployed"
    assert restored["manifest"] == status(cluster, ns, revision=3)["manifest"]
    assert live(cluster, ns, released(restored)) == good
    assert generated_secrets(cluster, ns) == secrets

    # Uninstall leaves only what must survive; the kept secrets are adopted by a reinstall.
    with cluster.helm(ns) as h:
        h.uninstall(RELEASE, timeout=120)
    kept = survivors(values, defaults)

    def left() -> set[str]:
        return {f"{o['kind']}/{o['metadata']['name']}" for o in cluster.get(KINDS, ns, INSTANCE)}
    wait_until("only the kept objects left", lambda: left() == kept, 60)
    reinstalled = install(cluster, ns, values)
    assert reinstalled["status"] == "deployed"
    again = generated_secrets(cluster, ns)
    kept_secrets = {k.partition("/")[2] for k in kept if k.startswith("Secret/")}
    assert {k: again[k] for k in kept_secrets} == {k: secrets[k] for k in kept_secrets}
