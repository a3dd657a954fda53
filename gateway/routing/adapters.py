"""Serving fine-tuned adapters: every succeeded job's adapter is kept loaded in each healthy
replica of its base model (`POST /v1/load_lora_adapter`), so a replica that restarts gets its
adapters back, and a new adapter is warmed up with one request after loading (the first
request after a load is slow, vllm#8559). An adapter under evaluation is loaded but withheld
from clients; one its evaluation held back is unloaded (see finetune.promotion)."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp

from finetune.jobs import FineTuning
from gateway.routing import Router
from llmops.catalog import Catalog
from llmops.settings import Settings
from llmops.store import FineTuningJob

__all__ = ["AdapterLoader"]

log = logging.getLogger(__name__)


class AdapterLoader:
    def __init__(self, settings: Settings, jobs: FineTuning, routers: dict[str, Router],
                 catalog: Catalog, session: aiohttp.ClientSession) -> None:
        self.jobs = jobs
        self.routers = routers
        self.catalog = catalog
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=120)

    async def reconcile(self) -> None:
        for job in await self.jobs.with_adapters():
            name, path = job.fine_tuned_model, job.result.get("adapter_path")
            router = self.routers.get(job.model)
            if not name or not path or router is None:
                continue
            verdict = job.result.get("evaluation")
            if job.status == "running" and (verdict or {}).get("state") != "evaluating":
                continue  # a resumed job training again
            self.catalog.owners[name] = job.tenant_id
            self.catalog.details[name] = _details(job)
            if verdict is None or verdict.get("promoted"):
                self.catalog.withheld.discard(name)
            else:
                self.catalog.withheld.add(name)  # under evaluation, or held back by it
                if job.status == "succeeded":  # held back: free its engine slots
                    for replica in router.replicas:
                        if name in replica.adapters and await self._unload(replica.url, name):
                            replica.adapters = replica.adapters - {name}
                            self._publish(job.model)
                    continue
            for replica in router.replicas:
                if replica.healthy and name not in replica.adapters \
                        and await self._load(replica.url, name, path):
                    replica.adapters = replica.adapters | {name}
                    self._publish(job.model)  # now, not after the other adapters' loads

    def _publish(self, base: str) -> None:
        names = set().union(*(r.adapters for r in self.routers[base].replicas))
        self.catalog.set_adapters(base, sorted(names))

    async def _unload(self, url: str, name: str) -> bool:
        try:
            async with self.session.post(f"{url}/v1/unload_lora_adapter", timeout=self.timeout,
                                         json={"lora_name": name}) as resp:
                await resp.read()
                ok = resp.status == 200 or resp.status == 404
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("unloading %s from %s failed: %s", name, url, exc)
            return False
        if ok:
            log.info("adapter %s unloaded from %s: held back by its evaluation", name, url)
        return ok

    async def _load(self, url: str, name: str, path: str) -> bool:
        try:
            async with self.session.post(f"{url}/v1/load_lora_adapter", timeout=self.timeout,
                                         json={"lora_name": name, "lora_path": path}) as resp:
                body = await resp.text()
                if resp.status != 200 and "already been loaded" not in body:
                    log.warning("loading %s into %s failed: %s %s", name, url, resp.status,
                                body[:200])
                    return False
            async with self.session.post(f"{url}/v1/completions", timeout=self.timeout,
                                         json={"model": name, "prompt": "Hi",
                                               "max_tokens": 1}) as warm:
                await warm.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("loading %s into %s failed: %s", name, url, exc)
            return False
        log.info("adapter %s loaded into %s", name, url)
        return True


def _details(job: FineTuningJob) -> dict[str, Any]:
    """What /v1/models tells about a fine-tuned adapter: its job and its evaluation."""
    out: dict[str, Any] = {"fine_tuning_job": job.id}
    verdict = job.result.get("evaluation")
    if verdict is not None:
        out["evaluation"] = {k: verdict[k] for k in ("state", "eval_id", "promoted", "reason")
                             if k in verdict}
        for role in ("base", "adapter"):
            if isinstance(verdict.get(role), dict):
                out["evaluation"][f"{role}_pass_rate"] = verdict[role]["pass_rate"]
    return out
