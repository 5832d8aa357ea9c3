"""The request bodies of the OpenAI-compatible routes (`eztinker.api.openai`)."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from eztinker.api.chat import TemplateOptions, template_variables
from eztinker.api.not_served import RefusesNotServed
from eztinker.api.structured import Answer, answer_for, choice_answer, json_answer, regex_answer
from eztinker.api.tool_calls import ToolUse, call_format
from eztinker.engine.errors import InvalidInputError
from eztinker.engine.types import ImageChunk

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_STOP_STRINGS = 4  # OpenAI's limit


class StreamOptions(BaseModel):
    include_usage: bool = False


# Fields of OpenAI's (or vLLM's, whose extras clients send through `extra_body`) that change what is
# generated and that this server does not do (`RefusesNotServed`). Other unknown fields (`user`,
# `metadata`, `store`...) do not change the output. Chat completions declare `tools` and `tool_choice`
# (served there, so never extras); on /v1/completions they stay refused.
NOT_SERVED: dict[str, tuple[tuple[Any, ...], str]] = {
    "tools": ((None, []), "tools are served on /v1/chat/completions, not on text completions"),
    "tool_choice": ((None, "none", "auto"), "tools are served on /v1/chat/completions"),
    "functions": ((None, []), "the legacy `functions` are not served: send them as `tools`"),
    "function_call": ((None, "none", "auto"), "the legacy `function_call` is not served: use `tool_choice`"),
    "suffix": ((None, ""), "insertion (a suffix after the completion) is not served"),
    "best_of": ((None, 1), "best_of is not served: ask for n samples and rank them yourself"),
    "echo": ((None, False), "echo is not served: the prompt's tokens are what you sent"),
    "min_p": ((None, 0, 0.0), "min_p is not served: use top_p or top_k"),
    "repetition_penalty": (
        (None, 1, 1.0),
        "repetition_penalty is not served: use frequency_penalty or presence_penalty",
    ),
    "min_tokens": ((None, 0), "min_tokens is not served"),
    "use_beam_search": ((None, False), "beam search is not served"),
    "ignore_eos": ((None, False), "ignore_eos is not served"),
    "modalities": ((None, ["text"]), "audio output is not served: only text"),
    "audio": ((None,), "audio output is not served"),
    "web_search_options": ((None,), "web search is not served"),
    "verbosity": ((None,), "verbosity is not served: say how long an answer you want in the prompt"),
    "guided_grammar": (
        (None,),
        "a grammar of your own is not served: use structured_outputs (json, regex, choice)",
    ),
    "guided_whitespace_pattern": ((None,), "a whitespace pattern is not served: JSON is written compactly"),
}

# vLLM's `structured_outputs` keys: the constraints served, and options that change nothing here.
_STRUCTURED_KINDS = ("json", "regex", "choice", "json_object")
_STRUCTURED_OFF = {
    "disable_any_whitespace": (None, False, True),
    "disable_additional_properties": (None, False),
}


class Sampling(RefusesNotServed):
    """Fields both routes share (`NOT_SERVED` lists those refused)."""

    NOT_SERVED = NOT_SERVED

    model: str
    n: int = Field(1, ge=1)  # (at most the server's `max_samples`)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, description="vLLM's extra: -1 or 0 for no limit")
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Structured output (`output_answer`): OpenAI's, and vLLM's extras.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None

    def refuse_not_served(self) -> None:
        super().refuse_not_served()
        if self.stream_options is not None and not self.stream:  # as OpenAI (and vLLM) answer it
            raise InvalidInputError("stream_options", "is only allowed with stream: true")

    def output_answer(self) -> Answer | None:
        """What the answer must be, as `response_format`, vLLM's `structured_outputs` or its `guided_*`
        ask it (at most one of them); None for free text."""
        asked: list[Answer] = []
        if self.response_format is not None and self.response_format.get("type") != "text":
            asked.append(_response_format(self.response_format))
        if self.structured_outputs is not None:
            asked.append(_structured_outputs(self.structured_outputs))
        if self.guided_json is not None:
            asked.append(json_answer(self.guided_json, "guided_json"))
        if self.guided_regex is not None:
            asked.append(regex_answer(self.guided_regex, "guided_regex"))
        if self.guided_choice is not None:
            asked.append(choice_answer(self.guided_choice, "guided_choice"))
        if len(asked) > 1:
            raise InvalidInputError(asked[1].field, f"one constraint at a time: {asked[0].field} is set too")
        return asked[0] if asked else None

    def biases(self) -> dict[int, float] | None:
        """`logit_bias` with its keys as token ids (their range is checked against the model's vocabulary)."""
        if not self.logit_bias:
            return None
        out = {}
        for key, bias in self.logit_bias.items():
            try:
                token = int(key)
            except ValueError:
                raise InvalidInputError("logit_bias", f"key {key!r} is not a token id") from None
            out[token] = bias
        return out

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidInputError("stop", f"at most {MAX_STOP_STRINGS} stop sequences")
        if any(not s for s in stops):
            raise InvalidInputError("stop", "contains an empty string")
        return stops


def _response_format(response_format: dict[str, Any]) -> Answer:
    kind = response_format.get("type")
    if kind == "json_object":
        return json_answer({"type": "object"}, "response_format")
    if kind != "json_schema":
        raise InvalidInputError(
            "response_format.type", f"{kind!r} is not one of text, json_object, json_schema"
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidInputError("response_format.json_schema", "is missing: send {name, schema, strict}")
    return json_answer(spec.get("schema", {"type": "object"}), "response_format.json_schema.schema")


def _structured_outputs(options: dict[str, Any]) -> Answer:
    for key, value in options.items():
        if key not in _STRUCTURED_KINDS and value not in _STRUCTURED_OFF.get(key, (None,)):
            raise InvalidInputError(
                f"structured_outputs.{key}", "is not served: send json, regex, choice or json_object"
            )
    kinds = [k for k in _STRUCTURED_KINDS if options.get(k) not in (None, False)]
    if len(kinds) != 1:
        raise InvalidInputError(
            "structured_outputs", "must set exactly one of json, regex, choice, json_object"
        )
    kind = kinds[0]
    field = f"structured_outputs.{kind}"
    value = options[kind]
    if kind == "json":
        return json_answer(value, field)
    if kind == "json_object":
        return json_answer({"type": "object"}, field)
    if kind == "regex":
        return regex_answer(value, field)
    return choice_answer(value, field)


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTool(BaseModel):
    """A tool the model may call: `{"type": "function", "function": {name, description, parameters}}`."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    function: FunctionSpec

    def for_template(self) -> dict[str, Any]:
        """The tool as chat templates take it."""
        function: dict[str, Any] = {"name": self.function.name}
        if self.function.description is not None:
            function["description"] = self.function.description
        function["parameters"] = self.function.parameters or {"type": "object", "properties": {}}
        return {"type": "function", "function": function}


class CalledFunction(BaseModel):
    name: str = Field(min_length=1)
    arguments: str  # JSON, as OpenAI writes it


class AssistantToolCall(BaseModel):
    """A tool call in an assistant message of the history."""

    model_config = ConfigDict(extra="allow")

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]  # another is a typo, never a turn
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[AssistantToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a `tool` message: the call it answers

    def for_template(self, text: str, where: str) -> dict[str, Any]:
        """This message as chat templates read it, with `text` as its content: tool calls with decoded
        arguments (a template writes them as JSON or as parameters), a tool result with its call's id."""
        message: dict[str, Any] = {"role": self.role, "content": text}
        reasoning = (self.model_extra or {}).get("reasoning_content")
        if isinstance(reasoning, str) and self.role == "assistant":  # templates decide what to keep
            message["reasoning_content"] = reasoning
        if self.tool_calls:
            if self.role != "assistant":
                raise InvalidInputError(f"{where}.tool_calls", "only assistant messages carry tool calls")
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": _decoded_arguments(
                            call.function.arguments, f"{where}.tool_calls[{j}].function.arguments"
                        ),
                    },
                }
                for j, call in enumerate(self.tool_calls)
            ]
        if self.role == "tool":
            if not self.tool_call_id:
                raise InvalidInputError(f"{where}.tool_call_id", "a tool message needs the id of its call")
            message["tool_call_id"] = self.tool_call_id
        return message

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: the text ones
            return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        return self.content or ""

    def parts(self, where: str) -> list[tuple[str, str | ImageChunk]]:
        """The content as (field name, text or image) parts, in order: `text` parts, and `image_url` parts
        with a base64 data URL (`data:image/png;base64,...`) as images. An image that is not a data URL
        (this server fetches nothing), or a part of another type, is refused naming `where[j]`. As
        OpenAI's: only an assistant's calls may stand without content, and a list holds a part."""
        if self.content is None:
            if self.role == "assistant" and self.tool_calls:
                return [(where, "")]
            raise InvalidInputError(where, "is missing: send a string or a list of content parts")
        if not isinstance(self.content, list):
            return [(where, self.content)]
        if not self.content:
            raise InvalidInputError(where, "is an empty list: send at least one content part, or a string")
        out: list[tuple[str, str | ImageChunk]] = []
        for j, part in enumerate(self.content):
            name = f"{where}[{j}]"
            kind = part.get("type")
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise InvalidInputError(f"{name}.text", "must be a string: the part's text")
                out.append((name, text))
            elif kind == "image_url":
                image = image_from_url(part.get("image_url"), f"{name}.image_url")
                out.append((name, image))
            else:
                raise InvalidInputError(f"{name}.type", f"{kind!r} parts are not supported (text, image_url)")
        return out


# An `image_url` part's bytes and format are both its data URL (`PromptImages.mark`'s `fields`).
IMAGE_URL_FIELDS = {".data": ".image_url", ".format": ".image_url"}


def _decoded_arguments(arguments: str, where: str) -> dict[str, Any]:
    try:
        decoded = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        raise InvalidInputError(where, "is not JSON: send the call's arguments as a JSON object") from None
    if not isinstance(decoded, dict):
        raise InvalidInputError(where, "must be a JSON object")
    return decoded


_DATA_URL = re.compile(r"^data:image/([A-Za-z0-9.+-]+)(;[^,]*)?,(.*)$", re.DOTALL)


def image_from_url(image_url: Any, where: str) -> ImageChunk:
    """An `image_url` part's image: its data URL's bytes and format (decoded, sized and checked against
    the format by the model's processor, engine-side). Other URLs are refused: nothing is fetched."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise InvalidInputError(f"{where}.url", "is missing: send the image as a data URL")
    match = _DATA_URL.match(url)
    if match is None:
        shown = url if len(url) <= 60 else url[:57] + "..."
        raise InvalidInputError(
            f"{where}.url",
            f"{shown!r} is not a data URL: this server fetches no image; send "
            "data:image/png;base64,... or data:image/jpeg;base64,...",
        )
    fmt, params, payload = match.group(1).lower(), match.group(2) or "", match.group(3)
    if "base64" not in params.lower().split(";"):
        raise InvalidInputError(f"{where}.url", "must be a base64 data URL (data:image/...;base64,...)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError(f"{where}.url", "is not valid base64 after the comma") from None
    if not data:
        raise InvalidInputError(f"{where}.url", "holds no image bytes")
    return ImageChunk(data=data, format=fmt)


# What the chat route refuses: the above, and vLLM's extras that change the prompt and are not served.
CHAT_NOT_SERVED: dict[str, tuple[tuple[Any, ...], str]] = {
    **NOT_SERVED,
    "chat_template": ((None, ""), "a chat_template of your own is not served: the model's template renders"),
    "documents": ((None, []), "documents are not served: put them in a message"),
    "mm_processor_kwargs": ((None, {}), "mm_processor_kwargs are not served: the model's processor's own"),
}


class ChatCompletionRequest(Sampling):
    NOT_SERVED = CHAT_NOT_SERVED

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[FunctionTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    # vLLM's extras for the rendering (`TemplateOptions`):
    chat_template_kwargs: dict[str, Any] | None = None  # template variables, e.g. {"enable_thinking": false}
    reasoning_effort: str | None = (
        None  # a template variable for the models whose template reads it (gpt-oss)
    )
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # continue the final assistant message (a prefill)
    include_reasoning: bool = True  # vLLM's extra: false drops a reasoning model's `reasoning_content`
    thinking_token_budget: int | None = Field(None, ge=0)  # vLLM's extra: at most this much thinking

    def template_options(self, tokenizer: Any, base_model: str) -> TemplateOptions:
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise InvalidInputError(
                    "continue_final_message", "needs add_generation_prompt: false (the turn is already open)"
                )
            if self.messages[-1].role != "assistant":
                raise InvalidInputError(
                    f"messages[{len(self.messages) - 1}].role",
                    "must be assistant to continue the final message",
                )
        variables = dict(self.chat_template_kwargs or {})
        template_variables(tokenizer, base_model, variables, "chat_template_kwargs.")
        if self.reasoning_effort is not None:  # as vLLM passes it: to the template, which must read it
            variables.update(
                template_variables(tokenizer, base_model, {"reasoning_effort": self.reasoning_effort})
            )
        return TemplateOptions(variables, self.add_generation_prompt, self.continue_final_message)

    def tool_mode(self) -> tuple[str, list[str] | None]:
        """(`none`, `auto` or `required`; the functions the model may call, None: every tool) from
        `tool_choice`: a mode, a named function (required, that one), or `allowed_tools` (its mode, its
        functions)."""
        choice = self.tool_choice
        if choice is None or choice in ("auto", "none", "required"):
            return choice or "auto", None
        if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
            allowed = choice.get("allowed_tools")
            mode = allowed.get("mode") if isinstance(allowed, dict) else None
            refs = allowed.get("tools") if isinstance(allowed, dict) else None
            if mode not in ("auto", "required") or not isinstance(refs, list) or not refs:
                raise InvalidInputError(
                    "tool_choice.allowed_tools", 'must be {"mode": "auto" | "required", "tools": [...]}'
                )
            return mode, [
                self._tool_name(ref, f"tool_choice.allowed_tools.tools[{i}]") for i, ref in enumerate(refs)
            ]
        if isinstance(choice, dict) and choice.get("type") == "function":
            return "required", [self._tool_name(choice, "tool_choice")]
        raise InvalidInputError(
            "tool_choice",
            f"{choice!r} is not one of none, auto, required, "
            '{"type": "function", "function": {"name": ...}}, {"type": "allowed_tools", ...}',
        )

    def _tool_name(self, ref: Any, where: str) -> str:
        """The name in a tool reference (`{"type": "function", "function": {"name"}}` or the Responses
        API's `{"type": "function", "name"}`), which must be one of the request's tools."""
        function = ref.get("function") if isinstance(ref, dict) else None
        name = (
            function.get("name")
            if isinstance(function, dict)
            else ref.get("name")
            if isinstance(ref, dict)
            else None
        )
        if not isinstance(name, str):
            raise InvalidInputError(where, 'must be {"type": "function", "function": {"name": ...}}')
        if name not in {tool.function.name for tool in self.tools or ()}:
            raise InvalidInputError(f"{where}.function.name", f"{name!r} is not one of the request's tools")
        return name

    def tool_use(self, tokenizer: Any, base_model: str) -> ToolUse | None:
        """The tools to render and the calls to read; None without tools or with `tool_choice: "none"`
        (then the model sees no tools, so it answers in text). Every tool is rendered, the allowed ones
        or not (as OpenAI's `allowed_tools` does, which keeps the prompt the same)."""
        mode, _ = self.tool_mode()
        if mode == "required" and not self.tools:
            raise InvalidInputError("tool_choice", "required needs tools")
        if not self.tools or mode == "none":
            return None
        named = isinstance(self.tool_choice, dict) and self.tool_choice.get("type") == "function"
        return ToolUse(
            [tool.for_template() for tool in self.tools],
            call_format(tokenizer, base_model, "tools"),
            "call_",
            max_calls=None if self.parallel_tool_calls and not named else 1,
        )

    def answer(self, tools: ToolUse | None) -> Answer | None:
        """What the answer must be (`eztinker.api.structured`): a call when `tool_choice` forces one; a
        call only to the allowed tools; with `strict` tools, text or calls whose arguments follow their
        schemas; with `response_format` too, its JSON or a call; None for free text."""
        mode, names = self.tool_mode()
        return answer_for(
            self.output_answer(),
            tools,
            forced=mode == "required",
            names=names,
            strict={tool.function.name for tool in self.tools or () if tool.function.strict},
        )
