"""A reasoning model's thinking, split from its answer (`api/reasoning.py`) and handed back as OpenAI's
`reasoning_content` and Anthropic's `thinking` blocks."""

from __future__ import annotations

import anthropic
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
