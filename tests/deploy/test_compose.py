"""docker-compose.gpu.yml: valid against the Compose Specification's schema, self-contained
(everything it names it defines, every file it mounts exists), and its gateway config is
accepted by the gateway's own settings loader."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from llmops.settings import Settings
from tests.deploy.chart import ROOT, environment

COMPOSE = ROOT / "docker-compose.gpu.yml"
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
# What a user's .env holds (see deploy/compose/env.example).
DOTENV = {"LLMOPS_ADMIN_KEY": "sk-llmops-test", "POSTGRES_PASSWORD": "pg-pass",
          "REDIS_PASSWORD": "redis-pass", "QDRANT_API_KEY": "qdrant-key",
          "GRAFANA_ADMIN_PASSWORD": "grafana-pass"}

_VARIABLE = re.compile(r"\$(?:\$|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: $$, ${VAR}, ${VAR:-default}, ${VAR:?error}, $VAR."""
    def one(m: re.Match[str]) -> str:
        if m[0] == "$$":
            return "$"
        name = m[1] or m[4]
        value = env.get(name)
        if m[2] in (":-", "-"):
            return value if value else m[3]
        if m[2] in (":?", "?") and not value:
            raise ValueError(f"{name}: {m[3]}")
        return value or ""
    return _VARIABLE.sub(one, text)


def load(env: dict[str, str] = DOTENV) -> dict[str, Any]:
    project: dict[str, Any] = yaml.safe_load(interpolate(COMPOSE.read_text(), env))
    return project


@pytest.fixture(scope="module")
def project() -> dict[str, Any]:
    return load()


def test_validates_against_the_compose_specification(project: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(project), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_the_schema_catches_mistakes(project: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    broken = json.loads(json.dumps(project))
    broken["services"]["gateway"]["depends_on"]["postgres"]["condition"] = "service_ready"
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] = [1]
    assert len(list(jsonschema.Draft7Validator(schema).iter_errors(broken))) == 2


def test_missing_secrets_stop_it_from_starting() -> None:
    with pytest.raises(ValueError, match="POSTGRES_PASSWORD"):
        load({k: v for k, v in DOTENV.items() if k != "POSTGRES_PASSWORD"})


def test_references_only_what_it_defines(project: dict[str, Any]) -> None:
    services = project["services"]
    used: dict[str, set[str]] = {"volumes": set(), "networks": set(), "configs": set(),
                                 "secrets": set()}
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= set(services), name
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith(("./", "/")):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                used["volumes"].add(source)
        used["networks"].update(service.get("networks", []))
        used["configs"].update(c["source"] if isinstance(c, dict) else c
                               for c in service.get("configs", []))
        used["secrets"].update(s["source"] if isinstance(s, dict) else s
                               for s in service.get("secrets", []))
        if build := service.get("build"):
            dockerfile = ROOT / build["context"] / build["dockerfile"]
            assert dockerfile.is_file(), name
            if target := build.get("target"):
                assert re.search(rf"^FROM .+ AS {re.escape(target)}$", dockerfile.read_text(),
                                 re.MULTILINE), f"{name}: no stage {target}"
    for kind, names in used.items():
        assert names == set(project.get(kind, {})), f"{kind}: used {names}"
    for config in project["configs"].values():
        assert (ROOT / config["file"]).is_file()


def test_gpu_services_reserve_the_gpu(project: dict[str, Any]) -> None:
    def gpus(name: str) -> list[dict[str, Any]]:
        devices = project["services"][name].get("deploy", {}).get("resources", {}) \
            .get("reservations", {}).get("devices", [])
        return [d for d in devices if "gpu" in d["capabilities"]]
    assert gpus("vllm-chat") and gpus("worker")
    assert not gpus("vllm-embed") and not gpus("ingest-worker") and not gpus("gateway")


def test_only_the_front_doors_publish_ports_on_loopback(project: dict[str, Any]) -> None:
    published = {name: s["ports"] for name, s in project["services"].items() if "ports" in s}
    assert set(published) == {"gateway", "prometheus", "grafana"}
    assert all(p.startswith("127.0.0.1:") for ports in published.values() for p in ports)


def test_gateway_accepts_its_config(project: dict[str, Any], tmp_path: Path) -> None:
    gateway = project["services"]["gateway"]
    [config] = gateway["configs"]
    source = ROOT / project["configs"][config["source"]]["file"]
    path = tmp_path / "config.yaml"
    path.write_text(source.read_text())
    env = {**gateway["environment"], "LLMOPS_CONFIG": str(path)}
    with environment(env):
        settings = Settings()
    assert settings.database_url == "postgresql://llmops:pg-pass@postgres:5432/llmops"
    assert settings.redis_url == "redis://:redis-pass@redis:6379/0"
    assert settings.retrieval.qdrant_api_key is not None
    assert settings.retrieval.qdrant_api_key.get_secret_value() == "qdrant-key"
    assert str(settings.admin_key_file) == f"/run/secrets/{gateway['secrets'][0]}"
    assert settings.embedding_model() is not None

    # Each model's pool points at the engine that serves it under that name.
    services = project["services"]
    for model in settings.models:
        for pool in model.pools:
            for url in pool.urls:
                host = url.removeprefix("http://").split(":")[0]
                command = services[host]["command"]
                assert f"--served-model-name={model.upstream_name}" in command
                gpu = "deploy" in services[host]
                assert (pool.device == "gpu") == gpu


def test_prometheus_scrapes_compose_services(project: dict[str, Any]) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "compose" / "prometheus.yml").read_text())
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                assert target.split(":")[0] in project["services"], target
