"""Anthropic's Messages API, as hosted Tinker serves it: `POST /anthropic/api/v1/messages` (whole or as
server-sent events) and `/messages/count_tokens` — and at `/v1/messages`, where Anthropic's own API and
vLLM's serve it, so `ANTHROPIC_BASE_URL=http://<server>` works as well as `http://<server>/anthropic/api`.

`model` names what the OpenAI routes accept (a base model, a run id, a tinker:// sampler path): the same
resolution, chat template, generation, detokenising / stop-string choices and token stream (`api/chat.py`)
and sampling entry point (`service.sampling.sample`) serve both. Errors are Anthropic's error object,
typed from the one error table (`api/errors.py`).
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from eztinker.api.anthropic_bodies import CountTokensRequest, MessagesRequest
from eztinker.api.chat import (
    Choice,
    ErrorShapedRoute,
    Generation,
    Piece,
    PromptImages,
    TokenStream,
    job_result,
    render_with_images,
    require_chat_template,
    resolve_model,
    whole_result,
)
from eztinker.api.deps import OwnerDep, ServiceDep, get_owner
from eztinker.api.errors import error_headers, error_kind, error_message
from eztinker.api.reasoning import Thought
from eztinker.api.tool_calls import ToolCall, ToolUse, complete_history
from eztinker.engine.types import ImageChunk, SamplingParams
from eztinker.service import Service

PREFIXES = ("/anthropic/api/v1", "/v1")  # where `router` is mounted: hosted Tinker's path, and Anthropic's


def anthropic_response(exc: BaseException) -> JSONResponse:
    """Anthropic's error object with the table's Anthropic type (validation errors are 400, as Anthropic's)."""
    kind = error_kind(exc)
    message, _, _ = error_message(exc)
    body = {"type": "error", "error": {"type": kind.anthropic_type, "message": message}}
    return JSONResponse(body, status_code=kind.status_for_openai, headers=error_headers(exc))


class AnthropicRoute(ErrorShapedRoute):
    """A route whose every exception (validation and auth included) is answered as an Anthropic error."""

    answer = staticmethod(anthropic_response)


router = APIRouter(tags=["anthropic"], route_class=AnthropicRoute, dependencies=[Depends(get_owner)])


def _prompt(
    service: Service, body: CountTokensRequest, owner: str | None
) -> tuple[Any, Any, list[int], tuple[ImageChunk, ...], ToolUse | None]:
    """(target, tokenizer, prompt tokens, its images, tool use): the system prompt, messages (their
    `image` blocks included) and tools through the chat template."""
    body.refuse_not_served()
    if body.context_management is not None:
        body.context_management.refuse_edits()
    target = resolve_model(service, body.model, owner)
    tokenizer = service.backend.tokenizer(target.base_model)
    require_chat_template(tokenizer, target.base_model, "messages", "this route renders chats with it")
    options = body.template_options(tokenizer, target.base_model)
    tools = body.tool_use(tokenizer, target.base_model)
    images = PromptImages()
    messages, wheres = body.template_messages(images)
    complete_history(tokenizer, target.base_model, messages, wheres)
    prompt, found = render_with_images(service, target, tokenizer, messages, images, tools, options)
    return target, tokenizer, prompt, found, tools


@router.post("/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, service: ServiceDep, owner: OwnerDep) -> dict[str, Any]:
    """The prompt's length in tokens, as `messages` would render it."""
    _, _, prompt, _, _ = await run_in_threadpool(_prompt, service, body, owner)
    return {"input_tokens": len(prompt)}


def _stop(choice: Choice, reason: str) -> tuple[str, str | None]:
    """(Anthropic stop_reason, the stop sequence met) once the choice's text is all taken."""
    if choice.stopped:
        rest = choice.text()[choice.released :]
        met = next((s for s in choice.stops if rest.startswith(s)), None)
        return "stop_sequence", met
    if reason == "stop":
        return ("tool_use" if choice.calls else "end_turn"), None
    return "max_tokens", None


def _block(piece: Piece) -> dict[str, Any]:
    if isinstance(piece, str):
        return {"type": "text", "text": piece}
    if isinstance(piece, Thought):  # no signature: there is nothing of Anthropic's to attest
        return {"type": "thinking", "thinking": piece.text, "signature": ""}
    return {"type": "tool_use", "id": piece.id, "name": piece.name, "input": piece.arguments}


class _BlockEvents:
    """A streamed answer's content blocks, opened as thinking, text and calls arrive: thinking and text
    deltas into an open block of their kind; each call its own `tool_use` block, its input as one
    `input_json_delta`."""

    def __init__(self, event: Callable[[str, dict[str, Any]], str]) -> None:
        self.event = event
        self.index = -1
        self.open: str | None = None  # the kind of the open thinking or text block

    def _start(self, block: dict[str, Any]) -> list[str]:
        self.index += 1
        started = [self.event("content_block_start", {"index": self.index, "content_block": block})]
        return started + ([self.event("ping", {})] if self.index == 0 else [])

    def _stop(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [self.event("content_block_stop", {"index": self.index})]

    def piece(self, piece: Piece) -> list[str]:
        if isinstance(piece, ToolCall):
            out = self._stop()
            out += self._start({"type": "tool_use", "id": piece.id, "name": piece.name, "input": {}})
            delta = {"type": "input_json_delta", "partial_json": piece.arguments_json}
            out.append(self.event("content_block_delta", {"index": self.index, "delta": delta}))
            return [*out, self.event("content_block_stop", {"index": self.index})]
        kind = "thinking" if isinstance(piece, Thought) else "text"
        out = []
        if self.open != kind:
            out = self._stop() + self._start(_block(Thought("") if kind == "thinking" else ""))
            self.open = kind
        if isinstance(piece, Thought):
            delta = {"type": "thinking_delta", "thinking": piece.text}
        else:
            delta = {"type": "text_delta", "text": piece}
        return [*out, self.event("content_block_delta", {"index": self.index, "delta": delta})]

    def close(self) -> list[str]:
        """The last block's stop; an empty text block when the answer had none (as without tools)."""
        if self.index < 0:
            self.open = "text"
            return [*self._start({"type": "text", "text": ""}), *self._stop()]
        return self._stop()


@router.post("/messages", response_model=None)
async def messages(
    body: MessagesRequest, request: Request, service: ServiceDep, owner: OwnerDep
) -> dict[str, Any] | Response:
    """One assistant turn: the system prompt and messages through the chat template, then one sample."""

    def prepare() -> Generation:
        target, tokenizer, prompt, images, tools = _prompt(service, body, owner)
        stops = body.stops()
        params = SamplingParams(
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k or -1,
            stop=stops or None,
        )
        return Generation(
            target,
            tokenizer,
            [prompt],
            params,
            1,
            0,
            stops,
            images=[images],
            tools=tools,
            reasoning=True,
            field_names={"stop": "stop_sequences"},
            answer=body.answer(tools),
            thinking_budget=body.thinking_budget(),
        )

    generation = await run_in_threadpool(prepare)
    message_id = "msg_" + uuid.uuid4().hex

    submit = functools.partial(generation.submit, service, owner, "messages")

    def message(
        content: list[dict[str, Any]], stop_reason: str | None, stop_sequence: str | None
    ) -> dict[str, Any]:
        return {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": body.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": {
                "input_tokens": generation.prompt_tokens,
                "output_tokens": generation.completion_tokens(),
            },
        }

    if not body.stream:
        result = await whole_result(request, submit)
        if result is None:  # the client hung up; the job runs on
            return Response(status_code=499)
        reasons = generation.fill(result)
        choice = generation.choices[0]
        pieces, _ = choice.pieces(final=True)
        blocks = [_block(p) for p in pieces if not (isinstance(p, str) and not p.strip() and len(pieces) > 1)]
        return message(blocks or [_block("")], *_stop(choice, reasons[0]))

    stream = TokenStream()
    job = await stream.start(submit)

    def event(name: str, data: dict[str, Any]) -> str:
        return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"

    async def events() -> AsyncIterator[str]:
        start = message([], None, None)
        start["usage"]["output_tokens"] = 0
        yield event("message_start", {"message": start})
        blocks = _BlockEvents(event)
        choice = generation.choices[0]
        async for _, token, logprob, topk, done in stream:
            choice.add(token, logprob, topk)
            for piece in choice.pieces(final=done)[0]:
                for out in blocks.piece(piece):
                    yield out
        if job.status == "failed":
            kind = "api_error" if job.error_category == "server" else "invalid_request_error"
            yield event("error", {"error": {"type": kind, "message": job.error}})
            return
        reasons = generation.fill(job_result(job))
        for piece in choice.pieces(final=True)[0]:
            for out in blocks.piece(piece):
                yield out
        for out in blocks.close():
            yield out
        stop_reason, stop_sequence = _stop(choice, reasons[0])
        yield event(
            "message_delta",
            {
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": {"output_tokens": generation.completion_tokens()},
            },
        )
        yield event("message_stop", {})

    return stream.response(events())
