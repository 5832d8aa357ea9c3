"""The OpenAI-compatible facade: `/v1/models`, `/v1/completions`, `/v1/chat/completions` — also under
hosted Tinker's prefix, `/oai/api/v1/...` (one router, mounted at each of `PREFIXES`).

`model` names what to sample from, in this order:
- a **checkpoint path** `tinker://<run>/sampler_weights/<name>` or `tinker://<run>/weights/<name>`: the
  caller's checkpoint, loaded as a sampler snapshot on first use and reused after;
- a **base model** the server has configured or loaded (its name as given to `--model` / `create_run`);
- a **run id** (`run-...`): the run's live adapter, as trained so far (ordered with the run's other ops);
- a **sampler snapshot id** (Tinker's sampling sessions, `save_sampler`): a frozen adapter.
`GET /v1/models` lists the last three (with auth on: the caller's runs and snapshots only).

Routes translate only: tokenize (chat template from the tokenizer), build engine `SampleRequest`s, submit
them through the service, and turn results into OpenAI's JSON. `stream: true` answers with server-sent
events as the engine chooses tokens (its `on_token` callback, bridged from the sampling thread into the
event loop). Every failure, request validation included, is answered in OpenAI's error shape. What the
Anthropic facade shares with this one (resolving `model`, choices, the token stream) is in `api/chat.py`.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool

from eztinker.api.chat import (
    Choice,
    ErrorShapedRoute,
    Generation,
    Piece,
    PromptImages,
    TokenStream,
    decode,
    job_result,
    render_with_images,
    require_chat_template,
    resolve_model,
    token_text,
    whole_result,
)
from eztinker.api.deps import OwnerDep, ServiceDep, get_owner
from eztinker.api.errors import openai_response
from eztinker.api.openai_bodies import IMAGE_URL_FIELDS, ChatCompletionRequest, CompletionRequest, Sampling
from eztinker.api.reasoning import Thought, require_reasoning
from eztinker.api.tool_calls import ToolCall, ToolUse, complete_history
from eztinker.engine.errors import InvalidInputError, NotFoundError
from eztinker.engine.types import ImageChunk, SamplingParams
from eztinker.scheduler import Job
from eztinker.service import ModelTarget, Service

# --- errors in OpenAI's shape (see `eztinker.api.errors`) --------------------------------------------


class OpenAIRoute(ErrorShapedRoute):
    """A route whose every exception (validation and auth included) is answered as an OpenAI error."""

    answer = staticmethod(openai_response)


router = APIRouter(tags=["openai"], route_class=OpenAIRoute, dependencies=[Depends(get_owner)])
PREFIXES = ("/v1", "/oai/api/v1")  # where `router` is mounted: EZTinker's own, and hosted Tinker's


def _params(body: Sampling, max_tokens: int | None, stops: list[str]) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k or -1,  # vLLM's 0 is no limit too
        stop=stops or None,
        seed=body.seed,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        logit_bias=body.biases(),
    )


def _completion_prompts(
    service: Service, target: ModelTarget, body: CompletionRequest
) -> tuple[Any, list[list[int]]]:
    tokenizer = service.backend.tokenizer(target.base_model)
    prompt: Any = body.prompt
    ids: list[list[int]]
    if isinstance(prompt, str):
        ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    elif prompt and all(isinstance(p, str) for p in prompt):
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        ids = [[int(t) for t in prompt]]
    else:
        ids = [[int(t) for t in p] for p in prompt]
    if not ids or any(not p for p in ids):
        raise InvalidInputError("prompt", "is empty: send some text or token ids")
    return tokenizer, ids


def _chat_prompt(
    service: Service, target: ModelTarget, body: ChatCompletionRequest
) -> tuple[Any, list[int], tuple[ImageChunk, ...], ToolUse | None]:
    """The chat's prompt tokens through the tokenizer's chat template (with the tools the model may call),
    its images (`image_url` parts) and its tool use."""
    tokenizer = service.backend.tokenizer(target.base_model)
    require_chat_template(tokenizer, target.base_model, "messages", "use /v1/completions")
    tools = body.tool_use(tokenizer, target.base_model)
    options = body.template_options(tokenizer, target.base_model)
    messages, images = [], PromptImages()
    for i, m in enumerate(body.messages):
        text = ""
        for name, part in m.parts(f"messages[{i}].content"):
            text += images.mark(name, part, IMAGE_URL_FIELDS) if isinstance(part, ImageChunk) else part
        messages.append(m.for_template(text, f"messages[{i}]"))
    complete_history(tokenizer, target.base_model, messages, [f"messages[{i}]" for i in range(len(messages))])
    prompt, found = render_with_images(service, target, tokenizer, messages, images, tools, options)
    return tokenizer, prompt, found, tools


# --- routes --------------------------------------------------------------------------------------


@router.get("/models")
async def list_models(service: ServiceDep, owner: OwnerDep) -> dict[str, Any]:
    """Base models, the caller's live runs and sampler snapshots: each usable as `model`."""
    models = await run_in_threadpool(service.views.list_models, owner)
    return {"object": "list", "data": [_model_entry(m) for m in models]}


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, service: ServiceDep, owner: OwnerDep) -> dict[str, Any]:
    """One model of the caller's listing (OpenAI's `models.retrieve`): a base model's id holds slashes
    when it is a path. Another key's run or snapshot is missing, as in the listing."""
    models = await run_in_threadpool(service.views.list_models, owner)
    for m in models:
        if m["id"] == model_id:
            return _model_entry(m)
    raise NotFoundError(f"the model {model_id!r} does not exist: GET /v1/models lists the models you can use")


def _model_entry(model: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": model["id"],
        "object": "model",
        "created": model["created"],
        "owned_by": "eztinker",
        **model,
    }


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, service: ServiceDep, owner: OwnerDep
) -> dict[str, Any] | Response:
    """Text completions of a prompt (text, texts, token ids or lists of ids), `n` each."""
    body.refuse_not_served()
    service.limits.check_num_samples(body.n)  # before a choice is made per sample

    def prepare() -> Generation:
        target = resolve_model(service, body.model, owner)
        tokenizer, prompts = _completion_prompts(service, target, body)
        stops = body.stops()
        return Generation(
            target,
            tokenizer,
            prompts,
            _params(body, body.max_tokens, stops),
            body.n,
            body.logprobs or 0,
            stops,
            answer=body.output_answer(),
        )

    generation = await run_in_threadpool(prepare)
    return await _respond(request, service, owner, body, generation, "text_completion")


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, service: ServiceDep, owner: OwnerDep
) -> dict[str, Any] | Response:
    """A chat turn: the messages through the tokenizer's chat template, then `n` completions."""
    body.refuse_not_served()
    if body.top_logprobs and not body.logprobs:
        raise InvalidInputError("top_logprobs", "needs logprobs: true")

    generation = await run_in_threadpool(chat_generation, service, body, owner)
    return await _respond(request, service, owner, body, generation, "chat.completion")


def chat_generation(service: Service, body: ChatCompletionRequest, owner: str | None) -> Generation:
    """A chat request's generation: its model resolved, its chat rendered, its sampling parameters and
    answer shape (the chat route's, and the Responses route's, which speaks in chat requests). Blocking."""
    service.limits.check_num_samples(body.n)  # before a choice is made per sample
    target = resolve_model(service, body.model, owner)
    tokenizer, prompt, images, tools = _chat_prompt(service, target, body)
    if body.thinking_token_budget is not None:
        require_reasoning(tokenizer, target.base_model, "thinking_token_budget")
    stops = body.stops()
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = _params(body, max_tokens, stops)
    return Generation(
        target,
        tokenizer,
        [prompt],
        params,
        body.n,
        body.top_logprobs or 0,
        stops,
        images=[images],
        tools=tools,
        reasoning=True,
        field_names={"max_tokens": "max_completion_tokens"} if body.max_completion_tokens else {},
        answer=body.answer(tools),
        thinking_budget=body.thinking_token_budget,
    )


Kind = Literal["text_completion", "chat.completion"]


async def _respond(
    request: Request,
    service: Service,
    owner: str | None,
    body: Sampling,
    generation: Generation,
    kind: Kind,
) -> dict[str, Any] | Response:
    response_id = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex
    created = int(time.time())
    prompt_field = "prompt" if kind == "text_completion" else "messages"

    submit = functools.partial(generation.submit, service, owner, prompt_field)

    if not body.stream:
        result = await whole_result(request, submit)
        if result is None:  # the client hung up; the job runs on
            return Response(status_code=499)
        reasons = generation.fill(result)
        choices = [_final_choice(generation, i, reasons[i], kind, body) for i in range(len(reasons))]
        return {
            "id": response_id,
            "object": kind,
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": _usage(generation),
        }
    stream = TokenStream()
    job = await stream.start(submit)
    return stream.response(_events(generation, body, job, stream, response_id, created, kind))


def _usage(generation: Generation) -> dict[str, int]:
    completion = generation.completion_tokens()
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": generation.prompt_tokens + completion,
    }


async def _events(
    generation: Generation,
    body: Sampling,
    job: Job,
    stream: TokenStream,
    response_id: str,
    created: int,
    kind: Kind,
) -> AsyncIterator[str]:
    chunk_kind = "text_completion" if kind == "text_completion" else "chat.completion.chunk"
    with_usage = body.stream_options is not None and body.stream_options.include_usage
    # As OpenAI's: with include_usage, every chunk has a `usage` (null until the last, which has no choices).
    usage: dict[str, Any] = {"usage": None} if with_usage else {}

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        payload = {"id": response_id, "object": chunk_kind, "created": created, "model": body.model}
        return f"data: {json.dumps({**payload, 'choices': choices, **usage, **extra})}\n\n"

    if kind == "chat.completion":
        yield chunk(
            [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for i in range(len(generation.choices))
            ]
        )
    finished: set[int] = set()
    async for index, token, logprob, topk, done in stream:
        choice = generation.choices[index]
        choice.add(token, logprob, topk)
        pieces, indices = choice.pieces(final=done)
        if pieces or indices:
            yield chunk([_chunk_choice(generation, index, pieces, indices, None, kind, body)])
        if done:
            finished.add(index)
    if job.status == "failed":
        error = {
            "message": job.error,
            "type": "server_error" if job.error_category == "server" else "invalid_request_error",
            "param": None,
            "code": None,
        }
        yield f"data: {json.dumps({'error': error})}\n\n"
        yield "data: [DONE]\n\n"
        return
    reasons = generation.fill(job_result(job))
    for index, reason in enumerate(reasons):
        pieces, indices = generation.choices[index].pieces(final=True)
        yield chunk([_chunk_choice(generation, index, pieces, indices, reason, kind, body)])
    if with_usage:
        yield chunk([], usage=_usage(generation))
    yield "data: [DONE]\n\n"


def _final_choice(
    generation: Generation, index: int, reason: str, kind: Kind, body: Sampling
) -> dict[str, Any]:
    choice = generation.choices[index]
    pieces, _ = choice.pieces(final=True)
    return _chunk_choice(
        generation, index, pieces, list(range(choice.released_tokens)), reason, kind, body, final=True
    )


def _chunk_choice(
    generation: Generation,
    index: int,
    pieces: list[Piece],
    indices: list[int],
    reason: str | None,
    kind: Kind,
    body: Sampling,
    *,
    final: bool = False,
) -> dict[str, Any]:
    """One choice of a response (`final`: the whole answer, as a `message`) or of a stream chunk (a
    `delta`): its new text, and on the chat route its new thinking (`reasoning_content`, as vLLM's
    reasoning parsers name it) and tool calls."""
    choice = generation.choices[index]
    text = "".join(p for p in pieces if isinstance(p, str))
    thinking = "".join(p.text for p in pieces if isinstance(p, Thought))
    if isinstance(body, ChatCompletionRequest) and not body.include_reasoning:
        thinking = ""
    if kind == "text_completion":
        logprobs = _completion_logprobs(generation, choice, indices, body)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
    calls = [p for p in pieces if isinstance(p, ToolCall)]
    if reason == "stop" and choice.calls:
        reason = "tool_calls"
    if final:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if thinking:
            message["reasoning_content"] = thinking
        if calls:
            message["content"] = text if text.strip() else None
            message["tool_calls"] = [_call_json(call) for call in calls]
        content: dict[str, Any] = {"message": message}
    else:
        delta: dict[str, Any] = {}
        if thinking:
            delta["reasoning_content"] = thinking
        if text or (reason is None and not calls and not thinking):
            delta["content"] = text
        if calls:  # each call whole, in one delta (`index`: its place among the choice's calls)
            delta["tool_calls"] = [{"index": choice.calls.index(call), **_call_json(call)} for call in calls]
        content = {"delta": delta}
    logprobs = _chat_logprobs(generation, choice, indices, body)
    return {"index": index, **content, "logprobs": logprobs, "finish_reason": reason}


def _call_json(call: ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments_json},
    }


def _completion_logprobs(
    generation: Generation, choice: Choice, indices: list[int], body: Sampling
) -> dict[str, Any] | None:
    if not isinstance(body, CompletionRequest) or body.logprobs is None:
        return None
    tok = generation.tokenizer
    texts = [token_text(tok, choice.tokens[i]) for i in indices]
    offsets, offset = [], len(decode(tok, choice.tokens[: indices[0]])) if indices else 0
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [choice.logprobs[i] for i in indices],
        "top_logprobs": [
            {token_text(tok, t): lp for t, lp in (choice.topk[i] or [])} if body.logprobs else None
            for i in indices
        ],
        "text_offset": offsets,
    }


def _chat_logprobs(
    generation: Generation, choice: Choice, indices: list[int], body: Sampling
) -> dict[str, Any] | None:
    if not isinstance(body, ChatCompletionRequest) or not body.logprobs:
        return None
    return {"content": token_logprobs(generation.tokenizer, choice, indices)}


def token_logprobs(tokenizer: Any, choice: Choice, indices: list[int]) -> list[dict[str, Any]]:
    """The choice's tokens at `indices` as OpenAI's chat (and Responses) logprobs: each token's text, its
    log-probability and UTF-8 bytes, and its top alternatives in the same shape."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return [
        {
            **entry(choice.tokens[i], choice.logprobs[i]),
            "top_logprobs": [entry(t, lp) for t, lp in (choice.topk[i] or [])],
        }
        for i in indices
    ]
