"""Bad input and misbehaving clients: each gets the right status in OpenAI's error shape, and
the gateway keeps serving."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from llmops.cli.stack import CHAT_MODEL, EMBEDDING_MODEL
from tests.e2e.conftest import Engines, Gateway, vllm_metric, wait_engine_idle

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, headers=gateway.headers, timeout=60) as client:
        yield client
    # Whatever the test did, the gateway still serves a real request afterwards.
    with httpx.Client(base_url=gateway.url, headers=gateway.headers, timeout=60) as after:
        ok = after.post(CHAT, json={"model": CHAT_MODEL, "messages": HELLO, "max_tokens": 2})
        assert ok.status_code == 200, ok.text


def assert_error(resp: httpx.Response, status: int, *, param: str | None = None,
                 code: str | None = None) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return dict(error)


def test_invalid_json(http: httpx.Client) -> None:
    resp = http.post(CHAT, content=b'{"model": "x", "messages": [', headers={
        "content-type": "application/json"})
    assert_error(resp, 400)


def test_body_that_is_not_an_object(http: httpx.Client) -> None:
    assert_error(http.post(CHAT, json=["not", "an", "object"]), 400)


def test_missing_messages(http: httpx.Client) -> None:
    assert_error(http.post(CHAT, json={"model": CHAT_MODEL}), 400, param="messages")


def test_wrong_types(http: httpx.Client) -> None:
    body = {"model": CHAT_MODEL, "messages": HELLO, "temperature": "hot"}
    assert_error(http.post(CHAT, json=body), 400, param="temperature")
    body = {"model": CHAT_MODEL, "messages": [{"role": "wizard", "content": "x"}]}
    assert_error(http.post(CHAT, json=body), 400, param="messages[0].role")
    body = {"model": CHAT_MODEL, "messages": HELLO, "max_tokens": "10"}
    assert_error(http.post(CHAT, json=body), 400, param="max_tokens")


def test_out_of_range(http: httpx.Client) -> None:
    body = {"model": CHAT_MODEL, "messages": HELLO, "n": 0}
    assert_error(http.post(CHAT, json=body), 400, param="n")


def test_unknown_model(http: httpx.Client) -> None:
    body = {"model": "no-such-model", "messages": HELLO}
    assert_error(http.post(CHAT, json=body), 404, param="model", code="model_not_found")


def test_model_of_the_wrong_kind(http: httpx.Client) -> None:
    body = {"model": EMBEDDING_MODEL, "messages": HELLO}
    assert_error(http.post(CHAT, json=body), 400, param="model")


def test_oversized_body(http: httpx.Client) -> None:
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x" * 100_000}]}
    assert_error(http.post(CHAT, json=body), 413)


def test_oversized_chunked_body(http: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}]}'

    assert_error(http.post(CHAT, content=chunks()), 413)


def test_backend_rejection_is_relayed_in_openai_shape(http: httpx.Client) -> None:
    # Valid for the gateway, too long for the engine's 2048-token context.
    body = {"model": CHAT_MODEL, "messages": HELLO, "max_tokens": 100_000}
    assert_error(http.post(CHAT, json=body), 400)


def test_missing_or_wrong_key(gateway: Gateway) -> None:
    body = {"model": CHAT_MODEL, "messages": HELLO}
    assert_error(httpx.post(gateway.url + CHAT, json=body), 401, code="invalid_api_key")
    wrong = {"Authorization": "Bearer sk-wrong"}
    assert_error(httpx.post(gateway.url + CHAT, json=body, headers=wrong), 401,
                 code="invalid_api_key")
    assert_error(httpx.get(gateway.url + "/v1/models"), 401)


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert_error(http.get("/v1/nope"), 404)
    assert_error(http.get(CHAT), 405)


def test_request_id_is_kept_or_made(http: httpx.Client) -> None:
    resp = http.post(CHAT, json={"model": CHAT_MODEL, "messages": HELLO, "max_tokens": 1},
                     headers={"x-request-id": "client-chosen-id-1"})
    assert resp.headers["x-request-id"] == "client-chosen-id-1"
    made = http.get("/v1/models").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert http.get("/v1/nope").headers["x-request-id"]


def test_client_disconnect_cancels_a_stream_upstream(http: httpx.Client,
                                                        engines: Engines) -> None:
    generated = "vllm:generation_tokens_total{"
    tokens_before = vllm_metric(engines.chat.url, generated)
    body = {"model": CHAT_MODEL, "messages": HELLO, "stream": True, "max_tokens": 1500,
            "ignore_eos": True}  # a vLLM extension, passed through: ~80 s of generation
    with http.stream("POST", CHAT, json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        assert vllm_metric(engines.chat.url, "vllm:num_requests_running{") == 1
    # The client is gone: vLLM must abort the generation, not finish it.
    wait_engine_idle(engines.chat.url)
    # Stopped early: far fewer than the 1500 tokens a finished generation would have made.
    assert vllm_metric(engines.chat.url, generated) - tokens_before < 500


def test_client_disconnect_cancels_a_plain_request_upstream(gateway: Gateway,
                                                            engines: Engines) -> None:
    generated = "vllm:generation_tokens_total{"
    tokens_before = vllm_metric(engines.chat.url, generated)
    body = {"model": CHAT_MODEL, "messages": HELLO, "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 3 s and hangs up
        httpx.post(f"{gateway.url}{CHAT}", json=body, headers=gateway.headers, timeout=3)
    wait_engine_idle(engines.chat.url)
    assert vllm_metric(engines.chat.url, generated) - tokens_before < 500
