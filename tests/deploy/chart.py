"""Render the Helm chart with Helm's own engine (helm-python-sdk) and read what it made."""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "deploy" / "helm" / "llmops"
RELEASE = "llm"
NAMESPACE = "ai"

Manifest = dict[str, Any]

helm.disable_logging()  # the engine logs every symlink it follows into observability/


@cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART_DIR)


def render(values: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would write it."""
    return chart().render(dict(values or {}), name=RELEASE, namespace=NAMESPACE)


def manifests(values: Mapping[str, Any] | None = None) -> list[Manifest]:
    """Every Kubernetes object the chart renders (NOTES.txt left out)."""
    docs: list[Manifest] = []
    for path, text in sorted(render(values).items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def find(docs: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind
            and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[Manifest], kind: str, name: str) -> Manifest:
    found = find(docs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def pod_spec(doc: Manifest) -> Manifest:
    spec: Manifest = doc["spec"]["template"]["spec"]
    return spec


def secret_data(docs: list[Manifest], name: str, key: str) -> str | None:
    for s in find(docs, "Secret", name):
        if key in s.get("stringData", {}):
            return str(s["stringData"][key])
        if key in s.get("data", {}):
            return base64.b64decode(s["data"][key]).decode()
    return None


def container_env(docs: list[Manifest], container: Manifest) -> dict[str, str]:
    """A container's environment as the kubelet builds it: plain values, values from the
    chart's own Secrets, and `$(VAR)` references expanded. Values from Secrets the chart
    does not render (existingSecret) become `<secret:name/key>`."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]),
                                      str(var["value"]))
        elif ref := var.get("valueFrom", {}).get("secretKeyRef"):
            value = secret_data(docs, ref["name"], ref["key"])
            unknown = f"<secret:{ref['name']}/{ref['key']}>"
            env[var["name"]] = value if value is not None else unknown
    return env


@contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    """Run with exactly these LLMOPS_* variables (and no others) in the environment."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("LLMOPS_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(env)
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith("LLMOPS_")]:
            del os.environ[k]
        os.environ.update(saved)
