"""Reading a model's tool calls out of its text (`api/tool_calls.py`), in both of Qwen's formats, and
finding the format from the chat template."""

from __future__ import annotations

import pytest

from eztinker.api.tool_calls import ToolCall, ToolUse, call_format
from eztinker.engine.errors import InvalidInputError
from eztinker.testing import CHATML_TEMPLATE, TOOLS_JSON_TEMPLATE, TOOLS_XML_TEMPLATE

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "zip": {"type": "string"},
            },
        },
    },
}
JSON_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
XML_CALL = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n2\n</parameter>\n<parameter=zip>\n75001\n</parameter>\n</function>\n</tool_call>"
)


def _tools(fmt: str = "json", max_calls: int | None = None) -> ToolUse:
    return ToolUse([WEATHER], fmt, "call_", max_calls=max_calls)  # ty: ignore[invalid-argument-type]


def _read(text: str, tools: ToolUse) -> list[str | tuple[str, dict]]:
    """The whole text at once: text pieces, and calls as (name, arguments)."""
    return [p if isinstance(p, str) else (p.name, p.arguments) for p in tools.reader().feed(text, final=True)]


def _read_char_by_char(text: str, tools: ToolUse) -> list[str | tuple[str, dict]]:
    """The same text released one character at a time, as a stream releases it; text pieces joined."""
    reader = tools.reader()
    pieces: list[str | ToolCall] = []
    for i, char in enumerate(text):
        pieces += reader.feed(char, final=i == len(text) - 1)
    merged: list[str | tuple[str, dict]] = []
    for p in pieces:
        if isinstance(p, str) and merged and isinstance(merged[-1], str):
            merged[-1] += p
        else:
            merged.append(p if isinstance(p, str) else (p.name, p.arguments))
    return merged


def test_a_json_call_is_read_with_the_text_before_it() -> None:
    text = "Let me look that up.\n" + JSON_CALL
    assert _read(text, _tools()) == ["Let me look that up.\n", ("get_weather", {"city": "Paris", "days": 2})]


def test_xml_values_follow_the_tool_schema() -> None:
    """A value is JSON-decoded unless the schema types it as a string: days=2 is a number, zip stays text."""
    assert _read(XML_CALL, _tools("xml")) == [("get_weather", {"city": "Paris", "days": 2, "zip": "75001"})]


def test_several_calls_keep_their_order_and_whitespace_between_them_is_dropped() -> None:
    text = JSON_CALL + "\n" + JSON_CALL.replace("Paris", "Oslo") + "\n"
    calls = [p for p in _read(text, _tools()) if not isinstance(p, str)]
    assert [c[1]["city"] for c in calls] == ["Paris", "Oslo"]
    assert _read(text, _tools()) == calls  # no whitespace-only text around them


def test_text_after_a_call_is_kept() -> None:
    assert _read(JSON_CALL + "\nDone.", _tools())[1:] == ["\nDone."]


@pytest.mark.parametrize(
    "text",
    [
        "Just text, no call.",
        "A < sign and <tool not a tag",
        "before " + JSON_CALL + " after " + JSON_CALL,
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call> rest',
        JSON_CALL[:-5],
    ],
)
def test_a_stream_reads_what_the_whole_text_reads(text: str) -> None:
    assert _read_char_by_char(text, _tools()) == _read(text, _tools())


def test_a_stream_holds_back_only_what_could_be_a_tag() -> None:
    reader = _tools().reader()
    assert reader.feed("Hello <tool", final=False) == ["Hello "]
    assert reader.feed("box>", final=False) == ["<toolbox>"]  # not the tag after all: released


def test_a_malformed_block_stays_text_as_the_model_wrote_it() -> None:
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    assert _read(bad, _tools()) == [bad]
    no_name = '<tool_call>\n{"arguments": {}}\n</tool_call>'
    assert _read(no_name, _tools()) == [no_name]
    assert _read("<tool_call>\n<function=f>\nstray text\n</function>\n</tool_call>", _tools("xml"))[
        0
    ].startswith("<tool_call>")


def test_a_block_cut_off_by_the_end_is_a_call_only_if_it_parses() -> None:
    complete_body = JSON_CALL.removesuffix("</tool_call>")
    assert _read(complete_body, _tools()) == [("get_weather", {"city": "Paris", "days": 2})]
    assert _read(JSON_CALL[:30], _tools()) == [JSON_CALL[:30]]


def test_arguments_written_as_a_json_string_are_decoded() -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}\n</tool_call>'
    assert _read(text, _tools()) == [("get_weather", {"city": "Rome"})]


def test_no_parallel_calls_keeps_the_first_and_drops_the_rest() -> None:
    tools = _tools(max_calls=1)
    text = JSON_CALL + "\n" + JSON_CALL.replace("Paris", "Oslo") + " trailing"
    assert _read(text, tools) == [("get_weather", {"city": "Paris", "days": 2})]


def test_calls_get_fresh_ids_in_the_facade_style() -> None:
    a, b = (p for p in _tools().reader().feed(JSON_CALL + JSON_CALL, final=True) if isinstance(p, ToolCall))
    assert a.id.startswith("call_") and b.id.startswith("call_") and a.id != b.id
    assert a.arguments_json == '{"city": "Paris", "days": 2}'


class _Tokenizer:
    def __init__(self, template: str) -> None:
        self.chat_template = template


def test_the_format_is_the_one_the_template_teaches() -> None:
    assert call_format(_Tokenizer(TOOLS_JSON_TEMPLATE), "m", "tools") == "json"
    assert call_format(_Tokenizer(TOOLS_XML_TEMPLATE), "m", "tools") == "xml"


def test_a_template_without_tools_or_in_another_format_is_refused_naming_the_field() -> None:
    with pytest.raises(InvalidInputError, match="does not render tools") as exc:
        call_format(_Tokenizer(CHATML_TEMPLATE), "m", "tools")
    assert exc.value.field == "tools"
    llama_like = "{% if tools %}{{ tools | tojson }}{% endif %}{{ '<|python_tag|>' }}"
    with pytest.raises(InvalidInputError, match="format this server does not read"):
        call_format(_Tokenizer(llama_like), "m", "tools")


def test_of_named_templates_the_tool_use_one_is_read(tiny_tokenizer_dir) -> None:
    """Hermes-2-Pro style: a `default` template without tools and a `tool_use` one, which transformers
    renders when tools are sent."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.chat_template = {"default": CHATML_TEMPLATE, "tool_use": TOOLS_XML_TEMPLATE}
    assert call_format(tokenizer, "m", "tools") == "xml"
