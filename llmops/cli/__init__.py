"""The `llmops` command: run the local stack, prepare offline models, serve the gateway."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NoReturn

from redis.asyncio import Redis

from llmops.cli.batches import add_batches_commands
from llmops.cli.evals import add_evals_commands
from llmops.cli.finetune import add_finetune_commands, openai_client
from llmops.cli.models import prepare_models
from llmops.cli.stack import (
    CHAT_MODEL,
    EMBEDDING_MODEL,
    StackLayout,
    batch_worker_service,
    eval_worker_service,
    gateway_service,
    ingest_worker_service,
    local_config,
    tail,
    vllm_service,
    worker_service,
)
from llmops.settings import Settings
from llmops.store import Database, upgrade
from tenancy.ledger import LedgerWriter, usage_report
from tenancy.tenants import ConflictError, Limits, NotFoundError, Tenancy

__all__ = ["main"]


def models_home() -> Path:
    return Path(os.environ.get("LLMOPS_HOME", Path.home() / ".cache" / "llmops"))


def _layout(args: argparse.Namespace) -> StackLayout:
    return StackLayout(Path(args.state_dir).resolve())


def _services(args: argparse.Namespace, dirs: dict[str, Path]) -> list:  # type: ignore[type-arg]
    layout = _layout(args)
    return [
        vllm_service("vllm-chat", dirs["chat"], CHAT_MODEL, args.chat_port),
        vllm_service("vllm-embedding", dirs["embedding"], EMBEDDING_MODEL, args.embedding_port,
                     embedding=True, kv_cache_bytes=256 << 20, max_model_len=None),
        gateway_service(args.port, layout.config),
        worker_service(layout.config, args.worker_metrics_port),
        ingest_worker_service(layout.config, args.ingest_metrics_port),
        eval_worker_service(layout.config, args.eval_metrics_port),
        batch_worker_service(layout.config, args.batch_metrics_port),
    ]


def cmd_up(args: argparse.Namespace) -> int:
    layout = _layout(args)
    dirs = prepare_models(models_home())
    key = layout.admin_key()
    layout.write_config(local_config(layout.root, args.port, args.chat_port, args.embedding_port,
                                     dirs))
    services = _services(args, dirs)
    for s in services:
        print(f"{'starting' if layout.start(s) else 'already running'}: {s.name}"
              f" (log: {layout.log_file(s.name)})")
    started = time.monotonic()

    def waiting(names: list[str]) -> None:
        elapsed = time.monotonic() - started
        if sys.stdout.isatty():
            print(f"\r  waiting for {', '.join(names)} ({elapsed:.0f} s)   ", end="", flush=True)
        elif int(elapsed) % 15 == 0:
            print(f"  waiting for {', '.join(names)} ({elapsed:.0f} s)", flush=True)

    try:
        layout.wait_healthy(services, args.timeout, waiting)
    except (RuntimeError, TimeoutError) as exc:
        print(f"\nllmops up failed: {exc}", file=sys.stderr)
        _stop_all(layout, services)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the stack")
        _stop_all(layout, services)
        return 130
    print()
    _print_usage(args.port, key)
    if args.detach:
        print("\nThe stack runs in the background; stop it with `make down` (llmops down).")
        return 0
    print("\nPress Ctrl-C to stop the stack.")
    try:
        while True:
            for s in services:
                if layout.alive(s):
                    continue
                if not layout.pid_file(s.name).exists():  # `llmops down` stopped it
                    print("the stack was stopped (llmops down)")
                    return 0
                print(f"{s.name} exited; its log ends with:\n{tail(layout.log_file(s.name))}",
                      file=sys.stderr)
                _stop_all(layout, services)
                return 1
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("\nstopping the stack")
        _stop_all(layout, services)
        return 0


def _stop_all(layout: StackLayout, services: list) -> None:  # type: ignore[type-arg]
    for s in reversed(services):  # the gateway first, then the engines behind it
        if layout.stop(s.name):
            print(f"stopped: {s.name}")


def cmd_down(args: argparse.Namespace) -> int:
    layout = _layout(args)
    stopped = [n for n in ("batcher", "evaluator", "ingester", "worker", "gateway",
                           "vllm-embedding", "vllm-chat")
               if layout.stop(n)]
    print("stopped: " + ", ".join(stopped) if stopped else "nothing was running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    layout = _layout(args)
    dirs = {k: models_home() / "models" / v for k, v in
            (("chat", "SmolLM2-135M-Instruct"), ("embedding", "all-MiniLM-L6-v2"))}
    ok = True
    for s in _services(args, dirs):
        state = "healthy" if s.healthy() else (
            "starting" if layout.alive(s) else "stopped")
        ok &= state == "healthy"
        print(f"{s.name:16} {state:9} {s.health_url if s.health_path else '(process)'}")
    return 0 if ok else 1


def cmd_models(_: argparse.Namespace) -> int:
    for kind, path in prepare_models(models_home()).items():
        print(f"{kind}: {path}")
    return 0


def cmd_gateway(_: argparse.Namespace) -> NoReturn:
    # The gateway is a process of its own; the CLI hands over to it.
    os.execv(sys.executable, [sys.executable, "-m", "gateway"])


def _settings(args: argparse.Namespace) -> Settings:
    """Settings for store commands: LLMOPS_CONFIG if set, else the local stack's config."""
    local = Path(args.state_dir) / "config.yaml"
    if "LLMOPS_CONFIG" not in os.environ and local.exists():
        os.environ["LLMOPS_CONFIG"] = str(local)
    return Settings()


def _store(fn: Callable[[argparse.Namespace, Database], Awaitable[int]]
           ) -> Callable[[argparse.Namespace], int]:
    """Run an async store command against the configured database (migrated first)."""
    def run(args: argparse.Namespace) -> int:
        settings = _settings(args)
        upgrade(settings.database_url)

        async def main() -> int:
            db = Database(settings.database_url)
            try:
                return await fn(args, db)
            except (NotFoundError, ConflictError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            finally:
                await db.close()

        return asyncio.run(main())
    return run


async def _tenant_id(tenants: Tenancy, ref: str) -> str:
    for t in await tenants.list_tenants():
        if ref in (t.id, t.name):
            return t.id
    raise NotFoundError(f"no tenant {ref!r}")


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(args.rpm, args.tpm, args.budget, args.period)


async def cmd_tenants_create(args: argparse.Namespace, db: Database) -> int:
    t = await Tenancy(db).create_tenant(args.name, limits=_limits(args), weight=args.weight)
    print(f"{t.id}  {t.name}")
    return 0


async def cmd_tenants_weight(args: argparse.Namespace, db: Database) -> int:
    tenants = Tenancy(db)
    t = await tenants.update_tenant(await _tenant_id(tenants, args.tenant), weight=args.weight)
    print(f"{t.id}  {t.name}  weight={t.weight}")
    return 0


async def cmd_tenants_list(args: argparse.Namespace, db: Database) -> int:
    for t in await Tenancy(db).list_tenants():
        state = "disabled" if t.disabled_at else "active"
        print(f"{t.id}  {t.name:24} {state:8} rpm={t.rpm_limit} tpm={t.tpm_limit} "
              f"budget={t.budget_usd}/{t.budget_period} weight={t.weight}")
    return 0


def cmd_tenants_delete(args: argparse.Namespace) -> int:
    """Through the gateway's admin API: the gateway owns the vector index and the folders
    the purge empties."""
    import openai

    client = openai_client(args)
    admin = str(client.base_url).rstrip("/").removesuffix("/v1") + "/admin/tenants"
    try:
        listed = client.get(admin, cast_to=dict)["data"]
        found = [t for t in listed if args.tenant in (t["id"], t["name"])]
        if not found:
            print(f"error: no tenant {args.tenant!r}", file=sys.stderr)
            return 1
        tenant = found[0]
        if args.disable and tenant["disabled_at"] is None:
            client.post(f"{admin}/{tenant['id']}/disable", cast_to=dict)
        client.delete(f"{admin}/{tenant['id']}", cast_to=dict)
    except openai.APIStatusError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(f"deleted {tenant['id']}  {tenant['name']}")
    return 0


async def cmd_keys_create(args: argparse.Namespace, db: Database) -> int:
    tenants = Tenancy(db)
    expires = (datetime.now(UTC) + timedelta(days=args.expires_in_days)
               if args.expires_in_days else None)
    models = [m.strip() for m in args.models.split(",")] if args.models else None
    key, plain = await tenants.create_key(
        await _tenant_id(tenants, args.tenant), name=args.name, role=args.role, models=models,
        limits=_limits(args), expires_at=expires)
    print(f"created {key.id} ({key.role}) for tenant {key.tenant_id}")
    print(f"key (shown once, store it now): {plain}")
    return 0


async def cmd_keys_list(args: argparse.Namespace, db: Database) -> int:
    tenants = Tenancy(db)
    tenant = await _tenant_id(tenants, args.tenant) if args.tenant else None
    for k in await tenants.list_keys(tenant):
        state = "revoked" if k.revoked_at else "active"
        print(f"{k.id}  {k.prefix}...  {k.tenant_id}  {k.role:6} {state:7} "
              f"models={k.models or '*'} rpm={k.rpm_limit} tpm={k.tpm_limit} "
              f"budget={k.budget_usd}/{k.budget_period} expires={k.expires_at}")
    return 0


async def cmd_keys_revoke(args: argparse.Namespace, db: Database) -> int:
    key = await Tenancy(db).revoke_key(args.key_id)
    print(f"revoked {key.id}")
    return 0


async def cmd_usage(args: argparse.Namespace, db: Database) -> int:
    tenant = await _tenant_id(Tenancy(db), args.tenant) if args.tenant else None
    groups = tuple(g.strip() for g in args.group_by.split(","))
    rows = await usage_report(db, group_by=groups, period=args.period, tenant_id=tenant,
                              key_id=args.key, model=args.model)
    header = [*groups, *(["period"] if args.period else []), "requests", "unfinished",
              "prompt_tokens", "cached_tokens", "completion_tokens", "trained_tokens", "cost_usd",
              "device_seconds"]
    print("  ".join(header))
    for row in rows:
        print("  ".join(f"{row[h]:.6f}" if isinstance(row[h], float) else str(row[h])
                        for h in header))
    return 0


def cmd_ledger_writer(args: argparse.Namespace) -> int:
    """Move usage records from Redis to the database until stopped. Gateways run a writer
    each by default; at high request rates give the work to this process instead
    (`ledger.writer: false` on the gateways) so that it stays off their cores."""
    settings = _settings(args)
    upgrade(settings.database_url)

    async def main() -> None:
        db = Database(settings.database_url)
        redis = Redis.from_url(settings.redis_url,
                               socket_timeout=settings.ledger.block_ms / 1000 + 5,
                               socket_connect_timeout=settings.redis_timeout_s)
        try:
            await LedgerWriter(redis, db, settings.redis_prefix, settings.ledger).run()
        finally:
            await redis.aclose()
            await db.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


async def cmd_db_upgrade(_: argparse.Namespace, __: Database) -> int:
    print("database schema is up to date")
    return 0


def _print_usage(port: int, key: str) -> None:
    base = f"http://127.0.0.1:{port}/v1"
    question = '[{"role": "user", "content": "What is the capital of France?"}]'
    print(f"""
llmops is up.
  base URL:  {base}
  admin key: {key}   (make member keys: llmops keys create --tenant NAME)
  console:   http://127.0.0.1:{port}/console   (sign in with the admin key)
  models:    {CHAT_MODEL} (chat, LoRA-ready), {EMBEDDING_MODEL} (embeddings)

  curl {base}/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "{CHAT_MODEL}", "messages": {question}, "temperature": 0}}'

  python -c 'from openai import OpenAI
c = OpenAI(base_url="{base}", api_key="{key}")
r = c.chat.completions.create(model="{CHAT_MODEL}", messages={question}, temperature=0)
print(r.choices[0].message.content)'""")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmops", description=__doc__)
    parser.add_argument("--state-dir", default=os.environ.get("LLMOPS_STATE_DIR", ".llmops"),
                        help="where the local stack keeps config, key, pids and logs")
    sub = parser.add_subparsers(dest="command", required=True)

    def stack_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--port", type=int, default=8000, help="gateway port")
        p.add_argument("--chat-port", type=int, default=8101)
        p.add_argument("--embedding-port", type=int, default=8102)
        p.add_argument("--worker-metrics-port", type=int, default=8103,
                       help="the fine-tuning worker's /metrics")
        p.add_argument("--ingest-metrics-port", type=int, default=8104,
                       help="the ingestion worker's /metrics")
        p.add_argument("--eval-metrics-port", type=int, default=8105,
                       help="the eval worker's /metrics")
        p.add_argument("--batch-metrics-port", type=int, default=8106,
                       help="the batch worker's /metrics")

    up = sub.add_parser("up", help="start the local stack and print how to call it")
    stack_args(up)
    up.add_argument("--detach", action="store_true", help="return once the stack is healthy")
    up.add_argument("--timeout", type=float, default=600, help="seconds to wait for health")
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="stop the local stack")
    down.set_defaults(func=cmd_down)
    status = sub.add_parser("status", help="show the local stack's health")
    stack_args(status)
    status.set_defaults(func=cmd_status)
    models = sub.add_parser("models", help="prepare the offline models (cached)")
    models.set_defaults(func=cmd_models)
    gw = sub.add_parser("gateway", help="serve the gateway (settings from LLMOPS_* / YAML)")
    gw.set_defaults(func=cmd_gateway)

    def weight(text: str) -> int:
        value = int(text)
        if not 1 <= value <= 1000:
            raise argparse.ArgumentTypeError("a weight is from 1 to 1000")
        return value

    def limit_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rpm", type=int, help="requests per minute")
        p.add_argument("--tpm", type=int, help="tokens per minute")
        p.add_argument("--budget", type=float, help="USD per period")
        p.add_argument("--period", choices=("day", "month"), default="month")

    db = sub.add_parser("db", help="the SQL store").add_subparsers(dest="db", required=True)
    db.add_parser("upgrade", help="apply migrations").set_defaults(func=_store(cmd_db_upgrade))
    tenants = sub.add_parser("tenants", help="manage tenants").add_subparsers(
        dest="tenants", required=True)
    t_create = tenants.add_parser("create", help="create a tenant")
    t_create.add_argument("name")
    limit_args(t_create)
    t_create.add_argument("--weight", type=weight, default=1,
                          help="share of busy replicas against other tenants (default 1)")
    t_create.set_defaults(func=_store(cmd_tenants_create))
    t_weight = tenants.add_parser("weight", help="set a tenant's share of busy replicas")
    t_weight.add_argument("tenant", help="tenant id or name")
    t_weight.add_argument("weight", type=weight)
    t_weight.set_defaults(func=_store(cmd_tenants_weight))
    tenants.add_parser("list", help="list tenants").set_defaults(
        func=_store(cmd_tenants_list))
    t_delete = tenants.add_parser(
        "delete", help="delete a disabled tenant and everything it owns (its usage stays)")
    t_delete.add_argument("tenant", help="tenant id or name")
    t_delete.add_argument("--disable", action="store_true",
                          help="disable the tenant first if it is not disabled yet")
    t_delete.add_argument("--base-url", help="default: OPENAI_BASE_URL or the local stack")
    t_delete.add_argument("--api-key", help="default: OPENAI_API_KEY or the local admin key")
    t_delete.set_defaults(func=cmd_tenants_delete)
    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys", required=True)
    k_create = keys.add_parser("create", help="create a key (printed once)")
    k_create.add_argument("--tenant", required=True, help="tenant id or name")
    k_create.add_argument("--name", default="")
    k_create.add_argument("--role", choices=("member", "admin"), default="member")
    k_create.add_argument("--models", help="comma-separated allowed models (globs allowed)")
    k_create.add_argument("--expires-in-days", type=float)
    limit_args(k_create)
    k_create.set_defaults(func=_store(cmd_keys_create))
    k_list = keys.add_parser("list", help="list keys")
    k_list.add_argument("--tenant", help="tenant id or name")
    k_list.set_defaults(func=_store(cmd_keys_list))
    k_revoke = keys.add_parser("revoke", help="revoke a key")
    k_revoke.add_argument("key_id")
    k_revoke.set_defaults(func=_store(cmd_keys_revoke))
    add_finetune_commands(sub)
    add_evals_commands(sub)
    add_batches_commands(sub)
    sub.add_parser("ledger-writer", help="write usage records from Redis to the database"
                   ).set_defaults(func=cmd_ledger_writer)
    usage = sub.add_parser("usage", help="usage and spend from the ledger")
    usage.add_argument("--tenant", help="tenant id or name")
    usage.add_argument("--key", help="key id")
    usage.add_argument("--model")
    usage.add_argument("--group-by", default="tenant_id,model,endpoint",
                       help="of tenant_id, key_id, model, adapter, pool, endpoint (training: "
                       "/v1/fine_tuning/jobs)")
    usage.add_argument("--period", choices=("day", "month"))
    usage.set_defaults(func=_store(cmd_usage))

    args = parser.parse_args(argv)
    return int(args.func(args))
