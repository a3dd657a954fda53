"""Deleting a tenant and everything it owns (`DELETE /admin/tenants/{id}`): the one place that
calls each domain store's `forget_tenant`, in an order that a retry can finish.

The tenant must be disabled first, so that none of its keys starts new work. Work still
running is stopped: what no worker holds is cancelled at once; while a worker holds any
(a fine-tuning job, an eval run, a batch) the deletion is refused with the ids, since that
worker could still write files or adapters after the purge. Background responses are
cancelled and ingestion is left to fail, without waiting: their workers act as the tenant's
keys, which a disabled tenant no longer has, and find their rows gone. The tenant's row goes
last, with its keys, so that a purge interrupted anywhere is finished by deleting again. The
usage ledger stays.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from batches import Batches
from conversations import Conversations, Responses
from evals.store import Evals
from evals.watches import EvalWatches
from finetune.jobs import FineTuning
from llmops.errors import ConflictError
from llmops.files import Files
from retrieval.grounding import Retriever
from retrieval.stores import VectorStores
from tenancy.auth import Authenticator
from tenancy.tenants import ADMIN_TENANT, Tenancy

__all__ = ["TenantDeletion"]

log = logging.getLogger(__name__)


class TenantDeletion:
    def __init__(self, tenants: Tenancy, auth: Authenticator, *, jobs: FineTuning,
                 adapters_root: Path, evals: Evals, watches: EvalWatches, batches: Batches,
                 stores: VectorStores, retriever: Retriever | None, files: Files,
                 responses: Responses, conversations: Conversations) -> None:
        self.tenants = tenants
        self.auth = auth
        self.jobs = jobs
        self.adapters_root = adapters_root
        self.evals = evals
        self.watches = watches
        self.batches = batches
        self.stores = stores
        self.retriever = retriever
        self.files = files
        self.responses = responses
        self.conversations = conversations

    async def delete(self, tenant_id: str) -> None:
        """Delete a disabled tenant and what it owns; raises tenancy's NotFoundError for an
        unknown (or already deleted) tenant and a ConflictError while it cannot go yet."""
        if tenant_id == ADMIN_TENANT:
            raise ConflictError("The bootstrap admin tenant cannot be deleted.",
                                code="tenant_protected")
        tenant = await self.tenants.get_tenant(tenant_id)
        if tenant.disabled_at is None:
            raise ConflictError(
                f"Tenant {tenant_id!r} is not disabled: disable it first "
                f"(POST /admin/tenants/{tenant_id}/disable), so that no new work starts.",
                code="tenant_not_disabled")
        running = {"fine-tuning jobs": await self.jobs.stop_tenant(tenant_id),
                   "eval runs": await self.evals.stop_tenant(tenant_id),
                   "batches": await self.batches.stop_tenant(tenant_id)}
        await self.responses.stop_tenant(tenant_id)
        busy = [f"{kind} {', '.join(ids)}" for kind, ids in running.items() if ids]
        if busy:
            raise ConflictError(
                f"Tenant {tenant_id!r} still has work running on workers: {'; '.join(busy)}. "
                "Cancellation was requested; delete again once it has stopped.",
                code="tenant_busy")
        # Each step removes all that is left of its kind, so a retry after a crash
        # finishes the job; chunks go before the stores that list them, watches before
        # the evals they name.
        if self.retriever is not None:
            await asyncio.to_thread(self.retriever.index.delete_tenant, tenant_id)
        purged = {
            "vector stores": await self.stores.forget_tenant(tenant_id),
            "eval watches": await self.watches.forget_tenant(tenant_id),
            "evals": await self.evals.forget_tenant(tenant_id),
            "fine-tuning jobs": await self.jobs.forget_tenant(tenant_id, self.adapters_root),
            "batches": await self.batches.forget_tenant(tenant_id),
            "responses": await self.responses.forget_tenant(tenant_id),
            "conversations": await self.conversations.forget_tenant(tenant_id),
            "files": await self.files.forget_tenant(tenant_id),
        }
        await self.tenants.delete_tenant(tenant_id)
        self.auth.forget()
        log.info("deleted tenant %s: %s", tenant_id,
                 ", ".join(f"{n} {kind}" for kind, n in purged.items()))
