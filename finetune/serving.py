"""How a published adapter becomes servable, seen from the worker: it tells every gateway at
once (a message on the Redis adapters channel, on which each gateway reconciles its adapters)
and waits until the gateway serves the adapter, so that a job reports `succeeded` only once its
model answers. The gateway side is `gateway.routing.adapters`."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import RedisError

from llmops.settings import Settings
from llmops.store import FineTuningJob
from tenancy.tenants import ON_BEHALF_HEADER

__all__ = ["NotServedError", "adapters_channel", "announce", "wait_until_served"]

log = logging.getLogger(__name__)

POLL_S = 0.2  # between tries; each try itself waits while the gateway loads the adapter


class NotServedError(Exception):
    """The gateway did not serve the adapter in time (or cannot be asked)."""


def adapters_channel(prefix: str) -> str:
    """The Redis pub/sub channel on which adapter changes are announced: the message is the
    adapter's name."""
    return f"{prefix}:adapters"


async def announce(settings: Settings, adapter: str) -> None:
    """Tell the gateways that `adapter` was published, promoted or held back. A lost message
    only delays them to their periodic reconcile (and a request naming the adapter loads it)."""
    redis = Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout_s,
                           socket_connect_timeout=settings.redis_timeout_s)
    try:
        await redis.publish(adapters_channel(settings.redis_prefix), adapter)
    except (RedisError, OSError) as exc:
        log.warning("announcing adapter %s failed: %s", adapter, exc)
    finally:
        await redis.aclose()


async def wait_until_served(adapter: str, job: FineTuningJob, settings: Settings,
                            timeout_s: float) -> None:
    """Return once the gateway serves `adapter` to the job's key (as our worker acting for
    it: a candidate under evaluation counts). Asking is what loads it where it is not loaded
    yet, so each try may wait for a load."""
    key = settings.bootstrap_key()
    if key is None:
        raise NotServedError("Workers need the bootstrap admin key to call the gateway.")
    url = f"{settings.gateway_url()}/v1/models/{adapter}"
    headers = {"authorization": f"Bearer {key}", ON_BEHALF_HEADER: job.key_id}
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotServedError(f"The gateway did not serve {adapter} within "
                                     f"{timeout_s:.0f} s.")
            try:
                async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(
                        total=max(left, 1.0))) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError) as exc:  # a gateway restarting
                log.info("asking the gateway for %s: %s", adapter, exc)
            await asyncio.sleep(min(POLL_S, max(deadline - time.monotonic(), 0)))
