"""The one typed settings object, read from `LLMOPS_*` environment variables and an optional
YAML file (`LLMOPS_CONFIG`). Environment variables win over the file.

Models are declared here: a public name, a kind, the name vLLM serves it under, and backend
pools. A pool is a device class with replica URLs and a priority; the gateway tries pools in
descending priority, so a GPU pool is normally given a higher priority than its CPU fallback.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

__all__ = ["ModelConfig", "PoolConfig", "RoutingConfig", "Settings", "load_settings"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PoolConfig(_Strict):
    """A set of interchangeable vLLM replicas on one device class."""

    device: Literal["gpu", "cpu"]
    urls: list[str] = Field(min_length=1, description="Base URLs of the vLLM servers.")
    priority: int = Field(0, description="Higher is tried first.")
    max_concurrency: int = Field(
        64, ge=1, description="Outstanding requests per replica before it counts as full."
    )
    max_waiting: int = Field(
        16, ge=0, description="vLLM's own queue length at which a replica counts as full."
    )

    @field_validator("urls")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"replica URL {url!r} must start with http:// or https://")
        return [url.rstrip("/") for url in urls]


class ModelConfig(_Strict):
    name: str = Field(min_length=1, description="The name clients send as `model`.")
    kind: Literal["chat", "embedding"]
    served_name: str | None = Field(None, description="vLLM's --served-model-name; default: name.")
    pools: list[PoolConfig] = Field(min_length=1)
    owned_by: str = "llmops"

    @property
    def upstream_name(self) -> str:
        return self.served_name or self.name


class RoutingConfig(_Strict):
    health_interval_s: float = Field(5.0, gt=0, description="Active /health probe period.")
    health_timeout_s: float = Field(2.0, gt=0)
    metrics_interval_s: float = Field(2.0, gt=0, description="vLLM /metrics scrape period.")
    models_interval_s: float = Field(10.0, gt=0, description="LoRA adapter discovery period.")
    failure_threshold: int = Field(
        2, ge=1, description="Consecutive failures that open a replica's circuit."
    )
    cooldown_s: float = Field(10.0, gt=0, description="How long an open circuit stays open.")
    max_attempts: int = Field(
        3, ge=1, description="Replicas tried per request on connection failures."
    )
    connect_timeout_s: float = Field(3.0, gt=0)
    read_timeout_s: float = Field(
        600.0, gt=0, description="Longest silence from vLLM before the request fails with 504."
    )
    max_connections: int = Field(1024, ge=1, description="Pooled upstream connections in all.")
    weight_outstanding: float = Field(1.0, ge=0)
    weight_queue: float = Field(1.0, ge=0)
    weight_kv_cache: float = Field(0.5, ge=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LLMOPS_", env_nested_delimiter="__", extra="forbid"
    )

    host: str = "127.0.0.1"
    port: int = 8000
    models: list[ModelConfig] = Field(default_factory=list)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body.")
    api_key: SecretStr | None = Field(None, description="The key clients must send.")
    api_key_file: Path | None = Field(None, description="A file holding that key.")
    allow_unauthenticated: bool = Field(
        False, description="Serve /v1 without a key (local experiments only)."
    )
    log_level: str = "info"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path := os.environ.get("LLMOPS_CONFIG"):
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"models: duplicate model names {dupes}")
        if self.api_key is None and self.api_key_file is None and not self.allow_unauthenticated:
            raise ValueError(
                "no API key configured: set LLMOPS_API_KEY or LLMOPS_API_KEY_FILE "
                "(or LLMOPS_ALLOW_UNAUTHENTICATED=true for a local experiment)"
            )
        return self

    def api_key_digest(self) -> bytes | None:
        """SHA-256 of the configured key; the plain key is not kept by the gateway."""
        if self.api_key is not None:
            key = self.api_key.get_secret_value()
        elif self.api_key_file is not None:
            key = self.api_key_file.read_text().strip()
        else:
            return None
        return hashlib.sha256(key.encode()).digest()


def load_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)


def dump_yaml(data: dict[str, Any], path: Path) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
