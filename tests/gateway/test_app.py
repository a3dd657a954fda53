"""The gateway application in process: its OpenAPI document and its public surface."""

from __future__ import annotations

import httpx

import gateway.routing
from gateway.app import create_app
from llmops.settings import Settings

SETTINGS = Settings(
    admin_key="sk-unit",
    models=[{"name": "m", "kind": "chat", "pools": [{"device": "cpu", "urls": ["http://x:1"]}]}],
)


async def test_openapi_document_describes_the_api() -> None:
    app = create_app(SETTINGS)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gw") as client:
        doc = (await client.get("/openapi.json")).json()
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
            "/healthz", "/readyz", "/admin/tenants", "/admin/keys", "/admin/usage"
            } <= set(doc["paths"])
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    ref = body["content"]["application/json"]["schema"]["$ref"]
    chat = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert {"model", "messages"} <= set(chat["required"])
    assert "ChatMessage" in doc["components"]["schemas"]


def test_routing_exports() -> None:
    assert set(gateway.routing.__all__) == {
        "REASONS", "SCORERS", "AdapterAffinity", "Circuit", "CircuitState", "Decision", "Filter",
        "Pool", "PrefixHolders", "PrefixIndex", "Replica", "Router", "Scorer", "WeightedScorer",
        "build_affinity", "build_prefixes", "build_scorers", "prefix_blocks",
    }
