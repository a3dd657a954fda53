"""The Helm chart, rendered by Helm's own engine: it lints, every object is valid Kubernetes,
the gateway accepts the config it writes, and bad values are refused with a clear message."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from llmops.cli.stack import (
    batch_worker_service,
    eval_worker_service,
    ingest_worker_service,
    worker_service,
)
from llmops.settings import Settings
from tests.deploy.chart import (
    CHART_DIR,
    NAMESPACE,
    ROOT,
    Manifest,
    chart,
    container_env,
    environment,
    find,
    manifests,
    one,
    pod_spec,
    render,
)
from tests.deploy.values_sets import CPU_ONLY, EXTERNAL, GPU_CLUSTER, VALUE_SETS

KUBERNETES = "1.35.0"  # a recent version kubernetes-validate ships schemas for
# Prometheus Operator kinds: no schema in kubernetes-validate; checked structurally below.
OPERATOR_GROUP = "monitoring.coreos.com/v1"
FULLNAME = "llm-llmops"

value_sets = pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Manifest]]:
    return {name: manifests(values) for name, values in VALUE_SETS.items()}


@value_sets
def test_lint_passes(values: dict[str, Any]) -> None:
    report = helm.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBERNETES}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_object_is_valid_kubernetes(rendered: dict[str, list[Manifest]], name: str) -> None:
    for doc in rendered[name]:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"] == OPERATOR_GROUP:
            _check_operator_object(doc)
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {where}: {e.message} at {list(e.path)}")


def _check_operator_object(doc: Manifest) -> None:
    assert doc["kind"] in {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    spec = doc["spec"]
    if doc["kind"] == "PrometheusRule":
        for group in spec["groups"]:
            assert group["name"] and group["rules"]
            for rule in group["rules"]:
                assert ("alert" in rule) != ("record" in rule) and rule["expr"]
        return
    endpoints = spec["endpoints" if doc["kind"] == "ServiceMonitor" else "podMetricsEndpoints"]
    assert spec["selector"]["matchLabels"] and all(e["port"] and e["path"] for e in endpoints)


@value_sets
def test_gateway_accepts_the_config_it_is_given(
    values: dict[str, Any], tmp_path: Path
) -> None:
    """The ConfigMap's YAML and the Deployment's environment, loaded by `Settings` exactly as
    `python -m gateway` loads them in the pod."""
    docs = manifests(values)
    config = one(docs, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"]
    gateway = pod_spec(one(docs, "Deployment", f"{FULLNAME}-gateway"))["containers"][0]
    env = container_env(docs, gateway)
    mount = next(m["mountPath"] for m in gateway["volumeMounts"] if m["name"] == "config")
    assert env["LLMOPS_CONFIG"] == f"{mount}/config.yaml"
    (tmp_path / "config.yaml").write_text(config)
    env["LLMOPS_CONFIG"] = str(tmp_path / "config.yaml")
    with environment({k: v for k, v in env.items() if k.startswith("LLMOPS_")}):
        settings = Settings()

    declared = values.get("models") or chart().values["models"]
    assert [m.name for m in settings.models] == [m["name"] for m in declared]
    for model, spec in zip(settings.models, declared, strict=True):
        assert model.context_length == spec["context_length"]
        assert [p.device for p in model.pools] == [p["device"] for p in spec["pools"]]
        for pool, pool_spec in zip(model.pools, spec["pools"], strict=True):
            assert len(pool.urls) == pool_spec["replicas"]
            for key, value in pool_spec.get("routing", {}).items():
                assert getattr(pool, key) == value
    assert settings.host == "0.0.0.0" and settings.port == 8000
    assert settings.database_url.startswith("postgresql://")
    assert settings.redis_url.startswith(("redis://", "<secret:"))
    assert str(settings.admin_key_file).startswith("/var/run/secrets/llmops/")
    assert settings.retrieval.gateway_url == \
        f"http://{FULLNAME}-gateway.{NAMESPACE}.svc.cluster.local:8000"
    assert settings.embedding_model() is not None
    if values is GPU_CLUSTER:
        assert settings.routing.cooldown_s == 5 and settings.drift.sample_rate == 0.1
        assert settings.routing.weight_prefix == 3.0 and settings.routing.load_floor == 8
        assert settings.retrieval.score_threshold == 0.5  # merged with the chart's own keys
        assert settings.retrieval.embedding_model == "bge-small-en-v1.5"
        assert settings.metrics.port == 9090
        assert settings.metrics.token is not None
        assert settings.retrieval.qdrant_api_key is not None
    if values is CPU_ONLY:
        assert settings.retrieval.qdrant_url is None  # the embedded engine, on the data volume
    if values is EXTERNAL:
        assert settings.database_url == EXTERNAL["externalDatabase"]["url"]
        assert settings.retrieval.qdrant_url == EXTERNAL["externalQdrant"]["url"]


def test_pool_urls_name_each_vllm_replica(rendered: dict[str, list[Manifest]]) -> None:
    docs = rendered["gpu-cluster"]
    config = yaml.safe_load(one(docs, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    sets = {s["metadata"]["name"]: s for s in find(docs, "StatefulSet")}
    services = {s["metadata"]["name"]: s for s in find(docs, "Service")}
    for model in config["models"]:
        for pool in model["pools"]:
            for i, url in enumerate(pool["urls"]):
                host, port = url.removeprefix("http://").split(":")
                pod, service, namespace = host.split(".")[:3]
                name = pod.rsplit("-", 1)[0]
                assert pod == f"{name}-{i}" and service == name and namespace == NAMESPACE
                assert sets[name]["spec"]["serviceName"] == name
                assert services[name]["spec"]["clusterIP"] == "None"
                assert int(port) == services[name]["spec"]["ports"][0]["port"]
                assert len(pool["urls"]) == sets[name]["spec"]["replicas"]


def test_chat_engines_schedule_by_priority_and_the_gateway_knows_it(
        rendered: dict[str, list[Manifest]]) -> None:
    """Each pool's `priority_scheduling` matches its engines' flag: vLLM refuses a request
    priority on engines started without it."""
    docs = rendered["gpu-cluster"]
    config = yaml.safe_load(one(docs, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    sets = {s["metadata"]["name"]: s for s in find(docs, "StatefulSet")}
    kinds = set()
    for model in config["models"]:
        for pool in model["pools"]:
            name = pool["urls"][0].removeprefix("http://").split(".")[1]
            args = pod_spec(sets[name])["containers"][0]["args"]
            flagged = "--scheduling-policy" in args
            assert pool["priority_scheduling"] is flagged is (model["kind"] == "chat")
            if flagged:
                assert args[args.index("--scheduling-policy") + 1] == "priority"
            kinds.add(model["kind"])
    assert kinds == {"chat", "embedding"}
    off = manifests({"vllm": {"priorityScheduling": False}})
    config = yaml.safe_load(one(off, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    assert not any(p["priority_scheduling"] for m in config["models"] for p in m["pools"])
    assert not any("--scheduling-policy" in pod_spec(s)["containers"][0].get("args", [])
                   for s in find(off, "StatefulSet"))


def test_gpu_pools_get_gpus_scheduling_and_probes(rendered: dict[str, list[Manifest]]) -> None:
    docs = rendered["gpu-cluster"]
    big = one(docs, "StatefulSet", f"{FULLNAME}-qwen2-5-72b-instruct-gpu")
    spec = pod_spec(big)
    vllm = spec["containers"][0]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert vllm["args"][vllm["args"].index("--tensor-parallel-size") + 1] == "4"
    model = vllm["args"][vllm["args"].index("--model") + 1]
    assert model == "/models/weights/Qwen2.5-72B-Instruct-AWQ"
    assert "--quantization" in vllm["args"] and "--enable-lora" not in vllm["args"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"] == [{"key": "dedicated", "value": "llm", "effect": "NoSchedule"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert vllm[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert {v["name"] for v in spec["volumes"]} >= {"model-cache", "shm"}

    llama = pod_spec(one(docs, "StatefulSet", f"{FULLNAME}-llama-3-1-8b-instruct-gpu"))
    args = llama["containers"][0]["args"]
    assert args[args.index("--max-lora-rank") + 1] == "64" and "--enable-prefix-caching" in args
    assert llama["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                     "effect": "NoSchedule"}]
    env = {e["name"]: e for e in llama["containers"][0]["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]["value"] == "True"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-token"
    # Adapters are read from the shared data volume at the path the workers wrote them to.
    data = next(m for m in llama["containers"][0]["volumeMounts"] if m["name"] == "data")
    assert data == {"name": "data", "mountPath": "/var/lib/llmops", "readOnly": True}

    cpu = pod_spec(one(docs, "StatefulSet", f"{FULLNAME}-llama-3-1-8b-instruct-cpu"))
    assert cpu["containers"][0]["image"].startswith(
        "public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:")
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"].get("limits", {})
    assert "tolerations" not in cpu

    finetune = pod_spec(one(docs, "Deployment", f"{FULLNAME}-worker-finetune"))
    worker = finetune["containers"][0]
    assert worker["image"].startswith("ghcr.io/llmops/llmops-worker-gpu:")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["args"][worker["args"].index("-Q") + 1] == "finetune"
    assert worker["args"][worker["args"].index("--pool") + 1] == "solo"
    assert finetune["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    # Workers run as the local stack runs them (llmops/cli/stack.py).
    assert worker["args"] == ["celery", *worker_service(Path("config.yaml")).argv[3:]]
    ingest = pod_spec(one(docs, "Deployment", f"{FULLNAME}-worker-ingest"))["containers"][0]
    local = ingest_worker_service(Path("config.yaml")).argv[3:]
    local[local.index("--concurrency") + 1] = "8"  # workers.ingest.concurrency
    assert ingest["args"] == ["celery", *local]
    assert "nvidia.com/gpu" not in ingest["resources"].get("limits", {})
    evaluator = pod_spec(one(docs, "Deployment", f"{FULLNAME}-worker-eval"))
    assert evaluator["containers"][0]["args"] == [
        "celery", *eval_worker_service(Path("config.yaml")).argv[3:]]
    # Eval runs reach models through the gateway: no GPU, no weights.
    assert "nvidia.com/gpu" not in evaluator["containers"][0]["resources"].get("limits", {})
    assert "model-cache" not in {v["name"] for v in evaluator["volumes"]}
    # So do batches.
    batcher = pod_spec(one(docs, "Deployment", f"{FULLNAME}-worker-batch"))
    assert batcher["containers"][0]["args"] == [
        "celery", *batch_worker_service(Path("config.yaml")).argv[3:]]
    assert "nvidia.com/gpu" not in batcher["containers"][0]["resources"].get("limits", {})
    assert "model-cache" not in {v["name"] for v in batcher["volumes"]}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_chat_engines_report_cached_prompt_tokens(rendered: dict[str, list[Manifest]],
                                                  name: str) -> None:
    engines = [d for d in find(rendered[name], "StatefulSet")
               if d["metadata"]["labels"].get("app.kubernetes.io/component") == "vllm"]
    assert engines
    for doc in engines:
        args = pod_spec(doc)["containers"][0]["args"]
        chat = "--runner" not in args  # embedding engines run the pooling runner
        for flag in ("--enable-prefix-caching", "--enable-prompt-tokens-details"):
            assert (flag in args) == chat, doc["metadata"]["name"]


def test_cpu_only_runs_no_gpu_anywhere(rendered: dict[str, list[Manifest]]) -> None:
    docs = rendered["cpu-only"]
    for doc in docs:
        if doc["kind"] in {"Deployment", "StatefulSet"}:
            for c in pod_spec(doc)["containers"]:
                assert not any("gpu" in r for r in c.get("resources", {}).get("limits", {})), \
                    doc["metadata"]["name"]
    assert not find(docs, "HorizontalPodAutoscaler") and not find(docs, "PodDisruptionBudget")
    assert not find(docs, "StatefulSet", f"{FULLNAME}-qdrant")


def test_gateway_scales_and_survives_drains(rendered: dict[str, list[Manifest]]) -> None:
    docs = rendered["default"]
    hpa = one(docs, "HorizontalPodAutoscaler", f"{FULLNAME}-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{FULLNAME}-gateway"
    deployment = one(docs, "Deployment", f"{FULLNAME}-gateway")
    # The HPA owns the count: installs start at its minimum, upgrades keep the live count
    # (test_chart_live.py), never the API server's default of 1.
    assert deployment["spec"]["replicas"] == hpa["spec"]["minReplicas"]
    pdb = one(docs, "PodDisruptionBudget", f"{FULLNAME}-gateway")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    gateway = pod_spec(deployment)["containers"][0]
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_a_fine_tuning_worker_with_several_gpus_trains_on_all_of_them(tmp_path: Path) -> None:
    values = {**GPU_CLUSTER, "workers": {**GPU_CLUSTER["workers"], "finetune": {
        "gpu": {"count": 4, "product": "NVIDIA-H100-80GB-HBM3"}}}}
    docs = manifests(values)
    deployment = one(docs, "Deployment", f"{FULLNAME}-worker-finetune")
    kubernetes_validate.validate(deployment, KUBERNETES, strict=True)
    worker = pod_spec(deployment)["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "4"
    # The worker's settings, loaded as in the pod: jobs default to all four GPUs.
    (tmp_path / "config.yaml").write_text(
        one(docs, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    env = {k: v for k, v in container_env(docs, worker).items() if k.startswith("LLMOPS_")}
    with environment({**env, "LLMOPS_CONFIG": str(tmp_path / "config.yaml")}):
        assert Settings().finetune.devices == 4
    # On the CPU a job trains in one process unless it asks for more.
    cpu = manifests(CPU_ONLY)
    worker = pod_spec(one(cpu, "Deployment", f"{FULLNAME}-worker-finetune"))["containers"][0]
    assert "LLMOPS_FINETUNE__DEVICES" not in container_env(cpu, worker)


def test_the_console_cookie_is_secure_behind_a_tls_ingress(tmp_path: Path) -> None:
    """TLS ends at the Ingress, so the gateway sees plain HTTP: the chart marks the console's
    session cookie Secure itself, and an explicit value wins."""
    tls = {"ingress": {"enabled": True, "tls": [{"secretName": "t", "hosts": ["x.example"]}],
                       "hosts": [{"host": "x.example", "paths": [{"path": "/",
                                                                  "pathType": "Prefix"}]}]}}

    def console(values: dict[str, Any]) -> Any:
        config = one(manifests(values), "ConfigMap", f"{FULLNAME}-config")["data"]
        (tmp_path / "config.yaml").write_text(config["config.yaml"])
        with environment({"LLMOPS_CONFIG": str(tmp_path / "config.yaml")}):
            return Settings().console

    assert console(CPU_ONLY).secure_cookie is None  # decided per request (its scheme)
    assert console(CPU_ONLY).enabled and console(CPU_ONLY).session_ttl_s == 8 * 3600
    assert console({**CPU_ONLY, **tls}).secure_cookie is True
    assert console({**CPU_ONLY, **tls, "console": {"secureCookie": False}}).secure_cookie is False
    assert console({**CPU_ONLY, "console": {"enabled": False}}).enabled is False


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_pod_is_locked_down(rendered: dict[str, list[Manifest]], name: str) -> None:
    for doc in rendered[name]:
        if doc["kind"] not in {"Deployment", "StatefulSet"}:
            continue
        spec = pod_spec(doc)
        where = doc["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            # Qdrant writes next to its binary; everything else runs read-only.
            assert sc["readOnlyRootFilesystem"] is (not where.endswith("-qdrant")), where
            assert ":" in c["image"] and not c["image"].endswith((":latest", ":")), where


def test_network_policy_admits_only_gateway_and_workers(
    rendered: dict[str, list[Manifest]]
) -> None:
    docs = rendered["default"]
    policy = one(docs, "NetworkPolicy", f"{FULLNAME}-vllm")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    engines = [e for e in find(docs, "StatefulSet")
               if e["metadata"]["labels"]["app.kubernetes.io/component"] == "vllm"]
    assert engines
    for engine in engines:  # it selects every vLLM pod ...
        labels = engine["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
    for doc in docs:  # ... and no other pod
        if doc["kind"] in {"Deployment", "StatefulSet"} and doc not in engines:
            assert not selector.items() <= doc["spec"]["template"]["metadata"]["labels"].items()

    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    [peer] = rule["from"]
    assert set(peer) == {"podSelector"}  # no namespaceSelector: this namespace only
    admitted = {d["metadata"]["name"] for d in docs if d["kind"] in {"Deployment", "StatefulSet"}
                and _selects(peer["podSelector"], d["spec"]["template"]["metadata"]["labels"])}
    assert admitted == {f"{FULLNAME}-gateway", f"{FULLNAME}-worker-finetune",
                        f"{FULLNAME}-worker-ingest"}
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    # The data stores are fenced the same way; eval and batch workers, which call models
    # through the gateway, reach the store and the broker only.
    for store in ("postgresql", "redis", "qdrant"):
        fence = one(docs, "NetworkPolicy", f"{FULLNAME}-{store}")
        [fenced] = fence["spec"]["ingress"][0]["from"]
        clients = {d["metadata"]["name"] for d in docs
                   if d["kind"] in {"Deployment", "StatefulSet"}
                   and _selects(fenced["podSelector"], d["spec"]["template"]["metadata"]["labels"])}
        through = ({f"{FULLNAME}-worker-eval", f"{FULLNAME}-worker-batch"}
                   if store in ("postgresql", "redis") else set())
        assert clients == admitted | through, store


def _selects(selector: Manifest, labels: dict[str, str]) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_secrets_are_generated_never_written_in_values(
    rendered: dict[str, list[Manifest]]
) -> None:
    first, again = manifests(), manifests()
    key = one(first, "Secret", f"{FULLNAME}-admin-key")["data"]["admin-key"]
    assert key != one(again, "Secret", f"{FULLNAME}-admin-key")["data"]["admin-key"]
    assert "sk-llmops" not in (CHART_DIR / "values.yaml").read_text()
    # With existingSecret the chart renders no Secret of its own for it, and mounts that one.
    docs = rendered["external"]
    assert not find(docs, "Secret", f"{FULLNAME}-admin-key")
    volumes = pod_spec(one(docs, "Deployment", f"{FULLNAME}-gateway"))["volumes"]
    admin = next(v for v in volumes if v["name"] == "admin-key")
    assert admin["secret"]["secretName"] == "llmops-admin"
    assert not find(docs, "StatefulSet", f"{FULLNAME}-postgresql")
    assert not find(docs, "StatefulSet", f"{FULLNAME}-redis")


def test_monitoring_is_built_from_observability(rendered: dict[str, list[Manifest]]) -> None:
    """One source of truth: the chart's files/ are links into observability/."""
    docs = rendered["gpu-cluster"]
    source = ROOT / "observability"
    linked = CHART_DIR / "files"
    for link in ("recording.yml", "alerts.yml", "dashboards"):
        assert (linked / link).is_symlink() and (linked / link).resolve() == source / link
    [rule] = find(docs, "PrometheusRule")
    groups = [yaml.safe_load((source / f).read_text())["groups"]
              for f in ("recording.yml", "alerts.yml")]
    assert rule["spec"]["groups"] == groups[0] + groups[1]
    boards = {d["metadata"]["name"]: d for d in find(docs, "ConfigMap")
              if d["metadata"]["labels"].get("grafana_dashboard") == "1"}
    files = sorted((source / "dashboards").glob("*.json"))
    assert files and len(boards) == len(files)
    for path in files:
        board = boards[f"{FULLNAME}-dashboard-{path.stem.removeprefix('llmops-')}"]
        assert board["data"][path.name] == path.read_text().rstrip("\n")
    for kind in ("ServiceMonitor", "PodMonitor"):
        for monitor in find(docs, kind):
            assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    [service_monitor] = find(docs, "ServiceMonitor")
    assert service_monitor["spec"]["endpoints"][0]["port"] == "metrics"
    # Nothing of the Prometheus Operator by default: its CRDs may be missing.
    assert not [d for d in rendered["default"] if d["apiVersion"] == "monitoring.coreos.com/v1"]


@pytest.mark.parametrize(("values", "message"), [
    ({"models": [{"name": "m", "kind": "chat", "hfId": "a/b", "context_length": 512,
                  "pools": [{"device": "tpu", "replicas": 1}]}]},
     "at '/models/0/pools/0/device': value must be one of 'gpu', 'cpu'"),
    ({"models": [{"name": "m", "kind": "chat", "context_length": 512,
                  "pools": [{"device": "gpu", "replicas": 1}]}]},
     "missing property 'hfId'"),
    ({"models": [{"name": "m", "kind": "rerank", "hfId": "a/b", "context_length": 512,
                  "pools": [{"device": "cpu", "replicas": 1}]}]},
     "at '/models/0/kind': value must be one of 'chat', 'embedding'"),
    ({"gateway": {"replicas": "two"}}, "at '/gateway/replicas': got string, want integer"),
    ({"gateway": {"config": {"models": []}}}, "invalid propertyName 'models'"),
    ({"externalDatabase": {"url": "mysql://db/llmops"}}, "at '/externalDatabase/url'"),
    ({"vllm": {"gpuMemoryUtilization": 1.5}}, "at '/vllm/gpuMemoryUtilization'"),
    ({"workers": {"finetune": {"gpu": {"count": -1}}}}, "at '/workers/finetune/gpu/count'"),
    ({"replicaCount": 3}, "additional properties 'replicaCount' not allowed"),
])
def test_schema_rejects_bad_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        chart().validate_schema(values)
    assert message in str(caught.value)
    with pytest.raises(helm.HelmValuesError):
        render(values)


def test_autoscaled_pools_scale_on_the_waiting_queue() -> None:
    values = {**GPU_CLUSTER, "vllm": {"autoscaling": {"enabled": True, "maxReplicas": 5}}}
    llama = GPU_CLUSTER["models"][0]
    values["models"] = [{**llama, "pools": [
        {**llama["pools"][0], "autoscaling": {"maxReplicas": 8}},
        {**llama["pools"][1], "autoscaling": {"enabled": False}}]},
        *GPU_CLUSTER["models"][1:]]
    docs = manifests(values)
    hpas = {h["metadata"]["name"]: h for h in find(docs, "HorizontalPodAutoscaler")}
    gpu, cpu = f"{FULLNAME}-llama-3-1-8b-instruct-gpu", f"{FULLNAME}-llama-3-1-8b-instruct-cpu"
    assert cpu not in hpas and f"{FULLNAME}-qwen2-5-72b-instruct-gpu" in hpas
    hpa = hpas[gpu]
    kubernetes_validate.validate(hpa, KUBERNETES, strict=True)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                             "name": gpu}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 8)
    external = hpa["spec"]["metrics"][0]["external"]
    assert external["metric"] == {"name": "vllm:num_requests_waiting",
                                  "selector": {"matchLabels": {"llmops_io_pool": gpu}}}
    assert external["target"] == {"type": "AverageValue", "averageValue": "4"}
    behavior = hpa["spec"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 60
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 600
    assert behavior["scaleUp"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 180}]
    # The series carry the pool label the HPA selects on.
    monitor = one(docs, "PodMonitor", f"{FULLNAME}-vllm")
    assert monitor["spec"]["podTargetLabels"] == ["llmops.io/pool"]
    # The gateway knows every replica the pool may grow to; the StatefulSet starts at the minimum.
    config = yaml.safe_load(one(docs, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    urls = {p["urls"][0].split(".")[1]: len(p["urls"]) for m in config["models"]
            for p in m["pools"]}
    assert urls[gpu] == 8 and urls[cpu] == 1
    assert one(docs, "StatefulSet", gpu)["spec"]["replicas"] == 3


@pytest.mark.parametrize(("values", "message"), [
    ({"qdrant": {"enabled": False}}, "embedded index, which one process owns"),
    ({"postgresql": {"enabled": False}}, "database: set postgresql.enabled=true"),
    ({"models": [{"name": "m", "kind": "chat", "hfId": "a/b", "context_length": 512,
                  "pools": [{"device": "cpu", "replicas": 1}]}] * 2}, 'duplicate model name "m"'),
    ({"models": [{"name": "m", "kind": "chat", "hfId": "a/b", "path": "m", "context_length": 512,
                  "pools": [{"device": "cpu", "replicas": 1}]}]}, "set hfId or path, not both"),
    ({"models": [{"name": "m", "kind": "chat", "hfId": "a/b", "context_length": 512,
                  "pools": [{"device": "cpu", "replicas": 3,
                             "autoscaling": {"enabled": True, "maxReplicas": 2}}]}]},
     r"autoscaling.maxReplicas \(2\) is below its minReplicas \(3\)"),
])
def test_inconsistent_values_fail_the_render(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render(values)


def test_notes_tell_how_to_call_the_api() -> None:
    notes = render(GPU_CLUSTER)["llmops/templates/NOTES.txt"]
    assert "export OPENAI_BASE_URL=https://llm.example.com/v1" in notes
    assert f"get secret {FULLNAME}-admin-key" in notes
    assert '"model": "llama-3.1-8b-instruct"' in notes


def test_every_value_is_documented() -> None:
    """Each key of values.yaml has a comment above it or on its line, or belongs to a block
    (at most two levels down) whose key has one."""
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    ancestors: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    undocumented = []
    for i, line in enumerate(lines):
        key = re.match(r"^(\s*)(- )?[A-Za-z_][\w.-]*:", line)
        if not key:
            continue
        indent = len(key[1]) + (2 if key[2] else 0)
        while ancestors and ancestors[-1][0] >= indent:
            ancestors.pop()
        documented = " # " in line or lines[i - 1].strip().startswith("#")
        if not documented and not any(d for _, d in ancestors[-2:]):
            undocumented.append(f"{i + 1}: {line.strip()}")
        ancestors.append((indent, documented))
    assert not undocumented, "\n".join(undocumented)


def test_packaged_chart_carries_the_observability_files(tmp_path: Path) -> None:
    """`helm package` stores the linked files' contents, so the published chart stands alone."""
    archive = helm.package(CHART_DIR, destination=tmp_path)
    with helm.Chart.load(archive) as packaged:
        out = packaged.render({"monitoring": {"prometheusRule": {"enabled": True},
                                              "dashboards": {"enabled": True}}},
                              name="llm", namespace=NAMESPACE)
    docs = [d for d in yaml.safe_load_all(out["llmops/templates/monitoring.yaml"]) if d]
    assert len(docs) == 1 + len(list((ROOT / "observability" / "dashboards").glob("*.json")))
