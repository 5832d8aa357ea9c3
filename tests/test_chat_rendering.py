"""How the OpenAI chat route renders its prompt beyond messages and tools: vLLM's extras that clients send
through `extra_body` (`chat_template_kwargs`, `add_generation_prompt`, `continue_final_message`), each
equal to transformers' own `apply_chat_template` with the same arguments, or a 400 naming the field."""

from __future__ import annotations

import httpx
import openai
import pytest
from transformers import AutoTokenizer

import eztinker
from eztinker.testing import CHATML_TEMPLATE, with_chat_template

# ChatML whose generation prompt reads a variable, as Qwen3's `enable_thinking` does, and whose system
# turn reads `reasoning_effort`, as gpt-oss's does.
THINKING_TEMPLATE = (
    "{% if reasoning_effort is defined %}"
    "{{ '<|im_start|>system\nReasoning: ' + reasoning_effort + '<|im_end|>\n' }}"
    "{% endif %}"
) + CHATML_TEMPLATE.replace(
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}",
)
HI = [{"role": "user", "content": "Hi"}]
PREFILLED = [*HI, {"role": "assistant", "content": "Sure, the answer is"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_model_dir) -> str:
    return str(
        with_chat_template(tiny_model_dir, tmp_path_factory.mktemp("thinking") / "m", THINKING_TEMPLATE)
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory, model, tiny_model_dir) -> str:
    models = [model, str(tiny_model_dir)]
    with eztinker.serve(data_dir=tmp_path_factory.mktemp("rendering-data"), models=models) as url:
        yield url


@pytest.fixture
def oai(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def _prompt_tokens(oai: openai.OpenAI, model: str, messages: list[dict], **extra) -> int:
    reply = oai.chat.completions.create(model=model, messages=messages, max_tokens=1, extra_body=extra)
    return reply.usage.prompt_tokens


def _expected(model: str, messages: list[dict], **kwargs) -> int:
    kwargs.setdefault("add_generation_prompt", True)
    ids = AutoTokenizer.from_pretrained(model).apply_chat_template(messages, tokenize=True, **kwargs)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_template_variables_reach_the_template(oai: openai.OpenAI, model: str) -> None:
    plain = _prompt_tokens(oai, model, HI)
    no_thinking = _prompt_tokens(oai, model, HI, chat_template_kwargs={"enable_thinking": False})
    assert plain == _expected(model, HI)
    assert no_thinking == _expected(model, HI, enable_thinking=False) > plain


def test_reasoning_effort_reaches_a_template_that_reads_it(
    oai: openai.OpenAI, model: str, tiny_model_dir
) -> None:
    low = _prompt_tokens(oai, model, HI, reasoning_effort="low")
    assert low == _expected(model, HI, reasoning_effort="low") > _expected(model, HI)
    plain = openai.OpenAI(base_url=oai.base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:  # ChatML reads no effort: refused, not ignored
        plain.chat.completions.create(
            model=str(tiny_model_dir), messages=HI, max_tokens=1, reasoning_effort="low"
        )
    assert info.value.body["param"] == "reasoning_effort"


def test_continuing_the_final_message_is_a_prefill(oai: openai.OpenAI, model: str) -> None:
    continued = _prompt_tokens(
        oai, model, PREFILLED, add_generation_prompt=False, continue_final_message=True
    )
    assert continued == _expected(model, PREFILLED, add_generation_prompt=False, continue_final_message=True)
    closed = _prompt_tokens(oai, model, PREFILLED, add_generation_prompt=False)
    assert closed == _expected(model, PREFILLED, add_generation_prompt=False) > continued  # + <|im_end|>\n


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        (
            {"chat_template_kwargs": {"enable_thinkin": False}},
            "chat_template_kwargs.enable_thinkin",
            "does not read",
        ),
        ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs.tools", "argument of the rendering"),
        ({"continue_final_message": True}, "continue_final_message", "add_generation_prompt: false"),
        ({"chat_template": "{{ messages }}"}, "chat_template", "not served"),
        ({"documents": [{"text": "d"}]}, "documents", "not served"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_the_field(
    server: str, model: str, extra, param, words
) -> None:
    body = {"model": model, "messages": PREFILLED, "max_tokens": 1, **extra}
    answer = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param and words in answer.json()["error"]["message"]


def test_only_an_assistant_message_can_be_continued(server: str, model: str) -> None:
    body = {"model": model, "messages": HI, "add_generation_prompt": False, "continue_final_message": True}
    answer = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "messages[0].role"


@pytest.mark.parametrize(
    ("template", "how"),
    [
        (CHATML_TEMPLATE.replace("message['content']", "'(content omitted)'"), "leaves it out"),
        (
            CHATML_TEMPLATE.replace("message['content']", "message['content'] + message['content']"),
            "writes it 2",
        ),
    ],
)
def test_an_image_the_template_drops_or_repeats_is_a_400_naming_its_part(
    tiny_tokenizer_dir, template: str, how: str
) -> None:
    """A template that leaves a message's content out (the image with it) or writes it twice would
    show the model other images than the request's: refused, naming the image's part."""
    from types import SimpleNamespace

    from eztinker.api.chat import PromptImages, render_with_images
    from eztinker.engine.errors import InvalidInputError
    from eztinker.engine.types import ImageChunk

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.chat_template = template
    images = PromptImages()
    content = "see " + images.mark("messages[0].content[1]", ImageChunk(data=b"png", format="png"))
    target = SimpleNamespace(base_model="tiny")
    with pytest.raises(InvalidInputError, match=how) as caught:
        render_with_images(None, target, tokenizer, [{"role": "user", "content": content}], images)  # type: ignore[arg-type]
    assert caught.value.field == "messages[0].content[1]"
