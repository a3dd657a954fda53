"""Regression watches' figures as gauges, read from the store with the gateway's other
background figures (`GatewayMetrics.add_collector`), labelled by tenant and watch name:

- `llmops_eval_pass_ratio`: share of the latest completed run's items that passed every
  criterion, and `llmops_eval_criterion_pass_ratio{criterion}` per testing criterion;
- `llmops_eval_accepted_pass_ratio`: the same share in the accepted (baseline) run;
- `llmops_eval_min_pass_ratio` (when the watch has one) and `llmops_eval_tolerance_ratio`;
- `llmops_eval_last_run_timestamp_seconds`: when the latest run completed, or when the watch
  was (re-)enabled if that is later, and `llmops_eval_interval_seconds`, for staleness.

Only enabled watches are exported: disabling a watch silences its alerts. Labels are bounded:
watches are few (`eval_watches.max_total`), their names are slugs, criteria are at most 32 per
eval (the API's limit, also applied here) and tenants go through `TenantLabels`. A tenant
without a label of its own is `other`, where two tenants' watches may share a name: the one
nearest an alert (smallest margin to its threshold or its accepted run) stands for them, as in
observability/budgets.py, so that the alert rules still see the worst of them.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence

from prometheus_client.core import GaugeMetricFamily, Metric

from evals.store import pass_ratios
from evals.watches import WatchView, pass_rate
from llmops.store import aware
from observability.tenants import OTHER, TenantLabels

__all__ = ["FAMILY", "MAX_CRITERIA", "EvalWatchGauges", "criterion_label"]

FAMILY = "llmops_eval_watches"  # how failed refreshes are counted
MAX_CRITERIA = 32  # testing criteria per eval (gateway.api.evals: EvalIn.testing_criteria)
_LABEL_CHARS = 64
_WATCH = ["tenant", "watch"]


def criterion_label(index: int, name: str) -> str:
    """A criterion's label value: its name, cut short (and told apart by its index) when
    long."""
    return name if len(name) <= _LABEL_CHARS else f"{name[:_LABEL_CHARS - 4]}#{index}"


def _margin(view: WatchView) -> float:
    """How far the latest pass rate is above the nearest of its alert lines (negative: an
    alert's condition holds); infinite without figures."""
    latest = pass_rate(view.latest) if view.latest else None
    if latest is None:
        return math.inf
    lines = [view.watch.min_pass_rate]
    accepted = pass_rate(view.accepted) if view.accepted else None
    if accepted is not None:
        lines.append(accepted - view.watch.tolerance)
    return min((latest - line for line in lines if line is not None), default=math.inf)


def _freshness(view: WatchView) -> float:
    """When staleness is counted from: the latest completion, or the (re-)enabling."""
    since = aware(view.watch.enabled_at)
    if view.latest is not None and view.latest.finished_at is not None:
        since = max(since, aware(view.latest.finished_at))
    return since.timestamp()


class EvalWatchGauges:
    def __init__(self, read: Callable[[], Awaitable[Sequence[WatchView]]],
                 tenants: TenantLabels) -> None:
        self.read = read
        self.tenants = tenants
        self._families: list[Metric] = []

    async def refresh(self) -> None:
        self._families = self._build(await self.read())

    def clear(self) -> None:
        self._families = []

    def describe(self) -> list[Metric]:
        return list(self._empty())

    def collect(self) -> list[Metric]:
        return list(self._families)

    def _empty(self) -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily("llmops_eval_pass_ratio", "Share of the items of the watch's "
                              "latest completed eval run that passed every criterion.",
                              labels=_WATCH),
            GaugeMetricFamily("llmops_eval_criterion_pass_ratio", "Share of the items of the "
                              "watch's latest completed eval run that passed the criterion.",
                              labels=[*_WATCH, "criterion"]),
            GaugeMetricFamily("llmops_eval_accepted_pass_ratio", "Share of the items of the "
                              "watch's accepted (baseline) run that passed every criterion.",
                              labels=_WATCH),
            GaugeMetricFamily("llmops_eval_min_pass_ratio",
                              "The watch's threshold: the least pass ratio that is no alert.",
                              labels=_WATCH),
            GaugeMetricFamily("llmops_eval_tolerance_ratio", "How far below the accepted "
                              "run's pass ratio the watch's may fall before it regressed.",
                              labels=_WATCH),
            GaugeMetricFamily("llmops_eval_last_run_timestamp_seconds", "When the watch's "
                              "latest run completed (or the watch was enabled, if later).",
                              labels=_WATCH),
            GaugeMetricFamily("llmops_eval_interval_seconds",
                              "The time between the watch's runs.", labels=_WATCH),
        )

    def _build(self, views: Sequence[WatchView]) -> list[Metric]:
        chosen: dict[tuple[str, str], WatchView] = {}
        for view in views:
            key = (self.tenants.label(view.watch.tenant_id), view.watch.name)
            held = chosen.get(key)
            if held is None or (key[0] == OTHER and _margin(view) < _margin(held)):
                chosen[key] = view
        ratio, criteria, accepted, floor, tolerance, fresh, interval = families = self._empty()
        for (tenant, name), view in sorted(chosen.items()):
            labels = [tenant, name]
            watch = view.watch
            if view.latest is not None and (rate := pass_rate(view.latest)) is not None:
                ratio.add_metric(labels, rate)
                shares = sorted(pass_ratios(view.latest).items())[:MAX_CRITERIA]
                for index, (criterion, share) in enumerate(shares):
                    criteria.add_metric([*labels, criterion_label(index, criterion)], share)
            if view.accepted is not None and (rate := pass_rate(view.accepted)) is not None:
                accepted.add_metric(labels, rate)
            if watch.min_pass_rate is not None:
                floor.add_metric(labels, watch.min_pass_rate)
            tolerance.add_metric(labels, watch.tolerance)
            fresh.add_metric(labels, _freshness(view))
            interval.add_metric(labels, float(watch.interval_s))
        return list(families)
