"""The request bodies of the Anthropic Messages routes (`eztinker.api.anthropic`)."""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from eztinker.api.chat import PromptImages, TemplateOptions, reads_variable
from eztinker.api.not_served import RefusesNotServed
from eztinker.api.reasoning import require_reasoning
from eztinker.api.structured import Answer, answer_for, json_answer
from eztinker.api.tool_calls import ToolUse, call_format
from eztinker.engine.errors import InvalidInputError
from eztinker.engine.types import ImageChunk
from eztinker.engine.vision import FORMATS

MAX_STOP_SEQUENCES = 16
# The image formats the model's processor reads (`ImageChunk.format`), as media types.
MEDIA_TYPES = tuple(sorted(f"image/{fmt}" for fmt in FORMATS))
# An `image` block's bytes and format are its source's `data` and `media_type`.
_SOURCE_FIELDS = {".data": ".source.data", ".format": ".source.media_type"}


class TextBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ContentBlock(BaseModel):
    """A message's content block of any type: `text`, `image` (user), and `tool_use` (assistant) /
    `tool_result` (user) are served; any other is refused naming it (`Message.for_template`)."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None
    thinking: str | None = None  # thinking (of an earlier answer)
    id: str | None = None  # tool_use
    name: str | None = None  # tool_use
    input: Any = None  # tool_use
    tool_use_id: str | None = None  # tool_result
    content: str | list[ContentBlock] | None = None  # tool_result
    is_error: bool = False  # tool_result (its content says what went wrong; templates have no flag for it)
    source: dict[str, Any] | None = None  # image

    def image(self, where: str) -> ImageChunk:
        """An `image` block's image: base64 data (`source.type` "base64"); nothing is fetched or stored, so
        a `url` or `file` source is refused naming it."""
        source = self.source or {}
        kind = source.get("type")
        if kind != "base64":
            raise InvalidInputError(
                f"{where}.source.type",
                f"{kind!r} image sources are not served: this server fetches and stores nothing; send the "
                "image as base64 data",
            )
        media_type, data = source.get("media_type"), source.get("data")
        if not isinstance(media_type, str) or media_type.lower() not in MEDIA_TYPES:
            raise InvalidInputError(
                f"{where}.source.media_type", f"{media_type!r} is not one of {', '.join(MEDIA_TYPES)}"
            )
        if not isinstance(data, str) or not data:
            raise InvalidInputError(f"{where}.source.data", "is missing: send the image as base64")
        try:
            decoded = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInputError(f"{where}.source.data", "is not valid base64") from None
        return ImageChunk(data=decoded, format=media_type.removeprefix("image/").lower())

    def result_content(self, where: str, images: PromptImages) -> str:
        """A tool_result's content as the `tool` message's text: a string, or text and `image` blocks in
        order (each image a mark, its image to `images`: Claude Code sends screenshots so; a model
        without vision refuses it naming the block, as an image anywhere else). Other blocks are refused
        naming them."""
        if not isinstance(self.content, list):
            return self.content or ""
        text = ""
        for k, block in enumerate(self.content):
            name = f"{where}.content[{k}]"
            if block.type == "image":
                text += images.mark(name, block.image(name), _SOURCE_FIELDS)
            elif block.type == "text" and block.text is not None:
                text += block.text
            else:
                raise InvalidInputError(
                    name, f"{block.type!r} blocks are not served in a tool result: send text or images"
                )
        return text


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]

    def is_empty(self) -> bool:
        """Whether it says nothing: no content, or only empty text blocks."""
        if isinstance(self.content, str):
            return not self.content
        return all(b.type == "text" and not b.text for b in self.content)

    def for_template(self, where: str, images: PromptImages) -> list[dict[str, Any]]:
        """The message as chat templates read it: a user turn's `tool_result` blocks become `tool`
        messages (before its text, as Anthropic orders them), its `image` blocks marks in its text (their
        images go to `images`), an assistant's `tool_use` blocks its `tool_calls`. A block of another type
        (document, search result...) is refused naming it."""
        if self.role == "user" and not self.content:  # as Anthropic's: a user turn says something
            raise InvalidInputError(f"{where}.content", "is empty: send some text or a content block")
        if isinstance(self.content, str):
            return [{"role": self.role, "content": self.content}]
        text, thinking, calls, results = "", "", [], []
        for j, block in enumerate(self.content):
            name = f"{where}.content[{j}]"
            if block.type == "text":
                if block.text is None:
                    raise InvalidInputError(f"{name}.text", "is missing")
                text += block.text
            elif block.type == "image" and self.role == "user":
                text += images.mark(name, block.image(name), _SOURCE_FIELDS)
            elif block.type == "thinking" and self.role == "assistant":
                thinking += block.thinking or ""
            elif block.type == "tool_use" and self.role == "assistant":
                if not block.id or not block.name or not isinstance(block.input, dict):
                    raise InvalidInputError(name, "a tool_use block needs an id, a name and an input object")
                calls.append(
                    {
                        "id": block.id,
                        "type": "function",
                        "function": {"name": block.name, "arguments": block.input},
                    }
                )
            elif block.type == "tool_result" and self.role == "user":
                if not block.tool_use_id:
                    raise InvalidInputError(f"{name}.tool_use_id", "is missing")
                results.append(
                    {
                        "role": "tool",
                        "tool_call_id": block.tool_use_id,
                        "content": block.result_content(name, images),
                    }
                )
            else:
                raise InvalidInputError(
                    name, f"{block.type!r} blocks are not served in a {self.role} message"
                )
        if self.role == "assistant":  # its thinking where templates read it (and keep what they keep)
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["reasoning_content"] = thinking
            return [{**message, **({"tool_calls": calls} if calls else {})}]
        return results + ([{"role": "user", "content": text}] if text or not results else [])


class Tool(BaseModel):
    """A client tool the model may call: a name, a description and the JSON schema of its input."""

    model_config = ConfigDict(extra="allow")  # cache_control... change nothing

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,128}$")  # Anthropic's
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None
    strict: bool | None = None  # the call's input follows input_schema exactly (structured outputs)

    def for_template(self, where: str) -> dict[str, Any]:
        """The tool as chat templates take it (an OpenAI-style function)."""
        if self.type not in (None, "custom"):
            raise InvalidInputError(
                f"{where}.type",
                f"{self.type!r}: Anthropic-defined and server tools (bash, text editor, web search, "
                "computer...) are not served; define it as a custom tool with an input_schema",
            )
        if self.input_schema is None:
            raise InvalidInputError(f"{where}.input_schema", "is missing")
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.input_schema
        return {"type": "function", "function": function}


class ContextEdit(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str


class ContextManagement(BaseModel):
    """Anthropic's context editing: only clearing thinking, which changes nothing here (thinking is not
    served, so no history holds any); an edit that would clear other content is refused naming it."""

    model_config = ConfigDict(extra="allow")

    edits: list[ContextEdit] = Field(default_factory=list)

    def refuse_edits(self) -> None:
        for i, edit in enumerate(self.edits):
            if not edit.type.startswith("clear_thinking_"):
                raise InvalidInputError(
                    f"context_management.edits[{i}]", f"{edit.type!r} edits are not served: edit the messages"
                )


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Thinking(BaseModel):
    """Extended thinking: `enabled` with a budget (at least 1,024 tokens, fewer than `max_tokens`),
    `adaptive` (the model decides), or `disabled`."""

    model_config = ConfigDict(extra="allow")  # display... changes nothing here

    type: Literal["enabled", "adaptive", "disabled"]
    budget_tokens: int | None = None


MIN_THINKING_BUDGET = 1024  # Anthropic's


# Fields of Anthropic's that change what is generated (or counted) and that this server does not do
# (`RefusesNotServed`). Other unknown fields (`metadata`, `service_tier`...) change nothing.
NOT_SERVED: dict[str, tuple[tuple[Any, ...], str]] = {
    "mcp_servers": ((None, []), "MCP servers are not served: send their tools as custom tools"),
    "container": ((None,), "code execution containers are not served"),
}


class CountTokensRequest(RefusesNotServed):
    """What `count_tokens` reads (`NOT_SERVED` lists the fields refused)."""

    NOT_SERVED = NOT_SERVED

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    context_management: ContextManagement | None = None
    output_format: dict[str, Any] | None = None  # structured outputs: {"type": "json_schema", "schema"}
    thinking: Thinking | None = None

    def template_options(self, tokenizer: Any, base_model: str) -> TemplateOptions:
        """How the chat renders for `thinking`: a reasoning model's template that reads `enable_thinking`
        (Qwen3's) gets it (false when `disabled`, as vLLM's Anthropic route sets it); `enabled` on a model
        that does not reason in `<think>` blocks is a 400, as Anthropic answers it for such a model."""
        prefill = self.prefill()
        if self.thinking is None:
            return TemplateOptions(continue_final=prefill)
        if self.thinking.type == "enabled":
            budget = self.thinking.budget_tokens
            if not isinstance(budget, int) or budget < MIN_THINKING_BUDGET:
                raise InvalidInputError(
                    "thinking.budget_tokens", f"must be an integer >= {MIN_THINKING_BUDGET}"
                )
            require_reasoning(tokenizer, base_model, "thinking")
            choice = self.tool_choice
            if choice is not None and choice.type in ("any", "tool"):
                raise InvalidInputError(
                    "tool_choice", "thinking may not be enabled when tool_choice forces tool use"
                )
        if not reads_variable(tokenizer, "enable_thinking"):
            return TemplateOptions(continue_final=prefill)
        return TemplateOptions({"enable_thinking": self.thinking.type != "disabled"}, continue_final=prefill)

    def prefill(self) -> bool:
        """Whether the chat ends in the assistant's text, which the answer continues (Anthropic's
        prefill: the answer is what comes after it). Its text may not end in whitespace, as Anthropic
        answers; an empty one is no prefill (the turn starts afresh); one with tool calls or thinking is
        history, rendered whole."""
        last = self.messages[-1]
        if last.role != "assistant" or last.is_empty():
            return False
        blocks = [last.content] if isinstance(last.content, str) else last.content
        if any(not isinstance(b, str) and b.type != "text" for b in blocks):
            return False
        text = "".join(b if isinstance(b, str) else b.text or "" for b in blocks)
        if text != text.rstrip():
            raise InvalidInputError(
                f"messages[{len(self.messages) - 1}].content",
                "final assistant content cannot end with trailing whitespace: strip it",
            )
        return True

    def system_text(self) -> str:
        if isinstance(self.system, list):
            return "".join(b.text for b in self.system)
        return self.system or ""

    def tool_use(self, tokenizer: Any, base_model: str) -> ToolUse | None:
        """The tools to render and the calls to read; None without tools or with `tool_choice` none
        (then the model sees no tools)."""
        choice = self.tool_choice or ToolChoice(type="auto")
        if choice.type in ("any", "tool") and not self.tools:
            raise InvalidInputError("tool_choice.type", f"{choice.type} needs tools")
        if choice.type == "tool" and choice.name not in {tool.name for tool in self.tools or ()}:
            raise InvalidInputError("tool_choice.name", f"{choice.name!r} is not one of the request's tools")
        if not self.tools or choice.type == "none":
            return None
        return ToolUse(
            [tool.for_template(f"tools[{i}]") for i, tool in enumerate(self.tools)],
            call_format(tokenizer, base_model, "tools"),
            "toolu_",
            max_calls=1 if choice.disable_parallel_tool_use or choice.type == "tool" else None,
            parameters_field="tools[{}].input_schema",
        )

    def answer(self, tools: ToolUse | None) -> Answer | None:
        """What the answer must be (`eztinker.api.structured`): a call when
        `tool_choice` forces one (`any`, `tool`); with `strict` tools, text or calls whose input follows
        their schemas; with `output_format` too, its JSON or a call; None for free text."""
        output = None
        if self.output_format is not None:
            if self.output_format.get("type") != "json_schema":
                raise InvalidInputError("output_format.type", "must be json_schema")
            output = json_answer(self.output_format.get("schema"), "output_format.schema")
        choice = self.tool_choice or ToolChoice(type="auto")
        return answer_for(
            output,
            tools,
            forced=choice.type in ("any", "tool"),
            names=[choice.name] if choice.type == "tool" and choice.name else None,
            strict={tool.name for tool in self.tools or () if tool.strict},
        )

    def template_messages(self, images: PromptImages) -> tuple[list[dict[str, Any]], list[str]]:
        """(the system prompt and messages as chat templates read them, the request field of each); the
        messages' images go to `images`."""
        messages: list[dict[str, Any]] = []
        wheres: list[str] = []
        if self.system:
            messages.append({"role": "system", "content": self.system_text()})
            wheres.append("system")
        for i, message in enumerate(self.messages):
            if message.role == "assistant" and message.is_empty():
                if i == len(self.messages) - 1:
                    break  # the assistant's turn, still to write: the template opens it
                raise InvalidInputError(  # as Anthropic's: an empty turn in the history says nothing
                    f"messages[{i}].content", "is empty: only the final assistant message may be"
                )
            rendered = message.for_template(f"messages[{i}]", images)
            messages += rendered
            wheres += [f"messages[{i}]"] * len(rendered)
        return messages, wheres


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)

    def thinking_budget(self) -> int | None:
        """The tokens the thinking may take: with `thinking` enabled, its budget (fewer than `max_tokens`);
        disabled, none (a template that reads `enable_thinking` closes the thinking in the prompt; any
        other reasoning model's is closed at once, as vLLM's budget of 0 closes it); else None."""
        if self.thinking is not None and self.thinking.type == "disabled":
            return 0
        if self.thinking is None or self.thinking.type != "enabled":
            return None
        budget = self.thinking.budget_tokens
        if isinstance(budget, int) and budget >= self.max_tokens:
            raise InvalidInputError(
                "thinking.budget_tokens", f"must be less than max_tokens ({self.max_tokens})"
            )
        return budget

    temperature: float = Field(1.0, ge=0, le=1)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False

    def stops(self) -> list[str]:
        stops = list(self.stop_sequences or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise InvalidInputError("stop_sequences", f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise InvalidInputError("stop_sequences", "contains an empty string")
        return stops
