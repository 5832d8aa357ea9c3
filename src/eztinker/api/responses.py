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
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pydantic
from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import Field

from eztinker.api.chat import Generation, Piece, TokenStream, job_result, whole_result
from eztinker.api.deps import OwnerDep, ServiceDep, get_owner
from eztinker.api.not_served import RefusesNotServed
from eztinker.api.openai import OpenAIRoute, chat_generation
from eztinker.api.openai_bodies import ChatCompletionRequest
from eztinker.api.reasoning import Thought
from eztinker.api.tool_calls import ToolCall
from eztinker.engine.errors import InvalidInputError
from eztinker.scheduler import Job

router = APIRouter(tags=["openai"], route_class=OpenAIRoute, dependencies=[Depends(get_owner)])

_STATELESS = "this server stores no responses: send the whole conversation as input"
NOT_SERVED: dict[str, tuple[tuple[Any, ...], str]] = {
    "previous_response_id": ((None,), f"previous_response_id is not served: {_STATELESS}"),
    "conversation": ((None,), f"conversations are not served: {_STATELESS}"),
    "background": ((None, False), "background responses are not served: stream the response instead"),
    "prompt": ((None,), "prompt templates are not served: send instructions and input"),
    "max_tool_calls": ((None,), "max_tool_calls is not served: parallel_tool_calls: false keeps one call"),
    "top_logprobs": ((None, 0), "log-probabilities are not served here: use /v1/chat/completions"),
    "truncation": ((None, "disabled"), "truncation is not served: the input must fit the model's context"),
    # vLLM's chat extras reach the chat request, but a response is one answer (the API has no `n`).
    "n": ((None, 1), "n is not served on /v1/responses: a response is one answer; send one request each"),
}
_INCLUDES = frozenset({"reasoning.encrypted_content"})  # asked by stateless clients; the thinking is plain


class ResponsesRequest(RefusesNotServed):
    NOT_SERVED = NOT_SERVED

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    stream: bool = False

    def chat(self) -> tuple[ChatCompletionRequest, list[str]]:
        """The chat request this one means, and the request field of each of its messages."""
        for i, name in enumerate(self.include or ()):
            if name not in _INCLUDES:
                raise InvalidInputError(f"include[{i}]", f"{name!r} is not served")
        messages, wheres = _messages(self.instructions, self.input)
        if not messages:
            raise InvalidInputError("input", "holds no message: send at least one (a string or a message)")
        body: dict[str, Any] = {
            **(
                self.model_extra or {}
            ),  # vLLM's extras (seed, top_k, guided_*...): served or refused as there
            "model": self.model,
            "messages": messages,
            "max_completion_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "parallel_tool_calls": self.parallel_tool_calls,
        }
        if self.tools:
            body["tools"] = [_chat_tool(tool, f"tools[{i}]") for i, tool in enumerate(self.tools)]
        if self.tool_choice is not None:
            body["tool_choice"] = _chat_tool_choice(self.tool_choice)
        text = self.text or {}
        if text.get("verbosity") is not None:  # as the chat route refuses its `verbosity`
            raise InvalidInputError(
                "text.verbosity", "is not served: say how long an answer you want in the instructions"
            )
        if text.get("format") is not None:
            body["response_format"] = _response_format(text["format"])
        effort = (self.reasoning or {}).get("effort")
        if effort is not None:
            body["reasoning_effort"] = effort
        try:
            return ChatCompletionRequest.model_validate(body), wheres
        except pydantic.ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in error["loc"]).replace(
                ".[", "["
            )
            raise InvalidInputError(_field(field, wheres), error["msg"]) from None


def _messages(
    instructions: str | None, items: str | list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[str]]:
    """`instructions` and `input` as chat messages: a `function_call` joins the assistant message just
    before it (or starts one), a `function_call_output` is a `tool` message, a `reasoning` item's text
    is the next assistant message's `reasoning_content`."""
    messages: list[dict[str, Any]] = []
    wheres: list[str] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
        wheres.append("instructions")
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}], [*wheres, "input"]
    thinking: str | None = None
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidInputError(
                    f"{where}.role", f"{role!r} is not user, assistant, system or developer"
                )
            message: dict[str, Any] = {"role": "system" if role == "developer" else role}
            content = item.get("content")
            where_content = f"{where}.content"
            message["content"] = (
                _parts(content, where_content) if role == "user" else _text(content, where_content)
            )
            if role == "assistant" and thinking is not None:
                message["reasoning_content"], thinking = thinking, None
            messages.append(message)
            wheres.append(where)
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and wheres[-1].startswith("input"):
                last.setdefault("tool_calls", []).append(call)
            else:
                message = {"role": "assistant", "content": "", "tool_calls": [call]}
                if thinking is not None:
                    message["reasoning_content"], thinking = thinking, None
                messages.append(message)
                wheres.append(where)
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else _text(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": content})
            wheres.append(where)
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            thinking = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
        else:
            raise InvalidInputError(f"{where}.type", f"{kind!r} items are not served on /v1/responses")
    return messages, wheres


def _parts(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A user message's content as chat content: its text, or its text and image parts in order
    (`input_image` with a data URL, which the chat route checks and the model's processor reads)."""
    if not isinstance(content, list) or not any(
        isinstance(p, dict) and p.get("type") == "input_image" for p in content
    ):
        return _text(content, where)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") == "input_image":
            if part.get("image_url") is None:
                raise InvalidInputError(
                    f"{where}[{j}]", "an image needs image_url (a data URL): this server keeps no files"
                )
            image = {"url": part["image_url"], **({"detail": part["detail"]} if part.get("detail") else {})}
            parts.append({"type": "image_url", "image_url": image})
        else:
            parts.append({"type": "text", "text": _text([part], f"{where}[{j}]", index=False)})
    return parts


def _text(content: Any, where: str, *, index: bool = True) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidInputError(where, "must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            served = "text and (in user messages) input_image parts are" if index else "text parts are"
            raise InvalidInputError(
                f"{where}[{j}]" if index else where, f"{kind!r} parts are not served: {served}"
            )
        texts.append(str(part.get("text", "")))
    return "".join(texts)


def _chat_tool(tool: dict[str, Any], where: str) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise InvalidInputError(
            f"{where}.type", f"{tool.get('type')!r} tools are not served: define a function"
        )
    function = {
        k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None
    }
    return {"type": "function", "function": function}


_FUNCTION_CHOICE = '{"type": "function", "name": ...}'


def _chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    """This request's `tool_choice` as the chat route's (this API names a function at the top level, not
    under `function`); a malformed one is refused here, in this API's shapes, naming its field."""
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidInputError("tool_choice", f"{choice!r} is not none, auto or required")
        return choice
    if choice.get("type") == "function":
        return {"type": "function", "function": {"name": _function_name(choice, "tool_choice")}}
    if choice.get("type") == "allowed_tools":
        refs = choice.get("tools")
        if not isinstance(refs, list) or not refs:
            raise InvalidInputError("tool_choice.tools", f"must be a non-empty list of {_FUNCTION_CHOICE}")
        if choice.get("mode") not in ("auto", "required"):
            raise InvalidInputError("tool_choice.mode", "must be auto or required")
        tools = [
            {"type": "function", "function": {"name": _function_name(ref, f"tool_choice.tools[{i}]")}}
            for i, ref in enumerate(refs)
        ]
        return {"type": "allowed_tools", "allowed_tools": {"mode": choice.get("mode"), "tools": tools}}
    raise InvalidInputError(
        "tool_choice",
        f"{choice!r} is not served: choose none, auto, required, {_FUNCTION_CHOICE} or allowed_tools",
    )


def _function_name(ref: Any, where: str) -> str:
    """The name in a reference to a function tool, `{"type": "function", "name": ...}`."""
    if not isinstance(ref, dict) or ref.get("type") != "function":
        raise InvalidInputError(where, f"must be {_FUNCTION_CHOICE}")
    name = ref.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"{where}.name", f"is missing: send {_FUNCTION_CHOICE}")
    return name


def _response_format(text_format: Any) -> dict[str, Any]:
    if not isinstance(text_format, dict):
        raise InvalidInputError(
            "text.format",
            'must be an object: {"type": "text"}, {"type": "json_object"} or '
            '{"type": "json_schema", "name": ..., "schema": {...}}',
        )
    if text_format.get("type") == "json_schema":
        spec = {k: text_format[k] for k in ("name", "schema", "strict") if k in text_format}
        return {"type": "json_schema", "json_schema": spec}
    return text_format


# Chat fields -> this request's (a chat error names the field the client sent here).
_RENAMED = (
    (re.compile(r"^tools\[(\d+)\]\.function\."), r"tools[\1]."),
    (re.compile(r"^tool_choice\.(allowed_tools\.)?(tools\[\d+\]\.)?function\.name"), r"tool_choice.\2name"),
    (re.compile(r"^response_format(\.json_schema)?"), "text.format"),
    (re.compile(r"^reasoning_effort"), "reasoning.effort"),
    (re.compile(r"^max_completion_tokens"), "max_output_tokens"),
)


def _field(field: str, wheres: list[str]) -> str:
    match = re.match(r"^messages\[(\d+)\](.*)$", field)
    if match is not None:
        index, rest = int(match.group(1)), match.group(2)
        rest = re.sub(r"^(\.content\[\d+\]\.image_url)\.url", r"\1", rest)  # a string here, not {"url"}
        return (wheres[index] if index < len(wheres) else "input") + rest
    if field == "messages":  # the chat as a whole (e.g. the template refused it)
        return "input"
    for pattern, replacement in _RENAMED:
        field = pattern.sub(replacement, field)
    return field


# --- the route --------------------------------------------------------------------------------------------


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
        raise InvalidInputError(_field(exc.field, wheres), exc.message) from None
    answer = _Answer(body, generation)

    def submit(*args: Any) -> Any:
        try:
            return generation.submit(service, owner, "input", *args)
        except InvalidInputError as exc:
            raise InvalidInputError(_field(exc.field, wheres), exc.message) from None

    if not body.stream:
        result = await whole_result(request, submit)
        if result is None:  # the client hung up; the job runs on
            return Response(status_code=499)
        (reason,) = generation.fill(result)
        pieces, _ = generation.choices[0].pieces(final=True)
        for piece in pieces:
            answer.add(piece)
        return answer.response(reason)
    stream = TokenStream()
    job = await stream.start(submit)
    return stream.response(_events(answer, generation, stream, job))


class _Answer:
    """The output items of a response as its pieces arrive (thinking, text, calls, in order), and the
    stream events that build them (`events`: each piece's, in order)."""

    def __init__(self, body: ResponsesRequest, generation: Generation) -> None:
        self.body, self.generation = body, generation
        self.id = "resp_" + uuid.uuid4().hex
        self.created = int(time.time())
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # a reasoning or message item still growing
        self.events: list[dict[str, Any]] = []

    def add(self, piece: Piece) -> None:
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
            self._event("response.output_item.added", output_index=index, item={**item, "arguments": ""})
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
            return
        kind = "reasoning" if isinstance(piece, Thought) else "message"
        text = piece.text if isinstance(piece, Thought) else piece
        if not text or (kind == "message" and self.open is None and not text.strip() and self._after_call()):
            return
        if self.open is None or self.open["type"] != kind:
            self._close()
            self._start(kind)
        assert self.open is not None
        index, item_id = len(self.items) - 1, self.open["id"]
        part = self.open["content"][0]
        part["text"] += text
        delta = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        self._event(delta, output_index=index, item_id=item_id, content_index=0, delta=text, **extra)

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
            part={**part},
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
            done, extra = "response.output_text.done", {"logprobs": []}
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
            "max_output_tokens": body.max_output_tokens,
            "text": body.text or {"format": {"type": "text"}},
            "reasoning": body.reasoning,
            "store": False,
            "metadata": {},
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
        pieces, _ = choice.pieces(final=done)
        for piece in pieces:
            answer.add(piece)
        for payload in answer.take_events():
            yield event(payload)
    if job.status == "failed":
        yield event({"type": "error", "code": job.error_category, "message": job.error, "param": None})
        return
    (reason,) = generation.fill(job_result(job))
    pieces, _ = choice.pieces(final=True)
    for piece in pieces:
        answer.add(piece)
    final = answer.response(reason)
    for payload in answer.take_events():
        yield event(payload)
    done = "response.completed" if final["status"] == "completed" else "response.incomplete"
    yield event({"type": done, "response": final})
