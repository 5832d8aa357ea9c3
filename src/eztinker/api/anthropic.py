"""Anthropic's Messages API, as hosted Tinker serves it: `POST /anthropic/api/v1/messages` (whole or as
server-sent events) and `/messages/count_tokens`.

`model` names what the OpenAI routes accept (a base model, a run id, a tinker:// sampler path): the same
resolution, chat template, generation, detokenising / stop-string choices and token stream (`api/chat.py`)
and sampling entry point (`service.sampling.sample`) serve both. Errors are Anthropic's error object,
typed from the one error table (`api/errors.py`).
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from eztinker.api.anthropic_bodies import CountTokensRequest, MessagesRequest
from eztinker.api.chat import (
    Choice,
    ErrorShapedRoute,
    Generation,
    TokenStream,
    chat_template_ids,
    job_result,
    require_chat_template,
    resolve_model,
    whole_result,
)
from eztinker.api.deps import OwnerDep, ServiceDep, get_owner
from eztinker.api.errors import error_headers, error_kind, error_message
from eztinker.engine.types import SamplingParams
from eztinker.service import Service

PREFIX = "/anthropic/api/v1"


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


def _prompt(service: Service, body: CountTokensRequest, owner: str | None) -> tuple[Any, Any, list[int]]:
    """(target, tokenizer, prompt tokens): the system prompt and messages through the chat template."""
    body.refuse_not_served()
    target = resolve_model(service, body.model, owner)
    tokenizer = service.backend.tokenizer(target.base_model)
    require_chat_template(tokenizer, target.base_model, "messages", "this route renders chats with it")
    messages = [{"role": "system", "content": body.system_text()}] if body.system else []
    messages += [{"role": m.role, "content": m.text(f"messages[{i}]")} for i, m in enumerate(body.messages)]
    return target, tokenizer, chat_template_ids(tokenizer, messages)


@router.post("/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, service: ServiceDep, owner: OwnerDep) -> dict[str, Any]:
    """The prompt's length in tokens, as `messages` would render it."""
    _, _, prompt = await run_in_threadpool(_prompt, service, body, owner)
    return {"input_tokens": len(prompt)}


def _stop(choice: Choice, reason: str) -> tuple[str, str | None]:
    """(Anthropic stop_reason, the stop sequence met) once the choice's text is all taken."""
    if choice.stopped:
        rest = choice.text()[choice.released :]
        met = next((s for s in choice.stops if rest.startswith(s)), None)
        return "stop_sequence", met
    return ("end_turn" if reason == "stop" else "max_tokens"), None


@router.post("/messages", response_model=None)
async def messages(
    body: MessagesRequest, request: Request, service: ServiceDep, owner: OwnerDep
) -> dict[str, Any] | Response:
    """One assistant turn: the system prompt and messages through the chat template, then one sample."""

    def prepare() -> Generation:
        target, tokenizer, prompt = _prompt(service, body, owner)
        stops = body.stops()
        params = SamplingParams(
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k or -1,
            stop=stops or None,
        )
        return Generation(target, tokenizer, [prompt], params, 1, 0, stops)

    generation = await run_in_threadpool(prepare)
    message_id = "msg_" + uuid.uuid4().hex

    submit = functools.partial(generation.submit, service, owner, "messages")

    def message(text: str | None, stop_reason: str | None, stop_sequence: str | None) -> dict[str, Any]:
        return {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": body.model,
            "content": [] if text is None else [{"type": "text", "text": text}],
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
        text, _ = choice.take(final=True)
        return message(text, *_stop(choice, reasons[0]))

    stream = TokenStream()
    job = await stream.start(submit)

    def event(name: str, data: dict[str, Any]) -> str:
        return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"

    def delta(text: str) -> str:
        return event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}})

    async def events() -> AsyncIterator[str]:
        start = message(None, None, None)
        start["usage"]["output_tokens"] = 0
        yield event("message_start", {"message": start})
        yield event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        yield event("ping", {})
        choice = generation.choices[0]
        async for _, token, logprob, topk, done in stream:
            choice.add(token, logprob, topk)
            text, _ = choice.take(final=done)
            if text:
                yield delta(text)
        if job.status == "failed":
            kind = "api_error" if job.error_category == "server" else "invalid_request_error"
            yield event("error", {"error": {"type": kind, "message": job.error}})
            return
        reasons = generation.fill(job_result(job))
        text, _ = choice.take(final=True)
        if text:
            yield delta(text)
        yield event("content_block_stop", {"index": 0})
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
