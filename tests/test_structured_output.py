"""Constrained decoding: a sample with a grammar only ever draws what the grammar allows
(`eztinker.engine.grammar`), and the compatible APIs ask for it as their clients do: OpenAI's
`response_format`, a forced or strict tool call, vLLM's `structured_outputs` / `guided_*`, Anthropic's
forced `tool_choice`, strict tools and `output_format` (`eztinker.api.structured`).

Random tiny models write nonsense, which is the point: whatever they write, it parses.
"""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import httpx
import jsonschema
import llguidance
import llguidance.hf
import openai
import pytest
import torch

import eztinker
from eztinker.api.structured import choice_answer, json_answer, regex_answer, tool_call_answer
from eztinker.api.tool_calls import ToolUse
from eztinker.engine.batcher import ContinuousBatcher
from eztinker.engine.engine import Engine, EngineConfig
from eztinker.engine.errors import InvalidInputError
from eztinker.engine.sampler import SampleRequest, prompt_logprobs, sample_batch
from eztinker.engine.types import SamplingParams
from eztinker.testing import TOOLS_JSON_TEMPLATE, TOOLS_XML_TEMPLATE, with_chat_template

EOS = 2  # the tiny tokenizer's <|im_end|>
PROMPT = [17, 250, 31, 402]
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 0, "maximum": 30},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}
# In the XML format a string is bare text up to its closing tag, so only an enum bounds it.
CITY_ENUM = {
    **CITY,
    "properties": {**CITY["properties"], "city": {"type": "string", "enum": ["Paris", "Le Mans"]}},
}
WEATHER_ENUM = {"type": "function", "function": {"name": "get_weather", "parameters": CITY_ENUM}}
CLOCK = {
    "type": "function",
    "function": {
        "name": "now",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path):
    return Engine(EngineConfig(device="cpu", dtype=torch.float32)).base_model(str(tiny_model_dir))


def _sample(base, grammar: str, seeds=range(3), n: int = 4, **params) -> list:
    params = {"max_tokens": 80, "temperature": 1.0, **params}
    requests = [
        SampleRequest(PROMPT, SamplingParams(seed=seed, grammar=grammar, **params), num_samples=n)
        for seed in seeds
    ]
    return [s for result in sample_batch(base, requests) for s in result.sequences]


# --- the engine ---------------------------------------------------------------------------------------


def test_every_sample_matches_its_json_schema_and_ends_on_the_stop_token(base) -> None:
    for sequence in _sample(base, json_answer(CITY, "f").grammar(None)):
        assert sequence.stop_reason == "stop" and sequence.tokens[-1] == EOS
        jsonschema.validate(json.loads(base.tokenizer.decode(sequence.tokens[:-1])), CITY)


def test_json_is_written_as_json_dumps_writes_it(base) -> None:
    """No padding whitespace: the text is exactly json.dumps of what it parses to."""
    for sequence in _sample(base, json_answer(CITY, "f").grammar(None), seeds=[7], n=3):
        text = base.tokenizer.decode(sequence.tokens[:-1])
        assert text == json.dumps(json.loads(text), ensure_ascii=False)


def test_a_sample_is_one_of_the_choices_and_greedy_picks_the_likelier(base) -> None:
    choices = ["yes", "no", "maybe so"]
    grammar = choice_answer(choices, "f").grammar(None)
    assert {base.tokenizer.decode(s.tokens[:-1]) for s in _sample(base, grammar)} <= set(choices)
    greedy = _sample(base, grammar, seeds=[0], n=1, temperature=0.0)[0]
    assert base.tokenizer.decode(greedy.tokens[:-1]) in choices


def test_a_row_with_no_stop_token_ends_when_its_grammar_is_complete(base) -> None:
    (sequence,) = _sample(base, regex_answer("[0-9]{3}-[a-z]{2}", "f").grammar(None), seeds=[1], n=1, stop=[])
    assert sequence.stop_reason == "stop"
    text = base.tokenizer.decode(sequence.tokens)
    assert len(text) == 6 and text[:3].isdigit() and text[3] == "-" and text[4:].isalpha()


def test_constrained_samples_report_the_models_own_logprobs(base) -> None:
    """The grammar shapes which token is drawn, not the reported log-probabilities (as logit_bias)."""
    (sequence,) = _sample(base, json_answer(CITY, "f").grammar(None), seeds=[3], n=1)
    model = prompt_logprobs(base, PROMPT + sequence.tokens, None)[len(PROMPT) :]
    assert max(abs(a - b) for a, b in zip(model, sequence.logprobs, strict=True)) < 1e-4


def test_unconstrained_rows_sample_the_same_beside_constrained_ones(base) -> None:
    free = SampleRequest(PROMPT, SamplingParams(max_tokens=12, temperature=1.0, seed=5), num_samples=2)
    grammar = json_answer(CITY, "f").grammar(None)
    bound = SampleRequest(PROMPT, SamplingParams(max_tokens=12, seed=5, grammar=grammar), num_samples=2)
    alone = sample_batch(base, [free])[0].sequences
    together = sample_batch(base, [bound, free])[1].sequences
    assert [s.tokens for s in alone] == [s.tokens for s in together]


@pytest.mark.parametrize("grammar", ["start: undefined_rule", 'start: %json {"type": "strng"}', "  "])
def test_a_bad_grammar_is_refused_before_any_compute_naming_the_request(base, grammar: str) -> None:
    good = SampleRequest(PROMPT, SamplingParams(max_tokens=4))
    bad = SampleRequest(PROMPT, SamplingParams(max_tokens=4, grammar=grammar))
    with pytest.raises(InvalidInputError) as caught:
        sample_batch(base, [good, bad])
    assert caught.value.field == "requests[1].sampling_params.grammar"


def test_a_grammar_too_large_to_decode_fails_its_own_request_and_no_other(base) -> None:
    """`a{1000000}` compiles, then llguidance stops at its lexer's size limit on the first token: that
    request fails, naming its grammar and saying what to change (the caller's to fix: never a server
    error the SDK would retry); a request decoding beside it in the same batch still gets its tokens."""
    huge = regex_answer("a{1000000}", "regex").grammar(None)
    free = SampleRequest(PROMPT, SamplingParams(max_tokens=6, temperature=1.0, seed=5), num_samples=2)
    bound = SampleRequest(PROMPT, SamplingParams(max_tokens=6, seed=5, grammar=huge), num_samples=2)
    batcher = ContinuousBatcher(base)
    outcomes: dict[str, object] = {}
    batcher.add([bound], lambda outcome: outcomes.__setitem__("bound", outcome))
    batcher.add([free], lambda outcome: outcomes.__setitem__("free", outcome))
    while batcher.has_work:
        batcher.step()
    error = outcomes["bound"]
    assert isinstance(error, InvalidInputError) and error.field == "sampling_params.grammar"
    assert "too large for the decoder" in str(error) and "<backtrace>" not in str(error)
    (result,) = outcomes["free"]  # type: ignore[misc]
    assert [s.tokens for s in result.sequences] == [s.tokens for s in sample_batch(base, [free])[0].sequences]


def test_a_grammar_too_large_to_compile_is_refused_without_a_backtrace(base) -> None:
    grammar = choice_answer([f"option{i}" for i in range(70_000)], "choice").grammar(None)
    with pytest.raises(InvalidInputError, match="is not a valid grammar") as caught:
        sample_batch(base, [SampleRequest(PROMPT, SamplingParams(max_tokens=4, grammar=grammar))])
    assert "<backtrace>" not in str(caught.value) and "<unknown>" not in str(caught.value)


def test_the_device_path_unpacks_a_bitmask_as_the_host_path_does() -> None:
    """On a GPU the packed bitmask crosses to the device and is unpacked there; on a CPU numpy unpacks
    it: the same allowed tokens either way (bit i of word w is token 32·w + i), the sign bit included."""
    import numpy as np

    from eztinker.engine.grammar import _unpacked_on_device, _unpacked_on_host

    bitmask = (
        np.random.default_rng(0).integers(-(2**31), 2**31, size=(3, 40), dtype=np.int64).astype(np.int32)
    )
    host = _unpacked_on_host(bitmask, 1270)
    assert torch.equal(host, _unpacked_on_device(bitmask, 1270, torch.device("cpu")))
    word, bit = divmod(1000, 32)
    assert bool(host[1, 1000]) == bool((int(bitmask[1, word]) >> bit) & 1) and host.shape == (3, 1270)


# --- the grammars the routes build ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def matcher_for(tiny_tokenizer_dir: Path):
    from eztinker.testing.tokenizer import _load_tokenizer

    tokenizer = _load_tokenizer(tiny_tokenizer_dir)
    lltokenizer = llguidance.hf.from_tokenizer(tokenizer, eos_token=EOS)

    def accepts(grammar: str, text: str) -> bool:
        matcher = llguidance.LLMatcher(lltokenizer, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher.consume_tokens(tokenizer.encode(text)) and matcher.is_accepting()

    return accepts


JSON_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
XML_CALL = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nLe Mans\n</parameter>\n"
    "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
)


@pytest.mark.parametrize(
    ("fmt", "call", "missing_city"),
    [
        ("json", JSON_CALL, JSON_CALL.replace('"city": "Paris", ', "")),
        ("xml", XML_CALL, XML_CALL.replace("<parameter=city>\nLe Mans\n</parameter>\n", "")),
    ],
)
def test_a_forced_call_is_one_or_more_calls_in_the_templates_format(
    matcher_for, fmt, call, missing_city
) -> None:
    tools = ToolUse([WEATHER, CLOCK], fmt, "call_")
    forced = tool_call_answer(tools, None, set(), text=False).grammar(None)
    assert matcher_for(forced, call) and matcher_for(forced, call + "\n" + call)
    assert not matcher_for(forced, missing_city) and not matcher_for(forced, "The weather is fine.")
    one = tool_call_answer(ToolUse([WEATHER, CLOCK], fmt, "call_", max_calls=1), ["now"], set(), text=False)
    assert not matcher_for(one.grammar(None), call)


def test_strict_tools_leave_text_free_and_hold_calls_to_their_schemas(matcher_for) -> None:
    auto = tool_call_answer(ToolUse([WEATHER], "json", "call_"), None, {"get_weather"}, text=True).grammar(
        None
    )
    assert matcher_for(auto, "No call needed.") and matcher_for(auto, "Let me look. " + JSON_CALL)
    assert not matcher_for(auto, "Let me look. " + JSON_CALL.replace('"days": 2', '"days": "two"'))


def test_a_reasoning_model_thinks_freely_before_the_constrained_answer(matcher_for) -> None:
    answer = json_answer(CITY, "f")
    city = '{"city": "Oslo", "days": 1}'
    assert matcher_for(answer.grammar(True), "any {thoughts}\n</think>\n\n" + city)
    assert matcher_for(answer.grammar(False), "<think>\nhm\n</think>\n\n" + city)
    assert matcher_for(answer.grammar(False), city)
    assert not matcher_for(answer.grammar(True), "any thoughts\n</think>\n\nOslo")


# --- the routes -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("structured-templates")
    return {
        "json": str(with_chat_template(tiny_model_dir, root / "json", TOOLS_JSON_TEMPLATE)),
        "xml": str(with_chat_template(tiny_model_dir, root / "xml", TOOLS_XML_TEMPLATE)),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, models) -> str:
    with eztinker.serve(
        data_dir=tmp_path_factory.mktemp("structured-data"), models=list(models.values())
    ) as url:
        yield url


@pytest.fixture
def oai(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def ant(server: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{server}/anthropic/api", api_key="unused", max_retries=0)


QUESTION = [{"role": "user", "content": "Weather in Paris for two days?"}]
SEEDED = {"seed": 11, "max_tokens": 100}  # the tiny models hold 512 tokens


def test_openai_response_format_json_schema_whole_and_streamed(oai: openai.OpenAI, models) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "weather", "schema": CITY, "strict": True},
    }
    reply = oai.chat.completions.create(
        model=models["json"], messages=QUESTION, response_format=response_format, n=3, **SEEDED
    )
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), CITY)
    stream = oai.chat.completions.create(
        model=models["json"], messages=QUESTION, response_format=response_format, stream=True, **SEEDED
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == reply.choices[0].message.content


def test_openai_json_object_and_vllms_structured_outputs_on_completions(oai: openai.OpenAI, models) -> None:
    reply = oai.chat.completions.create(
        model=models["json"], messages=QUESTION, response_format={"type": "json_object"}, n=4, **SEEDED
    )
    for choice in reply.choices:  # any object: a random model's keys may run to max_tokens
        content = choice.message.content or ""
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(content), dict)
        else:
            assert choice.finish_reason == "length" and content.startswith("{")
    for extra, check in (
        ({"structured_outputs": {"choice": ["sunny", "rainy"]}}, lambda t: t in ("sunny", "rainy")),
        ({"guided_regex": "[0-9]{2} C"}, lambda t: len(t) == 4 and t[:2].isdigit()),
        ({"guided_json": json.dumps(CITY)}, lambda t: jsonschema.validate(json.loads(t), CITY) is None),
    ):
        completion = oai.completions.create(
            model=models["json"], prompt="Weather:", extra_body=extra, **SEEDED
        )
        assert check(completion.choices[0].text), (extra, completion.choices[0].text)


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_openai_tool_choice_required_and_named_force_calls_that_follow_the_schema(
    oai: openai.OpenAI, models, fmt: str
) -> None:
    for tool_choice, names in (
        ("required", {"get_weather", "now"}),
        (_named("get_weather"), {"get_weather"}),
    ):
        reply = oai.chat.completions.create(
            model=models[fmt],
            messages=QUESTION,
            tools=[WEATHER_ENUM, CLOCK],
            tool_choice=tool_choice,
            parallel_tool_calls=False,  # a random model would go on calling until max_tokens
            **SEEDED,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.function.name in names
            if call.function.name == "get_weather":
                jsonschema.validate(json.loads(call.function.arguments), CITY_ENUM)
        assert len(choice.message.tool_calls) == 1


def _named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


def _allowed(mode: str, *names: str) -> dict:
    return {"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": [_named(n) for n in names]}}


def test_openai_allowed_tools_limit_the_calls_but_not_the_prompt(oai: openai.OpenAI, models) -> None:
    """Every tool is rendered; only the allowed ones can be called (`required`: one must be)."""
    tools = [WEATHER_ENUM, CLOCK]
    prompts = set()
    for mode in ("required", "auto"):
        reply = oai.chat.completions.create(
            model=models["json"],
            messages=QUESTION,
            tools=tools,
            tool_choice=_allowed(mode, "now"),
            parallel_tool_calls=False,
            n=3,
            **SEEDED,
        )
        prompts.add(reply.usage.prompt_tokens)
        for choice in reply.choices:
            calls = choice.message.tool_calls or []
            assert all(call.function.name == "now" for call in calls)
            assert calls or mode == "auto"
    plain = oai.chat.completions.create(model=models["json"], messages=QUESTION, tools=tools, max_tokens=1)
    assert prompts == {plain.usage.prompt_tokens}


def test_openai_strict_tools_under_auto_call_with_valid_arguments_or_answer_in_text(
    oai: openai.OpenAI, models
) -> None:
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    reply = oai.chat.completions.create(
        model=models["json"], messages=QUESTION, tools=[strict], n=4, **SEEDED
    )
    for choice in reply.choices:
        for call in choice.message.tool_calls or []:
            jsonschema.validate(json.loads(call.function.arguments), CITY)
        assert "<tool_call>" not in (choice.message.content or "")  # a started call always parses


def test_anthropic_forced_tool_choice_and_output_format(ant: anthropic.Anthropic, models) -> None:
    tool = {"name": "get_weather", "input_schema": CITY_ENUM}
    for tool_choice in (
        {"type": "any", "disable_parallel_tool_use": True},
        {"type": "tool", "name": "get_weather"},
    ):
        message = ant.messages.create(
            model=models["xml"],
            max_tokens=120,
            messages=QUESTION,
            tools=[tool],
            tool_choice=tool_choice,
            extra_body={"temperature": 0},  # greedy: Anthropic's API takes no seed
        )
        assert message.stop_reason == "tool_use"
        (call,) = [b for b in message.content if b.type == "tool_use"]
        assert call.name == "get_weather"
        jsonschema.validate(call.input, CITY_ENUM)
    message = ant.messages.create(
        model=models["json"],
        max_tokens=120,
        messages=QUESTION,
        extra_body={"output_format": {"type": "json_schema", "schema": CITY}, "temperature": 0},
    )
    jsonschema.validate(json.loads(message.content[0].text), CITY)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "w", "schema": {"type": "strng"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "x+"}, "guided_regex"),
        ({"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs.grammar"),
        ({"guided_grammar": "root ::= x"}, "guided_grammar"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_regex": "("}, "guided_regex"),
        ({"guided_regex": "\\"}, "guided_regex"),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"regex": "(" * 3000 + ")" * 3000}}, "structured_outputs.regex"),  # too deep
        ({"guided_regex": "(?:" * 1000 + "a" + ")" * 1000}, "guided_regex"),
        ({"guided_choice": ["a", 3]}, "guided_choice"),
        ({"tools": [WEATHER], "tool_choice": _named("nope")}, "tool_choice.function.name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "custom"}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools"}}, "tool_choice.allowed_tools"),
        (
            {"tools": [WEATHER], "tool_choice": _allowed("auto", "nope")},
            "tool_choice.allowed_tools.tools[0].function.name",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_openai_refuses_a_bad_constraint_naming_the_field(
    server: str, models, change: dict, param: str
) -> None:
    body = {"model": models["json"], "messages": QUESTION, "max_tokens": 4, **change}
    answer = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param, answer.text


WEIRD_SCHEMAS = [
    {"type": "object", "properties": {"a": True, "b": [1]}, "required": [["a"], "b"]},
    {"type": "object", "properties": "none"},
    {"type": "object", "properties": {"a": {"type": "string", "enum": [1, 2]}}, "required": ["a"]},
    {"type": "object", "properties": {"a": {"type": "string", "pattern": "("}}},
    {"type": "object", "properties": {"a": {"$ref": "https://example.com/remote.json"}}},
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}}},
    {"type": ["object", "nothing"]},
]


@pytest.mark.parametrize("fmt", ["json", "xml"])
@pytest.mark.parametrize("schema", WEIRD_SCHEMAS)
def test_odd_schemas_are_answered_or_refused_never_a_server_error(
    server: str, models, fmt: str, schema
) -> None:
    """Whatever a client puts in a schema: a reply that holds to it, or a 400 naming the field."""
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    for change in (
        {"tools": [tool], "tool_choice": "required", "parallel_tool_calls": False},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
        {"guided_json": schema},
    ):
        body = {"model": models[fmt], "messages": QUESTION, "max_tokens": 8, "seed": 0, **change}
        answer = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
        assert answer.status_code in (200, 400), answer.text
        if answer.status_code == 400:
            assert answer.json()["error"]["param"], answer.text


UNCOMPILABLE = {"type": "object", "properties": {"a": {"type": "bogus"}}}


@pytest.mark.parametrize(
    "change",
    [
        {"tool_choice": "required"},  # the call is forced: its arguments follow the schema
        {
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": UNCOMPILABLE, "strict": True}}
            ]
        },
    ],
)
@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_a_tool_schema_that_cannot_compile_is_blamed_on_the_tool(
    server: str, models, change: dict, fmt: str
) -> None:
    """Not on `tool_choice` or `tools` as a whole, and with llguidance's reason, not grammar text."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": UNCOMPILABLE}}]
    body = {"model": models[fmt], "messages": QUESTION, "max_tokens": 4, "tools": tools, **change}
    error = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60).json()["error"]
    assert error["param"] == "tools[0].function.parameters", error
    assert "Invalid type: bogus" in error["message"] and "%json" not in error["message"]
    body = {
        "model": models[fmt],
        "messages": QUESTION,
        "max_tokens": 4,
        "tools": [{"name": "f", "input_schema": UNCOMPILABLE}],
        "tool_choice": {"type": "any"},
    }
    answer = httpx.post(f"{server}/anthropic/api/v1/messages", json=body, timeout=60)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"].startswith("tools[0].input_schema: "), answer.text


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            {"tool_choice": {"type": "tool", "name": "nope"}, "tools": [{"name": "w", "input_schema": CITY}]},
            "tool_choice.name",
        ),
        ({"tool_choice": {"type": "any"}}, "tool_choice.type"),
        ({"output_format": {"type": "regex"}}, "output_format.type"),
    ],
)
def test_anthropic_refuses_a_bad_constraint_naming_the_field(
    server: str, models, change: dict, words: str
) -> None:
    body = {"model": models["json"], "messages": QUESTION, "max_tokens": 4, **change}
    answer = httpx.post(f"{server}/anthropic/api/v1/messages", json=body, timeout=60)
    assert answer.status_code == 400, answer.text
    assert words in answer.json()["error"]["message"]


def test_a_tokenizer_build_is_shared_by_every_grammar_on_a_model(tiny_model_dir: Path) -> None:
    """llguidance's view of the vocabulary is built once per tokenizer, not per request."""
    from eztinker.engine import grammar

    base = Engine(EngineConfig(device="cpu", dtype=torch.float32)).base_model(str(tiny_model_dir))
    first = grammar._tokenizer(base.tokenizer, base.vocab_size, base.eos_token_ids)
    assert grammar._tokenizer(base.tokenizer, base.vocab_size, base.eos_token_ids) is first


def test_the_native_client_samples_within_a_schema_a_regex_or_a_choice(server: str, models) -> None:
    from eztinker import EZTinkerClient
    from eztinker.exceptions import InvalidRequestError

    with EZTinkerClient(base_url=server) as client:
        base = models["json"]
        for prompt in ("Weather:", QUESTION):  # a text, and a chat through the template
            text = client.sample(prompt, base_model=base, json_schema=CITY, seed=1, max_new_tokens=100)
            jsonschema.validate(json.loads(text), CITY)
        assert client.sample("Sky:", base_model=base, choice=["blue", "grey"], seed=2) in ("blue", "grey")
        out = client.generate([17, 250, 31], base_model=base, regex="[0-9]{4}", n=3, seed=3)
        assert all(len(s.text) == 4 and s.text.isdigit() and s.stop_reason == "stop" for s in out.samples)
        with pytest.raises(InvalidRequestError) as refused:
            client.sample("x", base_model=base, regex="(")
        assert refused.value.field == "regex"
        with pytest.raises(InvalidRequestError, match="at most one"):
            client.sample("x", base_model=base, regex="a", choice=["a"])
        with pytest.raises(InvalidRequestError) as refused:
            client.sample("x", base_model=base, json_schema={"type": "strng"})
        assert refused.value.field == "json_schema"


def test_a_row_that_never_stops_runs_to_max_tokens_within_a_grammar_that_could_end(base) -> None:
    """`stop=[]` never stops early, not even at EOS: a grammar that could end there goes on instead."""
    grammar = regex_answer("[a-z ]*", "f").grammar(None)
    sequences = _sample(base, grammar, max_tokens=24, stop=[], logit_bias={EOS: 50.0})  # EOS most likely
    assert all(len(s.tokens) == 24 and s.stop_reason == "length" and EOS not in s.tokens for s in sequences)
