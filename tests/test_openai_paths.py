"""The OpenAI routes at hosted Tinker's path (`/oai/api/v1`) as well as `/v1`, and `tinker://` checkpoint
paths as `model`, through the official `openai` client against a live server with API keys."""

from __future__ import annotations

import openai
import pytest

import eztinker
from eztinker import EZTinkerClient
from eztinker.service import Service
from eztinker.settings import Settings

KEY, OTHER = "key-a", "key-b"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("openai-paths"), models=[str(tiny_model_dir)], api_keys=[KEY, OTHER]
    )
    service = Service(settings)
    with eztinker.serve(service=service) as url:
        yield service, url


@pytest.fixture(scope="module")
def checkpoints(served, tiny_model_dir) -> str:
    """A run of KEY's with a weights checkpoint `w` and a sampler checkpoint `s`; its id."""
    _, url = served
    with EZTinkerClient(base_url=url, api_key=KEY) as client:
        run_id = client.create_run(base_model=str(tiny_model_dir), lora_config={"r": 2})
        client.save_checkpoint(run_id, "w")
        client.save_checkpoint(run_id, "sampler_weights.s", kind="weights")
    return run_id


def _client(url: str, prefix: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}{prefix}", api_key=key, max_retries=0)


@pytest.mark.parametrize("prefix", ["/v1", "/oai/api/v1"])
def test_both_prefixes_serve_models_completions_and_chat(served, prefix: str, tiny_model_dir) -> None:
    _, url = served
    oai = _client(url, prefix)
    model = str(tiny_model_dir)
    assert model in {m.id for m in oai.models.list().data}
    completion = oai.completions.create(model=model, prompt="hello", max_tokens=3, temperature=0)
    assert completion.usage.completion_tokens >= 1
    chat = oai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
    )
    assert chat.object == "chat.completion" and chat.usage.completion_tokens >= 1


def test_a_checkpoint_path_is_a_model_loaded_once(served, checkpoints: str) -> None:
    service, url = served
    loads = []
    load = service.sampling.from_checkpoint

    def counted(*args, **kwargs):
        loads.append(args[:2])
        return load(*args, **kwargs)

    service.sampling.from_checkpoint = counted  # type: ignore[method-assign]
    try:
        for prefix, path in [
            ("/oai/api/v1", f"tinker://{checkpoints}/sampler_weights/s"),
            ("/v1", f"tinker://{checkpoints}/weights/w"),
        ]:
            oai = _client(url, prefix)
            first = oai.completions.create(model=path, prompt="hello", max_tokens=4, temperature=0)
            again = oai.completions.create(model=path, prompt="hello", max_tokens=4, temperature=0)
            assert first.choices[0].text == again.choices[0].text
            chat = oai.chat.completions.create(
                model=path, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
            )
            assert chat.usage.completion_tokens >= 1
    finally:
        service.sampling.from_checkpoint = load  # type: ignore[method-assign]
    assert loads == [(checkpoints, "sampler_weights.s"), (checkpoints, "w")]  # once each


def test_another_keys_checkpoint_path_is_missing(served, checkpoints: str) -> None:
    _, url = served
    for prefix in ("/v1", "/oai/api/v1"):
        other = _client(url, prefix, key=OTHER)
        with pytest.raises(openai.NotFoundError) as theirs:
            other.completions.create(model=f"tinker://{checkpoints}/weights/w", prompt="x", max_tokens=2)
        with pytest.raises(openai.NotFoundError) as missing:
            other.completions.create(model="tinker://run-nope/weights/w", prompt="x", max_tokens=2)
        assert str(theirs.value).replace(checkpoints, "RUN") == str(missing.value).replace("run-nope", "RUN")
        with pytest.raises(openai.NotFoundError):
            _client(url, prefix).completions.create(
                model=f"tinker://{checkpoints}/weights/absent", prompt="x", max_tokens=2
            )
    with pytest.raises(openai.BadRequestError):
        _client(url, "/v1").completions.create(model="tinker://nope", prompt="x", max_tokens=2)


def test_a_checkpoint_on_its_base_model_as_hosted_tinker_names_it(
    served, checkpoints: str, tiny_model_dir
) -> None:
    """`<base model>;<checkpoint path>` samples the checkpoint, when it names the base it was trained on."""
    _, url = served
    path = f"tinker://{checkpoints}/sampler_weights/s"
    oai = _client(url, "/oai/api/v1")
    alone = oai.completions.create(model=path, prompt="hello", max_tokens=4, temperature=0)
    paired = oai.completions.create(
        model=f"{tiny_model_dir};{path}", prompt="hello", max_tokens=4, temperature=0
    )
    assert paired.choices[0].text == alone.choices[0].text
    with pytest.raises(openai.BadRequestError, match="was trained on"):
        oai.completions.create(model=f"other/base;{path}", prompt="hello", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="is not <base model>;tinker://"):
        oai.completions.create(model=f"{tiny_model_dir};{checkpoints}", prompt="hello", max_tokens=4)
    with pytest.raises(openai.NotFoundError):  # another key's checkpoint stays missing, base or not
        _client(url, "/v1", key=OTHER).completions.create(
            model=f"{tiny_model_dir};{path}", prompt="x", max_tokens=2
        )


def test_a_message_of_no_known_role_is_refused_naming_it(served, tiny_model_dir) -> None:
    """A typo'd role is a 400, as OpenAI's, never a turn of that name in the prompt."""
    _, url = served
    with pytest.raises(openai.BadRequestError) as refused:
        _client(url, "/v1").chat.completions.create(
            model=str(tiny_model_dir), messages=[{"role": "wizard", "content": "Hi"}], max_tokens=1
        )
    assert refused.value.param == "messages[0].role"
