"""A chat answer as the Responses API shows it: `ResponseBuilder` turns a whole chat
completion into a Response object, or a stream of chat chunks into the Responses event
sequence (`response.created` ... `response.completed`, each with its `sequence_number`),
emitted as the chunks arrive. Both end in the same Response object, which is stored."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from conversations import item_id
from conversations.events import frame
from gateway.responses.protocol import FileSearchTool, ResponsesRequest

if TYPE_CHECKING:
    from gateway.inference.context import RequestContext
    from retrieval.grounding import Grounding

__all__ = ["ResponseBuilder", "new_response_id", "response_object"]

_MARKER = re.compile(r"\[(\d{1,2})\]")
# Why an answer stopped early, as `incomplete_details.reason`.
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}

Finished = Callable[[dict[str, Any]], None]


def new_response_id() -> str:
    return "resp_" + secrets.token_hex(24)


def response_object(req: ResponsesRequest, response_id: str, created_at: int, *,
                    status: str, output: list[dict[str, Any]] | None = None,
                    usage: dict[str, Any] | None = None, error: dict[str, Any] | None = None,
                    incomplete: str | None = None, completed_at: int | None = None
                    ) -> dict[str, Any]:
    """The Response object for `req` in a given state."""
    text_format: dict[str, Any] = {"type": "text"}
    if req.text is not None and req.text.format is not None:
        text_format = req.text.format.model_dump(by_alias=True, exclude_none=True)
    obj: dict[str, Any] = {
        "id": response_id, "object": "response", "created_at": created_at, "status": status,
        "background": req.background, "error": error,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "model": req.model, "output": output or [],
        "parallel_tool_calls": req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "store": req.store, "temperature": req.temperature, "top_p": req.top_p,
        "text": {"format": text_format}, "tool_choice": req.tool_choice,
        "tools": [t.model_dump(by_alias=True, exclude_none=isinstance(t, FileSearchTool))
                  for t in req.tools],
        "truncation": req.truncation, "metadata": req.metadata or {},
    }
    if usage is not None:
        obj["usage"] = usage
    for name in ("user", "safety_identifier", "prompt_cache_key"):  # strings when given
        if (value := getattr(req, name)) is not None:
            obj[name] = value
    if completed_at is not None:
        obj["completed_at"] = completed_at
    if req.conversation_id is not None:
        obj["conversation"] = {"id": req.conversation_id}
    return obj


def _usage(ctx: RequestContext) -> dict[str, Any]:
    return {"input_tokens": ctx.prompt_tokens,
            "input_tokens_details": {"cached_tokens": ctx.cached_tokens,
                                     "cache_write_tokens": 0},
            "output_tokens": ctx.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": ctx.prompt_tokens + ctx.completion_tokens}


def _annotations(text: str, grounding: Grounding | None) -> list[dict[str, Any]]:
    """A `file_citation` where the answer cites a source by its number ([1]), and one at the
    end of the text for each source it drew on without citing it."""
    if grounding is None or not grounding.sources:
        return []
    sources = grounding.sources
    out: list[dict[str, Any]] = []
    cited: set[int] = set()
    for match in _MARKER.finditer(text):
        n = int(match.group(1))
        if 1 <= n <= len(sources):
            cited.add(n)
            out.append({"type": "file_citation", "file_id": sources[n - 1].file_id,
                        "filename": sources[n - 1].filename, "index": match.start()})
    out += [{"type": "file_citation", "file_id": s.file_id, "filename": s.filename,
             "index": len(text)} for n, s in enumerate(sources, 1) if n not in cited]
    return out


class ResponseBuilder:
    """Builds one response from the chat answer. `finished` receives the final Response
    object (to store it) however the answer ends."""

    def __init__(self, req: ResponsesRequest, response_id: str, finished: Finished) -> None:
        self.req = req
        self.id = response_id
        self.created_at = int(time.time())
        self.finished = finished
        self.include_results = "file_search_call.results" in req.include
        self._seq = 0
        self._started = False
        self._output: list[dict[str, Any]] = []
        self._message: dict[str, Any] | None = None
        self._text: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}  # tool call index -> function_call item
        self._finish: str | None = None
        self._ended = False  # the final Response object was made

    # -- whole answers

    def whole(self, ctx: RequestContext, answer: dict[str, Any]) -> dict[str, Any]:
        self._search_item(ctx)
        choice = (answer.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        if text := message.get("content"):
            self._output.append(self._message_item(text, ctx, "completed"))
        for call in message.get("tool_calls") or []:
            fn = call.get("function") or {}
            self._output.append({"id": item_id("function_call"), "type": "function_call",
                                 "call_id": call.get("id") or "call_" + secrets.token_hex(12),
                                 "name": fn.get("name", ""),
                                 "arguments": fn.get("arguments") or "{}",
                                 "status": "completed"})
        self._finish = choice.get("finish_reason")
        return self._final(ctx)

    # -- streams

    def chunk(self, ctx: RequestContext, chunk: dict[str, Any]) -> bytes:
        """The events one chat chunk (after the hooks) becomes."""
        out = self._start(ctx) if not self._started else []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if content := delta.get("content"):
                out += self._text_delta(content)
            for call in delta.get("tool_calls") or []:
                out += self._call_delta(call)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return b"".join(out)

    def done(self, ctx: RequestContext) -> bytes:
        """The closing events once the engine's answer has ended."""
        out = self._start(ctx) if not self._started else []
        if self._message is not None:
            text = "".join(self._text)
            part = {"type": "output_text", "text": text,
                    "annotations": _annotations(text, ctx.grounding), "logprobs": []}
            where = {"item_id": self._message["id"], "output_index": self._index(self._message),
                     "content_index": 0}
            for i, annotation in enumerate(part["annotations"]):
                out.append(self._event("response.output_text.annotation.added", **where,
                                       annotation_index=i, annotation=annotation))
            out.append(self._event("response.output_text.done", **where, text=text,
                                   logprobs=[]))
            out.append(self._event("response.content_part.done", **where, part=part))
            self._message.update(content=[part], status=self._item_status())
            out.append(self._event("response.output_item.done",
                                   output_index=where["output_index"], item=self._message))
        for item in self._calls.values():
            item["status"] = "completed"
            index = self._index(item)
            out.append(self._event("response.function_call_arguments.done",
                                   item_id=item["id"], output_index=index,
                                   name=item["name"], arguments=item["arguments"]))
            out.append(self._event("response.output_item.done", output_index=index,
                                   item=item))
        final = self._final(ctx)
        kind = "response.incomplete" if final["status"] == "incomplete" else \
            "response.completed"
        out.append(self._event(kind, response=final))
        return b"".join(out)

    def failed(self, ctx: RequestContext, message: str, code: str) -> bytes:
        """The stream's last event when the engine failed mid-answer (OpenAI's codes name no
        engine failure but `server_error`)."""
        final = self._end(response_object(
            self.req, self.id, self.created_at, status="failed", output=self._output,
            usage=_usage(ctx), error={"code": "server_error", "message": message}))
        return self._event("response.failed", response=final)

    def left(self, ctx: RequestContext) -> None:
        """The client left mid-answer and the engine was stopped: the response ends
        `cancelled` (it was stopped, not cut by a limit), with what was produced so far."""
        if self._ended:
            return
        if self._message is not None:
            text = "".join(self._text)
            self._message["content"] = [{"type": "output_text", "text": text,
                                         "annotations": [], "logprobs": []}]
        for item in self._output:
            if item.get("status") == "in_progress":
                item["status"] = "incomplete"
        self._end(response_object(self.req, self.id, self.created_at, status="cancelled",
                                  output=self._output, usage=_usage(ctx)))

    def _end(self, final: dict[str, Any]) -> dict[str, Any]:
        self._ended = True
        self.finished(final)
        return final

    def _start(self, ctx: RequestContext) -> list[bytes]:
        self._started = True
        shown = response_object(self.req, self.id, self.created_at, status="in_progress")
        out = [self._event("response.created", response=shown),
               self._event("response.in_progress", response=shown)]
        if (item := self._search_item(ctx)) is not None:
            index = self._index(item)
            searching = {**item, "status": "in_progress", "results": None}
            out += [self._event("response.output_item.added", output_index=index,
                                item=searching),
                    self._event("response.file_search_call.in_progress", output_index=index,
                                item_id=item["id"]),
                    self._event("response.file_search_call.searching", output_index=index,
                                item_id=item["id"]),
                    self._event("response.file_search_call.completed", output_index=index,
                                item_id=item["id"]),
                    self._event("response.output_item.done", output_index=index, item=item)]
        return out

    def _text_delta(self, content: str) -> list[bytes]:
        out: list[bytes] = []
        if self._message is None:
            self._message = {"id": item_id("message"), "type": "message", "role": "assistant",
                             "status": "in_progress", "content": []}
            self._output.append(self._message)
            index = self._index(self._message)
            out.append(self._event("response.output_item.added", output_index=index,
                                   item=self._message))
            out.append(self._event("response.content_part.added",
                                   item_id=self._message["id"], output_index=index,
                                   content_index=0, part={"type": "output_text", "text": "",
                                                          "annotations": [], "logprobs": []}))
        self._text.append(content)
        out.append(self._event("response.output_text.delta", item_id=self._message["id"],
                               output_index=self._index(self._message), content_index=0,
                               delta=content, logprobs=[]))
        return out

    def _call_delta(self, call: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        index = call.get("index", 0)
        fn = call.get("function") or {}
        item = self._calls.get(index)
        if item is None:
            item = {"id": item_id("function_call"), "type": "function_call",
                    "call_id": call.get("id") or "call_" + secrets.token_hex(12),
                    "name": fn.get("name") or "", "arguments": "", "status": "in_progress"}
            self._calls[index] = item
            self._output.append(item)
            out.append(self._event("response.output_item.added",
                                   output_index=self._index(item), item=item))
        if args := fn.get("arguments"):
            item["arguments"] += args
            out.append(self._event("response.function_call_arguments.delta",
                                   item_id=item["id"], output_index=self._index(item),
                                   delta=args))
        return out

    # -- both

    def _search_item(self, ctx: RequestContext) -> dict[str, Any] | None:
        grounding = ctx.grounding
        if grounding is None or any(i["type"] == "file_search_call" for i in self._output):
            return None
        item = {"id": "fs_" + secrets.token_hex(24), "type": "file_search_call",
                "status": "completed", "queries": [grounding.query],
                "results": [{"file_id": s.file_id, "filename": s.filename,
                             "score": round(s.score, 4), "text": s.text,
                             "attributes": s.attributes} for s in grounding.sources]
                if self.include_results else None}
        self._output.insert(0, item)
        return item

    def _message_item(self, text: str, ctx: RequestContext, status: str) -> dict[str, Any]:
        return {"id": item_id("message"), "type": "message", "role": "assistant",
                "status": status, "content": [{
                    "type": "output_text", "text": text,
                    "annotations": _annotations(text, ctx.grounding), "logprobs": []}]}

    def _item_status(self) -> str:
        return "incomplete" if self._finish in _INCOMPLETE else "completed"

    def _final(self, ctx: RequestContext) -> dict[str, Any]:
        incomplete = _INCOMPLETE.get(self._finish or "")
        for item in self._output:
            if item["type"] == "message":
                item["status"] = self._item_status()
        return self._end(response_object(
            self.req, self.id, self.created_at, status="incomplete" if incomplete else "completed",
            output=self._output, usage=_usage(ctx), incomplete=incomplete,
            completed_at=int(time.time())))

    def _index(self, item: dict[str, Any]) -> int:
        return next(i for i, o in enumerate(self._output) if o["id"] == item["id"])

    def _event(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return frame(event)
