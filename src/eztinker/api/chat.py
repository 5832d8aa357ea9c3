"""What the OpenAI (`api/openai.py`) and Anthropic (`api/anthropic.py`) facades share: resolving `model`,
the chat template, one generation's engine requests and the choices they fill, each choice's text
(detokenised incrementally, cut at the first stop string), and the stream of tokens from the sampling
thread to the event loop. Each facade only reads its body and writes its own JSON and events.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute

from eztinker.api import tinker_wire as wire
from eztinker.api.deps import while_connected
from eztinker.api.reasoning import Thought, ThoughtReader, opens_thinking, thinking_budget
from eztinker.api.structured import Answer
from eztinker.api.tool_calls import CallReader, ToolCall, ToolUse, template_source
from eztinker.engine.errors import ComputeError, InvalidInputError
from eztinker.engine.sampler import SampleRequest, TokenCallback
from eztinker.engine.types import ImageChunk, SamplingParams, TopLogprobs
from eztinker.scheduler import Job
from eztinker.service import ModelTarget, SampleSpec, Service
from eztinker.service.results import SampleOutput

# --- errors in the facade's own shape (see `eztinker.api.errors`) ---------------------------------------


class ErrorShapedRoute(APIRoute):
    """A route whose every exception (validation and auth included) is answered by `answer`, a subclass's
    error object (OpenAI's, Anthropic's)."""

    @staticmethod
    def answer(exc: BaseException) -> Response:
        raise NotImplementedError

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        answer = self.answer

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return answer(exc)

        return handle


# --- the model and the prompt -------------------------------------------------------------------------


def resolve_model(service: Service, model: str, owner: str | None) -> ModelTarget:
    """What `model` names: a `tinker://<run>/sampler_weights|weights/<name>` checkpoint (loaded as a sampler
    snapshot on first use), else a base model, a run id or a sampler snapshot id; or, as hosted Tinker
    takes it, `<base model>;<checkpoint path>`, the checkpoint on the base it was trained on. Blocking: a
    checkpoint may be loaded."""
    if ";" in model:
        base, _, path = model.partition(";")
        if not path.startswith("tinker://"):
            raise InvalidInputError(
                "model", f"{model!r} is not <base model>;tinker://<run>/sampler_weights/<name>"
            )
        target = resolve_model(service, path, owner)
        if base != target.base_model:
            raise InvalidInputError(
                "model",
                f"{path} was trained on {target.base_model!r}, not {base!r}: name that base model, or the "
                "checkpoint alone",
            )
        return target
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


def require_chat_template(tokenizer: Any, base_model: str, field: str, instead: str) -> None:
    """A 400 naming `field` when the base model's tokenizer has no chat template (`instead`: what to use)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInputError(field, f"the tokenizer of {base_model!r} has no chat template: {instead}")


@dataclass(frozen=True)
class TemplateOptions:
    """How a chat is rendered beyond its messages and tools (vLLM's extras on the OpenAI route):
    `variables` for the template (e.g. Qwen3's `enable_thinking`), and whether the prompt opens the
    assistant's turn (`generation_prompt`) or continues the chat's final assistant message
    (`continue_final`, a prefill)."""

    variables: dict[str, Any] = field(default_factory=dict)
    generation_prompt: bool = True
    continue_final: bool = False


# apply_chat_template's own arguments: never template variables.
_RENDER_ARGUMENTS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)


def template_variables(
    tokenizer: Any, base_model: str, variables: dict[str, Any], field_prefix: str = ""
) -> dict[str, Any]:
    """`variables` checked against the chat template: a 400 naming `<field_prefix><key>` for one the
    template never reads (it would change nothing, silently) or one that is a rendering argument."""
    source = template_source(tokenizer, with_tools=True)
    for key in variables:
        if key in _RENDER_ARGUMENTS:
            raise InvalidInputError(
                f"{field_prefix}{key}", "is an argument of the rendering, not a template variable"
            )
        if not _reads(source, key):
            raise InvalidInputError(
                f"{field_prefix}{key}", f"the chat template of {base_model!r} does not read it"
            )
    return variables


def reads_variable(tokenizer: Any, name: str) -> bool:
    """Whether the chat template reads the variable `name` (e.g. Qwen3's `enable_thinking`)."""
    return _reads(template_source(tokenizer, with_tools=True), name)


def _reads(source: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", source) is not None


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: ToolUse | None = None,
    options: TemplateOptions | None = None,
    *,
    tokenize: bool = True,
) -> Any:
    """The messages (and tools) through the tokenizer's chat template, ready for the assistant's turn
    (or continuing its final message, per `options`): token ids, or the text with `tokenize=False`. A
    template that refuses them (`raise_exception`, e.g. roles that do not alternate) is a 400 naming
    `messages`, with the template's own words."""
    import jinja2

    options = options or TemplateOptions()
    schemas = tools.schemas if tools is not None else None
    try:
        out = tokenizer.apply_chat_template(
            messages,
            tools=schemas,
            add_generation_prompt=options.generation_prompt and not options.continue_final,
            continue_final_message=options.continue_final,
            tokenize=tokenize,
            **options.variables,
        )
    except (jinja2.TemplateError, ValueError) as exc:
        raise InvalidInputError("messages", f"the model's chat template refused them: {exc}") from None
    if not tokenize:
        return out
    if isinstance(out, dict) or hasattr(out, "keys"):  # a BatchEncoding in newer transformers
        out = out["input_ids"]
    return [int(t) for t in out]


_CHUNK_FIELD = re.compile(r"^chunks\[([0-9]+)\](.*)$")


@dataclass
class PromptImages:
    """A chat's images in the order met, each with the request field it came from; `mark` gives the text
    that stands for it in its message, which the template renders like any text. The marks carry a
    random nonce of this chat's, so text a client sends that looks like one is only text."""

    found: list[tuple[str, ImageChunk, Mapping[str, str]]] = field(default_factory=list)
    nonce: str = field(default_factory=lambda: secrets.token_hex(8))

    def mark(self, where: str, image: ImageChunk, fields: Mapping[str, str] | None = None) -> str:
        """`fields`: the request's field, under `where`, of each of the image chunk's own (`.data`,
        `.format`), which the engine's errors name and no request has."""
        self.found.append((where, image, fields or {}))
        return f"\ufff9eztinker-image-{self.nonce}-{len(self.found) - 1}\ufffb"

    def split(self, rendered: str) -> list[str]:
        """The rendered chat as text, image index, text, ... (around this chat's marks)."""
        return re.split(f"\ufff9eztinker-image-{self.nonce}-([0-9]+)\ufffb", rendered)


def render_with_images(
    service: Service,
    target: ModelTarget,
    tokenizer: Any,
    messages: list[dict[str, Any]],
    images: PromptImages,
    tools: ToolUse | None = None,
    options: TemplateOptions | None = None,
) -> tuple[list[int], tuple[ImageChunk, ...]]:
    """The messages through the chat template, with their images: (prompt tokens, the images). The text
    between image marks is tokenized; the engine puts each image in as the model's vision start /
    placeholder run / end tokens. A bad image is a 400 naming the part it came from."""
    if not images.found:
        return render_chat(tokenizer, messages, tools, options), ()
    rendered = render_chat(tokenizer, messages, tools, options, tokenize=False)
    pieces = images.split(rendered)  # text, image index, text, ...
    _require_each_image_once(images, [int(i) for i in pieces[1::2]], target.base_model)
    chunks: list[wire.Chunk] = []
    names: list[tuple[str, Mapping[str, str]]] = []
    for k, piece in enumerate(pieces):
        if k % 2:
            name, image, fields = images.found[int(piece)]
            chunks.append(image)
            names.append((name, fields))
        else:
            chunks.append([int(t) for t in tokenizer(piece, add_special_tokens=False)["input_ids"]])
            names.append(("messages", {}))
    try:
        tokens, found = service.sampling.expand_chunks(target.base_model, chunks, "chunks", frame=True)
    except InvalidInputError as exc:  # name the message part's field, not the internal chunk's
        match = _CHUNK_FIELD.match(exc.field)
        if match is None:
            raise
        name, fields = names[int(match.group(1))]
        rest = match.group(2)
        raise InvalidInputError(name + fields.get(rest, rest), exc.message) from None
    return tokens, found


def _require_each_image_once(images: PromptImages, rendered: list[int], base_model: str) -> None:
    """A 400 naming an image's part when the chat template dropped it (e.g. it leaves out that role's
    content, or escapes it as JSON) or wrote it twice: the model would silently see other images than
    the request's."""
    for index, (where, _, _) in enumerate(images.found):
        count = rendered.count(index)
        if count != 1:
            how = "leaves it out" if count == 0 else f"writes it {count} times"
            raise InvalidInputError(
                where, f"the chat template of {base_model!r} {how}: send the image in a user message"
            )


def chat_template_ids(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: ToolUse | None = None,
    options: TemplateOptions | None = None,
) -> list[int]:
    """The messages (and tools) through the tokenizer's chat template, as token ids."""
    return render_chat(tokenizer, messages, tools, options)


# --- text of a choice: detokenized incrementally, cut at the first stop string --------------------------


Piece = str | Thought | ToolCall  # of a choice's answer: text, thinking, a tool call


@dataclass
class Choice:
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
    thoughts: ThoughtReader | None = None  # a reasoning model's: splits its thinking from its answer
    reader: CallReader | None = None  # with tools: splits the answer into text and calls

    @property
    def calls(self) -> list[ToolCall]:
        return self.reader.calls if self.reader is not None else []

    def pieces(self, final: bool) -> tuple[list[Piece], list[int]]:
        """`take`'s new text as thinking, answer text and tool calls, in order (the text alone for a
        model that does not reason, without tools)."""
        text, indices = self.take(final)
        pieces: list[Piece] = [text] if text else []
        if self.thoughts is not None:
            pieces = list(self.thoughts.feed(text, final))
        if self.reader is None:
            return pieces, indices
        out: list[Piece] = []
        for piece in pieces:
            out += self.reader.feed(piece, final=False) if isinstance(piece, str) else [piece]
        if final:
            out += self.reader.feed("", final=True)
        return out, indices

    def add(self, token: int, logprob: float, topk: TopLogprobs | None) -> None:
        if not self.stopped:
            self.tokens.append(token)
            self.logprobs.append(logprob)
            self.topk.append(topk)

    def text(self) -> str:
        return decode(self.tokenizer, self.tokens)

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
            if done < len(self.tokens) and len(decode(self.tokenizer, self.tokens[:done])) < end:
                done += 1
        else:
            done = len(self.tokens) if final else self._tokens_within(end)
        indices = list(range(self.released_tokens, max(done, self.released_tokens)))
        self.released_tokens = max(done, self.released_tokens)
        return new, indices

    def _tokens_within(self, chars: int) -> int:
        """How many leading tokens decode to text no longer than `chars` characters."""
        n = self.released_tokens
        while n < len(self.tokens) and len(decode(self.tokenizer, self.tokens[: n + 1])) <= chars:
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


def decode(tokenizer: Any, tokens: list[int]) -> str:
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return text if isinstance(text, str) else "".join(text)


def token_text(tokenizer: Any, token: int) -> str:
    return decode(tokenizer, [token])


# --- one generation: prompts, engine requests, and the choices they produce --------------------------


@dataclass
class Generation:
    """A route's prompts on one model, each sampled `n` times; choice index = prompt · n + sample."""

    target: ModelTarget
    tokenizer: Any
    prompts: list[list[int]]
    params: SamplingParams
    n: int
    top_logprobs: int
    stops: list[str]
    images: list[tuple[ImageChunk, ...]] | None = None  # each prompt's images (vision-language models)
    tools: ToolUse | None = None  # the tools the model may call (chat routes)
    reasoning: bool = False  # split a reasoning model's thinking from its answer (chat routes)
    field_names: dict[str, str] = field(default_factory=dict)  # engine's sampling parameter -> the route's
    answer: Answer | None = None  # what the answer must be (structured output, a forced tool call)
    thinking_budget: int | None = None  # the tokens a reasoning model's thinking may take
    choices: list[Choice] = field(default_factory=list)
    thinking: list[bool | None] = field(default_factory=list)  # each prompt's `opens_thinking`

    def __post_init__(self) -> None:
        self.thinking = opens = [
            opens_thinking(self.tokenizer, p) if self.reasoning else None for p in self.prompts
        ]
        self.choices = [
            Choice(
                self.tokenizer,
                self.stops,
                thoughts=None
                if opens[i // self.n] is None
                else ThoughtReader(inside=bool(opens[i // self.n])),
                reader=None if self.tools is None else self.tools.reader(),
            )
            for i in range(len(self.prompts) * self.n)
        ]

    def requests(
        self, on_token: TokenCallback | None, cancelled: Callable[[], bool] | None = None
    ) -> list[SampleRequest]:
        return [
            SampleRequest(
                prompt=prompt,
                params=self._params(self.thinking[i]),
                num_samples=self.n,
                topk_sample_logprobs=self.top_logprobs,
                stop_at_eos=True,
                on_token=None if on_token is None else _shifted(on_token, i * self.n),
                cancelled=cancelled,
                images=self.images[i] if self.images else (),
            )
            for i, prompt in enumerate(self.prompts)
        ]

    def _params(self, thinking: bool | None) -> SamplingParams:
        """The sampling parameters of a prompt whose answer starts inside the thinking, may open it,
        or has none (`opens_thinking`): its grammar and thinking budget placed after / on the thinking."""
        params = self.params
        if self.answer is not None:
            params = replace(params, grammar=self.answer.grammar(thinking))
        if self.thinking_budget is not None and thinking is not None:
            params = replace(params, budget=thinking_budget(self.thinking_budget, opened=thinking))
        return params

    def submit(
        self,
        service: Service,
        owner: str | None,
        prompt_field: str,
        on_token: TokenCallback | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Job:
        """Sample the requests through the service, checked before the job is queued. Errors name the
        route's own fields: `prompt_field` for the prompt, `field_names` (engine name -> route's) for the
        sampling parameters, which the engine names `sampling_params.<name>`."""
        spec = SampleSpec(
            self.target, self.requests(on_token, cancelled), check_now=True, prompt_field=prompt_field
        )
        try:
            return service.sampling.sample(spec, owner)
        except InvalidInputError as exc:
            match = _ENGINE_FIELD.match(exc.field)
            if match is None:
                raise
            index, params, name, rest = match.groups()
            if params and name == "grammar" and self.answer is not None:
                name = self.answer.field  # the request field that asked for the answer's shape
            elif params:
                name = self.field_names.get(name, name)
            elif name == "prompt":
                name = prompt_field if index is None else f"{prompt_field}[{index}]"
            else:
                raise
            raise InvalidInputError(name + rest, exc.message) from None

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)

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


# An engine's field: `[requests[i].]sampling_params.<name><rest>` or `[requests[i].]prompt<rest>`.
_ENGINE_FIELD = re.compile(r"^(?:requests\[([0-9]+)\]\.)?(sampling_params\.)?([a-z_]+)(.*)$")


def _shifted(on_token: TokenCallback, offset: int) -> TokenCallback:
    def call(sample: int, token: int, logprob: float, topk: TopLogprobs | None, done: bool) -> None:
        on_token(offset + sample, token, logprob, topk, done)

    return call


# --- the job: a whole answer, or a stream of tokens -------------------------------------------------------


def job_result(job: Job) -> SampleOutput:
    """A finished sampling job's output; its failure raised as the engine error it was."""
    if job.status == "failed":
        if job.error_category == "server":
            raise ComputeError(job.error or "sampling failed")
        raise InvalidInputError("request", job.error or "sampling failed")
    assert isinstance(job.result, SampleOutput)
    return job.result


async def whole_result(request: Request, submit: Callable[[], Job]) -> SampleOutput | None:
    """Submit the job, wait for it and return its output; None if the client hung up (the job runs on)."""
    job = await run_in_threadpool(submit)
    if not await while_connected(request, job.wait(None)):
        return None
    return job_result(job)


Token = tuple[int, int, float, TopLogprobs | None, bool]  # (sample, token, logprob, top-k, finished?)


class TokenStream:
    """The tokens of a streamed job, from the sampling thread into the event loop, in order.

    `await stream.start(submit)` submits the job with `on_token` and `cancelled` (set once the client
    hangs up, so generation stops there); `async for token in stream` yields each token until the job is
    done; `stream.response(events)` answers the route with the facade's server-sent events.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Token | None] = asyncio.Queue()
        self._hung_up = threading.Event()

    def on_token(self, sample: int, token: int, logprob: float, topk: TopLogprobs | None, done: bool) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (sample, token, logprob, topk, done))

    async def start(self, submit: Callable[[TokenCallback, Callable[[], bool]], Job]) -> Job:
        job = await run_in_threadpool(submit, self.on_token, self._hung_up.is_set)
        # Set after the last token's callback on the same thread, so it reaches the queue after every token.
        job.future.add_done_callback(lambda _: self._loop.call_soon_threadsafe(self._queue.put_nowait, None))
        return job

    async def __aiter__(self) -> AsyncIterator[Token]:
        while (token := await self._queue.get()) is not None:
            yield token

    def response(self, events: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(self._until_hung_up(events), media_type="text/event-stream")

    async def _until_hung_up(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """The stream's events; if the client leaves before the last one, generation is cancelled."""
        finished = False
        try:
            async for event in events:
                yield event
            finished = True
        finally:
            if not finished:
                self._hung_up.set()
