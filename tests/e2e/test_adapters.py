"""LoRA adapters loaded into a running vLLM engine appear in the gateway's model list and are
served by name."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from llmops.cli.stack import CHAT_MODEL
from tests.e2e.conftest import API_KEY, Engines, Gateway

ADAPTER = "ft:smollm2-135m-instruct:e2e:test1"
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def adapter_dir(engines: Engines, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PEFT LoRA adapter for SmolLM2 with random (non-zero) weights, so it visibly
    changes the model's answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(engines.model_dirs["chat"], dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    out = tmp_path_factory.mktemp("adapter")
    get_peft_model(base, config).save_pretrained(out)
    return out


def _model_ids(gateway: Gateway) -> dict[str, dict[str, object]]:
    data = httpx.get(f"{gateway.base_url}/models", headers=gateway.headers).json()["data"]
    return {m["id"]: m for m in data}


def _wait_for(predicate: object, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.25)


def test_loaded_adapter_is_listed_and_served(engines: Engines, gateway: Gateway,
                                             adapter_dir: Path) -> None:
    load = httpx.post(f"{engines.chat.url}/v1/load_lora_adapter", timeout=120,
                      json={"lora_name": ADAPTER, "lora_path": str(adapter_dir)})
    assert load.status_code == 200, load.text
    try:
        _wait_for(lambda: ADAPTER in _model_ids(gateway))
        assert _model_ids(gateway)[ADAPTER]["parent"] == CHAT_MODEL

        client = OpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0)
        base = client.chat.completions.create(model=CHAT_MODEL, messages=PROMPT,
                                              temperature=0, max_tokens=12)
        tuned = client.chat.completions.create(model=ADAPTER, messages=PROMPT,
                                               temperature=0, max_tokens=12)
        assert tuned.model == ADAPTER
        assert tuned.choices[0].message.content != base.choices[0].message.content
    finally:
        httpx.post(f"{engines.chat.url}/v1/unload_lora_adapter", timeout=60,
                   json={"lora_name": ADAPTER})
    _wait_for(lambda: ADAPTER not in _model_ids(gateway))
    gone = httpx.post(f"{gateway.base_url}/chat/completions", headers=gateway.headers,
                      json={"model": ADAPTER, "messages": PROMPT})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
