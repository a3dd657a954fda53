"""Experiment tracking on a real MLflow server: a real DPO job (SmolLM2 on the CPU, a tiny
dataset, two steps) run in process by `run_job` logs its parameters, a metric per step,
validation loss, reward metrics and the adapter, and is billed in the ledger; a resumed job
continues its run; a server that is down costs the job nothing but a warning; bad
`integrations` are refused in OpenAI's shape."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from finetune.jobs import FineTuning
from finetune.run import _tracking, _train_config, run_job
from finetune.tracking import MlflowClient
from llmops.cli import models_home
from llmops.cli.models import prepare_models
from llmops.files import Files
from llmops.settings import Settings
from llmops.store import Database, FineTuningEvent, UsageRecord, upgrade
from tests.databases import REDIS_URL, in_process_gateway
from tests.mlflow_server import API, artifacts, free_port, history, mlflow_url, run

__all__ = ["mlflow_url"]  # the fixture, imported for this module

TENANT, KEY = "ten_track", "key_track"
ADMIN = "sk-unit-tracking"


def _examples(n: int) -> bytes:
    lines = [{"messages": [{"role": "user", "content": f"What is gadget {i}?"},
                           {"role": "assistant", "content": f"Gadget {i} is a blue kettle."}]}
             for i in range(n)]
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


@pytest.fixture(scope="module")
def weights() -> Path:
    return prepare_models(models_home())["chat"]


def _settings(tmp_path: Path, weights: Path, tracking_uri: str | None) -> Settings:
    return Settings(
        admin_key=ADMIN, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", redis_url=REDIS_URL,
        redis_prefix=f"llmops-test-{uuid.uuid4().hex[:12]}", files={"root": tmp_path / "files"},
        finetune={"adapters_root": tmp_path / "adapters", "min_examples": 2,
                  "mlflow_tracking_uri": tracking_uri, "mlflow_timeout_s": 10.0,
                  "device_cost_per_hour_usd": 36.0,
                  "ready_timeout_s": 0.5},  # no gateway here: the job succeeds with a warning
        models=[{"name": "chat", "kind": "chat", "weights": str(weights),
                 "context_length": 256,
                 "pools": [{"device": "cpu", "urls": ["http://127.0.0.1:9"]}]}])


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Database]:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    db = Database(url)
    yield db
    await db.close()


def _pairs(n: int) -> bytes:
    return b"".join(json.dumps({
        "input": {"messages": [{"role": "user", "content": f"What is gadget {i}?"}]},
        "preferred_output": [{"role": "assistant", "content": f"Ahoy! Gadget {i} is blue."}],
        "non_preferred_output": [{"role": "assistant", "content": f"Gadget {i} is blue."}],
    }).encode() + b"\n" for i in range(n))


async def _job(db: Database, settings: Settings, experiment: str, method: str = "supervised",
               **fields: Any) -> str:
    files = Files(db, settings.files.root, settings.files.max_bytes)
    data = _pairs if method == "dpo" else _examples

    async def chunks(data: bytes) -> AsyncIterator[bytes]:
        yield data

    train = await files.create(TENANT, "train.jsonl", "fine-tune", chunks(data(4)))
    valid = await files.create(TENANT, "valid.jsonl", "fine-tune", chunks(data(2)))
    job = await FineTuning(db).create(
        tenant_id=TENANT, key_id=KEY, model="chat", training_file=train.id,
        validation_file=valid.id, hyperparameters={"n_epochs": 1, "batch_size": 2},
        method=method,
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
              "checkpoint_every": 1},
        integrations=[{"type": "mlflow", "mlflow": {
            "experiment": experiment, "tags": {"team": "search"}}}], **fields)
    return job.id


async def _events(db: Database, job_id: str) -> list[FineTuningEvent]:
    rows, _ = await FineTuning(db).events(job_id, TENANT, limit=1000)
    return rows[::-1]


async def test_a_job_logs_params_step_metrics_and_its_adapter(
        tmp_path: Path, weights: Path, store: Database, mlflow_url: str) -> None:
    """A DPO job, so that its reward metrics are checked too."""
    settings = _settings(tmp_path, weights, mlflow_url)
    job_id = await _job(store, settings, "tracking-" + uuid.uuid4().hex[:8], method="dpo")
    assert await run_job(job_id, settings) == "succeeded"

    job = await FineTuning(store).get(job_id)
    assert job.tracking is not None
    run_id = job.tracking["run_id"]
    links = [e for e in await _events(store, job_id) if e.data and "run_id" in e.data]
    assert len(links) == 1 and links[0].data == {
        "run_id": run_id, "experiment_id": job.tracking["experiment_id"],
        "url": f"{mlflow_url}/#/experiments/{job.tracking['experiment_id']}/runs/{run_id}"}
    assert links[0].data["url"] in links[0].message

    found = run(mlflow_url, run_id)
    assert found["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in found["data"]["params"]}
    training = await Files(store, settings.files.root, 0).get(TENANT, job.training_file)
    assert params["base_model"] == "chat" and params["method"] == "dpo"
    assert params["lora_r"] == "4" and params["target_modules"] == "q_proj,v_proj"
    assert params["n_epochs"] == "1" and params["batch_size"] == "2"
    assert params["training_file_sha256"] == training.sha256
    assert len(params["validation_file_sha256"]) == 64
    tags = {t["key"]: t["value"] for t in found["data"]["tags"]}
    assert tags["team"] == "search" and tags["llmops.job_id"] == job_id
    assert tags["mlflow.runName"] == job_id  # no run_name given: the job's id

    # One value per training step, as the job's own metric events have them.
    steps = [e.data for e in await _events(store, job_id) if e.type == "metrics" and e.data]
    assert [s for s, _ in history(mlflow_url, run_id, "train_loss")] == [1, 2]
    for name in ("train_loss", "reward_margin", "reward_accuracy"):
        assert history(mlflow_url, run_id, name) == [
            (d["step"], pytest.approx(d[name])) for d in steps], name
    assert [s for s, _ in history(mlflow_url, run_id, "learning_rate")] == [1, 2]
    assert all(v > 0 for _, v in history(mlflow_url, run_id, "tokens_per_s"))
    for name in ("valid_loss", "valid_reward_margin", "valid_reward_accuracy"):
        assert [s for s, _ in history(mlflow_url, run_id, name)] == [1, 2], name

    files = artifacts(mlflow_url, run_id, "adapter")
    local = Path(job.result["adapter_path"]) / "adapter_model.safetensors"
    assert files["adapter/adapter_model.safetensors"] == local.stat().st_size
    assert "adapter/adapter_config.json" in files

    # Billed like inference: one record for its one attempt, priced by device time.
    async with store.session() as session:
        records = list(await session.scalars(select(UsageRecord)))
    assert [(r.request_id, r.tenant_id, r.key_id, r.endpoint, r.trained_tokens, r.status)
            for r in records] == [(f"{job_id}:1", TENANT, KEY, "/v1/fine_tuning/jobs",
                                   job.trained_tokens, 200)]
    assert records[0].device_seconds > 0
    assert float(records[0].cost_usd) == pytest.approx(records[0].device_seconds * 0.01,
                                                       abs=1e-6)


async def test_a_resumed_job_reopens_its_run(tmp_path: Path, weights: Path, store: Database,
                                            mlflow_url: str) -> None:
    """The next attempt of a job a killed worker left behind logs to the run it holds,
    reopened, instead of starting a second one (what `run_job` does before training)."""
    experiment = "resume-" + uuid.uuid4().hex[:8]
    client = MlflowClient(mlflow_url, 5, 30)
    earlier = await client.create_run(experiment, "first attempt", {})
    await client.set_status(earlier.run_id, "FAILED")  # as a UI may show a dead worker's run
    await client.aclose()
    settings = _settings(tmp_path, weights, mlflow_url)
    job_id = await _job(store, settings, experiment, status="running", attempts=2,
                        tracking=asdict(earlier))
    jobs = FineTuning(store)
    job = await jobs.get(job_id)
    files = Files(store, settings.files.root, settings.files.max_bytes)
    tracker = await _tracking(job, jobs, "worker", files, settings,
                              _train_config(job, settings.models[0], settings))
    assert tracker is not None and tracker.ref == earlier
    tracker.metrics(7, {"train_loss": 0.5})
    await tracker.close("FINISHED")

    assert history(mlflow_url, earlier.run_id, "train_loss") == [(7, 0.5)]
    assert run(mlflow_url, earlier.run_id)["info"]["status"] == "FINISHED"
    runs = httpx.post(f"{mlflow_url}{API}/runs/search", timeout=10,
                      json={"experiment_ids": [earlier.experiment_id]}).json()["runs"]
    assert [r["info"]["run_id"] for r in runs] == [earlier.run_id]
    resumed = [e for e in await _events(store, job_id) if e.data and "run_id" in e.data]
    assert [e.data["run_id"] for e in resumed if e.data] == [earlier.run_id]
    assert resumed[0].message.startswith("Resumed MLflow run")


async def test_a_server_that_is_down_costs_the_job_only_a_warning(
        tmp_path: Path, weights: Path, store: Database) -> None:
    settings = _settings(tmp_path, weights, f"http://127.0.0.1:{free_port()}")  # nobody there
    job_id = await _job(store, settings, "unreachable")
    assert await run_job(job_id, settings) == "succeeded"

    job = await FineTuning(store).get(job_id)
    assert job.status == "succeeded" and job.tracking is None
    events = await _events(store, job_id)
    warnings = [e.message for e in events if e.level == "warn"]
    assert [m for m in warnings if "Experiment tracking" in m] == [warnings[0]]
    assert "Experiment tracking is unavailable" in warnings[0]
    assert len([e for e in events if e.type == "metrics"]) == 2  # kept locally


async def test_bad_integrations_are_refused_in_openais_shape(tmp_path: Path, weights: Path
                                                             ) -> None:
    settings = _settings(tmp_path, weights, None)
    async with in_process_gateway(settings, ADMIN) as gateway:
        upload = await gateway.post("/v1/files", data={"purpose": "fine-tune"},
                                    files={"file": ("t.jsonl", _examples(4))})
        assert upload.status_code == 200, upload.text
        body = {"model": "chat", "training_file": upload.json()["id"]}
        cases = [
            ([{"type": "wandb", "wandb": {"project": "x"}}], "integrations[0].type"),
            ([{"type": "mlflow", "mlflow": {}}], "integrations[0].mlflow.experiment"),
            ([{"type": "mlflow", "mlflow": {"experiment": "e", "tags": {"k": 1}}}],
             "integrations[0].mlflow.tags.k"),
            # Well formed, but this gateway has no tracking server to log to.
            ([{"type": "mlflow", "mlflow": {"experiment": "e"}}], "integrations"),
        ]
        for integrations, param in cases:
            refused = await gateway.post("/v1/fine_tuning/jobs",
                                         json={**body, "integrations": integrations})
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == param
            assert set(error) == {"message", "type", "param", "code"}
        listed = await gateway.get("/v1/fine_tuning/jobs")
        assert listed.json()["data"] == []  # nothing was created
