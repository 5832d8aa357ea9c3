"""OpenAI's Responses API: `POST /v1/responses` (and at hosted Tinker's prefix, `/oai/api/v1/responses`),
whole or streamed with its typed events, for the clients that speak it (the OpenAI Agents SDK, Codex).

A request is the chat request it means — `instructions` and `input` items as messages (`function_call` /
`function_call_output` items as tool calls and results, `reasoning` items as the thinking before them),
function tools, `text.format` as `response_format`, `reasoning.effort` as `reasoning_effort` — and it is
generated as the chat route generates one (`openai.chat_generation`): one implementation of rendering,
tools, structured output and reasoning. The answer comes back as output items in the order the model wrote
them: `reasoning` (its thinking, as `reasoning_text`), `message` (`output_text`), one `function_call` per
call. Errors name the Responses request's own fields.

Nothing is stored, so `store` changes nothing; `previous_response_id` and `conversation` (server-side
state) are a 400: send the whole conversation as `input`, as `store: false` clients do.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool

from eztinker.api.chat import Generation, Piece, TokenStream, job_result, whole_result
from eztinker.api.deps import OwnerDep, ServiceDep, get_owner
from eztinker.api.openai import OpenAIRoute, chat_generation, token_logprobs
from eztinker.api.reasoning import Thought
from eztinker.api.responses_bodies import ResponsesRequest, request_field
from eztinker.api.tool_calls import ToolCall
from eztinker.engine.errors import InvalidInputError
from eztinker.scheduler import Job
from eztinker.service.results import SampleOutput

router = APIRouter(tags=["openai"], route_class=OpenAIRoute, dependencies=[Depends(get_owner)])


# --- the route ---------------------------------------------------------------------------------------------


@router.post("/responses", response_model=None)
async def responses(
    body: ResponsesRequest, request: Request, service: ServiceDep, owner: OwnerDep
) -> dict[str, Any] | Response:
    """One model response: the input through the model's chat template, then its output items."""
    body.refuse_not_served()
    chat, wheres = body.chat()
    chat.refuse_not_served()
    try:
        generation = await run_in_threadpool(chat_generation, service, chat, owner)
    except InvalidInputError as exc:
        raise InvalidInputError(request_field(exc.field, wheres), exc.message) from None
    answer = _Answer(body, generation)

    def submit(*args: Any) -> Any:
        try:
            return generation.submit(service, owner, "input", *args)
        except InvalidInputError as exc:
            raise InvalidInputError(request_field(exc.field, wheres), exc.message) from None

    if not body.stream:
        result = await whole_result(request, submit)
        if result is None:  # the client hung up; the job runs on
            return Response(status_code=499)
        if body.includes_logprobs:
            answer.replay(result)
        (reason,) = generation.fill(result)
        answer.feed(*generation.choices[0].pieces(final=True))
        return answer.response(reason)
    stream = TokenStream()
    job = await stream.start(submit)
    return stream.response(_events(answer, generation, stream, job))


class _Answer:
    """The output items of a response as its pieces arrive (thinking, text, calls, in order), and the
    stream events that build them (`events`: each piece's, in order).

    With logprobs asked, the tokens released with a batch of pieces go to that batch's text (a batch of
    thinking or calls alone has none: OpenAI gives logprobs for `output_text` only)."""

    def __init__(self, body: ResponsesRequest, generation: Generation) -> None:
        self.body, self.generation = body, generation
        self.choice = generation.choices[0]
        self.id = "resp_" + uuid.uuid4().hex
        self.created = int(time.time())
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # a reasoning or message item still growing
        self.events: list[dict[str, Any]] = []

    def feed(self, pieces: list[Piece], indices: list[int]) -> None:
        """A batch of pieces from `Choice.pieces`, with the indices of the tokens it released."""
        logprobs = (
            token_logprobs(self.generation.tokenizer, self.choice, indices)
            if self.body.includes_logprobs
            else []
        )
        for piece in pieces:
            if self.add(piece, logprobs) and isinstance(piece, str):
                logprobs = []  # the batch's tokens went to its first text

    def replay(self, result: SampleOutput) -> None:
        """A whole answer's tokens fed one at a time, as a stream feeds them: so each batch's tokens
        go where the streamed response puts them (its text's logprobs, or none)."""
        sequence = result.results[0].sequences[0]
        topk = sequence.topk_logprobs or [None] * len(sequence.tokens)
        last = len(sequence.tokens) - 1
        for k, (token, logprob, top) in enumerate(zip(sequence.tokens, sequence.logprobs, topk, strict=True)):
            self.choice.add(token, logprob, top)
            self.feed(*self.choice.pieces(final=k == last))

    def add(self, piece: Piece, logprobs: list[dict[str, Any]] | None = None) -> bool:
        """Add one piece (text with the `logprobs` of its tokens); whether it went into an item."""
        if isinstance(piece, ToolCall):
            self._close()
            item = {
                "type": "function_call",
                "id": "fc_" + uuid.uuid4().hex,
                "call_id": piece.id,
                "name": piece.name,
                "arguments": piece.arguments_json,
                "status": "completed",
            }
            index = len(self.items)
            self.items.append(item)
            started = {**item, "arguments": "", "status": "in_progress"}  # as OpenAI's: done at .done
            self._event("response.output_item.added", output_index=index, item=started)
            self._event(
                "response.function_call_arguments.delta",
                output_index=index,
                item_id=item["id"],
                delta=item["arguments"],
            )
            self._event(
                "response.function_call_arguments.done",
                output_index=index,
                item_id=item["id"],
                name=item["name"],
                arguments=item["arguments"],
            )
            self._event("response.output_item.done", output_index=index, item=item)
            return True
        kind = "reasoning" if isinstance(piece, Thought) else "message"
        text = piece.text if isinstance(piece, Thought) else piece
        if not text or (kind == "message" and self.open is None and not text.strip() and self._after_call()):
            return False
        if self.open is None or self.open["type"] != kind:
            self._close()
            self._start(kind)
        assert self.open is not None
        index, item_id = len(self.items) - 1, self.open["id"]
        part = self.open["content"][0]
        part["text"] += text
        if kind == "reasoning":
            self._event(
                "response.reasoning_text.delta",
                output_index=index,
                item_id=item_id,
                content_index=0,
                delta=text,
            )
            return True
        part["logprobs"] += logprobs or []
        self._event(
            "response.output_text.delta",
            output_index=index,
            item_id=item_id,
            content_index=0,
            delta=text,
            logprobs=logprobs or [],
        )
        return True

    def _after_call(self) -> bool:
        return bool(self.items) and self.items[-1]["type"] == "function_call"

    def _start(self, kind: str) -> None:
        if kind == "reasoning":
            item: dict[str, Any] = {
                "type": "reasoning",
                "id": "rs_" + uuid.uuid4().hex,
                "summary": [],
                "content": [],
            }
            part: dict[str, Any] = {"type": "reasoning_text", "text": ""}
        else:
            item = {
                "type": "message",
                "id": "msg_" + uuid.uuid4().hex,
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        index = len(self.items)
        self.items.append(item)
        self._event("response.output_item.added", output_index=index, item=json.loads(json.dumps(item)))
        item["content"].append(part)
        self._event(
            "response.content_part.added",
            output_index=index,
            item_id=item["id"],
            content_index=0,
            part=json.loads(json.dumps(part)),  # as it was then: the part grows after
        )
        self.open = item

    def _close(self) -> None:
        item, self.open = self.open, None
        if item is None:
            return
        index, part = len(self.items) - 1, item["content"][0]
        if item["type"] == "reasoning":
            done, extra = "response.reasoning_text.done", {}
        else:
            done, extra = "response.output_text.done", {"logprobs": part["logprobs"]}
            item["status"] = "completed"
        self._event(done, output_index=index, item_id=item["id"], content_index=0, text=part["text"], **extra)
        self._event(
            "response.content_part.done", output_index=index, item_id=item["id"], content_index=0, part=part
        )
        self._event("response.output_item.done", output_index=index, item=item)

    def _event(self, kind: str, **fields: Any) -> None:
        self.events.append({"type": kind, **fields})

    def take_events(self) -> Iterator[dict[str, Any]]:
        events, self.events = self.events, []
        yield from events

    def response(self, reason: str | None) -> dict[str, Any]:
        """The response object: `in_progress` while streaming (`reason` None), else the whole answer."""
        if reason is not None:
            self._close()
        body, generation = self.body, self.generation
        output_tokens = generation.completion_tokens()
        thinking = "".join(
            part["text"] for item in self.items if item["type"] == "reasoning" for part in item["content"]
        )
        reasoning_tokens = (
            len(generation.tokenizer(thinking, add_special_tokens=False)["input_ids"]) if thinking else 0
        )
        status = "in_progress" if reason is None else "completed" if reason == "stop" else "incomplete"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions,
            "model": body.model,
            "output": self.items if reason is not None else [],
            "parallel_tool_calls": body.parallel_tool_calls,
            "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [],
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_logprobs": body.top_logprobs,
            "max_output_tokens": body.max_output_tokens,
            "text": body.text or {"format": {"type": "text"}},
            "reasoning": body.reasoning,
            "store": False,
            "metadata": body.metadata or {},
            "usage": None
            if reason is None
            else {
                "input_tokens": generation.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                "total_tokens": generation.prompt_tokens + output_tokens,
            },
        }


async def _events(
    answer: _Answer, generation: Generation, stream: TokenStream, job: Job
) -> AsyncIterator[str]:
    """The response as Responses stream events: created, in progress, each item's as it grows, then
    completed (or incomplete, at max_output_tokens)."""
    sequence = 0

    def event(payload: dict[str, Any]) -> str:
        nonlocal sequence
        payload = {**payload, "sequence_number": sequence}
        sequence += 1
        return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n"

    yield event({"type": "response.created", "response": answer.response(None)})
    yield event({"type": "response.in_progress", "response": answer.response(None)})
    choice = generation.choices[0]
    async for _, token, logprob, topk, done in stream:
        choice.add(token, logprob, topk)
        answer.feed(*choice.pieces(final=done))
        for payload in answer.take_events():
            yield event(payload)
    if job.status == "failed":
        yield event({"type": "error", "code": job.error_category, "message": job.error, "param": None})
        return
    (reason,) = generation.fill(job_result(job))
    answer.feed(*choice.pieces(final=True))
    final = answer.response(reason)
    for payload in answer.take_events():
        yield event(payload)
    done = "response.completed" if final["status"] == "completed" else "response.incomplete"
    yield event({"type": done, "response": final})
