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
event loop). Every failure, request validation included, is answered in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute

from eztinker.api import tinker_wire as wire
from eztinker.api.deps import OwnerDep, ServiceDep, get_owner
from eztinker.api.errors import openai_response
from eztinker.api.native import while_connected
from eztinker.api.openai_bodies import ChatCompletionRequest, CompletionRequest, Sampling
from eztinker.engine.errors import ComputeError, InvalidInputError
from eztinker.engine.sampler import SampleRequest
from eztinker.engine.types import ImageChunk, SamplingParams, TopLogprobs
from eztinker.scheduler import Job
from eztinker.service import ModelTarget, SampleSpec, Service
from eztinker.service.results import SampleOutput

# --- errors in OpenAI's shape (see `eztinker.api.errors`) --------------------------------------------


class OpenAIRoute(APIRoute):
    """A route whose every exception (validation and auth included) is answered as an OpenAI error."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return openai_response(exc)

        return handle


router = APIRouter(tags=["openai"], route_class=OpenAIRoute, dependencies=[Depends(get_owner)])
PREFIXES = ("/v1", "/oai/api/v1")  # where `router` is mounted: EZTinker's own, and hosted Tinker's


def _resolve(service: Service, model: str, owner: str | None) -> ModelTarget:
    """What `model` names (see the module docstring). Blocking: a checkpoint may be loaded."""
    if model.startswith("tinker://"):
        try:
            run_id, name, kind = wire.parse_tinker_path(model)
        except InvalidInputError:
            run_id = name = kind = ""
        if kind not in ("weights", "sampler_weights"):
            raise InvalidInputError(
                "model",
                f"{model!r} is not tinker://<run>/sampler_weights/<name> or tinker://<run>/weights/<name>",
            )
        return service.sampling.checkpoint_target(run_id, name, owner)
    return service.sampling.resolve_model(model, owner)


# --- text of a choice: detokenized incrementally, cut at the first stop string --------------------------


@dataclass
class _Choice:
    """One sample's completion as it grows: the text released so far and the tokens behind it.

    Text is held back while it might be the start of a stop string, or ends in an incomplete UTF-8
    character; `stopped` once a stop string appeared (the text ends before it, as OpenAI's does).
    """

    tokenizer: Any
    stops: list[str]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk: list[TopLogprobs | None] = field(default_factory=list)
    released: int = 0  # characters of text released
    released_tokens: int = 0  # tokens whose text is fully released
    stopped: bool = False

    def add(self, token: int, logprob: float, topk: TopLogprobs | None) -> None:
        if not self.stopped:
            self.tokens.append(token)
            self.logprobs.append(logprob)
            self.topk.append(topk)

    def text(self) -> str:
        return _decode(self.tokenizer, self.tokens)

    def take(self, final: bool) -> tuple[str, list[int]]:
        """(new text to release, indices of the tokens it completes); all that is left when `final`."""
        if self.stopped:
            return "", []
        text = self.text()
        end = len(text)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            end, self.stopped, final = cut, True, True
        elif not final:
            while end > self.released and text[end - 1] == "\ufffd":
                end -= 1  # an incomplete UTF-8 character: wait for its other bytes
            end -= _held_for_stop(text[:end], self.stops)
        end = max(end, self.released)
        new = text[self.released : end]
        self.released = end
        if self.stopped:  # the tokens with text before the stop string, the one it starts in included
            done = self._tokens_within(end)
            if done < len(self.tokens) and len(_decode(self.tokenizer, self.tokens[:done])) < end:
                done += 1
        else:
            done = len(self.tokens) if final else self._tokens_within(end)
        indices = list(range(self.released_tokens, max(done, self.released_tokens)))
        self.released_tokens = max(done, self.released_tokens)
        return new, indices

    def _tokens_within(self, chars: int) -> int:
        """How many leading tokens decode to text no longer than `chars` characters."""
        n = self.released_tokens
        while n < len(self.tokens) and len(_decode(self.tokenizer, self.tokens[: n + 1])) <= chars:
            n += 1
        return n


def _held_for_stop(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could start a stop string (and so must wait)."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


def _decode(tokenizer: Any, tokens: list[int]) -> str:
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return text if isinstance(text, str) else "".join(text)


def _token_text(tokenizer: Any, token: int) -> str:
    return _decode(tokenizer, [token])


# --- one generation: prompts, engine requests, and the choices they produce --------------------------


@dataclass
class _Generation:
    """A route's prompts on one model, each sampled `n` times; choice index = prompt · n + sample."""

    target: ModelTarget
    tokenizer: Any
    prompts: list[list[int]]
    params: SamplingParams
    n: int
    top_logprobs: int
    stops: list[str]
    images: list[tuple[ImageChunk, ...]] | None = None  # each prompt's images (vision-language models)
    choices: list[_Choice] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.choices = [_Choice(self.tokenizer, self.stops) for _ in range(len(self.prompts) * self.n)]

    def requests(
        self,
        on_token: Callable[[int, int, float, TopLogprobs | None, bool], None] | None,
        cancelled: Callable[[], bool] | None = None,
    ) -> list[SampleRequest]:
        return [
            SampleRequest(
                prompt=prompt,
                params=self.params,
                num_samples=self.n,
                topk_sample_logprobs=self.top_logprobs,
                stop_at_eos=True,
                on_token=None if on_token is None else _shifted(on_token, i * self.n),
                cancelled=cancelled,
                images=self.images[i] if self.images else (),
            )
            for i, prompt in enumerate(self.prompts)
        ]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)

    def usage(self) -> dict[str, int]:
        completion = self.completion_tokens()
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def fill(self, result: SampleOutput) -> list[str]:
        """Put a finished job's sequences into the choices; return each choice's finish reason."""
        reasons = []
        for i, request_result in enumerate(result.results):
            for j, sequence in enumerate(request_result.sequences):
                choice = self.choices[i * self.n + j]
                if not choice.tokens:
                    topk = sequence.topk_logprobs or [None] * len(sequence.tokens)
                    for token, logprob, top in zip(sequence.tokens, sequence.logprobs, topk, strict=True):
                        choice.add(token, logprob, top)
                reasons.append("stop" if sequence.stop_reason == "stop" else "length")
        return reasons


def _shifted(
    on_token: Callable[[int, int, float, TopLogprobs | None, bool], None], offset: int
) -> Callable[[int, int, float, TopLogprobs | None, bool], None]:
    def call(sample: int, token: int, logprob: float, topk: TopLogprobs | None, done: bool) -> None:
        on_token(offset + sample, token, logprob, topk, done)

    return call


def _params(body: Sampling, max_tokens: int | None, stops: list[str]) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=stops or None,
        seed=body.seed,
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


_IMAGE_MARK = "\ufff9eztinker-image-{}\ufffb"
_IMAGE_SPLIT = re.compile("\ufff9eztinker-image-([0-9]+)\ufffb")
_CHUNK_FIELD = re.compile(r"^chunks\[([0-9]+)\](.*)$")


def _chat_prompt(
    service: Service, target: ModelTarget, body: ChatCompletionRequest
) -> tuple[Any, list[int], tuple[ImageChunk, ...]]:
    """The chat's prompt tokens through the tokenizer's chat template, and its images (`image_url` parts)."""
    tokenizer = service.backend.tokenizer(target.base_model)
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInputError(
            "messages", f"the tokenizer of {target.base_model!r} has no chat template: use /v1/completions"
        )
    messages, images = [], []
    for i, m in enumerate(body.messages):
        text = ""
        for name, part in m.parts(f"messages[{i}].content"):
            if isinstance(part, ImageChunk):
                text += _IMAGE_MARK.format(len(images))
                images.append((name, part))
            else:
                text += part
        messages.append({"role": m.role, "content": text})
    if not images:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return tokenizer, [int(t) for t in ids], ()
    # Images: the template renders each one's mark; the text between marks is tokenized, and the engine
    # puts each image in, as the model's vision start / placeholder run / end tokens.
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pieces = _IMAGE_SPLIT.split(rendered)  # text, image index, text, ...
    chunks: list[wire.Chunk] = []
    names: list[str] = []
    for k, piece in enumerate(pieces):
        if k % 2:
            name, image = images[int(piece)]
            chunks.append(image)
            names.append(name)
        else:
            chunks.append([int(t) for t in tokenizer(piece, add_special_tokens=False)["input_ids"]])
            names.append("messages")
    try:
        tokens, found = service.sampling.expand_chunks(target.base_model, chunks, "chunks", frame=True)
    except InvalidInputError as exc:  # name the message part, not the internal chunk
        match = _CHUNK_FIELD.match(exc.field)
        if match is None:
            raise
        raise InvalidInputError(names[int(match.group(1))] + match.group(2), exc.message) from None
    return tokenizer, tokens, found


# --- routes --------------------------------------------------------------------------------------


@router.get("/models")
async def list_models(service: ServiceDep, owner: OwnerDep) -> dict[str, Any]:
    """Base models, the caller's live runs and sampler snapshots: each usable as `model`."""
    models = await run_in_threadpool(service.views.list_models, owner)
    return {
        "object": "list",
        "data": [
            {"id": m["id"], "object": "model", "created": m["created"], "owned_by": "eztinker", **m}
            for m in models
        ],
    }


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, service: ServiceDep, owner: OwnerDep
) -> dict[str, Any] | Response:
    """Text completions of a prompt (text, texts, token ids or lists of ids), `n` each."""
    if body.echo:
        raise InvalidInputError("echo", "is not supported")

    def prepare() -> _Generation:
        target = _resolve(service, body.model, owner)
        tokenizer, prompts = _completion_prompts(service, target, body)
        stops = body.stops()
        return _Generation(
            target,
            tokenizer,
            prompts,
            _params(body, body.max_tokens, stops),
            body.n,
            body.logprobs or 0,
            stops,
        )

    generation = await run_in_threadpool(prepare)
    return await _respond(request, service, owner, body, generation, "text_completion")


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, service: ServiceDep, owner: OwnerDep
) -> dict[str, Any] | Response:
    """A chat turn: the messages through the tokenizer's chat template, then `n` completions."""
    if body.top_logprobs and not body.logprobs:
        raise InvalidInputError("top_logprobs", "needs logprobs: true")

    def prepare() -> _Generation:
        target = _resolve(service, body.model, owner)
        tokenizer, prompt, images = _chat_prompt(service, target, body)
        stops = body.stops()
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = _params(body, max_tokens, stops)
        return _Generation(
            target, tokenizer, [prompt], params, body.n, body.top_logprobs or 0, stops, images=[images]
        )

    generation = await run_in_threadpool(prepare)
    return await _respond(request, service, owner, body, generation, "chat.completion")


Kind = Literal["text_completion", "chat.completion"]


async def _respond(
    request: Request,
    service: Service,
    owner: str | None,
    body: Sampling,
    generation: _Generation,
    kind: Kind,
) -> dict[str, Any] | Response:
    response_id = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex
    created = int(time.time())
    prompt_field = "prompt" if kind == "text_completion" else "messages"

    def submit(requests: list[SampleRequest]) -> Job:
        spec = SampleSpec(generation.target, requests, check_now=True, prompt_field=prompt_field)
        return service.sampling.sample(spec, owner)

    if not body.stream:
        job = await run_in_threadpool(submit, generation.requests(None))
        if not await while_connected(request, job.wait(None)):  # the client hung up; the job runs on
            return Response(status_code=499)
        result = _job_result(job)
        reasons = generation.fill(result)
        choices = [_final_choice(generation, i, reasons[i], kind, body) for i in range(len(reasons))]
        return {
            "id": response_id,
            "object": kind,
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": generation.usage(),
        }
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, int, float, TopLogprobs | None, bool] | None] = asyncio.Queue()

    def on_token(sample: int, token: int, logprob: float, topk: TopLogprobs | None, done: bool) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (sample, token, logprob, topk, done))

    hung_up = threading.Event()  # set if the client leaves before the end: generation stops there
    job = await run_in_threadpool(submit, generation.requests(on_token, cancelled=hung_up.is_set))
    # Set after the last token's callback on the same thread, so it reaches the queue after every token.
    job.future.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
    return StreamingResponse(
        _until_hung_up(_events(generation, body, job, queue, response_id, created, kind), hung_up),
        media_type="text/event-stream",
    )


async def _until_hung_up(events: AsyncIterator[str], hung_up: threading.Event) -> AsyncIterator[str]:
    """The stream's events; if the client leaves before the last one, `hung_up` is set (and decoding stops)."""
    finished = False
    try:
        async for event in events:
            yield event
        finished = True
    finally:
        if not finished:
            hung_up.set()


def _job_result(job: Job) -> SampleOutput:
    if job.status == "failed":
        if job.error_category == "server":
            raise ComputeError(job.error or "sampling failed")
        raise InvalidInputError("request", job.error or "sampling failed")
    assert isinstance(job.result, SampleOutput)
    return job.result


async def _events(
    generation: _Generation,
    body: Sampling,
    job: Job,
    queue: asyncio.Queue[tuple[int, int, float, TopLogprobs | None, bool] | None],
    response_id: str,
    created: int,
    kind: Kind,
) -> AsyncIterator[str]:
    chunk_kind = "text_completion" if kind == "text_completion" else "chat.completion.chunk"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        payload = {"id": response_id, "object": chunk_kind, "created": created, "model": body.model}
        return f"data: {json.dumps({**payload, 'choices': choices, **extra})}\n\n"

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
    while (event := await queue.get()) is not None:
        index, token, logprob, topk, done = event
        choice = generation.choices[index]
        choice.add(token, logprob, topk)
        text, indices = choice.take(final=done)
        if text or indices:
            yield chunk([_chunk_choice(generation, index, text, indices, None, kind, body)])
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
    reasons = generation.fill(_job_result(job))
    for index, reason in enumerate(reasons):
        text, indices = generation.choices[index].take(final=True)
        yield chunk([_chunk_choice(generation, index, text, indices, reason, kind, body)])
    if body.stream_options is not None and body.stream_options.include_usage:
        yield chunk([], usage=generation.usage())
    yield "data: [DONE]\n\n"


def _final_choice(
    generation: _Generation, index: int, reason: str, kind: Kind, body: Sampling
) -> dict[str, Any]:
    choice = generation.choices[index]
    text, _ = choice.take(final=True)
    return _chunk_choice(
        generation, index, text, list(range(choice.released_tokens)), reason, kind, body, final=True
    )


def _chunk_choice(
    generation: _Generation,
    index: int,
    text: str,
    indices: list[int],
    reason: str | None,
    kind: Kind,
    body: Sampling,
    *,
    final: bool = False,
) -> dict[str, Any]:
    """One choice of a response (`final`: the whole text, as a `message`) or of a stream chunk (a `delta`)."""
    choice = generation.choices[index]
    if kind == "text_completion":
        logprobs = _completion_logprobs(generation, choice, indices, body)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
    if final:
        content: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
    else:
        content = {"delta": {"content": text} if text or reason is None else {}}
    logprobs = _chat_logprobs(generation, choice, indices, body)
    return {"index": index, **content, "logprobs": logprobs, "finish_reason": reason}


def _completion_logprobs(
    generation: _Generation, choice: _Choice, indices: list[int], body: Sampling
) -> dict[str, Any] | None:
    if not isinstance(body, CompletionRequest) or body.logprobs is None:
        return None
    tok = generation.tokenizer
    texts = [_token_text(tok, choice.tokens[i]) for i in indices]
    offsets, offset = [], len(_decode(tok, choice.tokens[: indices[0]])) if indices else 0
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [choice.logprobs[i] for i in indices],
        "top_logprobs": [
            {_token_text(tok, t): lp for t, lp in (choice.topk[i] or [])} if body.logprobs else None
            for i in indices
        ],
        "text_offset": offsets,
    }


def _chat_logprobs(
    generation: _Generation, choice: _Choice, indices: list[int], body: Sampling
) -> dict[str, Any] | None:
    if not isinstance(body, ChatCompletionRequest) or not body.logprobs:
        return None
    tok = generation.tokenizer

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tok, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            {
                **entry(choice.tokens[i], choice.logprobs[i]),
                "top_logprobs": [entry(t, lp) for t, lp in (choice.topk[i] or [])],
            }
            for i in indices
        ]
    }
