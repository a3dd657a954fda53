"""Tenants and keys in the SQL store, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from llmops.errors import AuthenticationError, PermissionDeniedError
from llmops.store import ApiKey, Database, upgrade
from tenancy.auth import BOOTSTRAP_ADMIN, Authenticator, acting_for, stand_in_key
from tenancy.tenants import ADMIN_TENANT, ConflictError, Limits, NotFoundError, Tenancy


def test_migrations_are_idempotent(database_url: str) -> None:
    upgrade(database_url)
    upgrade(database_url)


async def test_key_lifecycle(db: Database) -> None:
    tenants = Tenancy(db)
    team = await tenants.create_tenant("team-a", limits=Limits(rpm=100, budget_usd=5.0))
    key, plain = await tenants.create_key(team.id, name="ci", models=["chat-*"],
                                          limits=Limits(rpm=10, tpm=1000))
    assert plain.startswith("sk-llmops-") and len(plain) > 50
    # Stored hashed, with a visible prefix only.
    async with db.session() as session:
        row = await session.get(ApiKey, key.id)
    assert row is not None and plain not in (row.hash, row.prefix)
    assert row.hash == hashlib.sha256(plain.encode()).hexdigest()
    assert plain.startswith(row.prefix)

    who = await tenants.principal(plain)
    assert who is not None and (who.key_id, who.tenant_id, who.role) == (key.id, team.id,
                                                                        "member")
    assert who.key_limits.rpm == 10 and who.tenant_limits.budget_usd == 5.0
    assert who.may_use("chat-small") and not who.may_use("embed")
    assert await tenants.principal(plain + "x") is None

    assert who.weight == 1  # the default share
    await tenants.update_tenant(team.id, weight=4)
    assert (await tenants.principal(plain)).weight == 4  # type: ignore[union-attr]

    await tenants.revoke_key(key.id)
    assert await tenants.principal(plain) is None


async def test_expired_keys_and_disabled_tenants_stop_working(db: Database) -> None:
    tenants = Tenancy(db)
    team = await tenants.create_tenant("team-b")
    _, expired = await tenants.create_key(team.id, expires_at=datetime.now(UTC)
                                          - timedelta(seconds=1))
    _, live = await tenants.create_key(team.id, expires_at=datetime.now(UTC)
                                       + timedelta(hours=1))
    assert await tenants.principal(expired) is None
    assert await tenants.principal(live) is not None
    await tenants.disable_tenant(team.id)
    assert await tenants.principal(live) is None


async def test_our_workers_act_for_a_usable_key_only(db: Database) -> None:
    """What an eval worker (`x-llmops-on-behalf-of`) and the watch scheduler act as: the key,
    marked delegated, while it may still be used."""
    tenants = Tenancy(db)
    team = await tenants.create_tenant("team-c")
    key, _ = await tenants.create_key(team.id, models=["chat"])
    acting = await acting_for(tenants, key.id)
    assert acting is not None and acting.delegated
    assert (acting.key_id, acting.tenant_id, acting.models) == (key.id, team.id, ("chat",))
    assert await acting_for(tenants, BOOTSTRAP_ADMIN.key_id) is BOOTSTRAP_ADMIN
    auth = Authenticator(tenants, None, ttl_s=0)
    assert await auth.on_behalf(BOOTSTRAP_ADMIN, key.id) == acting
    with pytest.raises(PermissionDeniedError):
        await auth.on_behalf(acting, key.id)  # only admins act for others
    await tenants.revoke_key(key.id)
    assert await acting_for(tenants, key.id) is None
    with pytest.raises(AuthenticationError):
        await auth.on_behalf(BOOTSTRAP_ADMIN, key.id)


async def test_work_without_a_recorded_key_stands_in_a_usable_key_of_its_tenant(
        db: Database) -> None:
    """Files attached before keys were recorded are ingested as the tenant's oldest usable
    key: the tenant pays, never the admin; a tenant without one gets no key at all."""
    tenants = Tenancy(db)
    team = await tenants.create_tenant("team-d")
    assert await stand_in_key(tenants, team.id) is None
    first, _ = await tenants.create_key(team.id)
    second, _ = await tenants.create_key(team.id)
    await tenants.create_key((await tenants.create_tenant("team-e")).id)
    assert await stand_in_key(tenants, team.id) == first.id
    await tenants.revoke_key(first.id)
    assert await stand_in_key(tenants, team.id) == second.id
    await tenants.update_key(second.id, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    assert await stand_in_key(tenants, team.id) is None
    await tenants.create_key(team.id)
    await tenants.disable_tenant(team.id)
    assert await stand_in_key(tenants, team.id) is None
    assert await stand_in_key(tenants, ADMIN_TENANT) == BOOTSTRAP_ADMIN.key_id


async def test_errors_name_the_problem(db: Database) -> None:
    tenants = Tenancy(db)
    await tenants.create_tenant("dup")
    with pytest.raises(ConflictError, match="dup"):
        await tenants.create_tenant("dup")
    with pytest.raises(NotFoundError):
        await tenants.create_key("ten_missing")
    with pytest.raises(NotFoundError):
        await tenants.revoke_key("key_missing")


async def test_a_deleted_tenant_goes_with_its_keys(db: Database) -> None:
    tenants = Tenancy(db)
    gone, kept = await tenants.create_tenant("team-gone"), await tenants.create_tenant("team-kept")
    key, plain = await tenants.create_key(gone.id)
    _, other = await tenants.create_key(kept.id)
    await tenants.delete_tenant(gone.id)
    with pytest.raises(NotFoundError):
        await tenants.get_tenant(gone.id)
    with pytest.raises(NotFoundError):
        await tenants.get_key(key.id)
    assert await tenants.principal(plain) is None
    assert await tenants.principal(other) is not None
    # Its name is free again.
    assert (await tenants.create_tenant("team-gone")).id != gone.id
