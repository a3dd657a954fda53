"""`succeeded` means servable: two gateways over one engine, store and Redis; the official
openai client asks for a fine-tuned model the instant its job reports `succeeded`, through
either gateway, and it answers; both gateways list it at once, told by the Redis message."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from llmops.cli.stack import CHAT_MODEL, Service, free_port, gateway_service
from tests.e2e.conftest import (
    API_KEY,
    Engines,
    Gateway,
    GatewayFactory,
    model,
    pool,
    start,
    wait_healthy,
)
from tests.e2e.test_finetune import QUESTIONS, dataset

JOBS = 5


@pytest.fixture(scope="module")
def gateways(engines: Engines, gateway_factory: GatewayFactory, logs: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Gateway]]:
    """Gateway A (the one the worker asks) and gateway B, sharing A's config: the same
    store, Redis prefix and adapters; and a fine-tuning worker."""
    a = gateway_factory(
        [model(CHAT_MODEL, "chat", pool("cpu", engines.chat.url), context_length=2048,
               weights=str(engines.model_dirs["chat"]))],
        finetune={"adapters_root": str(tmp_path_factory.mktemp("adapters")),
                  "min_examples": 10},
        # No periodic reconcile within the test: gateways learn of adapters from the message
        # (or load them on demand), never from the safety-net poll.
        routing={"adapters_interval_s": 3600})
    port = free_port()
    b = Gateway(start(gateway_service(port, a.config), logs), a.config)
    worker_port = free_port()
    worker = start(Service("worker", [sys.executable, "-m", "celery", "-A", "workers.tasks",
                                      "worker", "-Q", "finetune", "--pool", "solo"],
                           worker_port, "/metrics",
                           {"LLMOPS_CONFIG": str(a.config),
                            "LLMOPS_PORT": str(a.running.service.port),
                            "LLMOPS_METRICS__WORKER_PORT": str(worker_port)}), logs)
    try:
        wait_healthy([b.running, worker], timeout_s=120)
        yield a, b
    finally:
        worker.stop()
        b.running.stop()


def _listed_by_both(listings: list[httpx.Client], name: str, since: float) -> float:
    """Seconds from `since` until every gateway lists `name` (given up after 10 s)."""
    while time.monotonic() - since < 10:
        if all(name in c.get("/models").text for c in listings):
            return time.monotonic() - since
        time.sleep(0.05)
    return float("inf")


@pytest.mark.timeout(600)
def test_a_succeeded_jobs_model_answers_at_once_on_every_gateway(
        gateways: tuple[Gateway, Gateway]) -> None:
    clients = [OpenAI(base_url=g.base_url, api_key=API_KEY, max_retries=0, timeout=120)
               for g in gateways]
    train = clients[0].files.create(file=("ready.jsonl", dataset(QUESTIONS[:10])),
                                    purpose="fine-tune")
    jobs = [clients[0].fine_tuning.jobs.create(
        model=CHAT_MODEL, training_file=train.id, suffix=f"ready{i}",
        hyperparameters={"n_epochs": 1, "batch_size": 4},
        extra_body={"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}})
        for i in range(JOBS)]  # the worker trains them one after another
    listings = [httpx.Client(base_url=g.base_url, headers=g.headers, timeout=5)
                for g in gateways]
    for c in listings:
        c.get("/models")  # connected before any clock starts
    with ThreadPoolExecutor(1) as pool_:
        for i, job in enumerate(jobs):
            deadline = time.monotonic() + 300
            while (done := clients[0].fine_tuning.jobs.retrieve(job.id)).status not in (
                    "succeeded", "failed", "cancelled"):
                assert time.monotonic() < deadline, f"job stuck in {done.status}"
                time.sleep(0.1)
            succeeded = time.monotonic()
            assert done.status == "succeeded", done.error
            name = done.fine_tuned_model
            assert name is not None
            listed = pool_.submit(_listed_by_both, listings, name, succeeded)
            # The instant it succeeded, through A or B: the adapter answers.
            reply = clients[i % 2].chat.completions.create(
                model=name, max_tokens=4, messages=[{"role": "user", "content": QUESTIONS[0]}])
            assert reply.model == name
            # Within a second, as bench.adapter_ready measures; the bound here only says it
            # was the message (there is no poll), with room for a busy host.
            assert listed.result() < 5.0, f"{name} not listed by both gateways"
    for c in listings:
        c.close()
