"""Grafana dashboards for llmops, written as JSON into `observability/dashboards/`.

The JSON files are what Grafana (and the Helm chart) loads; this module is how they are made,
so that every panel has the same datasource, layout rules and units. After editing a panel:
`python -m observability.dashboards` (a test checks that the files match this module).
Every query reads the `${datasource}` Prometheus, scraping the gateway (`llmops_*`), the
Celery workers (`llmops_worker_*`, `llmops_finetune_*` progress, `llmops_ingest_*`) and the
vLLM engines (`vllm:*`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DASHBOARDS", "FOLDER", "Dashboard", "Panel", "render", "write"]

FOLDER = Path(__file__).parent / "dashboards"
_DS = {"type": "prometheus", "uid": "${datasource}"}
_WIDTH = 24


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    targets: tuple[tuple[str, str], ...]  # (PromQL, legend)
    kind: str = "timeseries"  # timeseries | stat | bargauge | row (a heading, no query)
    width: int = 12
    description: str = ""


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]
    tags: tuple[str, ...] = field(default=("llmops",))


def _q(quantile: float, family: str, by: str) -> str:
    return (f"histogram_quantile({quantile}, sum by ({by}, le) "
            f"(rate({family}_bucket[1m])))")


def _quantiles(family: str, by: str) -> tuple[tuple[str, str], ...]:
    return tuple((_q(q, family, by), f"p{round(q * 100)} {{{{{by}}}}}")
                 for q in (0.5, 0.95, 0.99))


def _quantiles5m(family: str, legend: str) -> tuple[tuple[str, str], ...]:
    """p50 and p95 over 5 minutes, for events rarer than requests (files, batches)."""
    return tuple((f"histogram_quantile({q}, sum by (le) (rate({family}_bucket[5m])))",
                  f"p{round(q * 100)} {legend}") for q in (0.5, 0.95))


def _ratio(selector: str, by: str) -> str:
    """The share of requests matching `selector`, 0 (not absent) while none do."""
    total = f"sum by ({by}) (rate(llmops_requests_total[1m]))"
    part = f"sum by ({by}) (rate(llmops_requests_total{{{selector}}}[1m]))"
    return f"({part} or {total} * 0) / {total}"


GATEWAY = Dashboard("llmops-gateway", "llmops / Gateway overview",
                    "Traffic, errors, latency and backends of the llmops gateway.", (
    Panel("Requests by model and status", "reqps",
          (("sum by (model, status_class) (rate(llmops_requests_total[1m]))",
            "{{model}} {{status_class}}"),)),
    Panel("Error ratio", "percentunit",
          ((_ratio('status_class="5xx"', "model"), "5xx {{model}}"),
           (_ratio('status_class="4xx"', "model"), "4xx {{model}}")),
          description="Share of requests ending in a server (5xx) or client (4xx) error."),
    Panel("Latency (end to end)", "s", _quantiles("llmops_request_duration_seconds", "model"),
          width=8),
    Panel("Time to first token (streams)", "s",
          _quantiles("llmops_time_to_first_token_seconds", "model"), width=8),
    Panel("Time per output token (streams)", "s",
          _quantiles("llmops_time_per_output_token_seconds", "model"), width=8),
    Panel("Requests in flight", "short",
          (("sum by (model) (llmops_requests_in_flight)", "{{model}}"),), width=8),
    Panel("Tokens by model", "short",
          (("sum by (model, kind) (rate(llmops_tokens_total[1m]))", "{{model}} {{kind}}"),),
          width=8, description="Tokens per second, prompt and completion."),
    Panel("Requests by device", "reqps",
          (("sum by (device, pool) (rate(llmops_requests_total[1m]))", "{{device}} {{pool}}"),),
          width=8),
    Panel("Retries and fallbacks", "reqps",
          (("sum by (model) (rate(llmops_upstream_retries_total[1m]))", "retries {{model}}"),
           ("sum by (model, from_device, to_device) (rate(llmops_fallbacks_total[1m]))",
            "fallback {{model}} {{from_device}} to {{to_device}}"))),
    Panel("Backends", "short",
          (("llmops_backend_healthy", "{{model}} {{pool}} {{replica}}"),), kind="stat",
          description="1: the replica passes its health probes."),
    Panel("Replicas by circuit state", "short",
          (("sum by (state) (llmops_circuit_state)", "{{state}}"),), kind="stat"),
    Panel("Prefix cache hit ratio", "percentunit",
          (("sum by (model, pool, device) (rate(llmops_cached_prompt_tokens_total[5m]))"
            " / sum by (model, pool, device) (rate(llmops_pool_prompt_tokens_total[5m]))",
            "{{model}} {{pool}} {{device}}"),),
          description="Share of prompt tokens the engines found in their prefix caches "
          "(`cached_tokens`): no prefill for them, and billed at the cached price."),
    Panel("Guardrail events", "reqps",
          (("sum by (stage, category, action) (rate(llmops_guardrail_events_total[5m]))",
            "{{stage}} {{category}} {{action}}"),), width=24,
          description="Requests a guardrail acted on, per second: sensitive data blocked, "
          "redacted or logged in prompts (input) and answers (output), prompts refused by "
          "size, message count or deny pattern, retrieved chunks dropped for injected "
          "instructions (retrieval)."),
    Panel("Flow control", "", (), kind="row"),
    Panel("Requests waiting in the gateway", "short",
          (("sum by (model, priority) (llmops_flow_queue_depth)", "{{model}} {{priority}}"),),
          width=8, description="Requests held while every replica of their model is full, by "
          "priority class (interactive, batch, background)."),
    Panel("Wait for a replica", "s", _quantiles("llmops_flow_wait_seconds", "priority"),
          width=8, description="Time queued requests waited for a replica, served or refused."),
    Panel("Requests shed", "reqps",
          (("sum by (model, reason) (rate(llmops_flow_shed_total[1m]))",
            "{{model}} {{reason}}"),), width=8,
          description="Requests refused instead of queued: queue_full and wait_timeout "
          "answer 429 with Retry-After, no_capacity 503. An alert fires when shedding lasts."),
))

TENANTS = Dashboard("llmops-tenants", "llmops / Tenants and cost",
                    "Who uses the platform, what it costs and who gets refused.", (
    Panel("Top tenants by requests", "reqps",
          (("topk(10, sum by (tenant) (rate(llmops_requests_total[1m])))", "{{tenant}}"),)),
    Panel("Top tenants by tokens", "short",
          (("topk(10, sum by (tenant) (rate(llmops_tokens_total[1m])))", "{{tenant}}"),),
          description="Tokens per second, prompt and completion."),
    Panel("Top tenants by cost", "currencyUSD",
          (("topk(10, sum by (tenant) (rate(llmops_cost_usd_total[1m])) * 3600)",
            "{{tenant}}"),), description="Spend rate in US dollars per hour."),
    Panel("Cost by model, last 24 h", "currencyUSD",
          (("sum by (model) (increase(llmops_cost_usd_total[24h]))", "{{model}}"),),
          kind="bargauge"),
    Panel("Training cost by base model, last 24 h", "currencyUSD",
          (("sum by (base_model) (increase(llmops_finetune_cost_usd_total[24h]))",
            "{{base_model}}"),), kind="bargauge",
          description="Fine-tuning jobs' trained tokens or device time, priced as billed to "
          "the ledger (and counted in budgets); by tenant in `/admin/usage`."),
    Panel("Rejections by reason", "reqps",
          (("sum by (reason) (rate(llmops_rejections_total[1m]))", "{{reason}}"),)),
    Panel("Rejections by tenant", "reqps",
          (("topk(10, sum by (tenant) (rate(llmops_rejections_total[1m])))", "{{tenant}}"),)),
    Panel("Guardrail blocks by tenant", "reqps",
          (('topk(10, sum by (tenant) (rate(llmops_guardrail_events_total{action="block"}'
            '[5m])))', "{{tenant}}"),),
          description="Requests refused, or answers withheld, by guardrails."),
    Panel("Budget used", "percentunit",
          (("max by (tenant) (llmops_tenant_spend_usd / (llmops_tenant_budget_usd > 0))",
            "{{tenant}}"),), kind="bargauge",
          description="Spend this period over budget, for tenants with a budget; `other` is "
          "the unlabelled tenant nearest its budget. An alert fires over 90%."),
    Panel("Budget and spend", "currencyUSD",
          (("max by (tenant) (llmops_tenant_spend_usd)", "spent {{tenant}}"),
           ("max by (tenant) (llmops_tenant_budget_usd)", "budget {{tenant}}")),
          description="The current budget period's settled spend and budget, in US dollars."),
))

VLLM = Dashboard("llmops-vllm", "llmops / vLLM engines",
                 "The engines' own metrics, per instance and model.", (
    Panel("Running requests", "short",
          (("sum by (instance, model_name) (vllm:num_requests_running)",
            "{{model_name}} {{instance}}"),), width=8),
    Panel("Waiting requests", "short",
          (("sum by (instance, model_name) (vllm:num_requests_waiting)",
            "{{model_name}} {{instance}}"),), width=8),
    Panel("KV cache use", "percentunit",
          (("max by (instance, model_name) (vllm:kv_cache_usage_perc)",
            "{{model_name}} {{instance}}"),), width=8),
    Panel("Time to first token", "s",
          _quantiles("vllm:time_to_first_token_seconds", "model_name")),
    Panel("Inter-token latency", "s",
          _quantiles("vllm:inter_token_latency_seconds", "model_name")),
    Panel("Tokens", "short",
          (("sum by (model_name) (rate(vllm:prompt_tokens_total[1m]))", "prompt {{model_name}}"),
           ("sum by (model_name) (rate(vllm:generation_tokens_total[1m]))",
            "generation {{model_name}}")), description="Tokens per second."),
    Panel("Finished requests by reason", "reqps",
          (("sum by (model_name, finished_reason) (rate(vllm:request_success_total[1m]))",
            "{{model_name}} {{finished_reason}}"),)),
))

FINETUNING = Dashboard("llmops-finetuning", "llmops / Fine-tuning",
                       "Fine-tuning jobs, their Celery queue and the workers' training.", (
    Panel("Jobs by status", "short",
          (("sum by (status) (llmops_finetune_jobs)", "{{status}}"),)),
    Panel("Finetune queue length", "short",
          (('sum(llmops_queue_length{queue="finetune"})', "waiting"),)),
    Panel("Running and queued", "short",
          (('sum(llmops_finetune_jobs{status="running"})', "running"),
           ('sum(llmops_finetune_jobs{status="queued"})', "queued")), kind="stat"),
    Panel("Jobs ended, last 24 h", "short",
          (('sum by (status) (delta(llmops_finetune_jobs{status=~"succeeded|failed|cancelled"}'
            '[24h]))', "{{status}}"),), kind="stat"),
    Panel("Training loss", "short",
          (("max by (base_model, instance) (llmops_finetune_train_loss)",
            "{{base_model}} {{instance}}"),),
          description="Loss of the latest training step of the job each worker trains now."),
    Panel("Training tokens per second", "short",
          (("sum by (base_model, instance) (rate(llmops_finetune_tokens_total[1m]))",
            "{{base_model}} {{instance}}"),),
          description="Tokens trained on per second (padding excluded), loading and "
          "checkpoints included."),
    Panel("Training progress", "percentunit",
          (("max by (base_model, instance) (llmops_finetune_progress_ratio)",
            "{{base_model}} {{instance}}"),), kind="bargauge",
          description="Steps done over all steps of the job each worker trains now."),
    Panel("Fine-tuning tasks by outcome", "short",
          (('sum by (outcome) (increase(llmops_worker_tasks_total{queue="finetune"}[1h]))',
            "{{outcome}}"),), description="Tasks the workers ended in the last hour."),
))

RETRIEVAL = Dashboard("llmops-retrieval", "llmops / Retrieval",
                      "Vector store ingestion (the gateway's and the workers' view) and "
                      "embedding traffic.", (
    Panel("Vector store files by status", "short",
          (("sum by (status) (llmops_vector_store_files)", "{{status}}"),)),
    Panel("Ingest queue length", "short",
          (('sum(llmops_queue_length{queue="ingest"})', "waiting"),)),
    Panel("Embedding requests", "reqps",
          (('sum by (model, status_class) (rate(llmops_requests_total{endpoint="/v1/embeddings"}'
            '[1m]))', "{{model}} {{status_class}}"),)),
    Panel("Failed files", "short",
          (('sum(llmops_vector_store_files{status="failed"})', "failed"),), kind="stat"),
    Panel("Chunks ingested", "short",
          (("sum(rate(llmops_ingest_chunks_embedded_total[1m]))", "embedded"),
           ("sum(rate(llmops_ingest_chunks_upserted_total[1m]))", "written")),
          description="Chunks per second, embedded and written to the index by the workers."),
    Panel("Files ingested by outcome", "short",
          (("sum by (outcome) (increase(llmops_ingest_files_total[5m]))", "{{outcome}}"),),
          description="Files the workers finished in the last 5 minutes."),
    Panel("Ingestion time per file", "s",
          _quantiles5m("llmops_ingest_file_duration_seconds", "per file")),
    Panel("Embedding batch latency", "s",
          _quantiles5m("llmops_ingest_embedding_batch_seconds", "per batch")),
    Panel("Ingestion tasks in progress", "short",
          (('sum by (instance) (llmops_worker_tasks_in_progress{queue="ingest"})',
            "{{instance}}"),)),
))

DRIFT = Dashboard("llmops-drift", "llmops / Drift",
                  "Drift of recent traffic from the reference window, per model and signal.", (
    Panel("Drift score and threshold", "short",
          (("llmops_drift_score", "score {{model}} {{signal}}"),
           ("llmops_drift_threshold", "threshold {{model}} {{signal}}")), width=24),
    Panel("Score relative to threshold", "percentunit",
          (("llmops_drift_score / llmops_drift_threshold", "{{model}} {{signal}}"),),
          description="Over 100%: the signal drifted past its threshold."),
    Panel("Signals over threshold", "short",
          (("sum by (model) (llmops_drift_score > bool llmops_drift_threshold)", "{{model}}"),),
          kind="stat"),
    Panel("Samples per window", "short",
          (("llmops_drift_window_samples", "{{model}} {{window}}"),),
          description="Signals are computed once both windows hold `drift.min_samples`."),
))

_WATCH = "max by (tenant, watch) "  # every gateway exports the same figures

EVALS = Dashboard("llmops-evals", "llmops / Evaluations",
                  "Regression watches: the pass ratio of each watch's latest eval run against "
                  "its accepted run and its threshold.", (
    Panel("Pass ratio per watch vs accepted", "percentunit",
          ((f"{_WATCH}(llmops_eval_pass_ratio)", "{{tenant}}/{{watch}}"),
           (f"{_WATCH}(llmops_eval_accepted_pass_ratio)", "accepted {{tenant}}/{{watch}}"),
           (f"{_WATCH}(llmops_eval_min_pass_ratio)", "threshold {{tenant}}/{{watch}}")),
          width=24, description="Share of the latest completed run's items that passed every "
          "criterion, with the accepted (baseline) run's and the watch's threshold."),
    Panel("Pass ratio per criterion", "percentunit",
          (("max by (tenant, watch, criterion) (llmops_eval_criterion_pass_ratio)",
            "{{tenant}}/{{watch}} {{criterion}}"),)),
    Panel("Time since the last completed run", "s",
          (("min by (tenant, watch) (time() - llmops_eval_last_run_timestamp_seconds)",
            "{{tenant}}/{{watch}}"),
           (f"{_WATCH}(3 * llmops_eval_interval_seconds)", "stale after {{tenant}}/{{watch}}")),
          description="A watch is stale after three intervals without a completed run."),
    Panel("Watches regressed or below threshold", "short",
          (("count(max by (tenant, watch) (llmops_eval_pass_ratio < "
            "llmops_eval_accepted_pass_ratio - llmops_eval_tolerance_ratio)) or vector(0)",
            "regressed"),
           ("count(max by (tenant, watch) (llmops_eval_pass_ratio < llmops_eval_min_pass_ratio))"
            " or vector(0)", "below threshold")), kind="stat"),
    Panel("Eval queue length", "short",
          (('sum(llmops_queue_length{queue="eval"})', "waiting"),)),
))

DASHBOARDS = (GATEWAY, TENANTS, VLLM, FINETUNING, RETRIEVAL, DRIFT, EVALS)


def _panel(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "datasource": _DS,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": [{"refId": chr(ord("A") + i), "datasource": _DS, "expr": expr,
                     "legendFormat": legend, "range": True}
                    for i, (expr, legend) in enumerate(panel.targets)],
    }
    if panel.description:
        out["description"] = panel.description
    if panel.kind == "timeseries":
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom"},
                          "tooltip": {"mode": "multi"}}
    return out


def _row(title: str, pid: int, y: int) -> dict[str, Any]:
    return {"id": pid, "type": "row", "title": title, "collapsed": False, "panels": [],
            "gridPos": {"h": 1, "w": _WIDTH, "x": 0, "y": y}}


def render(dashboard: Dashboard) -> dict[str, Any]:
    """The dashboard as Grafana's JSON model; panels flow left to right, 8 units high; a row
    starts a line of its own."""
    panels, x, y = [], 0, 0
    for pid, panel in enumerate(dashboard.panels, start=1):
        if panel.kind == "row":
            y += 8 if x else 0
            panels.append(_row(panel.title, pid, y))
            x, y = 0, y + 1
            continue
        if x + panel.width > _WIDTH:
            x, y = 0, y + 8
        panels.append(_panel(panel, pid, x, y))
        x += panel.width
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": list(dashboard.tags),
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "timezone": "browser",
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [{
            "name": "datasource", "label": "Data source", "type": "datasource",
            "query": "prometheus", "current": {}, "hide": 0, "refresh": 1,
        }]},
        "annotations": {"list": []},
        "panels": panels,
    }


def write(folder: Path = FOLDER) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for dashboard in DASHBOARDS:
        path = folder / f"{dashboard.uid}.json"
        path.write_text(json.dumps(render(dashboard), indent=2) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write(Path(sys.argv[1]) if len(sys.argv) > 1 else FOLDER):
        print(written)
