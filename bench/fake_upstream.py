"""A fake vLLM upstream for measuring the gateway's own overhead (never used by tests as a
stand-in for vLLM): canned OpenAI answers from an aiohttp server, as fast as Python allows.

    python -m bench.fake_upstream PORT
"""

from __future__ import annotations

import asyncio
import sys

import orjson
from aiohttp import web

CHAT = orjson.dumps({
    "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": "fake",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "The capital of France is Paris."}}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20},
})
CHUNK = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,' \
        b'"delta":{"content":"tok"}}]}\n\n'


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json(loads=orjson.loads)
    if not body.get("stream"):
        return web.Response(body=CHAT, content_type="application/json")
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    for _ in range(8):
        await resp.write(CHUNK)
        await asyncio.sleep(0.005)  # a token every 5 ms
    await resp.write(b"data: [DONE]\n\n")
    return resp


async def ok(_: web.Request) -> web.Response:
    return web.Response(text="")


async def models(_: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})


def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", ok)
    app.router.add_get("/metrics", ok)
    app.router.add_get("/v1/models", models)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
