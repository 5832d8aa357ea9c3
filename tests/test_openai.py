"""The OpenAI-compatible routes through the official `openai` client against a live server."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from transformers import AutoTokenizer

import eztinker
from eztinker import EZTinkerClient


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir) -> str:
    with eztinker.serve(data_dir=tmp_path_factory.mktemp("openai-data"), models=[str(tiny_model_dir)]) as url:
        yield url


@pytest.fixture
def oai(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir)


def test_models_lists_base_models_and_runs(oai: openai.OpenAI, server: str, model: str) -> None:
    with EZTinkerClient(base_url=server) as client:
        run_id = client.create_run(base_model=model, lora_config={"r": 2})
    ids = {m.id: m for m in oai.models.list().data}
    assert model in ids and run_id in ids
    assert ids[run_id].model_extra["kind"] == "run" and ids[run_id].model_extra["base_model"] == model
    completion = oai.completions.create(model=run_id, prompt="hello", max_tokens=4, temperature=0)
    assert completion.choices[0].text is not None and completion.usage.completion_tokens >= 1


def test_completion_counts_tokens_and_reports_length(oai: openai.OpenAI, model: str) -> None:
    completion = oai.completions.create(model=model, prompt="The cat", max_tokens=5, temperature=0)
    choice = completion.choices[0]
    assert completion.object == "text_completion" and isinstance(choice.text, str)
    assert choice.finish_reason in ("length", "stop")
    usage = completion.usage
    assert usage.prompt_tokens > 0 and 1 <= usage.completion_tokens <= 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # Several prompts, as text or as token ids; choices indexed prompt-major.
    many = oai.completions.create(model=model, prompt=["a b", "c d"], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    by_ids = oai.completions.create(model=model, prompt=[17, 250, 31], max_tokens=3, temperature=0)
    assert by_ids.usage.prompt_tokens == 3


def test_chat_uses_the_chat_template(oai: openai.OpenAI, model: str) -> None:
    chat = oai.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        max_tokens=6,
        temperature=0,
    )
    assert chat.object == "chat.completion"
    message = chat.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    assert chat.usage.prompt_tokens > 10  # the ChatML wrapping is in the prompt


def test_seeded_requests_reproduce_and_n_gives_distinct_samples(oai: openai.OpenAI, model: str) -> None:
    def texts(seed: int) -> list[str]:
        out = oai.completions.create(model=model, prompt="x", max_tokens=12, n=3, seed=seed, temperature=1.0)
        return [c.text for c in out.choices]

    first = texts(7)
    assert texts(7) == first and len(first) == 3
    assert len(set(first)) > 1 and texts(8) != first


def test_streaming_arrives_in_chunks_equal_to_the_whole(oai: openai.OpenAI, model: str) -> None:
    kwargs = {"model": model, "prompt": "stream me", "max_tokens": 24, "seed": 3, "temperature": 1.0}
    whole = oai.completions.create(**kwargs)
    chunks = list(oai.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) >= 3
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )

    chat_kwargs = {
        "model": model,
        "messages": [{"role": "user", "content": "hey"}],
        "max_tokens": 16,
        "seed": 5,
    }
    chat_whole = oai.chat.completions.create(**chat_kwargs).choices[0].message.content
    deltas = list(oai.chat.completions.create(stream=True, **chat_kwargs))
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == chat_whole


def test_streaming_is_incremental(server: str, model: str) -> None:
    """Tokens are sent as they are generated: the first text arrives long before the end."""
    body = {"model": model, "prompt": "go", "max_tokens": 300, "temperature": 1.0, "seed": 1, "stream": True}
    arrivals = []
    start = time.perf_counter()
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.perf_counter() - start)
    assert len(arrivals) > 10
    assert arrivals[0] < 0.5 * arrivals[-1]


def test_stop_strings_are_cut_from_the_text(oai: openai.OpenAI, model: str) -> None:
    base = oai.completions.create(model=model, prompt="abc", max_tokens=20, temperature=0).choices[0].text
    assert len(base) > 4
    stop = base[3:5]
    cut = oai.completions.create(model=model, prompt="abc", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == base[: base.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = oai.completions.create(
        model=model, prompt="abc", max_tokens=20, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_logprobs_in_both_shapes(oai: openai.OpenAI, model: str) -> None:
    completion = oai.completions.create(model=model, prompt="abc", max_tokens=4, temperature=0, logprobs=3)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(x <= 0 for x in lp.token_logprobs) and all(len(t) <= 3 for t in lp.top_logprobs)
    # Greedy: the chosen token is the most likely one.
    assert all(
        abs(max(t.values()) - x) < 1e-5 for t, x in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    chat = oai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "x"}], max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens  # every generated token, EOS included
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_errors_have_openai_shape(oai: openai.OpenAI, server: str, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        oai.completions.create(model="no-such-model", prompt="x")
    assert "no-such-model" in missing.value.message
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=model, prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=model, prompt="x", max_tokens=10**9)
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=model, messages=[])
    raw = httpx.post(f"{server}/v1/completions", json={"prompt": "x"})
    assert raw.status_code == 400
    error = raw.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == "model"


def test_auth_errors_have_openai_shape(tmp_path, tiny_model_dir) -> None:
    with eztinker.serve(data_dir=tmp_path, models=[str(tiny_model_dir)], api_keys=["k1"]) as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="k1", max_retries=0)
        assert [m.id for m in good.models.list().data] == [str(tiny_model_dir)]


def test_a_tokenizer_without_chat_template_is_a_clear_400(tmp_path, tiny_model_dir) -> None:
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    config = plain / "tokenizer_config.json"
    import json

    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    for extra in plain.glob("chat_template.*"):
        extra.unlink()
    with eztinker.serve(data_dir=tmp_path / "d", models=[str(plain)]) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="chat template"):
            client.chat.completions.create(model=str(plain), messages=[{"role": "user", "content": "x"}])


def test_logit_bias_and_penalties_shape_the_completion(oai: openai.OpenAI, model: str) -> None:
    """OpenAI's logit_bias (token id -> bias) and frequency / presence penalties reach the sampler: a
    +100 bias makes greedy decoding say that token; a presence penalty keeps greedy from repeating."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompt = [17, 250, 31]
    forced = oai.completions.create(
        model=model, prompt=prompt, max_tokens=5, temperature=0, logit_bias={"40": 100}
    )
    assert forced.choices[0].text == tokenizer.decode([40] * 5)
    chat = oai.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logit_bias={"40": 100},
    )
    assert chat.choices[0].message.content == tokenizer.decode([40] * 4)

    def greedy_tokens(**shaping) -> list[str]:
        out = oai.completions.create(
            model=model, prompt=prompt, max_tokens=12, temperature=0, logprobs=0, **shaping
        )
        return out.choices[0].logprobs.tokens

    plain = greedy_tokens()
    assert len(set(plain)) < len(plain)  # greedy repeats itself on this model
    varied = greedy_tokens(presence_penalty=2.0)
    assert varied != plain and len(set(varied)) > len(set(plain))
    assert greedy_tokens(frequency_penalty=0.0, presence_penalty=0.0) == plain


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("functions", [{"name": "f", "parameters": {}}]),
        ("modalities", ["text", "audio"]),
        ("verbosity", "low"),
        ("guided_grammar", "root ::= x"),
        ("min_p", 0.1),
        ("repetition_penalty", 1.2),
    ],
)
def test_what_is_not_served_is_refused_naming_the_field(server: str, model: str, field: str, value) -> None:
    """A field that would change the output and that this server does not do is a 400 naming it, never
    answered as if it had not been sent; the same field at its off value is fine."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    refused = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == field and "not served" in refused.json()["error"]["message"]
    off = {
        "functions": [],
        "modalities": ["text"],
        "min_p": 0.0,
    }
    if field in off:
        assert (
            httpx.post(
                f"{server}/v1/chat/completions", json={**body, field: off[field]}, timeout=60
            ).status_code
            == 200
        )


def test_a_bad_logit_bias_is_a_400_naming_it(oai: openai.OpenAI, model: str) -> None:
    for bias in ({"forty": 1}, {"40": 101}, {"99999999": 1}):
        with pytest.raises(openai.BadRequestError) as info:
            oai.completions.create(model=model, prompt="x", max_tokens=2, logit_bias=bias)
        assert "logit_bias" in str(info.value.body)


def test_a_sampling_error_names_the_routes_own_field(server: str, model: str) -> None:
    """The engine's check of max_tokens against the context is reported under the field the client sent."""
    for field in ("max_tokens", "max_completion_tokens"):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], field: 100_000}
        answer = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == field, answer.text
        assert "exceeds the model's context" in answer.json()["error"]["message"]
    body = {"model": model, "prompt": ["a", "b"], "max_tokens": 100_000}
    answer = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "max_tokens", answer.text
