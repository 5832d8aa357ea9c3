"""Tool calling on the compatible APIs (OpenAI, Anthropic): the tools go to the model through its chat
template, and the calls it writes are read back out of its text.

The chat template decides how a model sees tools and how it writes a call, so this server renders with
the template (transformers' `apply_chat_template(tools=...)`, tools as OpenAI-style function schemas)
and reads the call format that template teaches, found in the template's own source:

- `json` (Qwen2.5, Qwen3, Hermes; vLLM's `hermes` parser):
  `<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>`
- `xml` (Qwen3-Coder, Qwen3.5; vLLM's `qwen3_coder` parser):
  `<tool_call>\\n<function=get_weather>\\n<parameter=city>\\nParis\\n</parameter>\\n</function>\\n</tool_call>`
  (a value is JSON-decoded unless the tool's schema types it as a string, as that parser does).

A template that renders no tools, or writes calls in another format, is a 400 when tools are sent, never
a prompt that silently drops them. A block that does not parse stays in the text, as the model wrote it.

`CallReader` splits a choice's text, as it is released, into text and calls: both routes read whole
answers and streams through it, so a streamed answer is the whole one in pieces.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from eztinker.engine.errors import InvalidInputError

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
CallFormat = Literal["json", "xml"]


@dataclass(frozen=True)
class ToolCall:
    """One call the model wrote: its id (made here, in the facade's style), name and decoded arguments."""

    id: str
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass(frozen=True)
class ToolUse:
    """A request's tools as the chat template takes them, and how to read the model's calls.

    `schemas`: OpenAI-style `{"type": "function", "function": {name, description, parameters}}`;
    `max_calls`: 1 when the client asked for no parallel calls (later ones are dropped), else None;
    `id_prefix`: `call_` (OpenAI) or `toolu_` (Anthropic); `parameters_field`: the request field of tool
    `i`'s parameters schema, as `parameters_field.format(i)` (an error in a schema names it).
    """

    schemas: list[dict[str, Any]]
    format: CallFormat
    id_prefix: str
    max_calls: int | None = None
    parameters_field: str = "tools[{}].function.parameters"

    def reader(self) -> CallReader:
        return CallReader(self)

    def parameter_types(self, name: str) -> dict[str, Any]:
        for schema in self.schemas:
            function = schema.get("function", {})
            if function.get("name") == name:
                properties = (function.get("parameters") or {}).get("properties") or {}
                return {key: (spec or {}).get("type") for key, spec in properties.items()}
        return {}


def template_source(tokenizer: Any, with_tools: bool) -> str:
    """The chat template transformers renders with (of several named ones, `tool_use` when tools are
    sent, else `default`); "" without one."""
    try:
        source = tokenizer.get_chat_template(tools=[{}] if with_tools else None)
    except (AttributeError, ValueError, TypeError):  # no template (or not a transformers tokenizer)
        source = getattr(tokenizer, "chat_template", None)
    return source if isinstance(source, str) else ""


def call_format(tokenizer: Any, base_model: str, field_name: str) -> CallFormat:
    """The call format `tokenizer`'s chat template teaches; a 400 naming `field_name` if it renders no
    tools or teaches a format this server does not read."""
    source = template_source(tokenizer, with_tools=True)
    if "tools" not in source:
        raise InvalidInputError(
            field_name,
            f"the chat template of {base_model!r} does not render tools: describe them in the prompt",
        )
    if "<function=" in source:
        return "xml"
    if CALL_START in source:
        return "json"
    raise InvalidInputError(
        field_name,
        f"the chat template of {base_model!r} writes tool calls in a format this server does not read "
        f"(it reads {CALL_START} blocks, as Qwen2.5, Qwen3, Qwen3.5 and Hermes templates write them)",
    )


def complete_history(
    tokenizer: Any, base_model: str, messages: list[dict[str, Any]], wheres: list[str]
) -> None:
    """Ready a chat's tool history for the template, in place: each `tool` result gets the `name` of the
    call it answers (templates that print it read it there). A 400 naming the request's message
    (`wheres[i]` for `messages[i]`) when the template would drop its tool calls (it never reads them)."""
    names: dict[str, str] = {}
    renders_calls = "tool_calls" in template_source(tokenizer, with_tools=True)
    for i, message in enumerate(messages):
        for call in message.get("tool_calls") or ():
            if not renders_calls:
                raise InvalidInputError(
                    wheres[i], f"the chat template of {base_model!r} renders no tool calls"
                )
            names[call["id"]] = call["function"]["name"]
        if message["role"] == "tool" and message.get("tool_call_id") in names:
            message.setdefault("name", names[message["tool_call_id"]])


# --- reading calls out of the text ----------------------------------------------------------------------


def parse_call(body: str, tools: ToolUse) -> tuple[str, dict[str, Any]] | None:
    """(name, arguments) of one block's body (between the tags), or None if it is not a well-formed call."""
    return _parse_xml(body, tools) if tools.format == "xml" else _parse_json(body)


def _parse_json(body: str) -> tuple[str, dict[str, Any]] | None:
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return call["name"], arguments


_FUNCTION = re.compile(r"^\s*<function=([^>\n]+)>(.*?)</function>\s*$", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)


def _parse_xml(body: str, tools: ToolUse) -> tuple[str, dict[str, Any]] | None:
    match = _FUNCTION.match(body)
    if match is None:
        return None
    name, inner = match.group(1).strip(), match.group(2)
    types = tools.parameter_types(name)
    arguments: dict[str, Any] = {}
    for key, raw in _PARAMETER.findall(inner):
        value = raw.removeprefix("\n").removesuffix("\n")  # the format's own line breaks
        arguments[key.strip()] = _typed(value, types.get(key.strip()))
    if _PARAMETER.sub("", inner).strip():  # text outside the parameters: not a well-formed call
        return None
    return name, arguments


def _typed(value: str, schema_type: Any) -> Any:
    """A parameter's value: as written when the schema says string (or says nothing of a text that is not
    JSON), else JSON-decoded (numbers, booleans, objects, arrays, null)."""
    if schema_type == "string":
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


@dataclass
class CallReader:
    """One choice's text, fed as it is released, split into text and calls in the order written.

    Text that might begin a `<tool_call>` tag is held until it can tell; a block is held until its
    closing tag (or the end, for one cut off by the end of the answer). Whitespace between or after calls
    is the format's, not content. With `max_calls` reached, the rest of the answer is dropped.
    """

    tools: ToolUse
    calls: list[ToolCall] = field(default_factory=list)
    _held: str = ""
    _in_call: bool = False
    _gap: str = ""  # whitespace right after a call, released only if text follows it
    _text_since_call: bool = False
    _scanned: int = 0  # how much of a held block is known to hold no closing tag
    _done: bool = False

    def feed(self, text: str, final: bool) -> list[str | ToolCall]:
        """The text and calls that `text` (the next released text) completes; all that is left when `final`."""
        if self._done:
            return []
        self._held += text
        out: list[str | ToolCall] = []
        while not self._done:
            if self._in_call:
                end = self._held.find(CALL_END, self._scanned)  # a long block is not searched again
                if end < 0 and not final:
                    self._scanned = max(0, len(self._held) - len(CALL_END) + 1)
                    break
                self._scanned = 0
                body = self._held if end < 0 else self._held[:end]
                self._held = "" if end < 0 else self._held[end + len(CALL_END) :]
                self._in_call = False
                parsed = parse_call(body, self.tools)
                if parsed is None:  # not a call: the model's text, tags and all
                    self._text(out, CALL_START + body + ("" if end < 0 else CALL_END))
                else:
                    self._call(out, *parsed)
                continue
            start = self._held.find(CALL_START)
            if start >= 0:
                self._text(out, self._held[:start])
                self._held = self._held[start + len(CALL_START) :]
                self._in_call = True
                continue
            keep = 0 if final else held_prefix(self._held, CALL_START)
            self._text(out, self._held[: len(self._held) - keep])
            self._held = self._held[len(self._held) - keep :]
            break
        return out

    def _text(self, out: list[str | ToolCall], text: str) -> None:
        if not text:
            return
        if self.calls and not self._text_since_call:
            if not (self._gap + text).strip():
                self._gap += text
                return
            text, self._gap = self._gap + text, ""
        self._text_since_call = True
        if out and isinstance(out[-1], str):
            out[-1] += text
        else:
            out.append(text)

    def _call(self, out: list[str | ToolCall], name: str, arguments: dict[str, Any]) -> None:
        self._gap, self._text_since_call = "", False
        call = ToolCall(self.tools.id_prefix + uuid.uuid4().hex[:24], name, arguments)
        self.calls.append(call)
        out.append(call)
        if self.tools.max_calls is not None and len(self.calls) >= self.tools.max_calls:
            self._done = True


def held_prefix(text: str, tag: str) -> int:
    """How many trailing characters of `text` could be the start of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
