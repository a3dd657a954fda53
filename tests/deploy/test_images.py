"""The Dockerfiles: pinned bases, an unprivileged user, a health check, and the same commands
the local stack runs (llmops/cli/stack.py)."""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from llmops.cli.stack import (
    batch_worker_service,
    eval_worker_service,
    gateway_service,
    ingest_worker_service,
    worker_service,
)
from tests.deploy.chart import ROOT

DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and heredocs skipped."""
    text = re.sub(r"<<'(\w+)'\n.*?\n\1\n", "\n", path.read_text(), flags=re.DOTALL)
    text = re.sub(r"\\\n", " ", text)
    found = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def final_stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Each stage's own instructions, by stage name."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for word, rest in instructions(path):
        if word == "FROM":
            current = [(word, rest)]
            name = rest.split(" AS ")[-1] if " AS " in rest else f"stage{len(stages)}"
            stages[name] = current
        else:
            current.append((word, rest))
    return stages


def test_there_are_images_for_the_gateway_and_the_workers() -> None:
    assert [p.name for p in DOCKERFILES] == ["gateway.Dockerfile", "worker.Dockerfile"]
    assert set(final_stages(DOCKER / "worker.Dockerfile")) >= {"worker", "worker-gpu"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_bases_are_pinned_and_the_user_is_not_root(path: Path) -> None:
    steps = instructions(path)
    args = dict(rest.split("=", 1) for word, rest in steps if word == "ARG" and "=" in rest)
    image = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", image), image
    for word, rest in steps:
        if word == "FROM":
            base = rest.split()[0]
            assert base == "${PYTHON_IMAGE}" or not base.startswith(("python", "ubuntu")), base
    users = [rest for word, rest in steps if word == "USER"]
    assert users and all(not u.startswith(("root", "0")) for u in users)
    assert any(word == "HEALTHCHECK" for word, _ in steps)


def _cmd(path: Path) -> list[str]:
    [cmd] = [json.loads(rest) for word, rest in instructions(path) if word == "CMD"]
    return list(cmd)


def test_commands_match_the_local_stack(tmp_path: Path) -> None:
    assert ["python", *gateway_service(8000, tmp_path).argv[1:]] == _cmd(
        DOCKER / "gateway.Dockerfile")
    finetune = worker_service(tmp_path).argv
    assert finetune[:3] == [sys.executable, "-m", "celery"]
    assert ["celery", *finetune[3:]] == _cmd(DOCKER / "worker.Dockerfile")
    # The compose file runs the workers as the stack does.
    services = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]
    assert services["worker"]["command"] == ["celery", *finetune[3:]]
    ingest = ingest_worker_service(tmp_path).argv
    assert services["ingest-worker"]["command"] == ["celery", *ingest[3:]]
    evaluator = eval_worker_service(tmp_path).argv
    assert services["eval-worker"]["command"] == ["celery", *evaluator[3:]]
    batcher = batch_worker_service(tmp_path).argv
    assert services["batch-worker"]["command"] == ["celery", *batcher[3:]]


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "tests", ".env"} <= set(ignored)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_package_of_the_project_is_copied_into_the_image(dockerfile: Path) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {args.split()[0] for word, args in instructions(dockerfile)
              if word == "COPY" and not args.startswith("--")}
    assert packages <= copied, f"{dockerfile.name} leaves out {sorted(packages - copied)}"
