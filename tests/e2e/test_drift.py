"""Drift detection end to end: real chat traffic through the gateway, prompts embedded by the
real MiniLM engine, windows in the real Redis. Prompts from one distribution stay under the
threshold against a reference from the same one; prompts from a clearly different one cross
it, in `/admin/drift` and in `/metrics` alike; setting the reference starts over."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from openai import OpenAI

from llmops.cli.stack import CHAT_MODEL
from tests.drift_prompts import prompts
from tests.e2e.conftest import API_KEY, Engines, Gateway, GatewayFactory, standard_models

WINDOW = 40
DRIFT = {"sample_rate": 1.0, "window": WINDOW, "min_samples": WINDOW, "interval_s": 0.5}


def send(gw: Gateway, texts: list[str]) -> None:
    with OpenAI(base_url=gw.base_url, api_key=API_KEY, max_retries=0, timeout=120) as client:
        def one(text: str) -> None:
            client.chat.completions.create(
                model=CHAT_MODEL, messages=[{"role": "user", "content": text}], max_tokens=1,
                temperature=0)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, texts))


def chat_drift(gw: Gateway, recent: int, since: float = 0.0) -> dict[str, Any]:
    """The chat model's entry once its recent window holds `recent` samples and a comparison
    newer than `since` covers it."""
    deadline = time.monotonic() + 60
    while True:
        resp = httpx.get(f"{gw.url}/admin/drift", headers=gw.headers)
        assert resp.status_code == 200, resp.text
        entry = next((m for m in resp.json()["data"] if m["model"] == CHAT_MODEL), None)
        if (entry is not None and entry["recent"]["samples"] == recent
                and (entry["computed_at"] or 0) > since
                and (recent < WINDOW or entry["signals"])):
            return entry
        assert time.monotonic() < deadline, f"drift never caught up: {entry}"
        time.sleep(0.25)


def test_a_different_prompt_distribution_crosses_the_threshold(
        engines: Engines, gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(standard_models(engines), drift=DRIFT)
    send(gw, prompts("kitchen", WINDOW, seed=1))  # the reference window
    send(gw, prompts("kitchen", WINDOW, seed=2))  # same distribution, other prompts
    same = chat_drift(gw, WINDOW)
    assert same["reference"]["samples"] == WINDOW and same["reference"]["complete_at"]
    prompt = same["signals"]["prompt_embedding"]
    assert prompt["method"] == "mmd2_permutation"
    assert not prompt["drifted"], prompt
    assert prompt["score"] < prompt["threshold"]
    # The answers' signals are computed too (the prompt signal is the one this test moves).
    assert set(same["signals"]) == {"prompt_embedding", "output_length",
                                    "empty_or_refusal_rate", "error_rate"}
    assert not same["signals"]["error_rate"]["drifted"]

    send(gw, prompts("python", WINDOW, seed=3))  # replaces the recent window entirely
    # The window was full before too: wait for a comparison that surely saw every new sample
    # (each background round flushes the samples, then compares).
    other = chat_drift(gw, WINDOW, since=time.time() + 1.0)
    moved = other["signals"]["prompt_embedding"]
    assert moved["drifted"] and moved["score"] > moved["threshold"], moved
    assert moved["score"] > 5 * prompt["score"]

    metrics = httpx.get(f"{gw.url}/metrics").text
    labels = f'model="{CHAT_MODEL}",signal="prompt_embedding"'
    assert f"llmops_drift_score{{{labels}}}" in metrics
    assert f"llmops_drift_threshold{{{labels}}}" in metrics

    # The new traffic is intended: it becomes the reference, and the alarm clears.
    reset = httpx.post(f"{gw.url}/admin/drift/reference", headers=gw.headers,
                       json={"model": CHAT_MODEL, "source": "recent"})
    assert reset.status_code == 200, reset.text
    assert reset.json()["reference"]["samples"] == WINDOW
    assert reset.json()["recent"]["samples"] == 0 and reset.json()["signals"] == {}
    send(gw, prompts("python", WINDOW, seed=4))
    after = chat_drift(gw, WINDOW, since=time.time() - 1)
    assert not after["signals"]["prompt_embedding"]["drifted"], after


def test_drift_admin_errors(engines: Engines, gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(standard_models(engines), drift={"sample_rate": 0.0})
    unknown = httpx.post(f"{gw.url}/admin/drift/reference", headers=gw.headers,
                         json={"model": "no-such-model"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    bad = httpx.post(f"{gw.url}/admin/drift/reference", headers=gw.headers,
                     json={"model": CHAT_MODEL, "source": "yesterday"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "source"
    wrong_key = httpx.get(f"{gw.url}/admin/drift", headers={"Authorization": "Bearer sk-nope"})
    assert wrong_key.status_code == 401
    off = gateway_factory(standard_models(engines), drift={"enabled": False})
    resp = httpx.get(f"{off.url}/admin/drift", headers=off.headers)
    assert resp.status_code == 503 and resp.json()["error"]["type"] == "server_error"
