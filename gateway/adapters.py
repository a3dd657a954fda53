"""Serving fine-tuned adapters: every succeeded job's adapter is kept loaded in each healthy
replica of its base model (`POST /v1/load_lora_adapter`), so a replica that restarts gets its
adapters back, and a new adapter is warmed up with one request after loading (the first
request after a load is slow, vllm#8559)."""

from __future__ import annotations

import logging

import aiohttp

from gateway.routing import Router
from llmops.catalog import Catalog
from llmops.finetuning import FineTuning
from llmops.settings import Settings

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
        changed: set[str] = set()
        for job in await self.jobs.succeeded():
            name, path = job.fine_tuned_model, job.result.get("adapter_path")
            router = self.routers.get(job.model)
            if not name or not path or router is None:
                continue
            self.catalog.owners[name] = job.tenant_id
            for replica in router.replicas:
                if replica.healthy and name not in replica.adapters \
                        and await self._load(replica.url, name, path):
                    replica.adapters = replica.adapters | {name}
                    changed.add(job.model)
        for base in changed:
            names = set().union(*(r.adapters for r in self.routers[base].replicas))
            self.catalog.set_adapters(base, sorted(names))

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
