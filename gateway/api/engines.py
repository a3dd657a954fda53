"""`GET /admin/engines`: what the gateway knows of its engines right now, per model, pool and
replica: health, circuit, loaded adapters, KV-cache use, engine queues and this process's
requests in flight. Read from the routers the health monitor keeps up to date; nothing is
fetched from the engines here."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from gateway.http.auth import Authenticated, require_admin
from gateway.routing import Pool, Replica, Router
from gateway.routing.flow import FlowControl

__all__ = ["engines_router"]


def _replica(r: Replica) -> dict[str, Any]:
    circuit = r.circuit
    return {"index": r.index, "url": r.url, "healthy": r.healthy,
            "available": r.available, "probe_failures": r.probe_failures,
            "circuit": {"state": circuit.state.value, "failures": circuit.failures},
            "adapters": sorted(r.adapters),
            "kv_cache_usage": r.kv_cache_usage,
            "waiting": r.waiting, "running": r.running,
            # In flight through this gateway process (others have their own).
            "in_flight": r.outstanding, "max_concurrency": r.max_concurrency}


def _pool(p: Pool) -> dict[str, Any]:
    return {"device": p.device, "priority": p.priority,
            "replicas": [_replica(r) for r in p.replicas]}


def engines_router(routers: dict[str, Router], flows: dict[str, FlowControl],
                   principal: Authenticated) -> APIRouter:
    router = APIRouter(prefix="/admin", tags=["admin"],
                       dependencies=[Depends(principal), Depends(require_admin)])

    @router.get("/engines")
    async def engines() -> dict[str, Any]:
        """Each model's pools and replicas as routing sees them (admins only: engine addresses
        and every tenant's load are operators' business)."""
        data = []
        for name, model in routers.items():
            replicas = model.replicas
            flow = flows.get(name)
            data.append({
                "object": "engine_model", "model": name,
                "healthy_replicas": sum(r.available for r in replicas),
                "replicas": len(replicas),
                # Requests this gateway holds back while every replica is full (flow control).
                "queued": len(flow.queue) if flow is not None else 0,
                "pools": [_pool(p) for p in model.pools]})
        return {"object": "list", "data": data}

    return router
