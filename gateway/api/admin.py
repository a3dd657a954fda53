"""The admin API under `/admin` (admin keys only): tenants, keys, model prices, usage and
drift."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends
from pydantic import AfterValidator, BaseModel, Field
from sqlalchemy import select

import tenancy
from gateway.api.usage import Period, UsageQuery, usage_query
from gateway.deletion import TenantDeletion
from gateway.http.auth import Authenticated, require_admin
from gateway.http.timestamps import epoch
from guardrails.schema import GuardrailsPolicy
from llmops.catalog import Catalog
from llmops.errors import (
    ConflictError,
    ModelNotFoundError,
    NotFoundError,
    ServiceUnavailableError,
)
from llmops.store import ApiKey, Database, ModelPrice, Tenant
from llmops.wire import Wire
from observability.drift import DriftDetector, ReferenceSource
from tenancy.accounting import PriceBook
from tenancy.auth import Authenticator
from tenancy.ledger import last_used
from tenancy.pricing import Price
from tenancy.tenants import Limits, Tenancy

__all__ = ["admin_router"]

# What the store's columns hold: a 32-bit INTEGER (PostgreSQL) and NUMERIC(20, 10).
_INT_MAX = 2**31 - 1
_MONEY_MAX = 1e9
_WEIGHT_MAX = 1000
_METADATA_MAX_BYTES = 16 * 1024


def _storable(value: dict[str, Any]) -> dict[str, Any]:
    """Metadata is stored as JSON and served by orjson: a value orjson cannot write (an
    integer beyond 64 bits) would make the record unreadable after it was stored."""
    try:
        size = len(orjson.dumps(value))
    except TypeError as exc:
        raise ValueError(f"metadata cannot be stored: {exc}") from None
    if size > _METADATA_MAX_BYTES:
        raise ValueError(f"metadata must be at most {_METADATA_MAX_BYTES} bytes as JSON")
    return value


Metadata = Annotated[dict[str, Any], AfterValidator(_storable)]


class LimitsIn(Wire):
    rpm_limit: int | None = Field(None, ge=1, le=_INT_MAX)
    tpm_limit: int | None = Field(None, ge=1, le=_INT_MAX)
    budget_usd: float | None = Field(None, ge=0, le=_MONEY_MAX, allow_inf_nan=False)
    budget_period: Period = "month"

    def limits(self) -> Limits:
        return Limits(self.rpm_limit, self.tpm_limit, self.budget_usd, self.budget_period)


class DriftReferenceIn(Wire):
    model: str = Field(min_length=1, max_length=256)
    source: ReferenceSource = Field(
        "recent", description="`recent`: the recent window becomes the reference; `next`: the "
        "next requests form a new one (for example right after a deploy).")


_WEIGHT = ("The tenant's share of a model's replicas while requests queue for them, relative to "
           "the other waiting tenants' weights.")
_GUARDRAILS = ("Guardrail policy; unset fields are inherited (the key's from its tenant's, "
               "the tenant's from the server's). PATCH replaces the whole policy; null clears "
               "it.")


class TenantIn(LimitsIn):
    name: str = Field(min_length=1, max_length=128)
    metadata: Metadata = Field(default_factory=dict)
    weight: int = Field(1, ge=1, le=_WEIGHT_MAX, description=_WEIGHT)
    guardrails: GuardrailsPolicy | None = Field(None, description=_GUARDRAILS)


class TenantPatch(Wire):
    name: str | None = Field(None, min_length=1, max_length=128)
    rpm_limit: int | None = Field(None, ge=1, le=_INT_MAX)
    tpm_limit: int | None = Field(None, ge=1, le=_INT_MAX)
    budget_usd: float | None = Field(None, ge=0, le=_MONEY_MAX, allow_inf_nan=False)
    budget_period: Period | None = None
    metadata: Metadata | None = None
    guardrails: GuardrailsPolicy | None = Field(None, description=_GUARDRAILS)
    weight: int | None = Field(None, ge=1, le=_WEIGHT_MAX, description=_WEIGHT)


class KeyIn(LimitsIn):
    tenant_id: str
    name: str = Field("", max_length=128)
    role: Literal["admin", "member"] = "member"
    models: list[str] | None = Field(None, description="Allowed models or glob patterns.")
    expires_at: datetime | None = None
    metadata: Metadata = Field(default_factory=dict)
    guardrails: GuardrailsPolicy | None = Field(None, description=_GUARDRAILS)


class KeyPatch(Wire):
    name: str | None = Field(None, max_length=128)
    models: list[str] | None = None
    rpm_limit: int | None = Field(None, ge=1, le=_INT_MAX)
    tpm_limit: int | None = Field(None, ge=1, le=_INT_MAX)
    budget_usd: float | None = Field(None, ge=0, le=_MONEY_MAX, allow_inf_nan=False)
    budget_period: Period | None = None
    expires_at: datetime | None = None
    metadata: Metadata | None = None
    guardrails: GuardrailsPolicy | None = Field(None, description=_GUARDRAILS)


class PriceIn(Wire):
    input_per_mtok: float = Field(ge=0, le=_MONEY_MAX, allow_inf_nan=False,
                                  description="USD per million prompt tokens.")
    output_per_mtok: float = Field(ge=0, le=_MONEY_MAX, allow_inf_nan=False,
                                   description="USD per million completion tokens.")
    cached_input_per_mtok: float | None = Field(
        None, ge=0, le=_MONEY_MAX, allow_inf_nan=False,
        description="USD per million prompt tokens found in the engine's prefix cache "
        "(`cached_tokens`); unset: `input_per_mtok`.")
    training_per_mtok: float | None = Field(
        None, ge=0, le=_MONEY_MAX, allow_inf_nan=False,
        description="USD per million tokens a fine-tuning job trains on (each epoch counts); "
        "unset: the fine-tuning workers' device time (`finetune.device_cost_per_hour_usd`).")


def _tenant_out(t: Tenant) -> dict[str, Any]:
    return {"id": t.id, "object": "tenant", "name": t.name, "rpm_limit": t.rpm_limit,
            "tpm_limit": t.tpm_limit, "budget_period": t.budget_period,
            "budget_usd": float(t.budget_usd) if t.budget_usd is not None else None,
            "metadata": t.metadata_, "guardrails": t.guardrails, "weight": t.weight,
            "created_at": t.created_at, "disabled_at": t.disabled_at}


def _key_out(k: ApiKey, last_used_at: datetime | None = None) -> dict[str, Any]:
    return {"id": k.id, "object": "api_key", "tenant_id": k.tenant_id, "name": k.name,
            "prefix": k.prefix, "role": k.role, "models": k.models, "rpm_limit": k.rpm_limit,
            "tpm_limit": k.tpm_limit, "budget_period": k.budget_period,
            "budget_usd": float(k.budget_usd) if k.budget_usd is not None else None,
            "expires_at": k.expires_at, "revoked_at": k.revoked_at, "metadata": k.metadata_,
            "guardrails": k.guardrails, "created_at": k.created_at,
            # When it last made a request, from the ledger (epoch seconds; null: never).
            "last_used_at": epoch(last_used_at) if last_used_at is not None else None}


async def _keys_out(db: Database, keys: list[ApiKey]) -> list[dict[str, Any]]:
    """Key objects with their last use: one grouped ledger query for all of them."""
    used = await last_used(db, [k.id for k in keys])
    return [_key_out(k, used.get(k.id)) for k in keys]


def _patch(model: BaseModel) -> dict[str, Any]:
    fields = model.model_dump(exclude_unset=True)
    if "metadata" in fields:
        fields["metadata_"] = fields.pop("metadata")
    if fields.get("budget_usd") is not None:
        fields["budget_usd"] = Decimal(str(fields["budget_usd"]))
    if "guardrails" in fields:
        fields["guardrails"] = _stored(getattr(model, "guardrails", None))
    if "weight" in fields and fields["weight"] is None:
        fields["weight"] = 1  # null: back to the default share
    return fields


def _stored(policy: GuardrailsPolicy | None) -> dict[str, Any] | None:
    return (policy.stored() or None) if policy is not None else None


def admin_router(db: Database, tenants: Tenancy, auth: Authenticator,
                 principal: Authenticated, prices: PriceBook,
                 catalog: Catalog, drift: DriftDetector | None,
                 deletion: TenantDeletion) -> APIRouter:
    router = APIRouter(prefix="/admin", tags=["admin"],
                       dependencies=[Depends(principal), Depends(require_admin)])

    async def call(coro: Any) -> Any:
        try:
            return await coro
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc)) from None
        except tenancy.ConflictError as exc:
            raise ConflictError(str(exc)) from None

    @router.post("/tenants", status_code=201)
    async def create_tenant(body: TenantIn) -> dict[str, Any]:
        return _tenant_out(await call(tenants.create_tenant(
            body.name, limits=body.limits(), metadata=body.metadata,
            guardrails=_stored(body.guardrails), weight=body.weight)))

    @router.get("/tenants")
    async def list_tenants() -> dict[str, Any]:
        return {"object": "list", "data": [_tenant_out(t) for t in await tenants.list_tenants()]}

    @router.get("/tenants/{tenant_id}")
    async def get_tenant(tenant_id: str) -> dict[str, Any]:
        return _tenant_out(await call(tenants.get_tenant(tenant_id)))

    @router.patch("/tenants/{tenant_id}")
    async def update_tenant(tenant_id: str, body: TenantPatch) -> dict[str, Any]:
        tenant = await call(tenants.update_tenant(tenant_id, **_patch(body)))
        auth.forget()
        return _tenant_out(tenant)

    @router.post("/tenants/{tenant_id}/disable")
    async def disable_tenant(tenant_id: str) -> dict[str, Any]:
        tenant = await call(tenants.disable_tenant(tenant_id))
        auth.forget()
        return _tenant_out(tenant)

    @router.delete("/tenants/{tenant_id}")
    async def delete_tenant(tenant_id: str) -> dict[str, Any]:
        """Delete a disabled tenant with everything it owns; its usage ledger stays."""
        await call(deletion.delete(tenant_id))
        return {"id": tenant_id, "object": "tenant.deleted", "deleted": True}

    @router.post("/keys", status_code=201)
    async def create_key(body: KeyIn) -> dict[str, Any]:
        key, plain = await call(tenants.create_key(
            body.tenant_id, name=body.name, role=body.role, models=body.models,
            limits=body.limits(), expires_at=body.expires_at, metadata=body.metadata,
            guardrails=_stored(body.guardrails)))
        return {**_key_out(key), "key": plain}  # the only time the key is shown

    @router.get("/keys")
    async def list_keys(tenant_id: str | None = None) -> dict[str, Any]:
        return {"object": "list", "data": await _keys_out(db, await tenants.list_keys(
            tenant_id))}

    @router.get("/keys/{key_id}")
    async def get_key(key_id: str) -> dict[str, Any]:
        [key] = await _keys_out(db, [await call(tenants.get_key(key_id))])
        return key

    @router.patch("/keys/{key_id}")
    async def update_key(key_id: str, body: KeyPatch) -> dict[str, Any]:
        key = await call(tenants.update_key(key_id, **_patch(body)))
        auth.forget()
        [out] = await _keys_out(db, [key])
        return out

    @router.post("/keys/{key_id}/revoke")
    async def revoke_key(key_id: str) -> dict[str, Any]:
        key = await call(tenants.revoke_key(key_id))
        auth.forget()
        [out] = await _keys_out(db, [key])
        return out

    @router.put("/prices/{model:path}")
    async def set_price(model: str, body: PriceIn) -> dict[str, Any]:
        async with db.session() as session:
            row = await session.get(ModelPrice, model)
            if row is None:
                row = ModelPrice(model=model, input_per_mtok=Decimal(0),
                                 output_per_mtok=Decimal(0))
                session.add(row)
            row.input_per_mtok = Decimal(str(body.input_per_mtok))
            row.output_per_mtok = Decimal(str(body.output_per_mtok))
            row.cached_input_per_mtok = (None if body.cached_input_per_mtok is None
                                         else Decimal(str(body.cached_input_per_mtok)))
            row.training_per_mtok = (None if body.training_per_mtok is None
                                     else Decimal(str(body.training_per_mtok)))
            await session.commit()
        prices.prices[model] = Price(body.input_per_mtok, body.output_per_mtok,
                                     body.cached_input_per_mtok, body.training_per_mtok)
        return {"model": model, **body.model_dump()}

    @router.get("/prices")
    async def list_prices() -> dict[str, Any]:
        async with db.session() as session:
            rows = await session.scalars(select(ModelPrice).order_by(ModelPrice.model))
            data = [{"model": r.model, "input_per_mtok": float(r.input_per_mtok),
                     "output_per_mtok": float(r.output_per_mtok),
                     "cached_input_per_mtok": float(r.cached_input_per_mtok)
                     if r.cached_input_per_mtok is not None else None,
                     "training_per_mtok": float(r.training_per_mtok)
                     if r.training_per_mtok is not None else None} for r in rows]
        return {"object": "list", "data": data}

    @router.get("/usage")
    async def usage(query: Annotated[UsageQuery, Depends(usage_query)]) -> dict[str, Any]:
        return await query.run(db)

    def detector() -> DriftDetector:
        if drift is None:
            raise ServiceUnavailableError("Drift detection is switched off (`drift.enabled`).")
        return drift

    @router.get("/drift")
    async def drift_report() -> dict[str, Any]:
        """Each model's reference and recent windows and its drift signals."""
        d = detector()
        cfg = d.config
        return {"object": "list", "data": await d.report(), "dropped_samples": d.dropped,
                "config": cfg.model_dump(include={"sample_rate", "window", "min_samples",
                                                  "interval_s", "alpha"})}

    @router.post("/drift/reference")
    async def set_drift_reference(body: DriftReferenceIn) -> dict[str, Any]:
        """Set a model's reference window (after an intended change, such as a deploy)."""
        d = detector()
        entry = catalog.resolve(body.model)
        if entry is None:
            raise ModelNotFoundError(body.model)
        await d.reset(entry.name, body.source)
        return next(m for m in await d.report() if m["model"] == entry.name)

    return router
