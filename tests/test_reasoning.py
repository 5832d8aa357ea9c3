"""A reasoning model's thinking, split from its answer (`api/reasoning.py`) and handed back as OpenAI's
`reasoning_content` and Anthropic's `thinking` blocks."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest
from transformers import AutoTokenizer

import eztinker
from eztinker.api.reasoning import Thought, ThoughtReader
from eztinker.testing import CHATML_TEMPLATE, with_chat_template


def _read(text: str, inside: bool, step: int | None = None) -> list[tuple[str, str]]:
    """(kind, text) pieces, merged by kind; fed whole, or `step` characters at a time as a stream."""
    reader = ThoughtReader(inside=inside)
    chunks = [text] if step is None else [text[i : i + step] for i in range(0, len(text), step)] or [""]
    pieces: list[tuple[str, str]] = []
    for i, chunk in enumerate(chunks):
        for p in reader.feed(chunk, final=i == len(chunks) - 1):
            kind, value = ("thinking", p.text) if isinstance(p, Thought) else ("answer", p)
            if pieces and pieces[-1][0] == kind:
                pieces[-1] = (kind, pieces[-1][1] + value)
            else:
                pieces.append((kind, value))
    return pieces


CASES = [
    # (the answer, did the prompt open the thinking?, the pieces)
    ("<think>\nsum it\n</think>\n\nIt is 4.", False, [("thinking", "sum it\n"), ("answer", "It is 4.")]),
    ("sum it\n</think>\n\nIt is 4.", True, [("thinking", "sum it\n"), ("answer", "It is 4.")]),
    ("It is 4.", False, [("answer", "It is 4.")]),
    ("  <thin air", False, [("answer", "  <thin air")]),
    ("still thinking when cut off", True, [("thinking", "still thinking when cut off")]),
    ("a </think > b </think>c", True, [("thinking", "a </think > b "), ("answer", "c")]),
    ("<think>x</think>y <think>z</think>", False, [("thinking", "x"), ("answer", "y <think>z</think>")]),
]


@pytest.mark.parametrize(("text", "inside", "expected"), CASES)
def test_thinking_is_split_from_the_answer(text: str, inside: bool, expected) -> None:
    assert _read(text, inside) == expected


@pytest.mark.parametrize(("text", "inside", "expected"), CASES)
@pytest.mark.parametrize("step", [1, 3])
def test_a_stream_splits_as_the_whole_text_does(text: str, inside: bool, expected, step: int) -> None:
    assert _read(text, inside, step) == expected


# ChatML whose generation prompt opens the thinking, as Qwen3's thinking models' templates do.
THINKING_TEMPLATE = CHATML_TEMPLATE.replace(
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
    "{# a reasoning model's turn ends its thinking with </think> #}",
)
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_model_dir) -> str:
    return str(
        with_chat_template(tiny_model_dir, tmp_path_factory.mktemp("reasoner") / "m", THINKING_TEMPLATE)
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory, model) -> str:
    with eztinker.serve(data_dir=tmp_path_factory.mktemp("reasoning-data"), models=[model]) as url:
        yield url


def _raw_answer(oai: openai.OpenAI, model: str) -> str:
    """What the model writes after the rendered prompt, as a plain completion (nothing split)."""
    ids = AutoTokenizer.from_pretrained(model).apply_chat_template(
        HI, add_generation_prompt=True, tokenize=True
    )
    prompt = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return oai.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0).choices[0].text


def test_openai_hands_back_the_thinking_as_reasoning_content(server: str, model: str) -> None:
    """The random model never writes </think>: after a prompt that opened the thinking, all it writes is
    thinking, and the answer is empty; `include_reasoning: false` drops it."""
    oai = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    raw = _raw_answer(oai, model)
    assert raw and "</think>" not in raw
    reply = oai.chat.completions.create(model=model, messages=HI, max_tokens=12, temperature=0)
    message = reply.choices[0].message
    assert message.content == "" and message.model_extra["reasoning_content"] == raw
    streamed = ""
    for chunk in oai.chat.completions.create(
        model=model, messages=HI, max_tokens=12, temperature=0, stream=True
    ):
        delta = chunk.choices[0].delta
        assert not delta.content
        streamed += (delta.model_extra or {}).get("reasoning_content") or ""
    assert streamed == raw
    dropped = oai.chat.completions.create(
        model=model, messages=HI, max_tokens=12, temperature=0, extra_body={"include_reasoning": False}
    )
    assert "reasoning_content" not in (dropped.choices[0].message.model_extra or {})


def test_anthropic_hands_back_the_thinking_as_a_thinking_block(server: str, model: str) -> None:
    oai = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    raw = _raw_answer(oai, model)
    ant = anthropic.Anthropic(base_url=f"{server}/anthropic/api", api_key="unused", max_retries=0)
    kwargs = {"model": model, "max_tokens": 12, "messages": HI, "extra_body": {"temperature": 0}}
    message = ant.messages.create(**kwargs)
    assert [(b.type, b.thinking) for b in message.content] == [("thinking", raw)]
    with ant.messages.stream(**kwargs) as stream:
        streamed = stream.get_final_message()
    assert [(b.type, b.thinking) for b in streamed.content] == [("thinking", raw)]
    # The block goes back in the history as Claude Code sends it: accepted, the template decides.
    history = [*HI, {"role": "assistant", "content": [b.model_dump() for b in message.content]}, *HI]
    assert ant.messages.count_tokens(model=model, messages=history).input_tokens > 0


def test_anthropic_thinking_disabled_closes_the_thinking_at_once(server: str, model: str) -> None:
    """This template has no `enable_thinking` switch and opens the thinking in the prompt: `disabled` is
    a thinking budget of 0, so `</think>` comes first and the answer is all text, whole and streamed."""
    ant = anthropic.Anthropic(base_url=f"{server}/anthropic/api", api_key="unused", max_retries=0)
    kwargs = {
        "model": model,
        "max_tokens": 12,
        "messages": HI,
        "thinking": {"type": "disabled"},
        "extra_body": {"temperature": 0},
    }
    message = ant.messages.create(**kwargs)
    assert [b.type for b in message.content] == ["text"] and "think>" not in message.content[0].text
    with ant.messages.stream(**kwargs) as stream:
        streamed = stream.get_final_message()
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in message.content]


# --- thinking budgets and switches --------------------------------------------------------------------------

# ChatML whose template reads Qwen3's `enable_thinking`: false closes an empty thinking in the prompt.
SWITCH_TEMPLATE = CHATML_TEMPLATE.replace(
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}",
)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory, tiny_model_dir) -> str:
    """The reasoner with 2,048 positions: Anthropic's thinking budgets start at 1,024 tokens."""
    out = with_chat_template(
        tiny_model_dir, tmp_path_factory.mktemp("long-reasoner") / "m", THINKING_TEMPLATE
    )
    for name, key in (
        ("config.json", "max_position_embeddings"),
        ("tokenizer_config.json", "model_max_length"),
    ):
        config = json.loads((out / name).read_text())
        config[key] = 2048
        (out / name).write_text(json.dumps(config))
    return str(out)


@pytest.fixture(scope="module")
def budget_server(tmp_path_factory, long_model, tiny_model_dir) -> str:
    switch = with_chat_template(tiny_model_dir, tmp_path_factory.mktemp("switch") / "m", SWITCH_TEMPLATE)
    models = [long_model, str(tiny_model_dir), str(switch)]
    with eztinker.serve(data_dir=tmp_path_factory.mktemp("budget-data"), models=models) as url:
        yield url


def test_anthropic_thinking_budget_closes_the_thinking_and_the_answer_follows(
    budget_server, long_model
) -> None:
    """The random model never writes </think> itself: with a budget, its thinking is closed after
    budget_tokens tokens, and the rest of max_tokens is the answer, whole and streamed alike."""
    ant = anthropic.Anthropic(base_url=f"{budget_server}/anthropic/api", api_key="unused", max_retries=0)
    kwargs = {
        "model": long_model,
        "max_tokens": 1040,
        "messages": HI,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "extra_body": {"temperature": 0},
    }
    message = ant.messages.create(**kwargs)
    assert [b.type for b in message.content] == ["thinking", "text"] and message.content[1].text
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 1040
    tokenizer = AutoTokenizer.from_pretrained(long_model)
    assert len(tokenizer(message.content[0].thinking, add_special_tokens=False)["input_ids"]) <= 1024
    with ant.messages.stream(**kwargs) as stream:
        streamed = stream.get_final_message()
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in message.content]
    unbounded = ant.messages.create(**{**kwargs, "thinking": {"type": "adaptive"}})
    assert [b.type for b in unbounded.content] == ["thinking"]  # the model decides: it never stops


def test_openai_thinking_token_budget_as_vllm_takes_it(budget_server, long_model) -> None:
    oai = openai.OpenAI(base_url=f"{budget_server}/v1", api_key="unused", max_retries=0)
    free = oai.chat.completions.create(model=long_model, messages=HI, max_tokens=16, temperature=0)
    capped = oai.chat.completions.create(
        model=long_model, messages=HI, max_tokens=16, temperature=0, extra_body={"thinking_token_budget": 4}
    )
    thinking = capped.choices[0].message.model_extra["reasoning_content"]
    assert free.choices[0].message.content == "" and capped.choices[0].message.content
    assert thinking and free.choices[0].message.model_extra["reasoning_content"].startswith(thinking)


def test_thinking_switches_a_template_that_reads_enable_thinking(budget_server, tmp_path_factory) -> None:
    ant = anthropic.Anthropic(base_url=f"{budget_server}/anthropic/api", api_key="unused", max_retries=0)
    switch = next(
        m.id
        for m in openai.OpenAI(base_url=f"{budget_server}/v1", api_key="x").models.list()
        if "switch" in m.id
    )

    def counted(thinking: dict | None) -> int:
        extra = {} if thinking is None else {"thinking": thinking}
        return ant.messages.count_tokens(model=switch, messages=HI, **extra).input_tokens

    assert counted({"type": "disabled"}) > counted(None) == counted({"type": "adaptive"})


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            {"thinking": {"type": "enabled", "budget_tokens": 512}},
            "thinking.budget_tokens: must be an integer >= 1024",
        ),
        ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1100}}, "must be less than max_tokens"),
        (
            {
                "thinking": {"type": "enabled", "budget_tokens": 1024},
                "tools": [{"name": "f", "input_schema": {"type": "object"}}],
                "tool_choice": {"type": "any"},
            },
            "tool_choice: thinking may not be enabled",
        ),
        ({"thinking": {"type": "sometimes"}}, "thinking"),
    ],
)
def test_anthropic_refuses_a_thinking_it_cannot_honour(budget_server, long_model, change, words: str) -> None:
    body = {"model": long_model, "max_tokens": 1050, "messages": HI, **change}
    answer = httpx.post(f"{budget_server}/anthropic/api/v1/messages", json=body, timeout=60)
    assert answer.status_code == 400 and words in answer.json()["error"]["message"], answer.text


def test_thinking_on_a_model_that_does_not_reason_is_refused(budget_server, tiny_model_dir) -> None:
    body = {"model": str(tiny_model_dir), "max_tokens": 1050, "messages": HI}
    for route, extra in (
        ("anthropic/api/v1/messages", {"thinking": {"type": "enabled", "budget_tokens": 1024}}),
        ("v1/chat/completions", {"thinking_token_budget": 8}),
    ):
        answer = httpx.post(f"{budget_server}/{route}", json={**body, **extra}, timeout=60)
        assert answer.status_code == 400 and "does not reason" in answer.text, answer.text
    adaptive = {**body, "max_tokens": 4, "thinking": {"type": "adaptive"}}  # the model decides: no thinking
    assert (
        httpx.post(f"{budget_server}/anthropic/api/v1/messages", json=adaptive, timeout=60).status_code == 200
    )


def test_a_budget_and_a_constraint_together_think_then_answer_in_shape(budget_server, long_model) -> None:
    """The grammar lets the thinking run free up to </think>, which the budget writes; the JSON follows."""
    ant = anthropic.Anthropic(base_url=f"{budget_server}/anthropic/api", api_key="unused", max_retries=0)
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    }
    message = ant.messages.create(
        model=long_model,
        max_tokens=1100,
        messages=HI,
        thinking={"type": "enabled", "budget_tokens": 1024},
        extra_body={"temperature": 0, "output_format": {"type": "json_schema", "schema": schema}},
    )
    assert [b.type for b in message.content] == ["thinking", "text"] and message.stop_reason == "end_turn"
    assert 0 <= json.loads(message.content[1].text)["n"] <= 9
