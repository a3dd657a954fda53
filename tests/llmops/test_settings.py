"""Settings: models declared in YAML or the environment, validated with clear messages."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from llmops.settings import Settings

CHAT = {"name": "chat", "kind": "chat",
        "pools": [{"device": "gpu", "urls": ["http://gpu-0:8000/"], "priority": 10},
                  {"device": "cpu", "urls": ["http://cpu-0:8000"]}]}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMOPS_CONFIG", raising=False)


def test_yaml_file_declares_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "llmops.yaml"
    path.write_text(yaml.safe_dump({"models": [CHAT], "routing": {"cooldown_s": 3}}))
    monkeypatch.setenv("LLMOPS_CONFIG", str(path))
    s = Settings()
    assert [p.device for p in s.models[0].pools] == ["gpu", "cpu"]
    assert s.models[0].pools[0].urls == ["http://gpu-0:8000"]  # trailing slash dropped
    assert s.models[0].upstream_name == "chat"
    assert s.routing.cooldown_s == 3


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "llmops.yaml"
    path.write_text(yaml.safe_dump({"port": 9000, "models": [CHAT]}))
    monkeypatch.setenv("LLMOPS_CONFIG", str(path))
    monkeypatch.setenv("LLMOPS_PORT", "9100")
    monkeypatch.setenv("LLMOPS_ROUTING__MAX_ATTEMPTS", "5")
    s = Settings()
    assert (s.port, s.routing.max_attempts) == (9100, 5)


def test_models_from_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOPS_MODELS", json.dumps([CHAT]))
    assert Settings().models[0].name == "chat"


@pytest.mark.parametrize(("change", "message"), [
    ({"kind": "vision"}, "kind"),
    ({"pools": []}, "pools"),
    ({"pools": [{"device": "tpu", "urls": ["http://x"]}]}, "device"),
    ({"pools": [{"device": "cpu", "urls": ["x:8000"]}]}, "must start with http"),
    ({"pools": [{"device": "cpu", "urls": ["http://x"], "replicas": 2}]}, "replicas"),
])
def test_bad_model_config_names_the_field(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(models=[{**CHAT, **change}])


def test_duplicate_model_names_are_refused() -> None:
    with pytest.raises(ValidationError, match="duplicate model names"):
        Settings(models=[CHAT, CHAT])


def test_admin_key_file_is_read_and_only_its_digest_kept(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file\n")
    s = Settings(admin_key_file=key_file)
    assert s.admin_key_hash() == hashlib.sha256(b"sk-from-file").hexdigest()
    assert "sk-unit" not in repr(Settings(admin_key="sk-unit"))  # never printed


def test_database_and_redis_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOPS_DATABASE_URL", "postgresql://u@db/llmops")
    monkeypatch.setenv("LLMOPS_LIMITS__BUDGETS_FAIL_OPEN", "true")
    s = Settings()
    assert s.database_url == "postgresql://u@db/llmops"
    assert s.limits.fail_open and s.limits.budgets_fail_open
