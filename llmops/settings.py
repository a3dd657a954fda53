"""The one typed settings object, read from `LLMOPS_*` environment variables and an optional
YAML file (`LLMOPS_CONFIG`). Environment variables win over the file.

Models are declared here: a public name, a kind, the name vLLM serves it under, and backend
pools. A pool is a device class with replica URLs and a priority; the gateway tries pools in
descending priority, so a GPU pool is normally given a higher priority than its CPU fallback.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from guardrails.schema import GuardrailsPolicy

__all__ = [
    "BatchesConfig",
    "ConsoleConfig",
    "DriftConfig",
    "EvalWatchesConfig",
    "EvalsConfig",
    "FilesConfig",
    "FineTuneConfig",
    "FlowConfig",
    "GuardrailsConfig",
    "LedgerConfig",
    "LimitsConfig",
    "MetricsConfig",
    "ModelConfig",
    "PoolConfig",
    "ResponsesConfig",
    "RetrievalConfig",
    "RoutingConfig",
    "Settings",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PoolConfig(_Strict):
    """A set of interchangeable vLLM replicas on one device class."""

    device: Literal["gpu", "cpu"]
    urls: list[str] = Field(min_length=1, description="Base URLs of the vLLM servers.")
    priority: int = Field(0, description="Higher is tried first.")
    max_concurrency: int = Field(
        64, ge=1, description="Outstanding requests per replica before it counts as full."
    )
    max_waiting: int = Field(
        16, ge=0, description="vLLM's own queue length at which a replica counts as full."
    )
    cost_per_hour_usd: float = Field(
        0.0, ge=0, description="What one replica costs per hour (device and host)."
    )
    decode_tokens_per_s: float = Field(
        100.0, gt=0, description="Measured generation throughput of one replica."
    )
    prefill_tokens_per_s: float = Field(
        2000.0, gt=0, description="Measured prompt-processing throughput of one replica."
    )
    priority_scheduling: bool = Field(
        False, description="The replicas run vLLM's --scheduling-policy priority: requests "
        "carry their priority class (interactive first). Off: none is sent (vLLM refuses a "
        "priority it cannot schedule)."
    )

    @field_validator("urls")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"replica URL {url!r} must start with http:// or https://")
        return [url.rstrip("/") for url in urls]


class ModelConfig(_Strict):
    name: str = Field(min_length=1, description="The name clients send as `model`.")
    kind: Literal["chat", "embedding"]
    served_name: str | None = Field(None, description="vLLM's --served-model-name; default: name.")
    pools: list[PoolConfig] = Field(min_length=1)
    owned_by: str = "llmops"
    context_length: int = Field(
        4096, ge=1, description="The engine's max model length; bounds token reservations."
    )
    weights: str | None = Field(
        None, description="Local folder (or hub id) of the weights, for fine-tuning this model "
        "(chat) or tokenizing chunks (embedding)."
    )

    @property
    def upstream_name(self) -> str:
        return self.served_name or self.name


class RoutingConfig(_Strict):
    health_interval_s: float = Field(5.0, gt=0, description="Active /health probe period.")
    health_timeout_s: float = Field(2.0, gt=0)
    metrics_interval_s: float = Field(2.0, gt=0, description="vLLM /metrics scrape period.")
    models_interval_s: float = Field(10.0, gt=0, description="LoRA adapter discovery period.")
    adapters_interval_s: float = Field(
        10.0, gt=0, description="Safety-net period of the fine-tuned adapters' reconcile; a "
        "worker's message (Redis pub/sub) starts one at once.")
    adapter_load_wait_s: float = Field(
        30.0, gt=0, description="How long a request naming a fine-tuned adapter that no replica "
        "has loaded yet waits while it is loaded; then it is refused with 503.")
    adapter_miss_ttl_s: float = Field(
        2.0, ge=0, description="How long a looked-up fine-tuned model name is trusted before "
        "the database is asked again (names that serve nothing do not reach the database on "
        "every request).")
    failure_threshold: int = Field(
        2, ge=1, description="Consecutive failures that open a replica's circuit."
    )
    cooldown_s: float = Field(10.0, gt=0, description="How long an open circuit stays open.")
    max_attempts: int = Field(
        3, ge=1, description="Replicas tried per request on connection failures."
    )
    connect_timeout_s: float = Field(3.0, gt=0)
    read_timeout_s: float = Field(
        600.0, gt=0, description="Longest silence from vLLM before the request fails with 504."
    )
    max_connections: int = Field(1024, ge=1, description="Pooled upstream connections in all.")
    weight_outstanding: float = Field(1.0, ge=0)
    weight_queue: float = Field(1.0, ge=0)
    weight_kv_cache: float = Field(0.5, ge=0)
    adapter_affinity: int = Field(
        4, ge=0, description="Adapters remembered per replica as likely in vLLM's LoRA cache "
        "(set it to --max-loras); an adapter's requests go where it was sent lately. 0: off.")
    affinity_slack: int = Field(
        4, ge=0, description="Outstanding requests a replica holding the adapter may have beyond "
        "the least busy replica and still be preferred.")
    weight_prefix: float = Field(
        2.0, ge=0, description="Scorer weight: the share of the prompt's prefix a replica likely "
        "holds in its KV cache. 0: off.")
    weight_session: float = Field(
        2.0, ge=0, description="Scorer weight: the home replica of the request's session "
        "(`prompt_cache_key` or the x-session-id header). 0: off.")
    prefix_block_chars: int = Field(
        256, ge=16, description="Characters of the prompt per hashed prefix block.")
    prefix_index_blocks: int = Field(
        50_000, ge=1, description="Prefix blocks remembered per model (least recently used go).")
    prefix_ttl_s: float = Field(
        600.0, gt=0, description="How long a replica is assumed to keep a prefix it served in "
        "its KV cache.")
    load_factor: float = Field(
        1.25, ge=1.0, description="Bounded loads: a session's or prefix's home replica is "
        "passed over while its load exceeds this many times the average.")
    load_floor: int = Field(
        4, ge=0, description="Requests a session's or prefix's home may have in flight (with "
        "vLLM's queue) and still be its home whatever the average: engines batch a few "
        "requests at little cost, while moving a conversation loses its cache.")
    prefix_mode: Literal["approximate", "precise"] = Field(
        "approximate", description="How the gateway knows which replica holds a prompt's "
        "prefix in its KV cache: approximate (what it sent where lately) or precise (from the "
        "engines' KV-cache events; needs vLLM's --kv-events-config and the model's `weights`).")
    kv_events_max_blocks: int = Field(
        200_000, ge=1, description="KV-cache blocks remembered per engine in precise mode; "
        "the oldest are forgotten first.")
    kv_events_timeout_s: float = Field(
        5.0, gt=0, description="Precise mode: timeout of event-source discovery and replays.")


class FlowConfig(_Strict):
    """Flow control: while every replica of a model is full, requests wait in the gateway in
    per-tenant queues served by weighted fair share, instead of piling onto the engines."""

    enabled: bool = Field(
        True, description="Queue requests in the gateway while a model's replicas are full; "
        "off: they are sent into the engines' own queues.")
    max_queued: int = Field(
        64, ge=1, description="Requests one tenant may have waiting for one model; more are "
        "refused (429).")
    max_wait_s: float = Field(
        30.0, gt=0, description="Longest a request waits for a replica before it is refused "
        "(429).")
    retry_after_s: int = Field(
        2, ge=1, description="The Retry-After of a refused request, in seconds.")


class LimitsConfig(_Strict):
    fail_open: bool = Field(
        True, description="Serve without rpm/tpm limits while Redis is unreachable."
    )
    budgets_fail_open: bool = Field(
        False, description="Serve keys that have budgets while Redis is unreachable."
    )


class LedgerConfig(_Strict):
    writer: bool = Field(True, description="Run a ledger writer in this gateway process.")
    batch_size: int = Field(500, ge=1, description="Usage records per database insert.")
    block_ms: int = Field(1000, ge=1, description="How long the writer waits for records.")
    claim_idle_s: float = Field(
        30.0, gt=0, description="Records read but not written for this long are re-taken."
    )
    spool_path: Path = Field(
        Path("llmops-usage.spool"), description="Where records wait while Redis is down."
    )


class FilesConfig(_Strict):
    root: Path = Field(Path("llmops-files"), description="Folder that holds uploaded files.")
    max_bytes: int = Field(512 * 1024 * 1024, ge=1, description="Largest file upload.")


class FineTuneConfig(_Strict):
    adapters_root: Path = Field(Path("llmops-adapters"), description="Where adapters are kept.")
    lease_s: float = Field(60.0, gt=0, description="A worker's hold on a job between heartbeats.")
    heartbeat_s: float = Field(5.0, gt=0)
    min_examples: int = Field(10, ge=1, description="Fewest examples a training file needs.")
    evaluation_max_tokens: int = Field(
        64, ge=1, description="Answer length when a job is evaluated on its validation file.")
    evaluation_load_timeout_s: float = Field(
        300.0, gt=0, description="How long an evaluated adapter may take to be served.")
    mlflow_tracking_uri: str | None = Field(
        None, description="The MLflow tracking server jobs with an `mlflow` integration log to "
        "(its REST API, e.g. http://mlflow:5000); unset: such jobs are refused.")
    mlflow_timeout_s: float = Field(
        5.0, gt=0, le=120, description="Timeout of each call to the tracking server.")
    mlflow_artifact_timeout_s: float = Field(
        300.0, gt=0, description="Timeout of the adapter's upload to the tracking server.")
    mlflow_queue_size: int = Field(
        10_000, ge=100, description="Metrics a job buffers for the tracking server; beyond "
        "that the oldest are dropped (they stay in the job's events).")
    device_cost_per_hour_usd: float = Field(
        0.0, ge=0, description="Price of an hour of a fine-tuning worker's device, for jobs "
        "whose base model has no training price.")
    estimate_tokens_per_s: float = Field(
        1000.0, gt=0, description="Training throughput assumed when a job's cost is estimated "
        "from device time (measure it: the workers' tokens/s metric).")
    devices: int = Field(
        1, ge=1, le=64, description="Processes (GPUs, one each) a job trains on when it does "
        "not say (`lora.devices`); above 1, data parallel under torchrun.")
    restarts: int = Field(
        3, ge=0, le=100, description="Times a job on several devices restarts all its "
        "processes, from the newest checkpoint, when one dies.")
    group_timeout_s: float = Field(
        1800.0, gt=0, description="Bound on forming a multi-device job's process group and "
        "on each exchange between its processes (a checkpoint with its evaluation included).")
    ready_timeout_s: float = Field(
        120.0, gt=0, description="How long a job waits, once its adapter is published, for the "
        "gateway to serve it; then it succeeds anyway (with a warning event) and the adapter is "
        "loaded as soon as a replica can take it.")


class RetrievalConfig(_Strict):
    embedding_model: str | None = Field(
        None, description="Embedding model for vector stores; unset: the first one configured.")
    qdrant_url: str | None = Field(
        None, description="A Qdrant server; unset: the embedded engine in `path`.")
    qdrant_api_key: SecretStr | None = None
    qdrant_timeout_s: float = Field(10.0, gt=0)
    path: Path = Field(Path("llmops-qdrant"), description="Folder of the embedded engine.")
    collection: str = Field("llmops_chunks", min_length=1)
    dimensions: int = Field(384, ge=1, description="Size of the embedding model's vectors.")
    gateway_url: str | None = Field(
        None, description="Where ingestion workers reach the gateway; unset: host and port.")
    embed_batch: int = Field(64, ge=1, le=2048, description="Chunks per embedding request.")
    max_batch_files: int = Field(
        500, ge=1, le=10_000, description="Most files one vector store file batch may attach.")
    max_points_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="Largest batch of chunks a worker may write.")
    score_threshold: float = Field(
        0.3, ge=0, le=1, description="Default relevance floor for answers with retrieval.")
    ingest_redelivery_s: float = Field(
        600.0, gt=0, description="An ingestion task whose worker vanished (killed, host lost) "
        "is delivered again after this long; keep it above the longest ingestion.")


class MetricsConfig(_Strict):
    """The gateway's Prometheus metrics and who may scrape them."""

    enabled: bool = Field(True, description="Serve Prometheus metrics at `GET /metrics`.")
    token: SecretStr | None = Field(
        None, description="When set, scrapes must send `Authorization: Bearer <token>`.")
    port: int | None = Field(
        None, ge=1, le=65535,
        description="Serve `/metrics` on this port of `host` instead of the API's port.")
    top_tenants: int = Field(
        20, ge=0, description="Busiest tenants that get a label value of their own; the "
        "rest are counted as `other`.")
    tenants: list[str] = Field(
        default_factory=list, description="Tenant ids always labelled (beyond the top ones).")
    refresh_s: float = Field(
        5.0, gt=0, description="How often fine-tuning jobs, vector store files and Celery "
        "queue lengths are read (scrapes read the cached figures).")
    worker_port: int | None = Field(
        None, ge=1, le=65535,
        description="Celery workers serve their own `/metrics` on this port of `host` (each "
        "worker needs its own: set LLMOPS_METRICS__WORKER_PORT per worker); unset: none.")


class DriftConfig(_Strict):
    """Drift detection: recent traffic of each model against its reference window."""

    enabled: bool = Field(True, description="Sample requests and compare windows.")
    sample_rate: float = Field(
        0.05, ge=0.0, le=1.0, description="Fraction of chat and completion requests sampled.")
    window: int = Field(
        200, ge=2, le=2000, description="Samples in the reference and in the recent window.")
    min_samples: int = Field(
        50, ge=2, description="Samples each window needs before a signal is computed.")
    interval_s: float = Field(60.0, gt=0, description="How often the windows are compared.")
    alpha: float = Field(
        0.01, gt=0.0, lt=0.5, description="False alarm rate of each signal's threshold.")
    permutations: int = Field(
        200, ge=20, le=2000, description="Permutations of the prompt embedding MMD test.")
    min_mmd: float = Field(
        0.01, ge=0.0, description="Smallest prompt embedding MMD² reported as drift, however "
        "significant: big windows make tiny shifts significant.")
    min_rate_rise: float = Field(
        0.02, ge=0.0, le=1.0, description="Smallest rise of the empty/refusal or error rate "
        "reported as drift.")
    max_pending: int = Field(
        256, ge=1, description="Samples waiting for their prompt embedding; more are dropped.")


class EvalsConfig(_Strict):
    """Evaluations (OpenAI's Evals API): the limits of runs and how workers run them."""

    max_items: int = Field(
        1000, ge=1, description="Most data items one eval run may hold.")
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body under /v1/evals (inline "
        "`file_content` items count).")
    max_file_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest data file (JSONL of items) a run may "
        "use; it is read whole when the run is created and when it runs.")
    max_active_runs: int = Field(
        4, ge=1, description="Queued or running eval runs one tenant may have at once.")
    concurrency: int = Field(
        4, ge=1, le=64, description="Model calls one run makes at once (sampling and model "
        "graders together).")
    request_timeout_s: float = Field(
        120.0, gt=0, description="Longest a worker waits for one model call to the gateway.")
    attempts: int = Field(
        3, ge=1, le=10, description="Tries per model call while the gateway is unreachable, "
        "overloaded (429) or failing (5xx).")
    lease_s: float = Field(
        60.0, gt=0, description="A worker's hold on a run between heartbeats; when it runs "
        "out (the worker died) the run is queued again and resumes where it stopped.")
    heartbeat_s: float = Field(5.0, gt=0)


class BatchesConfig(_Strict):
    """Batches (OpenAI's Batch API): the limits of input files and how workers run them."""

    max_lines: int = Field(
        50_000, ge=1, description="Most requests (lines) one batch's input file may hold.")
    max_file_bytes: int = Field(
        100 * 1024 * 1024, ge=1024, description="Largest input file of a batch; it is read "
        "whole when the batch is created (to validate every line) and when it runs.")
    max_errors: int = Field(
        1000, ge=1, description="Most invalid lines a failed batch lists in its `errors`.")
    max_output_bytes: int = Field(
        4 * 1024 * 1024 * 1024, ge=1024, description="Largest output or error file a batch "
        "writes (not bound by `files.max_bytes`, the upload limit); a batch whose answers "
        "exceed it fails when it is finalized.")
    max_active: int = Field(
        20, ge=1, description="Batches one tenant may have validating, in progress, "
        "finalizing or cancelling at once.")
    concurrency: int = Field(
        8, ge=1, le=256, description="Requests of one batch a worker sends to the gateway "
        "at once.")
    request_timeout_s: float = Field(
        600.0, gt=0, description="Longest a worker waits for the gateway's answer to one line.")
    attempts: int = Field(
        5, ge=1, le=20, description="Tries per line while the gateway refuses it for now "
        "(429, 503) or cannot be reached; other answers are the line's result (never sent "
        "twice).")
    lease_s: float = Field(
        60.0, gt=0, description="A worker's hold on a batch between heartbeats; when it runs "
        "out (the worker died) the batch is queued again and resumes where it stopped.")
    heartbeat_s: float = Field(
        5.0, gt=0, description="How often a worker renews its lease and learns of a cancel "
        "or of the batch's expiry.")


class EvalWatchesConfig(_Strict):
    """Regression watches: evals run on a schedule, their pass rates exported as metrics."""

    scheduler: bool = Field(
        True, description="Start the runs of due watches from this gateway; with several "
        "gateways each run is still started by one of them.")
    poll_s: float = Field(5.0, gt=0, description="How often the gateway looks for due watches.")
    min_interval_s: int = Field(
        60, ge=1, description="Shortest interval between a watch's runs that may be asked for.")
    max_per_tenant: int = Field(
        20, ge=1, description="Most watches one tenant may have (each is a metric label).")
    max_total: int = Field(
        200, ge=1, description="Most watches in all: bounds the eval metrics' series.")
    max_data_source_bytes: int = Field(
        256 * 1024, ge=1024, description="Largest data source a watch may keep (its JSON, "
        "inline `file_content` items included); larger data goes in a file.")
    start_timeout_s: float = Field(
        60.0, gt=0, description="Longest the start of a watch's run (its data read and "
        "checked, the run queued) may take.")


class GuardrailsConfig(_Strict):
    """Guardrails on prompts, answers and retrieved text (see `guardrails.schema`)."""

    enabled: bool = Field(
        True, description="Apply guardrail policies; off: no prompt or answer is looked at.")
    default: GuardrailsPolicy = Field(
        default_factory=GuardrailsPolicy,
        description="The server's policy: what it sets overrides the built-in defaults (every "
        "category `log`, no size limits, no deny patterns, injected retrieval chunks "
        "dropped); tenants' and then keys' policies override it, field by field.")


class ResponsesConfig(_Strict):
    """The Responses and Conversations APIs' stored state."""

    ttl_days: float | None = Field(
        30, gt=0, description="How long stored responses are kept; none: until deleted.")
    max_chain: int = Field(
        100, ge=1, le=10_000,
        description="The most stored responses a `previous_response_id` chain may replay.")
    max_conversation_items: int = Field(
        1000, ge=1, description="The most items a conversation may hold.")
    stream_max_events: int = Field(
        20_000, ge=100,
        description="The most stream events kept per background response for live and "
        "resumed streams (about one per output token); older ones are dropped.")
    stream_ttl_s: int = Field(
        3600, ge=60,
        description="How long a background response's stream events are kept after the last "
        "one; later, a stream is rebuilt from the stored response.")


class ConsoleConfig(_Strict):
    """The web console under `/console`: signed in with an API key, a server-side session."""

    enabled: bool = Field(True, description="Serve the web console under `/console`.")
    session_ttl_s: float = Field(
        8 * 3600, gt=0, le=30 * 86400,
        description="How long a console session lasts after sign-in (kept in Redis).")
    secure_cookie: bool | None = Field(
        None, description="Mark the session cookie `Secure`; none: when the request came over "
        "HTTPS (behind a TLS-terminating proxy, run uvicorn with --proxy-headers or set true).")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LLMOPS_", env_nested_delimiter="__", extra="forbid"
    )

    host: str = "127.0.0.1"
    port: int = 8000
    models: list[ModelConfig] = Field(default_factory=list)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    flow: FlowConfig = Field(default_factory=FlowConfig)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body.")
    admin_key: SecretStr | None = Field(None, description="The bootstrap admin key.")
    admin_key_file: Path | None = Field(None, description="A file holding that key.")
    database_url: str = Field("sqlite:///llmops.db", description="sqlite:/// or postgresql://")
    auto_migrate: bool = Field(True, description="Apply database migrations at start-up.")
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = Field("llmops", description="Prefix of every Redis key we write.")
    redis_timeout_s: float = Field(0.5, gt=0)
    key_cache_ttl_s: float = Field(
        5.0, ge=0, description="How long a gateway trusts a key it looked up (revocation lag)."
    )
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    files: FilesConfig = Field(default_factory=FilesConfig)
    finetune: FineTuneConfig = Field(default_factory=FineTuneConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    guardrails: GuardrailsConfig = Field(default_factory=GuardrailsConfig)
    evals: EvalsConfig = Field(default_factory=EvalsConfig)
    eval_watches: EvalWatchesConfig = Field(default_factory=EvalWatchesConfig)
    batches: BatchesConfig = Field(default_factory=BatchesConfig)
    responses: ResponsesConfig = Field(default_factory=ResponsesConfig)
    console: ConsoleConfig = Field(default_factory=ConsoleConfig)
    log_level: str = "info"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path := os.environ.get("LLMOPS_CONFIG"):
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"models: duplicate model names {dupes}")
        if self.routing.prefix_mode == "precise":
            # Prompts are tokenized in the gateway, with the model's own tokenizer.
            blind = [m.name for m in self.models if m.kind == "chat" and m.weights is None]
            if blind:
                raise ValueError(f"routing.prefix_mode: precise needs `weights` of models {blind}")
        return self

    def embedding_model(self) -> ModelConfig | None:
        """The model that embeds vector stores' chunks and queries."""
        wanted = self.retrieval.embedding_model
        return next((m for m in self.models if m.kind == "embedding"
                     and (wanted is None or m.name == wanted)), None)

    def gateway_url(self) -> str:
        return self.retrieval.gateway_url or f"http://{self.host}:{self.port}"

    def bootstrap_key(self) -> str | None:
        """The bootstrap admin key, for our own workers' calls to the gateway."""
        if self.admin_key is not None:
            return self.admin_key.get_secret_value()
        if self.admin_key_file is not None:
            return self.admin_key_file.read_text().strip()
        return None

    def admin_key_hash(self) -> str | None:
        """SHA-256 (hex) of the bootstrap admin key; the gateway keeps no plain key."""
        key = self.bootstrap_key()
        return None if key is None else hashlib.sha256(key.encode()).hexdigest()

