"""The GPU fine-tuning benchmark carries nothing of llmops' services, and on a machine without
CUDA it says so and fails instead of measuring the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"llmops", "gateway", "workers", "tenancy", "evals", "retrieval", "observability",
            "fastapi", "starlette", "celery", "vllm", "sqlalchemy", "redis", "qdrant_client"}
PROBE = """
import json, sys
import bench.gpu_finetune as bench
sys.argv = ["bench.gpu_finetune", "--model", sys.argv[1]]
try:
    bench.main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def test_it_needs_cuda_and_none_of_the_services(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, timeout=120)
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["code"] == 2
    assert "needs a CUDA GPU" in done.stderr
    assert not SERVICES & set(report["modules"])
