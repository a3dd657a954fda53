"""The OpenAI inference endpoints, declared once: `ENDPOINTS` gives each path its wire model
and model kind. The same declaration serves the requests (`handlers`, which
`gateway.http.middleware.InferenceRoutes` calls past FastAPI's router) and documents them
(`inference_router`, whose routes give the OpenAPI document its paths and answer 405 to other
methods, and `add_wire_schemas`, which adds the wire models to it)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response

from gateway.inference.pipeline import Endpoint, Pipeline
from gateway.inference.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from tenancy import Principal

__all__ = ["ENDPOINTS", "add_wire_schemas", "handlers", "inference_router"]

ENDPOINTS = (
    Endpoint("/v1/chat/completions", ChatCompletionRequest, "chat",
             "Creates a model response for the given chat conversation."),
    Endpoint("/v1/completions", CompletionRequest, "chat",
             "Creates a completion for the provided prompt."),
    Endpoint("/v1/embeddings", EmbeddingRequest, "embedding",
             "Creates an embedding vector representing the input text."),
)

Handler = Callable[[Request], Awaitable[Response]]


def handlers(pipeline: Pipeline, authenticate: Callable[[Request], Awaitable[Principal]]
             ) -> dict[str, Handler]:
    """Each endpoint's handler by path: authenticate, then the pipeline."""
    def handler(endpoint: Endpoint) -> Handler:
        async def serve(request: Request) -> Response:
            await authenticate(request)
            return await pipeline.serve(request, endpoint)
        return serve

    return {e.path: handler(e) for e in ENDPOINTS}


def inference_router(served: dict[str, Handler]) -> APIRouter:
    router = APIRouter(tags=["inference"])
    for e in ENDPOINTS:
        ref = {"$ref": f"#/components/schemas/{e.schema.__name__}"}
        router.add_api_route(
            e.path, served[e.path], methods=["POST"], summary=e.summary,
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/json": {"schema": ref}}}})
    return router


def add_wire_schemas(schema: dict[str, Any], *others: type[BaseModel]) -> None:
    """The endpoints' wire models (and `others`), as the components their request bodies
    refer to."""
    models = [e.schema for e in ENDPOINTS] + list(others)
    _, defs = models_json_schema([(m, "validation") for m in models],
                                 ref_template="#/components/schemas/{model}")
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
