"""How a batch's worker sends a line (`batches.client`), against a tiny real HTTP server: as
the admin key acting for the batch's key, with a request id naming the batch and line; tried
again only when the gateway cannot have served it (429, 503, no connection), never after an
answer that may mean it ran."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from batches.client import GatewaySender
from batches.validation import BatchLine
from llmops.cli.stack import free_port
from tenancy.tenants import ON_BEHALF_HEADER

LINE = BatchLine(7, "c7", b'{"model":"chat"}')


class Script:
    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.seen: list[dict[str, str]] = []

    async def answer(self, request: web.Request) -> web.Response:
        self.seen.append({"rid": request.headers["x-request-id"],
                          "auth": request.headers["authorization"],
                          "for": request.headers[ON_BEHALF_HEADER],
                          "body": (await request.read()).decode()})
        status = self.statuses.pop(0)
        headers = {"retry-after": "0"} if status in (429, 503) else {}
        return web.json_response({"status": status}, status=status, headers=headers)


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[Script, str, aiohttp.ClientSession]]:
    script = Script()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", script.answer)
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        yield script, str(server.make_url("")), session


async def test_a_line_is_sent_as_the_batch_key_and_retried_only_when_not_served(
        gateway: tuple[Script, str, aiohttp.ClientSession]) -> None:
    script, url, session = gateway
    send = GatewaySender(session, url, "sk-admin", "key_a", "/v1/chat/completions",
                         "batch_1", attempts=4)
    script.statuses = [429, 503, 200]
    answer, rid = await send(LINE)
    assert answer.status_code == 200 and answer.body == {"status": 200}
    assert len(script.seen) == 3 and rid == script.seen[-1]["rid"]
    assert all(s["rid"].startswith("batch_1.7.") for s in script.seen)
    assert len({s["rid"] for s in script.seen}) == 3  # each try its own id
    assert script.seen[0]["auth"] == "Bearer sk-admin" and script.seen[0]["for"] == "key_a"
    assert orjson.loads(script.seen[0]["body"]) == {"model": "chat"}
    for status in (500, 502, 504, 400):  # it may have run: its answer is the result
        script.seen.clear()
        script.statuses = [status, 200]
        answer, _ = await send(LINE)
        assert answer.status_code == status and len(script.seen) == 1
    script.statuses = [429, 429, 429, 429]
    answer, _ = await send(LINE)
    assert answer.status_code == 429  # tries are bounded


async def test_an_unreachable_gateway_is_an_error_after_the_tries() -> None:
    async with aiohttp.ClientSession() as session:
        send = GatewaySender(session, f"http://127.0.0.1:{free_port()}", "k", "key_a",
                             "/v1/chat/completions", "batch_1", attempts=2)
        answer, _ = await send(LINE)
    assert answer.status_code is None and answer.error is not None
    assert answer.error["code"] == "gateway_unreachable"
