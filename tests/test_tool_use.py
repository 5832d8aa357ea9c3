"""Tool calling on the OpenAI and Anthropic routes, through the official clients against a live server.

The prompt side on tiny models whose chat templates render tools (`eztinker.testing.TOOLS_*_TEMPLATE`):
what the routes render equals transformers' own `apply_chat_template(messages, tools=...)`, history
included, and what cannot be honoured is a 400 naming the field. The answer side on SmolLM2, taught in a
few LoRA steps to answer a weather question with a call: both routes, whole and streamed, hand the call
back as the client's own tool-call objects.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest
from transformers import AutoTokenizer

import eztinker
from eztinker import EZTinkerClient
from eztinker.dataset import ChatDataset, parse_conversation
from eztinker.testing import TOOLS_JSON_TEMPLATE, TOOLS_XML_TEMPLATE, with_chat_template

WEATHER_OPENAI = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WEATHER_ANTHROPIC = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": WEATHER_OPENAI["function"]["parameters"],
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0}


def _ids(tokenizer, messages, tools=None) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


# --- the prompt: tools and tool history through the model's own template ---------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tool-templates")
    return {
        "json": str(with_chat_template(tiny_model_dir, root / "json", TOOLS_JSON_TEMPLATE)),
        "xml": str(with_chat_template(tiny_model_dir, root / "xml", TOOLS_XML_TEMPLATE)),
        "plain": str(tiny_model_dir),  # ChatML without tools
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, models) -> str:
    with eztinker.serve(data_dir=tmp_path_factory.mktemp("tools-data"), models=list(models.values())) as url:
        yield url


@pytest.fixture
def oai(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def ant(server: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{server}/anthropic/api", api_key="unused", max_retries=0)


# One conversation with a call and its result, as each API writes it and as templates read it.
OPENAI_HISTORY = [
    *QUESTION,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
]
ANTHROPIC_HISTORY = [
    *QUESTION,
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        ],
    },
    {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_1",
                "content": [{"type": "text", "text": "Sunny, 21 C"}],
            },
            {"type": "text", "text": "And tomorrow?"},
        ],
    },
]


def _template_history(call_id: str, text: str = "") -> list[dict]:
    call = {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
    }
    return [
        *QUESTION,
        {"role": "assistant", "content": text, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "name": "get_weather", "content": "Sunny, 21 C"},
    ]


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_openai_renders_tools_and_history_with_the_template(oai: openai.OpenAI, models, fmt: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(models[fmt])
    reply = oai.chat.completions.create(
        model=models[fmt], messages=OPENAI_HISTORY, tools=[WEATHER_OPENAI], max_tokens=1, extra_body=GREEDY
    )
    expected = _ids(tokenizer, _template_history("call_1"), [WEATHER_OPENAI])
    assert reply.usage.prompt_tokens == len(expected)
    rendered = tokenizer.decode(expected)
    assert '"name": "get_weather"' in rendered and "Sunny, 21 C" in rendered


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_anthropic_renders_tools_and_history_with_the_template(
    ant: anthropic.Anthropic, models, fmt: str
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(models[fmt])
    counted = ant.messages.count_tokens(
        model=models[fmt], system="Be brief.", messages=ANTHROPIC_HISTORY, tools=[WEATHER_ANTHROPIC]
    )
    expected = [
        {"role": "system", "content": "Be brief."},
        *_template_history("toolu_1", text="Let me check."),
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert counted.input_tokens == len(_ids(tokenizer, expected, [WEATHER_OPENAI]))
    message = ant.messages.create(
        model=models[fmt],
        system="Be brief.",
        max_tokens=1,
        messages=ANTHROPIC_HISTORY,
        tools=[WEATHER_ANTHROPIC],
        extra_body=GREEDY,
    )
    assert message.usage.input_tokens == counted.input_tokens


def test_tool_choice_none_renders_no_tools(oai: openai.OpenAI, ant: anthropic.Anthropic, models) -> None:
    """The model sees no tools, so it answers in text (nothing forces it, nothing is parsed)."""
    tokenizer = AutoTokenizer.from_pretrained(models["json"])
    reply = oai.chat.completions.create(
        model=models["json"], messages=QUESTION, tools=[WEATHER_OPENAI], tool_choice="none", max_tokens=1
    )
    assert (
        reply.usage.prompt_tokens
        == len(_ids(tokenizer, QUESTION))
        < len(_ids(tokenizer, QUESTION, [WEATHER_OPENAI]))
    )
    counted = ant.messages.count_tokens(
        model=models["json"], messages=QUESTION, tools=[WEATHER_ANTHROPIC], tool_choice={"type": "none"}
    )
    assert counted.input_tokens == len(_ids(tokenizer, QUESTION))


def _openai_error(server: str, route: str, body: dict) -> dict:
    answer = httpx.post(f"{server}/v1/{route}", json=body, timeout=60)
    assert answer.status_code == 400, answer.text
    return answer.json()["error"]


def _anthropic_error(server: str, body: dict) -> str:
    answer = httpx.post(f"{server}/anthropic/api/v1/messages/count_tokens", json=body, timeout=60)
    assert answer.status_code == 400, answer.text
    return answer.json()["error"]["message"]


@pytest.mark.parametrize(
    ("change", "param", "words"),
    [
        (
            {"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
            "tool_choice.function.name",
            "not one of the request's tools",
        ),
        (
            {
                "messages": [
                    *QUESTION,
                    {
                        **OPENAI_HISTORY[1],
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": "{city"},
                            }
                        ],
                    },
                ]
            },
            "messages[1].tool_calls[0].function.arguments",
            "not JSON",
        ),
        (
            {"messages": [*QUESTION, {"role": "tool", "content": "x"}]},
            "messages[1].tool_call_id",
            "id of its call",
        ),
    ],
)
def test_openai_refuses_what_it_cannot_honour_naming_the_field(
    server: str, models, change, param, words
) -> None:
    body = {
        "model": models["json"],
        "messages": QUESTION,
        "tools": [WEATHER_OPENAI],
        "max_tokens": 2,
        **change,
    }
    error = _openai_error(server, "chat/completions", body)
    assert error["param"] == param and words in error["message"]


def test_a_template_without_tools_refuses_tools_and_tool_history(server: str, models) -> None:
    """The ChatML template would silently drop the tools and the assistant's calls: a 400 instead."""
    plain = models["plain"]
    error = _openai_error(
        server, "chat/completions", {"model": plain, "messages": QUESTION, "tools": [WEATHER_OPENAI]}
    )
    assert error["param"] == "tools" and "does not render tools" in error["message"]
    error = _openai_error(server, "chat/completions", {"model": plain, "messages": OPENAI_HISTORY})
    assert error["param"] == "messages[1]" and "renders no tool calls" in error["message"]
    message = _anthropic_error(server, {"model": plain, "messages": QUESTION, "tools": [WEATHER_ANTHROPIC]})
    assert message.startswith("tools: ") and "does not render tools" in message
    message = _anthropic_error(server, {"model": plain, "messages": ANTHROPIC_HISTORY})
    assert message.startswith("messages[1]: ") and "renders no tool calls" in message


def test_tools_on_text_completions_are_refused(server: str, models) -> None:
    error = _openai_error(
        server, "completions", {"model": models["json"], "prompt": "x", "tools": [WEATHER_OPENAI]}
    )
    assert error["param"] == "tools" and "/v1/chat/completions" in error["message"]


@pytest.mark.parametrize(
    ("change", "start"),
    [
        ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "tools[0].type: 'bash_20250124'"),
        ({"tools": [{"name": "get_weather"}]}, "tools[0].input_schema: is missing"),
        (  # Anthropic's names: ^[a-zA-Z0-9_-]{1,128}$
            {"tools": [{"name": "get weather", "input_schema": {"type": "object"}}]},
            "tools[0].name: String should match pattern",
        ),
        ({"tool_choice": {"type": "tool", "name": "get_time"}}, "tool_choice.name: 'get_time' is not one of"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}
                ]
            },
            "messages[0].content[0]: 'tool_use' blocks are not served in a user message",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "document"}]}
                        ],
                    }
                ]
            },
            "messages[0].content[0].content[0]: 'document' blocks are not served in a tool result",
        ),
    ],
)
def test_anthropic_refuses_what_it_cannot_honour_naming_the_field(server: str, models, change, start) -> None:
    body = {"model": models["json"], "messages": QUESTION, "tools": [WEATHER_ANTHROPIC], **change}
    assert _anthropic_error(server, body).startswith(start)


def test_a_template_that_raises_is_a_400_with_its_words(tmp_path, tiny_model_dir) -> None:
    strict = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    model = str(with_chat_template(tiny_model_dir, tmp_path / "strict", strict))
    with eztinker.serve(data_dir=tmp_path / "d", models=[model]) as url:
        error = _openai_error(url, "chat/completions", {"model": model, "messages": QUESTION})
    assert error["param"] == "messages" and "roles must alternate" in error["message"]


# --- the answer: a model that calls the tool ---------------------------------------------------------


CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def caller(tmp_path_factory, smollm2_model_dir):
    """(server url, run id, prompt tokens) of SmolLM2 with the JSON tools template, its LoRA run taught
    in a few SFT steps to answer the weather question (tools rendered) with `CALL_TEXT`."""
    model = str(
        with_chat_template(smollm2_model_dir, tmp_path_factory.mktemp("smol") / "m", TOOLS_JSON_TEMPLATE)
    )
    tokenizer = AutoTokenizer.from_pretrained(model)
    # The SFT side of the same loop: a tool-use chat in OpenAI's fine-tuning format, through ChatDataset.
    record = {"tools": [WEATHER_OPENAI], "messages": [*QUESTION, OPENAI_HISTORY[1]]}
    [example] = ChatDataset([parse_conversation(record)], tokenizer)
    prompt = _ids(tokenizer, QUESTION, [WEATHER_OPENAI])
    data_dir = tmp_path_factory.mktemp("caller-data")
    with eztinker.serve(data_dir=data_dir, models=[model]) as url, EZTinkerClient(base_url=url) as client:
        run_id = client.create_run(base_model=model, lora_config={"r": 16, "lora_alpha": 32, "seed": 0})
        for _ in range(8):
            client.forward_backward(run_id, data=[example.to_native()])
            client.optim_step(run_id, learning_rate=2e-3).result()
        taught = client.sample(prompt, run_id=run_id, max_new_tokens=40, temperature=0)
        assert CALL_TEXT in taught, taught
        yield url, run_id, prompt


@pytest.mark.slow
def test_openai_hands_back_the_call_whole_and_streamed(caller) -> None:
    url, run_id, prompt = caller
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    kwargs = {
        "model": run_id,
        "messages": QUESTION,
        "tools": [WEATHER_OPENAI],
        "max_tokens": 40,
        "extra_body": GREEDY,
    }
    reply = oai.chat.completions.create(**kwargs)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    content, calls, reasons = "", {}, []
    for chunk in oai.chat.completions.create(**kwargs, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or []:
            entry = calls.setdefault(part.index, {"id": part.id, "name": "", "arguments": ""})
            entry["name"] += part.function.name or ""
            entry["arguments"] += part.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert content.strip() == "" and reasons[-1] == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris"})
    ]

    # Text completions read no calls: the same prompt's answer is the model's text, tags and all.
    plain = oai.completions.create(model=run_id, prompt=prompt, max_tokens=40, extra_body=GREEDY)
    assert CALL_TEXT in plain.choices[0].text


@pytest.mark.slow
def test_anthropic_hands_back_the_call_whole_and_streamed(caller) -> None:
    url, run_id, _ = caller
    ant = anthropic.Anthropic(base_url=f"{url}/anthropic/api", api_key="unused", max_retries=0)
    kwargs = {
        "model": run_id,
        "max_tokens": 40,
        "messages": QUESTION,
        "tools": [WEATHER_ANTHROPIC],
        "extra_body": GREEDY,
    }
    message = ant.messages.create(**kwargs)
    assert message.stop_reason == "tool_use"
    [block] = message.content
    assert block.type == "tool_use" and block.id.startswith("toolu_")
    assert (block.name, block.input) == ("get_weather", {"city": "Paris"})

    with ant.messages.stream(**kwargs) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert streamed.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in streamed.content] == [
        ("tool_use", "get_weather", {"city": "Paris"})
    ]

    # The conversation goes on: the call and its result, rendered back in the template's format.
    follow = ant.messages.create(
        **{
            **kwargs,
            "messages": [
                *QUESTION,
                {"role": "assistant", "content": [block.model_dump()]},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "Sunny"}],
                },
            ],
        }
    )
    assert follow.usage.input_tokens > message.usage.input_tokens
