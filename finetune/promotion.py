"""Fine-tune promotion: after training, the base model and the new adapter are evaluated on
the same eval, both results are attached to the job, and with `promote: "if_better"` the
adapter is served only when it beats the base.

While it is evaluated the adapter is a candidate: the gateway loads it into the engines but
serves it only to our workers acting for its owner (and to admins). The eval is the one the
job names, or one made from its validation file (each example's last assistant message is
the reference the answer is compared with, ROUGE-L >= 0.5). Items come from the job's
`evaluation.data_source`, else from the validation file.

Both runs start as any run does (`evals.runs`: their data checked, the tenant's active-run
limit), made as the job's key, and are run here in the worker; a refused run fails the
evaluation. An adapter beats the base when more of the eval's items pass every testing
criterion with it than with the base; a tie or a failed run holds it back.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from evals.runner import in_process
from evals.runs import RunIn, RunStarter, parse_run
from evals.store import Evals
from finetune.dataset import Example
from finetune.jobs import FineTuning
from finetune.serving import NotServedError, wait_until_served
from llmops.catalog import Catalog
from llmops.errors import APIError
from llmops.files import Files
from llmops.settings import Settings
from llmops.store import Eval, EvalRun, FineTuningJob
from tenancy.auth import acting_for
from tenancy.tenants import NotFoundError, Tenancy

__all__ = ["DEFAULT_CRITERION", "evaluate", "validation_data_source"]

DEFAULT_CRITERION: dict[str, Any] = {
    "type": "text_similarity", "name": "matches the validation answer",
    "input": "{{sample.output_text}}", "reference": "{{item.reference}}",
    "evaluation_metric": "rouge_l", "pass_threshold": 0.5}
_ITEM_SCHEMA = {"type": "object", "properties": {
    "messages": {"type": "array"}, "reference": {"type": "string"}},
    "required": ["messages", "reference"]}


class PromotionError(Exception):
    pass


def validation_data_source(examples: list[Example], seed: int, max_tokens: int
                           ) -> dict[str, Any]:
    """A `completions` data source asking each validation example's question."""
    items = [{"item": {"messages": list(e.messages[:-1]),
                       "reference": str(e.messages[-1].get("content") or "")}}
             for e in examples if e.messages and e.messages[-1].get("role") == "assistant"]
    if not items:
        raise PromotionError("The validation file has no example ending with an assistant "
                             "answer to compare with.")
    return {"type": "completions", "source": {"type": "file_content", "content": items},
            "input_messages": {"type": "item_reference", "item_reference": "item.messages"},
            "sampling_params": {"temperature": 0.0, "max_completion_tokens": max_tokens,
                                "seed": seed}}


async def evaluate(job: FineTuningJob, adapter: str, validation: list[Example],
                   jobs: FineTuning, evals: Evals, files: Files, settings: Settings
                   ) -> dict[str, Any]:
    """Evaluate the base and the candidate `adapter`; the verdict as stored on the job."""
    spec = job.evaluation or {}
    promote = spec.get("promote", "always")
    try:
        ev = await _the_eval(job, evals)
        source = spec.get("data_source") or validation_data_source(
            validation, job.seed, settings.finetune.evaluation_max_tokens)
        # Loaded as a candidate: served to our workers acting for the job's key only.
        await wait_until_served(adapter, job, settings,
                                settings.finetune.evaluation_load_timeout_s)
        who = await acting_for(Tenancy(jobs.db), job.key_id)
        if who is None:
            raise PromotionError(f"The job's key {job.key_id} is revoked or expired, or its "
                                 "tenant is disabled.")
        starter = RunStarter(evals, files, _candidate_catalog(job, adapter, settings),
                             settings.evals, in_process(evals, files, settings))
        await jobs.event(job.id, f"Evaluating {job.model} and {adapter} on eval {ev.id}")
        runs = {}
        for role, model in (("base", job.model), ("adapter", adapter)):
            run = await starter.start(who, ev, _run_request(job, role, model, source))
            runs[role] = await evals.get_run(ev.tenant_id, ev.id, run.id)  # as it finished
    except (PromotionError, NotServedError, APIError, NotFoundError, aiohttp.ClientError,
            TimeoutError) as exc:
        return {"eval_id": spec.get("eval_id"), "promote": promote,
                "promoted": promote == "always", "reason": f"The evaluation failed: {exc}"}
    base, tuned = _summary(runs["base"]), _summary(runs["adapter"])
    failed = [r for r in (base, tuned) if r["status"] != "completed"]
    better = not failed and tuned["pass_rate"] > base["pass_rate"]
    if failed:
        reason = f"The {failed[0]['role']} run ended {failed[0]['status']}."
    else:
        reason = (f"The adapter passed {tuned['passed_items']} of {tuned['items']} items, the "
                  f"base {base['passed_items']} of {base['items']}.")
    return {"eval_id": ev.id, "promote": promote, "base": base, "adapter": tuned,
            "promoted": promote == "always" or better, "better": better, "reason": reason}


def _candidate_catalog(job: FineTuningJob, adapter: str, settings: Settings) -> Catalog:
    """The gateway's catalog as it is while the adapter is judged (`gateway.routing.adapters`):
    the configured models, and the candidate, owned by the job's tenant and withheld."""
    catalog = Catalog(settings.models)
    catalog.set_adapters(job.model, [adapter])
    catalog.owners[adapter] = job.tenant_id
    catalog.withheld.add(adapter)
    return catalog


def _run_request(job: FineTuningJob, role: str, model: str, source: dict[str, Any]) -> RunIn:
    return parse_run({"name": f"{job.id} {role}",
                      "metadata": {"fine_tuning_job": job.id, "role": role},
                      "data_source": {**source, "model": model}})


async def _the_eval(job: FineTuningJob, evals: Evals) -> Eval:
    eval_id = (job.evaluation or {}).get("eval_id")
    if eval_id:
        return await evals.get(job.tenant_id, eval_id)
    return await evals.create(
        tenant_id=job.tenant_id, key_id=job.key_id, name=f"validation of {job.id}",
        metadata={"fine_tuning_job": job.id},
        data_source_config={"type": "custom", "item_schema": _ITEM_SCHEMA,
                            "include_sample_schema": True},
        testing_criteria=[DEFAULT_CRITERION])


def _summary(run: EvalRun) -> dict[str, Any]:
    items = run.passed + run.failed + run.errored
    return {"run_id": run.id, "role": (run.metadata_ or {}).get("role"), "model": run.model,
            "status": run.status, "items": items, "passed_items": run.passed,
            "pass_rate": run.passed / items if items else 0.0,
            "per_testing_criteria": {name: c.get("passed", 0) / items if items else 0.0
                                     for name, c in run.per_criteria.items()}}
