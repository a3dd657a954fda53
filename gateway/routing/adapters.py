"""Serving fine-tuned adapters: every published job's adapter is kept loaded in each healthy
replica of its base model (`POST /v1/load_lora_adapter`), so a replica that restarts gets its
adapters back, and a new adapter is warmed up with one request after loading (the first
request after a load is slow, vllm#8559). An adapter under evaluation is loaded but withheld
from clients; one its evaluation held back is unloaded (see finetune.promotion).

A new adapter is served at once, by two means (see finetune.serving for the worker's side):
workers announce adapters on a Redis channel and every gateway reconciles on the message (the
periodic reconcile is a safety net), and a request naming a published adapter this gateway
does not serve yet loads it on the spot and waits for it, bounded. Loads are single-flight per
replica and adapter, whoever asks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import aiohttp
from redis.asyncio import Redis

from finetune.jobs import FineTuning
from gateway.routing.policy import Router
from gateway.routing.replica import Replica
from llmops.catalog import FINE_TUNED, Catalog
from llmops.errors import NoHealthyBackendError, ServiceUnavailableError
from llmops.settings import Settings
from llmops.store import FineTuningJob
from tenancy.tenants import NotFoundError, Principal
from tenancy.visibility import may_see

__all__ = ["AdapterLoader", "servable"]

log = logging.getLogger(__name__)

LOOKUPS_KEPT = 10_000  # looked-up model names remembered (least recently asked go first)
BACKOFF_S = (0.5, 30.0)  # reconnecting to Redis: first and longest pause


def servable(job: FineTuningJob) -> bool:
    """The job's adapter is published: it succeeded, or its worker published it and is
    evaluating it or waiting for it to be served (not a resumed job still training)."""
    if not job.fine_tuned_model or not job.result.get("adapter_path"):
        return False
    verdict = job.result.get("evaluation") or {}
    return job.status == "succeeded" or (job.status == "running" and (
        bool(job.result.get("published")) or verdict.get("state") == "evaluating"))


class AdapterLoader:
    def __init__(self, settings: Settings, jobs: FineTuning, routers: dict[str, Router],
                 catalog: Catalog, session: Callable[[], aiohttp.ClientSession]) -> None:
        self.jobs = jobs
        self.routers = routers
        self.catalog = catalog
        self.session = session  # the upstream client, opened once the event loop runs
        self.config = settings.routing
        self.timeout = aiohttp.ClientTimeout(total=120)
        self._loads: dict[tuple[str, str], asyncio.Task[bool]] = {}
        self._lookups: OrderedDict[str, tuple[float, FineTuningJob | None]] = OrderedDict()
        self._wake = asyncio.Event()

    # Keeping every gateway's adapters in line with the store

    async def run(self) -> None:
        """Reconcile at start, at once when poked (a worker's message), else every
        adapters_interval_s."""
        self._wake.set()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.adapters_interval_s)
            self._wake.clear()
            try:
                await self.reconcile()
            except Exception as exc:  # the loop must outlive a failing round
                log.warning("reconciling adapters failed: %s", exc)

    def poke(self, adapter: str | None = None) -> None:
        """Something changed (`adapter`, or anything): forget what was looked up, reconcile."""
        if adapter is None:
            self._lookups.clear()
        else:
            self._lookups.pop(adapter, None)
        self._wake.set()

    async def follow(self, redis: Redis, channel: str) -> None:
        """Poke on every message of the workers' adapters channel; a lost connection is
        retried with backoff, and each (re)subscription pokes once, as messages sent while
        away are lost."""
        pause = BACKOFF_S[0]
        while True:
            try:
                async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(channel)
                    pause = BACKOFF_S[0]
                    self.poke()
                    while True:
                        message = await pubsub.get_message(timeout=1.0)
                        if message is not None:
                            data = message["data"]
                            self.poke(data.decode() if isinstance(data, bytes) else str(data))
            except Exception as exc:  # Redis down or gone: never the gateway's end
                log.warning("adapter notifications lost (%s); resubscribing in %.1f s",
                            exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, BACKOFF_S[1])

    async def reconcile(self) -> None:
        for job in await self.jobs.with_adapters():
            loads = await self._apply(job)
            if loads:
                await asyncio.gather(*loads)

    async def _apply(self, job: FineTuningJob) -> list[asyncio.Task[bool]]:
        """Bring the catalog and the engines in line with `job`: its owner, details and
        visibility noted, unloaded if held back, else loaded where it is missing (the loads
        in flight are returned)."""
        name, path = job.fine_tuned_model, job.result.get("adapter_path")
        router = self.routers.get(job.model)
        if not servable(job) or not name or not path or router is None:
            return []
        self.catalog.owners[name] = job.tenant_id
        self.catalog.details[name] = _details(job)
        if not _withheld(job):
            self.catalog.withheld.discard(name)
        else:
            self.catalog.withheld.add(name)  # under evaluation, or held back by it
            if job.status == "succeeded":  # held back: free its engine slots
                for replica in router.replicas:
                    if name in replica.adapters and await self._unload(replica.url, name):
                        replica.adapters = replica.adapters - {name}
                        self._publish(job.model)
                return []
        return [self._load_once(replica, job.model, name, path) for replica in router.replicas
                if replica.healthy and name not in replica.adapters]

    # A request naming an adapter this gateway does not serve yet

    async def ensure(self, who: Principal, model: str) -> None:
        """Before `model` is looked up for `who`: when it names a published fine-tuned adapter
        that `who` may use and this gateway does not serve yet (or still withholds, or whose
        owner it does not know yet), bring it in line with the store and wait, bounded, until
        one replica has loaded it. Anything else is left to the usual rules (which answer 404
        for another tenant's adapter exactly as for a missing one)."""
        entry = self.catalog.resolve(model)
        if entry is not None and may_see(self.catalog, who, entry) and (
                entry.adapter is None or model in self.catalog.owners):
            return
        job = await self._lookup(model)
        if job is None or not (who.is_admin or (job.tenant_id == who.tenant_id
                                                and who.may_use(model))):
            return
        if _withheld(job) and (job.status == "succeeded"  # held back: never loaded again
                               or not (who.is_admin or who.delegated)):
            return
        loads = await self._apply(job)
        if self.catalog.resolve(model) is not None:
            return  # a replica has it
        if not loads:
            raise NoHealthyBackendError(
                f"No healthy backend can load model `{model}`. Try again later.")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.adapter_load_wait_s
        pending = set(loads)
        while pending:  # the first replica that has it will do
            done, pending = await asyncio.wait(pending, timeout=max(deadline - loop.time(), 0),
                                               return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise ServiceUnavailableError(
                    f"The model `{model}` is being loaded; try again in a few seconds.",
                    code="model_loading")
            if any(t.exception() is None and t.result() for t in done):
                return
        raise ServiceUnavailableError(f"The model `{model}` could not be loaded; try again "
                                      "later.", code="model_loading")

    async def _lookup(self, model: str) -> FineTuningJob | None:
        """The job whose published adapter `model` names, or None; one database read per name
        per adapter_miss_ttl_s, however often it is asked (a message forgets it at once)."""
        if not model.startswith(FINE_TUNED):
            return None  # not an adapter name (`finetune.jobs.adapter_name`)
        now = time.monotonic()
        if (hit := self._lookups.get(model)) is not None and hit[0] > now:
            self._lookups.move_to_end(model)
            return hit[1]
        try:
            job: FineTuningJob | None = await self.jobs.get(model.rsplit(":", 1)[-1])
        except NotFoundError:
            job = None
        if job is not None and (job.fine_tuned_model != model or not servable(job)):
            job = None
        self._lookups[model] = (now + self.config.adapter_miss_ttl_s, job)
        self._lookups.move_to_end(model)
        while len(self._lookups) > LOOKUPS_KEPT:
            self._lookups.popitem(last=False)
        return job

    # The engines

    def _load_once(self, replica: Replica, base: str, name: str, path: str
                   ) -> asyncio.Task[bool]:
        """The load of `name` into `replica`: the one in flight, else a new one."""
        key = (replica.url, name)
        task = self._loads.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(replica, base, name, path))
            self._loads[key] = task
            task.add_done_callback(lambda _: self._loads.pop(key, None))
        return task

    async def _load(self, replica: Replica, base: str, name: str, path: str) -> bool:
        if not await self._post_load(replica.url, name, path):
            return False
        replica.adapters = replica.adapters | {name}
        self._publish(base)  # now, not after the other adapters' loads
        return True

    def _publish(self, base: str) -> None:
        names = set().union(*(r.adapters for r in self.routers[base].replicas))
        self.catalog.set_adapters(base, sorted(names))

    async def _unload(self, url: str, name: str) -> bool:
        try:
            async with self.session().post(f"{url}/v1/unload_lora_adapter",
                                           timeout=self.timeout,
                                           json={"lora_name": name}) as resp:
                await resp.read()
                ok = resp.status == 200 or resp.status == 404
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("unloading %s from %s failed: %s", name, url, exc)
            return False
        if ok:
            log.info("adapter %s unloaded from %s: held back by its evaluation", name, url)
        return ok

    async def _post_load(self, url: str, name: str, path: str) -> bool:
        session = self.session()
        try:
            async with session.post(f"{url}/v1/load_lora_adapter", timeout=self.timeout,
                                    json={"lora_name": name, "lora_path": path}) as resp:
                body = await resp.text()
                if resp.status != 200 and "already been loaded" not in body:
                    log.warning("loading %s into %s failed: %s %s", name, url, resp.status,
                                body[:200])
                    return False
            async with session.post(f"{url}/v1/completions", timeout=self.timeout,
                                    json={"model": name, "prompt": "Hi",
                                          "max_tokens": 1}) as warm:
                await warm.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("loading %s into %s failed: %s", name, url, exc)
            return False
        log.info("adapter %s loaded into %s", name, url)
        return True


def _withheld(job: FineTuningJob) -> bool:
    """Under evaluation, or held back by it."""
    verdict = job.result.get("evaluation")
    return verdict is not None and not verdict.get("promoted")


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
