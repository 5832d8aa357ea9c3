"""The request body of OpenAI's Responses API (`eztinker.api.responses`) and its translation into the
chat request it means: `instructions` and `input` items as messages, function tools, `text.format` as
`response_format`, `reasoning.effort` as `reasoning_effort`; and the chat request's error fields named as
this request's own (`request_field`)."""

from __future__ import annotations

import re
from typing import Any

import pydantic
from pydantic import Field

from eztinker.api.not_served import RefusesNotServed
from eztinker.api.openai_bodies import MAX_TOP_LOGPROBS, ChatCompletionRequest
from eztinker.engine.errors import InvalidInputError

_STATELESS = "this server stores no responses: send the whole conversation as input"
NOT_SERVED: dict[str, tuple[tuple[Any, ...], str]] = {
    "previous_response_id": ((None,), f"previous_response_id is not served: {_STATELESS}"),
    "conversation": ((None,), f"conversations are not served: {_STATELESS}"),
    "background": ((None, False), "background responses are not served: stream the response instead"),
    "prompt": ((None,), "prompt templates are not served: send instructions and input"),
    "max_tool_calls": ((None,), "max_tool_calls is not served: parallel_tool_calls: false keeps one call"),
    "truncation": ((None, "disabled"), "truncation is not served: the input must fit the model's context"),
    # vLLM's chat extras reach the chat request, but a response is one answer (the API has no `n`).
    "n": ((None, 1), "n is not served on /v1/responses: a response is one answer; send one request each"),
}
LOGPROBS = "message.output_text.logprobs"  # the include that asks for the answer's token logprobs
# reasoning.encrypted_content is asked by stateless clients; the thinking is plain, so it changes nothing.
_INCLUDES = frozenset({"reasoning.encrypted_content", LOGPROBS})


class ResponsesRequest(RefusesNotServed):
    NOT_SERVED = NOT_SERVED

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    metadata: dict[str, str] | None = None  # the client's own: echoed in the response, as OpenAI's
    stream: bool = False
    stream_options: dict[str, Any] | None = None  # include_obfuscation: no padding is sent either way

    @property
    def includes_logprobs(self) -> bool:
        """Whether the answer's text carries its tokens' logprobs: asked by `include`, as OpenAI's (whose
        `top_logprobs` alone leaves `logprobs` empty)."""
        return LOGPROBS in (self.include or ())

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
        if self.includes_logprobs:
            body["logprobs"], body["top_logprobs"] = True, self.top_logprobs
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
            raise InvalidInputError(request_field(field, wheres), error["msg"]) from None


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
            for key in ("call_id", "name", "arguments"):  # named here, not as the chat message's fields
                if not isinstance(item.get(key), str):
                    raise InvalidInputError(
                        f"{where}.{key}", "is missing: a function_call item needs a string"
                    )
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
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
            if not isinstance(item.get("call_id"), str) or not item["call_id"]:
                raise InvalidInputError(f"{where}.call_id", "is missing: the call_id of the call it answers")
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
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidInputError(f"{where}[{j}].text" if index else f"{where}.text", "must be a string")
        texts.append(text)
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


def request_field(field: str, wheres: list[str]) -> str:
    """The field of this request that a chat request's `field` stands for (`wheres`: each message's)."""
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
