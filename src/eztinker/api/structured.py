"""Structured output on the compatible APIs: what a request asks the answer to be (JSON matching a schema,
a regex, one of some strings, a call to one of its tools), as the grammar the engine decodes within
(`SamplingParams.grammar`, `eztinker.engine.grammar`).

Served: OpenAI's `response_format` (`json_object`, `json_schema`), a forced `tool_choice` (`required`, a
named function) and `strict` tools; vLLM's `structured_outputs` (`json`, `regex`, `choice`,
`json_object`) and its older `guided_json` / `guided_regex` / `guided_choice`; Anthropic's forced
`tool_choice` (`any`, `tool`), `strict` tools and `output_format`.

An `Answer` is Lark rules defining `answer`, the whole answer. A forced or strict tool call is written in
the model's own call format, as its chat template teaches it (`eztinker.api.tool_calls`), so the model
stays in the distribution it was trained on and the route reads the call back as it reads any other.
A reasoning model thinks freely first (`<think>…</think>`, `eztinker.api.reasoning`): the constraint
holds for the answer after the thinking, as vLLM's reasoning-aware structured outputs hold it.

JSON is written the way `json.dumps` and chat templates' `tojson` write it (`", "` and `": "`, no other
whitespace): a model cannot pad an answer with unbounded whitespace, a known way for constrained JSON to
run to `max_tokens`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import llguidance

from eztinker.api.reasoning import THINK_END, THINK_START
from eztinker.api.tool_calls import CALL_END, CALL_START, ToolUse
from eztinker.engine.errors import InvalidInputError

_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class Answer:
    """What the whole answer may be: `head`, a Lark expression, with the helper `rules` it names, and the
    request field that asked for it (a grammar error names it)."""

    head: str
    rules: str = ""
    field: str = ""

    def grammar(self, thinking: bool | None) -> str:
        """The grammar of a whole completion: the answer, after the thinking when the model reasons
        (`thinking`: True when the prompt opened it, False when the model may open it itself, None when
        it does not reason)."""
        answer = f"answer: {self.head}\n{self.rules}"
        if thinking is None:
            return "start: answer\n" + answer
        think = f"think[stop={_literal(THINK_END)}]: /(.|\\n)*/\nNL: /\\n{{1,2}}/\n"
        if thinking:
            return "start: think NL? answer\n" + think + answer
        return f"start: ({_literal(THINK_START)} NL? think NL?)? answer\n" + think + answer

    def __or__(self, other: Answer) -> Answer:
        """An answer that is either one (at most one of them may have helper rules)."""
        assert not (self.rules and other.rules), "two answers with helper rules would clash"
        return Answer(f"({self.head}) | ({other.head})", self.rules + other.rules, self.field)


def json_answer(schema: Any, field: str) -> Answer:
    """JSON matching `schema` (a JSON schema object, or its JSON text)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InvalidInputError(field, f"is not JSON: {exc}") from None
        except RecursionError:
            raise InvalidInputError(field, _TOO_DEEP) from None
    if not isinstance(schema, dict):
        raise InvalidInputError(field, "must be a JSON schema (an object)")
    return Answer(f"%json {_compiled_schema(schema, field)}", field=field)


def regex_answer(pattern: Any, field: str) -> Answer:
    """Text matching a regular expression (Rust `regex` syntax, which Python's mostly is)."""
    if not isinstance(pattern, str) or not pattern:
        raise InvalidInputError(field, "must be a non-empty regular expression")
    try:  # what clients write (vLLM's are Python's); llguidance then refuses what Rust's syntax lacks
        re.compile(pattern)
    except re.error as exc:
        raise InvalidInputError(field, f"is not a regular expression: {exc}") from None
    except RecursionError:  # Python's parser recurses per group
        raise InvalidInputError(field, _TOO_DEEP) from None
    return Answer(f"/{llguidance.regex_to_lark(pattern)}/", field=field)


def choice_answer(choices: Any, field: str) -> Answer:
    """Exactly one of `choices`."""
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise InvalidInputError(field, "must be a non-empty list of non-empty strings")
    return Answer(" | ".join(_literal(c) for c in choices), field=field)


def tool_call_answer(
    tools: ToolUse, names: list[str] | None, strict: set[str], text: bool, field: str = "tools"
) -> Answer:
    """One call or more (one when `tools.max_calls` is 1), in the model's call format, to the tools in
    `names` (None: any of them). A call's arguments follow its tool's schema when its name is in
    `strict` (or the call is forced: `text` False), else they are any JSON object. With `text`, the answer
    may instead be plain text, or text followed by calls (the model chooses; `tool_choice` auto)."""
    offered = [
        (i, s["function"])
        for i, s in enumerate(tools.schemas)
        if names is None or s["function"]["name"] in names
    ]
    for i, function in offered:  # a schema the calls are held to must compile (an error names the tool's)
        if not text or function["name"] in strict:
            _compiled_schema(_mapping(function.get("parameters")), tools.parameters_field.format(i))
    functions = [function for _, function in offered]
    if tools.format == "xml":
        rules = _xml_calls(functions, strict, forced=not text)
    else:
        rules = _json_calls(functions, strict, forced=not text)
    # Calls are separated by a line break, as templates render them; one may end the answer too (a model
    # breaks the line before it ends its turn), so a "\n" after a call does not commit it to another.
    more = ' "\\n"?' if tools.max_calls == 1 else ' ("\\n" call)* "\\n"?'
    if not text:
        return Answer(f"call{more}", f"call: {_literal(CALL_START)} call_body\n" + rules, field)
    return Answer(
        f"TEXT | text_then_call{more}",
        f"text_then_call: before_call call_body\ncall: {_literal(CALL_START)} call_body\n"
        f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{_regex_escape(CALL_START)}(.|\\n)*/\n"
        f"before_call[stop={_literal(CALL_START)}]: /(.|\\n)*/\n" + rules,
        field,
    )


def answer_for(
    output: Answer | None,
    tools: ToolUse | None,
    *,
    forced: bool,
    names: list[str] | None,
    strict: set[str],
) -> Answer | None:
    """What a chat's answer must be on both compatible APIs: a call when the tool choice forces one (to
    one of `names`; None: any tool); else the `output` format's answer or a call; else, with `strict`
    tools or only some tools allowed, text or calls (to the allowed tools, strict arguments for the tools
    in `strict`); None for free text."""
    if tools is None:
        return output
    if forced:
        return tool_call_answer(tools, names, set(), text=False, field="tool_choice")
    if output is not None:
        return output | tool_call_answer(tools, names, strict, text=False)
    if strict or names is not None:
        return tool_call_answer(
            tools, names, strict, text=True, field="tools" if names is None else "tool_choice"
        )
    return None


def _json_calls(functions: list[dict[str, Any]], strict: set[str], forced: bool) -> str:
    """`call_body`: what follows `<tool_call>`, `{"name": ..., "arguments": ...}` and the closing tag."""
    bodies = []
    for function in functions:
        arguments = _mapping(function.get("parameters")) or _ANY_OBJECT
        if not forced and function["name"] not in strict:
            arguments = _ANY_OBJECT
        call = {
            "type": "object",
            "properties": {"name": {"const": function["name"]}, "arguments": arguments},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        bodies.append(f"%json {_schema(call)}")
    return f'call_body: "\\n" ({" | ".join(bodies)}) "\\n" {_literal(CALL_END)}\n'


def _xml_calls(functions: list[dict[str, Any]], strict: set[str], forced: bool) -> str:
    """`call_body`: `<function=NAME>`, its `<parameter=KEY>` blocks, `</function>` and the closing tag.

    A call held to its schema (forced, or strict) has a block per property, the required ones always, in
    the schema's order. A string value is written as is: one of its `enum` when it has one, else free text
    up to its closing tag (the format has no quotes to bound it, so a string's length and pattern are
    not held); any other value is JSON of its schema. A call not held to it takes any blocks."""
    rules, names = [], []
    loose = False
    for i, function in enumerate(functions):
        header = _literal(f"<function={function['name']}>\n")
        names.append(f"f{i}")
        if not (forced or function["name"] in strict):
            rules.append(f'f{i}: {header} any_parameter* "</function>\\n"\n')
            loose = True
            continue
        schema = _mapping(function.get("parameters"))
        properties = _mapping(schema.get("properties"))
        listed = schema.get("required")
        required = {r for r in listed if isinstance(r, str)} if isinstance(listed, list) else set()
        parts = []
        for j, (key, value_schema) in enumerate(properties.items()):
            rule, spec = f"f{i}_p{j}", _mapping(value_schema)
            start = _literal(f"<parameter={key}>\n")
            options = spec.get("enum", [spec["const"]] if "const" in spec else None)
            if spec.get("type") == "string" and isinstance(options, list) and options:
                if not all(isinstance(o, str) for o in options):
                    raise InvalidInputError(
                        "tools", f"{function['name']}.{key}: a string's enum must hold strings"
                    )
                values = " | ".join(_literal(o) for o in options)
                rules.append(f'{rule}: {start} ({values}) "\\n</parameter>\\n"\n')
            elif spec.get("type") == "string":
                rules.append(f"{rule}: {start} free_value\n")
                loose = True
            else:
                rules.append(f'{rule}: {start} %json {_schema(spec)} "\\n</parameter>\\n"\n')
            parts.append(rule if key in required else f"{rule}?")
        rules.append(f'f{i}: {header} {" ".join(parts)} "</function>\\n"\n')
    if loose:
        rules.append(
            'any_parameter: "<parameter=" PARAMETER_NAME ">\\n" free_value\nPARAMETER_NAME: /[^>\\n]+/\n'
            'free_value[stop="\\n</parameter>\\n"]: /(.|\\n)*/\n'
        )
    return f'call_body: "\\n" ({" | ".join(names)}) {_literal(CALL_END)}\n' + "".join(rules)


def _mapping(value: Any) -> dict[str, Any]:
    """`value` when it is a JSON object, else {} (a schema's malformed part constrains nothing here;
    llguidance refuses a malformed schema where it compiles one)."""
    return value if isinstance(value, dict) else {}


def _schema(schema: dict[str, Any]) -> str:
    return json.dumps({**schema, "x-guidance": _JSON_STYLE}, ensure_ascii=False)


_TOO_DEEP = "is nested too deeply: flatten it"


def _compiled_schema(schema: dict[str, Any], field: str) -> str:
    """`_schema(schema)`, once llguidance compiles it: a schema it cannot is a 400 naming `field` with
    llguidance's reason, before the whole grammar's error (which quotes grammar text the client never
    wrote, under the field that asked for the answer's shape) could name it."""
    try:
        text = _schema(schema)
        error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(text))
    except RecursionError:
        raise InvalidInputError(field, _TOO_DEEP) from None
    except ValueError as exc:
        error = str(exc)
    if error:
        raise InvalidInputError(
            field, f"cannot be compiled as a JSON schema ({' '.join(error.split())}): fix it"
        )
    return text


def _literal(text: str) -> str:
    """A Lark string literal of `text`."""
    return json.dumps(text, ensure_ascii=False)


def _regex_escape(text: str) -> str:
    """`text` as a literal in a Lark `/regex/` (Rust syntax: `\\<` would be a word boundary there)."""
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


_REGEX_META = set("\\.+*?()|[]{}^$#&-~/")
