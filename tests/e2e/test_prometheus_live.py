"""The issue's key test: a real Prometheus scrapes a real gateway and the real vLLM engines
under real traffic (chats, a stream, an embedding, a 404, a rate-limit rejection, fallbacks
from a dead GPU pool to the CPU one, priced requests from a tenant with a budget), and a real
Celery ingestion worker ingesting a file; every dashboard query then returns data, but for the
few whose metrics cannot exist here (`NO_DATA_HERE`, with the reason)."""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from llmops.cli.stack import CHAT_MODEL, EMBEDDING_MODEL, Service, free_port
from tenancy.tenants import ADMIN_TENANT
from tests.clients import EVALS_API
from tests.e2e.conftest import (
    API_KEY,
    Engines,
    Gateway,
    GatewayFactory,
    Running,
    model,
    pool,
    start,
)
from tests.observability.prom import Prometheus, prometheus
from tests.observability.test_dashboards import FILES, load

# Training is too slow for this test, and its gauges exist only while a job trains;
# tests/e2e/test_finetune.py scrapes a real fine-tuning worker instead.
_NO_TRAINING = "no fine-tuning worker runs here (see tests/e2e/test_finetune.py)"
NO_DATA_HERE = {
    "llmops_upstream_retries_total": "healthy engines never fail mid-request, so no retry",
    "llmops_finetune_train_loss": _NO_TRAINING,
    "llmops_finetune_tokens_total": _NO_TRAINING,
    "llmops_finetune_progress_ratio": _NO_TRAINING,
    "llmops_finetune_cost_usd_total": _NO_TRAINING,
    'llmops_worker_tasks_total{queue="finetune"}': _NO_TRAINING,
}
COUNT = [{"role": "user", "content": "Count from one to twenty."}]
# 3600 USD an hour, so that requests cost something.
PRICED = {"cost_per_hour_usd": 3600.0, "prefill_tokens_per_s": 1000.0,
          "decode_tokens_per_s": 100.0}


def wait_ready(gw: Gateway) -> None:
    deadline = time.monotonic() + 30
    while httpx.get(f"{gw.url}/readyz").status_code != 200:
        assert time.monotonic() < deadline, "gateway never became ready"
        time.sleep(0.2)


def drive_traffic(gw: Gateway) -> int:
    """Real requests of every kind; returns how many the gateway will count."""
    with OpenAI(base_url=gw.base_url, api_key=API_KEY, max_retries=0, timeout=120) as client:
        for _ in range(2):
            client.chat.completions.create(model=CHAT_MODEL, messages=COUNT, max_tokens=4)
        with client.chat.completions.create(model=CHAT_MODEL, messages=COUNT, max_tokens=8,
                                            stream=True, stream_options={"include_usage": True}
                                            ) as stream:
            assert [c for c in stream if c.usage]
        client.embeddings.create(model=EMBEDDING_MODEL, input=["dashboards show data"])
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=COUNT)
    with httpx.Client(base_url=gw.url, headers=gw.headers, timeout=120) as admin:
        tenant = admin.post("/admin/tenants", json={"name": f"t-{uuid.uuid4().hex[:8]}",
                                                    "budget_usd": 1000.0}).json()
        key = admin.post("/admin/keys", json={"tenant_id": tenant["id"], "rpm_limit": 1})
        assert key.status_code == 201, key.text
        body = {"model": CHAT_MODEL, "messages": COUNT, "max_tokens": 2}
        auth = {"Authorization": f"Bearer {key.json()['key']}"}
        first = admin.post("/v1/chat/completions", json=body, headers=auth)
        second = admin.post("/v1/chat/completions", json=body, headers=auth)
        assert (first.status_code, second.status_code) == (200, 429), second.text
        # A guardrail blocking a card number for one key (events of every other kind are
        # logged by the default policy).
        guarded = admin.post("/admin/keys", json={"tenant_id": tenant["id"], "guardrails": {
            "input": {"card": "block"}}})
        assert guarded.status_code == 201, guarded.text
        card = {**body, "messages": [{"role": "user", "content": "Pay with 4111 1111 1111 "
                                      "1111 and mail me at ana@example.com"}]}
        blocked = admin.post("/v1/chat/completions", json=card, headers={
            "Authorization": f"Bearer {guarded.json()['key']}"})
        assert blocked.status_code == 400 and blocked.json()["error"]["code"] == \
            "guardrail_blocked", blocked.text
    return 7


NARROW = "chat-narrow"  # the chat engine again, one request at a time: flow control shows


def queue_and_shed(gw: Gateway) -> None:
    """One request in flight on the narrow model, one queued behind it, one shed (429)."""
    def queued_now() -> bool:
        return any(line.startswith("llmops_flow_queue_depth{") and f'model="{NARROW}"' in line
                   and float(line.rsplit(" ", 1)[1]) >= 1
                   for line in httpx.get(f"{gw.url}/metrics").text.splitlines())

    with OpenAI(base_url=gw.base_url, api_key=API_KEY, max_retries=0, timeout=120) as client:
        # Held in flight until closed: it cannot end on its own first.
        stream = client.chat.completions.create(model=NARROW, messages=COUNT, max_tokens=1024,
                                                stream=True, extra_body={"ignore_eos": True})
        with ThreadPoolExecutor(1) as pool:
            with stream:
                next(iter(stream))  # in flight: the replica is full
                queued = pool.submit(client.chat.completions.create, model=NARROW,
                                     messages=COUNT, max_tokens=2)
                deadline = time.monotonic() + 30
                while not queued_now():
                    assert time.monotonic() < deadline, "nothing queued"
                    time.sleep(0.1)
                with pytest.raises(openai.RateLimitError):
                    client.chat.completions.create(model=NARROW, messages=COUNT, max_tokens=2)
            # Closing the stream stops its generation and frees the replica for the queued one.
            assert queued.result().choices


def ingest_worker(gw: Gateway, logs: Path) -> Running:
    """A real Celery worker for ingestion and evals, serving its own /metrics."""
    port = free_port()
    return start(Service("ingester", [
        sys.executable, "-m", "celery", "-A", "workers.tasks", "worker", "-Q", "ingest,eval",
        "--pool", "threads", "--concurrency", "2", "-n", f"ingest-{uuid.uuid4().hex[:6]}@%h"],
        port, "/metrics", {"LLMOPS_CONFIG": str(gw.config),
                           "LLMOPS_PORT": str(gw.running.service.port),
                           "LLMOPS_METRICS__WORKER_PORT": str(port)}), logs)


def ingest_a_file(gw: Gateway) -> None:
    with OpenAI(base_url=gw.base_url, api_key=API_KEY, max_retries=0, timeout=120) as client:
        store = client.vector_stores.create(name="dashboards")
        uploaded = client.files.create(file=("notes.txt", b"Dashboards show data. " * 40),
                                       purpose="assistants")
        done = client.vector_stores.files.create_and_poll(
            vector_store_id=store.id, file_id=uploaded.id, poll_interval_ms=300)
        assert done.status == "completed", done.last_error


def watch_an_eval(gw: Gateway) -> None:
    """An eval watched every second: the evaluation panels get a real run to show."""
    with OpenAI(base_url=gw.base_url, api_key=API_KEY, max_retries=0, timeout=120) as client:
        ev = client.evals.create(
            name="dashboards", testing_criteria=[{  # type: ignore[list-item]
                "type": "string_check", "name": "answers", "operation": "ne",
                "input": "{{sample.output_text}}", "reference": ""}],
            data_source_config={"type": "custom", "include_sample_schema": True,
                                "item_schema": {"type": "object",
                                                "properties": {"q": {"type": "string"}}}})
    watch = httpx.post(f"{gw.url}/v1/evals/{ev.id}/watches", headers=gw.headers, timeout=60,
                       json={"name": "dashboards", "model": CHAT_MODEL, "interval_s": 1,
                             "min_pass_rate": 0.5, "data_source": {
                                 "type": "completions", "sampling_params": {
                                     "temperature": 0, "max_completion_tokens": 4},
                                 "source": {"type": "file_content",
                                            "content": [{"item": {"q": "Say hi."}}]},
                                 "input_messages": {"type": "template", "template": [
                                     {"role": "user", "content": "{{item.q}}"}]}}})
    assert watch.status_code == 200, watch.text


@contextlib.contextmanager
def worker_stopped(worker: Running) -> Iterator[None]:
    try:
        yield
    finally:
        worker.stop()


def wait_for(prom: Prometheus, expr: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not prom.result(expr):
        assert time.monotonic() < deadline, f"no {expr} in {timeout_s} s"
        time.sleep(0.5)


@EVALS_API
def test_every_dashboard_query_returns_data(engines: Engines, gateway_factory: GatewayFactory,
                                            tmp_path: Path, logs: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw = gateway_factory(
        [model(CHAT_MODEL, "chat", pool("gpu", dead, priority=10),
               pool("cpu", engines.chat.url, **PRICED), context_length=2048),
         model(NARROW, "chat", pool("cpu", engines.chat.url, max_concurrency=1),
               served_name=CHAT_MODEL, context_length=2048),
         model(EMBEDDING_MODEL, "embedding", pool("cpu", engines.embedding.url),
               context_length=256, weights=str(engines.model_dirs["embedding"]))],
        metrics={"tenants": [ADMIN_TENANT], "refresh_s": 1.0},
        # Every chat request sampled, tiny windows: the drift gauges exist after the traffic.
        drift={"sample_rate": 1.0, "window": 2, "min_samples": 2, "interval_s": 0.5},
        eval_watches={"min_interval_s": 1, "poll_s": 0.5}, flow={"max_queued": 1})
    wait_ready(gw)
    worker = ingest_worker(gw, logs)  # starts up while the traffic runs
    jobs = {job: [url.removeprefix("http://") for url in urls] for job, urls in (
        ("llmops", [gw.url]), ("vllm", [engines.chat.url, engines.embedding.url]),
        ("workers", [worker.url]))}
    with worker_stopped(worker), prometheus(tmp_path / "prometheus", jobs) as prom:
        wait_for(prom, 'up{job="llmops"} == 1')
        wait_for(prom, 'count(up{job="vllm"} == 1) == 2')
        counted = drive_traffic(gw)
        queue_and_shed(gw)
        wait_for(prom, f"sum(llmops_requests_total) >= {counted}")
        wait_for(prom, 'up{job="workers"} == 1')
        ingest_a_file(gw)
        wait_for(prom, 'llmops_ingest_files_total{outcome="completed"} >= 1')
        wait_for(prom, "llmops_drift_score")
        watch_an_eval(gw)
        wait_for(prom, "llmops_eval_pass_ratio")
        time.sleep(5)  # a few more scrapes: every rate has two samples after the traffic

        targets = [(path.stem, panel["title"], t["expr"]) for path in FILES
                   for panel in load(path)["panels"] for t in panel.get("targets", ())]
        skipped = [t for t in targets if any(m in t[2] for m in NO_DATA_HERE)]
        empty = [t for t in targets if t not in skipped and not prom.result(t[2])]
        assert not empty, "queries without data:\n" + "\n".join(map(str, empty))
        assert not prom.result("llmops_no_such_family")  # an absent family does read as empty
        assert len(skipped) <= 6, skipped  # the allow-list stays short

