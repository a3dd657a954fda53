"""Calling the engines: pick a replica of the model's pools, send, try another replica when one
fails before answering, and read whole answers, all on one pooled HTTP client."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from gateway.inference.hooks import RequestObserver
from gateway.inference.protocol import OpenAIRequest
from gateway.inference.spans import upstream_span
from gateway.routing import Replica, Router
from gateway.routing.flow import Claim, FlowControl
from gateway.routing.policy import RouteRequest
from llmops.catalog import CatalogEntry
from llmops.errors import (
    ModelNotFoundError,
    NoHealthyBackendError,
    UpstreamError,
    UpstreamTimeoutError,
)
from llmops.settings import PoolConfig, RoutingConfig
from observability import tracing
from tenancy.priority import Priority

__all__ = ["Embeddings", "Upstream"]

log = logging.getLogger(__name__)

# Replica failures that happen before vLLM produced any response: safe to try elsewhere.
_RETRYABLE = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError,
              aiohttp.ClientOSError)


@dataclass(frozen=True)
class Embeddings:
    """An embedding call's vectors (in the order of its texts) and what it used."""

    vectors: list[list[float]]
    prompt_tokens: int
    pool: PoolConfig | None
    device: str


class Upstream:
    """The engines behind the gateway. `start` opens the pooled client (inside the event
    loop), `close` closes it; health checks and adapter loading share it."""

    def __init__(self, routers: dict[str, Router], config: RoutingConfig,
                 observer: RequestObserver | None = None,
                 flows: dict[str, FlowControl] | None = None) -> None:
        self.routers = routers
        self.config = config
        self.observer = observer
        self.flows = flows or {}  # by model: where requests wait while its replicas are full
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout_s, sock_read=config.read_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream.start() first"
        return self._session

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.config.max_connections, ttl_dns_cache=300,
                                         keepalive_timeout=30)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                              skip_auto_headers=("User-Agent",))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def dispatch(self, entry: CatalogEntry, path: str, body: bytes,
                       headers: dict[str, str], request: OpenAIRequest | None = None,
                       claim: Claim | None = None, session: str | None = None
                       ) -> tuple[Replica, aiohttp.ClientResponse]:
        """The first replica's response, trying others while replicas fail to connect;
        `request` (the body, parsed) and its `session` key are what routing may look at. A
        client's request (`claim`: whose it is) waits its turn while every replica is full."""
        router = self.routers[entry.base.name]
        flow = self.flows.get(entry.base.name) if claim is not None else None
        blocks = (router.prefixes.blocks(request, entry.adapter)
                  if router.prefixes is not None else ())
        tried: set[int] = set()
        for _ in range(self.config.max_attempts):
            route = RouteRequest(entry.adapter, frozenset(tried), request, session, blocks)
            if flow is not None and claim is not None and not tried:
                decision = await flow.acquire(route, claim)
            else:
                chosen = router.decide(route)
                if chosen is None:
                    break
                decision = chosen
                decision.replica.acquire()
            replica = decision.replica
            if tried and self.observer is not None:
                self.observer.retried(entry.name)
            sent = _prioritized(body, claim, replica)
            try:
                resp = await self._post(replica, path, sent, headers, entry.upstream_name,
                                        decision.reason)
            except _RETRYABLE as exc:
                replica.release(ok=False)
                if isinstance(exc, aiohttp.ClientConnectorError):
                    replica.circuit.trip()  # nothing listens there: stop sending at once
                log.warning("replica %s failed (%s); trying another", replica.url,
                            type(exc).__name__)
                tried.add(id(replica))
                continue
            except TimeoutError:
                replica.release(ok=False)
                raise UpstreamTimeoutError("The model backend did not answer in time.") from None
            except BaseException:
                replica.release(ok=True)  # cancelled by the client, not the replica's fault
                raise
            if self.observer is not None and replica.config is not None:
                self.observer.dispatched(entry.name, replica.config, decision.reason)
            return replica, resp
        raise NoHealthyBackendError(
            f"No healthy backend is available for model `{entry.name}`. Try again later."
        )

    @staticmethod
    async def read(replica: Replica, resp: aiohttp.ClientResponse) -> bytes:
        """A whole answer's body; the replica is released, its health noted."""
        try:
            data = await resp.read()
        except TimeoutError:
            replica.release(ok=False)
            raise UpstreamTimeoutError("The model backend did not answer in time.") from None
        except aiohttp.ClientError:
            replica.release(ok=False)
            raise UpstreamError("The model backend closed the connection.") from None
        except BaseException:  # cancelled: the client left
            resp.close()
            replica.release(ok=True)
            raise
        finally:
            resp.release()
        replica.release(ok=resp.status < 500)
        return data

    async def embed(self, entry: CatalogEntry, texts: list[str]) -> list[list[float]]:
        """Embeddings for the gateway's own use (drift probes), through the same routing and
        failover as clients' requests."""
        return (await self.embeddings(entry, texts)).vectors

    async def embeddings(self, entry: CatalogEntry, texts: list[str]) -> Embeddings:
        """`texts` embedded by `entry`'s model, with what the call used (for the ledger)."""
        if entry.base.kind != "embedding":
            raise ModelNotFoundError(entry.name)
        body = orjson.dumps({"model": entry.upstream_name, "input": texts})
        replica, resp = await self.dispatch(entry, "/v1/embeddings", body,
                                            {"content-type": "application/json"})
        try:
            data = await self.read(replica, resp)
        except (UpstreamError, UpstreamTimeoutError):
            raise UpstreamError("The embedding backend failed.") from None
        if resp.status != 200:
            raise UpstreamError(f"The embedding backend answered {resp.status}: "
                                f"{data[:300].decode(errors='replace')}")
        answer = orjson.loads(data)
        rows = sorted(answer["data"], key=lambda d: d["index"])
        usage = answer.get("usage") or {}
        return Embeddings([r["embedding"] for r in rows], int(usage.get("prompt_tokens") or 0),
                          replica.config, replica.device)

    async def count_tokens(self, entry: CatalogEntry, messages: list[dict[str, Any]]
                           ) -> tuple[int, int]:
        """(prompt tokens, the engine's context length) of chat `messages` for `entry`'s
        model, as the engine's tokenizer and chat template count them."""
        body = orjson.dumps({"model": entry.upstream_name, "messages": messages})
        replica, resp = await self.dispatch(entry, "/tokenize", body,
                                            {"content-type": "application/json"})
        data = await self.read(replica, resp)
        if resp.status != 200:
            raise UpstreamError(f"The model backend could not count tokens ({resp.status}).")
        counted = orjson.loads(data)
        return int(counted["count"]), int(counted["max_model_len"])

    async def _post(self, replica: Replica, path: str, body: bytes, headers: dict[str, str],
                    model: str, reason: str) -> aiohttp.ClientResponse:
        """One attempt at calling a replica: a CLIENT span, whose context vLLM receives."""
        with upstream_span(replica, path, model, reason) as span:
            if span is not None:
                headers = tracing.inject({**headers})
            resp = await self.session.post(replica.url + path, data=body, headers=headers,
                                           timeout=self.timeout)
            if span is not None:
                span.set_attribute("http.response.status_code", resp.status)
                if resp.status >= 500:
                    tracing.failed(span, str(resp.status))
            return resp


def _prioritized(body: bytes, claim: Claim | None, replica: Replica) -> bytes:
    """The body with the request's class as vLLM's `priority`, for engines that schedule by
    it; interactive is vLLM's default (0), so only lower classes change the body."""
    if (claim is None or claim.priority is Priority.INTERACTIVE or replica.config is None
            or not replica.config.priority_scheduling):
        return body
    return orjson.dumps({**orjson.loads(body), "priority": int(claim.priority)})
