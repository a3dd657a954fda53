"""A FAKE vLLM upstream for the reliability suite (named as such wherever it is used): canned
OpenAI answers with exact, predictable usage, so that faults and floods can be driven through
the gateway for minutes without the CPU cost of real engines, and the ledger reconciled
exactly. It is no stand-in for vLLM's behaviour; the e2e suite covers that on real engines.

    python -m tests.reliability.fake_vllm PORT

Answers: every chat or completion uses `PROMPT_TOKENS` prompt tokens and `max_tokens` (default
`COMPLETION_TOKENS`) completion tokens, streamed one event per token when asked; embeddings are
deterministic 384-dimensional vectors of one prompt token per input. `POST /_fake/config` sets
`{"embed_delay_s": ..}` (slow embeddings, to catch a worker mid-task); `GET /_fake/stats`
counts the requests seen.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import sys
from collections import Counter
from typing import Any

import orjson
from aiohttp import web

__all__ = ["CHAT", "COMPLETION_TOKENS", "DIMENSIONS", "PROMPT_TOKENS"]

PROMPT_TOKENS = 7
COMPLETION_TOKENS = 5
DIMENSIONS = 384

CHAT = "fake-chat"  # the base model its adapters name as their parent
_config: dict[str, float] = {"embed_delay_s": 0.0}
_adapters: dict[str, None] = {}  # loaded LoRA adapters, in load order
_stats: Counter[str] = Counter()


def _usage(completion: int) -> dict[str, int]:
    return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion,
            "total_tokens": PROMPT_TOKENS + completion}


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    body = await request.json(loads=orjson.loads)
    _stats["chat" if chat else "completion"] += 1
    n = int(body.get("max_tokens") or COMPLETION_TOKENS)
    text = " ".join(["tok"] * n)
    kind = "chat.completion" if chat else "text_completion"
    if not body.get("stream"):
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return web.Response(body=orjson.dumps({
            "id": "fake-1", "object": kind, "created": 0, "model": body["model"],
            "choices": [choice], "usage": _usage(n)}), content_type="application/json")
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(n):
        delta = {"delta": {"content": "tok "}} if chat else {"text": "tok "}
        chunk = {"id": "fake-1", "object": f"{kind}.chunk", "created": 0,
                 "model": body["model"], "choices": [{"index": 0, **delta,
                                                      "finish_reason": None}],
                 "usage": _usage(i + 1)}
        await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await asyncio.sleep(0.002)
    final = {"id": "fake-1", "object": f"{kind}.chunk", "created": 0, "model": body["model"],
             "choices": [], "usage": _usage(n)}
    await resp.write(b"data: " + orjson.dumps(final) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    return resp


async def chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


def _vector(text: str) -> list[float]:
    seed = hashlib.sha256(text.encode()).digest()
    raw = (seed * (DIMENSIONS * 4 // len(seed) + 1))[:DIMENSIONS]
    values = [b / 255.0 - 0.5 for b in raw]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]


async def embeddings(request: web.Request) -> web.Response:
    body = await request.json(loads=orjson.loads)
    _stats["embeddings"] += 1
    if _config["embed_delay_s"]:
        _stats["embeddings_delayed"] += 1
        await asyncio.sleep(_config["embed_delay_s"])
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    data = []
    for i, text in enumerate(inputs):
        vector: Any = _vector(str(text))
        if body.get("encoding_format") == "base64":
            vector = base64.b64encode(struct.pack(f"<{DIMENSIONS}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vector})
    return web.Response(body=orjson.dumps({
        "object": "list", "model": body["model"], "data": data,
        "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}}),
        content_type="application/json")


async def ok(_: web.Request) -> web.Response:
    return web.Response(text="")


async def load_adapter(request: web.Request) -> web.Response:
    """Adapters "load" without weights, and are then listed, as vLLM lists them."""
    _adapters.setdefault(str((await request.json())["lora_name"]))
    return web.Response(text="")


async def models(_: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [
        {"id": name, "object": "model", "parent": CHAT} for name in _adapters]})


async def config(request: web.Request) -> web.Response:
    _config.update({k: float(v) for k, v in (await request.json()).items()})
    return web.json_response(_config)


async def stats(_: web.Request) -> web.Response:
    return web.json_response(dict(_stats))


def make_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/health", ok)
    app.router.add_get("/metrics", ok)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/load_lora_adapter", load_adapter)
    app.router.add_post("/_fake/config", config)
    app.router.add_get("/_fake/stats", stats)
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=int(sys.argv[1]), access_log=None,
                print=None)
