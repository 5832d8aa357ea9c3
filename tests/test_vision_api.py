"""Images through the facades, on a tiny Qwen3-VL: Tinker's `ImageChunk` (the official SDK) and OpenAI
`image_url` data URLs (the `openai` package), against a live server; bad images are 4xx naming the chunk."""

from __future__ import annotations

import base64
import inspect
import io
from pathlib import Path

import openai
import pytest
import torch
from PIL import Image

import eztinker
from eztinker.api import tinker as tinker_routes
from eztinker.api import tinker_wire as wire
from eztinker.engine import Datum, Engine, InvalidInputError
from eztinker.engine.types import ImageChunk
from eztinker.testing import make_tiny_model

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

# The forward_backward route expands a datum's images once `api/tinker.py` calls `wire.expand_images`
# with the run's base model (see the report of issue 17); until then those tests are skipped.
ROUTE_EXPANDS = "expand_images" in inspect.getsource(tinker_routes)
needs_route = pytest.mark.skipif(
    not ROUTE_EXPANDS, reason="api/tinker.py does not call wire.expand_images yet"
)


def png(width: int = 32, height: int = 32, color=(200, 30, 60), fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format=fmt)
    return out.getvalue()


def huge_png(width: int = 7000, height: int = 6000) -> bytes:
    """A valid 1×1 PNG whose header claims `width`×`height` (refused from the header, never decoded)."""
    import struct
    import zlib

    data = bytearray(png(1, 1))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


RED, GREEN = png(), png(color=(20, 180, 40))
IMAGE_TOKENS = 4  # a 32×32 image on the tiny vision tower: a 4×4 patch grid, 2×2 merged


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp("tiny-qwen3_vl"), "qwen3_vl", num_layers=2, tokenizer_dir=tiny_tokenizer_dir
    )


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def server(tmp_path_factory, vl_dir, tiny_model_dir, monkeypatch_module) -> str:
    monkeypatch_module.setenv("TINKER_API_KEY", "tml-test")
    monkeypatch_module.setenv("TINKER_TELEMETRY", "0")
    monkeypatch_module.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    data_dir = tmp_path_factory.mktemp("vision-data")
    with eztinker.serve(data_dir=data_dir, models=[str(vl_dir), str(tiny_model_dir)]) as url:
        yield url


@pytest.fixture(scope="module")
def service_client(server: str):
    client = tinker.ServiceClient(base_url=server)
    client.get_server_capabilities()  # the SDK's REST holder first (see tests/test_tinker_sdk.py)
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def vision_ids(vl_dir) -> tuple[int, int]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(vl_dir))
    return config.vision_start_token_id, config.vision_end_token_id


def model_input(vision_ids, image: bytes, before=(5, 6), after=(7, 8, 9), expected=IMAGE_TOKENS):
    start, end = vision_ids
    return types.ModelInput(
        chunks=[
            types.EncodedTextChunk(tokens=[*before, start]),
            types.ImageChunk(data=image, format="png", expected_tokens=expected),
            types.EncodedTextChunk(tokens=[end, *after]),
        ]
    )


def sdk_datum(vision_ids, image: bytes) -> types.Datum:
    mi = model_input(vision_ids, image)
    n = mi.length
    targets = [(11 + 7 * i) % 900 + 3 for i in range(n)]
    return types.Datum(model_input=mi, loss_fn_inputs={"target_tokens": targets, "weights": [1.0] * n})


# --- the wire --------------------------------------------------------------------------------------------


def test_protobuf_image_chunks_decode_to_typed_images(vision_ids) -> None:
    from tinker.proto import request_conv

    datum = sdk_datum(vision_ids, RED)
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"),
        model_id="m",
        seq_id=1,
    )
    body = request_conv.forward_backward_request_to_proto(request).SerializeToString()  # the SDK's encoder
    call = wire.decode_forward_backward(body, None)
    assert call.chunks is not None
    chunks = call.chunks[0]
    assert chunks[0] == [5, 6, vision_ids[0]] and chunks[2] == [vision_ids[1], 7, 8, 9]
    assert chunks[1] == ImageChunk(data=RED, format="png", expected_tokens=IMAGE_TOKENS)
    expanded = wire.expand_images(call, lambda c, where: ([1] * datum.model_input.length, (c[1],)))
    assert expanded.chunks is None and list(expanded.data[0].tokens) == [1] * datum.model_input.length
    assert expanded.data[0].images == (chunks[1],)


def test_json_chunks_decode_and_pointers_are_refused() -> None:
    good = {
        "chunks": [
            {"type": "encoded_text", "tokens": [1, 2]},
            {"type": "image", "data": base64.b64encode(RED).decode(), "format": "png", "expected_tokens": 4},
        ]
    }
    assert wire.model_input_chunks(good)[1] == ImageChunk(RED, "png", 4)
    pointer = {"chunks": [{"type": "image_asset_pointer", "location": "s3://x.png", "format": "png"}]}
    with pytest.raises(
        InvalidInputError, match=r"^prompt\.chunks\[0\]: image_asset_pointer.*fetches no image"
    ):
        wire.model_input_chunks(pointer)
    bad = {
        "chunks": [{"type": "encoded_text", "tokens": [1]}, {"type": "image", "data": "%%", "format": "png"}]
    }
    with pytest.raises(InvalidInputError, match=r"^prompt\.chunks\[1\]\.data: is not valid base64"):
        wire.model_input_chunks(bad)


# --- the Tinker SDK ---------------------------------------------------------------------------------------


@needs_route
def test_sdk_loss_with_an_image_equals_the_engine_and_training_learns(
    service_client, vl_dir, vision_ids
) -> None:
    training = service_client.create_lora_training_client(base_model=str(vl_dir), rank=8, seed=0).result()
    red, green = sdk_datum(vision_ids, RED), sdk_datum(vision_ids, GREEN)
    out = training.forward([red], "cross_entropy").result()
    sdk_logprobs = out.loss_fn_outputs[0]["logprobs"].to_torch()
    assert sdk_logprobs.shape == (red.model_input.length,)

    # Engine-side: the same image and tokens on a fresh run (LoRA B starts at zero: the base model).
    engine = Engine()
    run_id = engine.create_run(str(vl_dir), {"r": 8, "seed": 0}).run_id
    chunks = [[5, 6, vision_ids[0]], ImageChunk(RED, "png", IMAGE_TOKENS), [vision_ids[1], 7, 8, 9]]
    tokens, images = engine.expand_chunks(str(vl_dir), chunks)
    targets = red.loss_fn_inputs["target_tokens"].tolist()
    result = engine.forward(
        run_id, [Datum(tokens, {"target_tokens": targets}, images=images)], "cross_entropy"
    )
    torch.testing.assert_close(
        sdk_logprobs, torch.as_tensor(result.logprobs[0]).float(), rtol=1e-5, atol=1e-5
    )
    other = training.forward([green], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_torch()
    assert not torch.allclose(other, sdk_logprobs)  # the pixels reach the model

    before = float(-sdk_logprobs.sum())
    for _ in range(3):
        training.forward_backward([red], "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after = float(
        -training.forward([red], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_torch().sum()
    )
    assert after < before

    sampler = training.save_weights_and_get_sampling_client().result()
    prompt = model_input(vision_ids, RED, after=())
    sample = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=4, seed=3, stop=[])).result()
    assert [len(s.tokens) for s in sample.sequences] == [4, 4]


@needs_route
def test_sdk_refuses_a_bad_image_naming_the_chunk(service_client, vl_dir, tiny_model_dir, vision_ids) -> None:
    training = service_client.create_lora_training_client(base_model=str(vl_dir), rank=4, seed=0).result()
    bad = sdk_datum(vision_ids, b"not a png")
    with pytest.raises(tinker.RequestFailedError, match=r"data\[0\]\.model_input\.chunks\[1\]\.data.*decode"):
        training.forward_backward([bad], "cross_entropy").result(timeout=60)
    text_only = service_client.create_lora_training_client(
        base_model=str(tiny_model_dir), rank=4, seed=0
    ).result()
    with pytest.raises(tinker.RequestFailedError, match=r"chunks\[1\].*takes no images"):
        text_only.forward([sdk_datum(vision_ids, RED)], "cross_entropy").result(timeout=60)


def test_sdk_samples_with_an_image_and_refuses_bad_ones(
    service_client, vl_dir, tiny_model_dir, vision_ids
) -> None:
    sampler = service_client.create_sampling_client(base_model=str(vl_dir)).result()
    params = types.SamplingParams(max_tokens=3, seed=5, stop=[])
    red = sampler.sample(model_input(vision_ids, RED, after=()), 1, params).result()
    again = sampler.sample(model_input(vision_ids, RED, after=()), 1, params).result()
    assert red.sequences[0].tokens == again.sequences[0].tokens and len(red.sequences[0].tokens) == 3
    # The prompt's log-probs see the image: the text after it scores differently under another image.
    lp_red = sampler.compute_logprobs(model_input(vision_ids, RED)).result()
    lp_green = sampler.compute_logprobs(model_input(vision_ids, GREEN)).result()
    assert len(lp_red) == model_input(vision_ids, RED).length and lp_red[-1] != lp_green[-1]

    with pytest.raises(tinker.RequestFailedError, match=r"prompt\.chunks\[1\]\.data: does not decode"):
        sampler.sample(model_input(vision_ids, b"junk"), 1, params).result(timeout=60)
    with pytest.raises(tinker.RequestFailedError, match=r"prompt\.chunks\[1\]\.expected_tokens: is 7"):
        sampler.sample(model_input(vision_ids, RED, expected=7), 1, params).result(timeout=60)
    with pytest.raises(tinker.RequestFailedError, match=r"prompt\.chunks\[1\]\.data.*pixels"):
        sampler.sample(model_input(vision_ids, huge_png()), 1, params).result(timeout=60)
    text_only = service_client.create_sampling_client(base_model=str(tiny_model_dir)).result()
    with pytest.raises(tinker.RequestFailedError, match=r"prompt\.chunks\[1\].*takes no images"):
        text_only.sample(model_input(vision_ids, RED), 1, params).result(timeout=60)


# --- OpenAI -----------------------------------------------------------------------------------------------


def data_url(image: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(image).decode()}"


def chat(image_url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": image_url}},
            ],
        }
    ]


def test_openai_chat_with_an_image_data_url(server, vl_dir) -> None:
    oai = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    model = str(vl_dir)

    def answer(url: str, **kw):
        return oai.chat.completions.create(model=model, messages=chat(url), max_tokens=3, seed=1, **kw)

    red = answer(data_url(RED))
    text_only = oai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "what is this?"}], max_tokens=3, seed=1
    )
    # The image's placeholder run and its vision start / end tokens count as prompt tokens.
    assert red.usage.prompt_tokens == text_only.usage.prompt_tokens + IMAGE_TOKENS + 2
    assert red.usage.completion_tokens == 3
    jpeg = answer(data_url(png(fmt="JPEG"), "image/jpeg"))
    assert jpeg.usage.prompt_tokens == red.usage.prompt_tokens
    assert answer(data_url(RED)).choices[0].message.content == red.choices[0].message.content


def test_openai_refuses_bad_images_naming_the_part(server, vl_dir, tiny_model_dir) -> None:
    oai = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    cases = {
        "https://example.com/cat.png": r"messages\[0\]\.content\[1\]\.image_url\.url: .*not a data URL.*fetches no",
        "data:image/png;base64,@@@": r"messages\[0\]\.content\[1\]\.image_url\.url: is not valid base64",
        # The image's bytes and format are the data URL's: the error names it, not the engine's chunk.
        data_url(b"not an image"): r"messages\[0\]\.content\[1\]\.image_url: does not decode",
        data_url(RED, "image/jpeg"): r"messages\[0\]\.content\[1\]\.image_url: is a PNG image, not jpeg",
        data_url(huge_png()): r"messages\[0\]\.content\[1\]\.image_url: .*pixels",
        data_url(b"<svg/>", "image/svg+xml"): r"messages\[0\]\.content\[1\]\.image_url: 'svg\+xml' is not",
    }
    for url, message in cases.items():
        with pytest.raises(openai.BadRequestError, match=message):
            oai.chat.completions.create(model=str(vl_dir), messages=chat(url), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.content\[1\].*takes no images"):
        oai.chat.completions.create(model=str(tiny_model_dir), messages=chat(data_url(RED)), max_tokens=2)


def test_responses_input_image_is_the_chat_image(server, vl_dir, tiny_model_dir) -> None:
    """`/v1/responses` `input_image` parts mean the chat route's `image_url` parts: the same prompt (and so
    the same seeded answer), and bad images are refused naming the Responses field."""
    oai = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    content = [
        {"type": "input_text", "text": "what is this?"},
        {"type": "input_image", "image_url": data_url(RED), "detail": "auto"},
    ]
    response = oai.responses.create(
        model=str(vl_dir),
        input=[{"role": "user", "content": content}],
        max_output_tokens=3,
        extra_body={"seed": 1},
    )
    chatted = oai.chat.completions.create(
        model=str(vl_dir), messages=chat(data_url(RED)), max_tokens=3, seed=1
    )

    assert response.usage.input_tokens == chatted.usage.prompt_tokens
    assert response.output_text == chatted.choices[0].message.content
    for url, words in (("https://example.com/cat.png", "data URL"), (data_url(b"junk"), "does not decode")):
        bad = {"type": "input_image", "image_url": url}
        with pytest.raises(openai.BadRequestError, match=rf"input\[0\]\.content\[1\]\.image_url: .*{words}"):
            oai.responses.create(model=str(vl_dir), input=[{"role": "user", "content": [content[0], bad]}])
    with pytest.raises(openai.BadRequestError, match=r"input\[0\]\.content\[0\].*takes no images"):
        oai.responses.create(model=str(tiny_model_dir), input=[{"role": "user", "content": [content[1]]}])
    with pytest.raises(openai.BadRequestError, match=r"input\[0\]\.content\[0\]: an image needs image_url"):
        oai.responses.create(
            model=str(vl_dir), input=[{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]
        )


# --- Anthropic --------------------------------------------------------------------------------------------


def test_anthropic_image_blocks_are_the_chat_image(server, vl_dir, tiny_model_dir) -> None:
    """An Anthropic `image` block (base64) is the same image as the chat route's data URL: the same prompt
    and seeded answer's length; other sources and bad images are refused naming the block."""
    import anthropic

    claude = anthropic.Anthropic(base_url=f"{server}/anthropic/api", api_key="unused", max_retries=0)
    image = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(RED).decode()}
    content = [{"type": "text", "text": "what is this?"}, {"type": "image", "source": image}]
    message = claude.messages.create(
        model=str(vl_dir), messages=[{"role": "user", "content": content}], max_tokens=3
    )
    counted = claude.messages.count_tokens(model=str(vl_dir), messages=[{"role": "user", "content": content}])
    text_only = claude.messages.count_tokens(
        model=str(vl_dir), messages=[{"role": "user", "content": content[:1]}]
    )

    assert message.usage.input_tokens == counted.input_tokens == text_only.input_tokens + IMAGE_TOKENS + 2
    assert message.usage.output_tokens == 3
    gif = {"type": "base64", "media_type": "image/gif", "data": base64.b64encode(png(fmt="GIF")).decode()}
    as_gif = claude.messages.count_tokens(
        model=str(vl_dir),
        messages=[{"role": "user", "content": [content[0], {"type": "image", "source": gif}]}],
    )
    assert as_gif.input_tokens == counted.input_tokens  # any format the processor reads, as the error says
    cases = {
        "url": (
            {"type": "url", "url": "https://example.com/cat.png"},
            r"messages\[0\]\.content\[1\]\.source\.type: 'url' image sources are not served",
        ),
        "bad base64": (
            {**image, "data": "@@@"},
            r"messages\[0\]\.content\[1\]\.source\.data: is not valid base64",
        ),
        "not an image": (
            {**image, "data": base64.b64encode(b"not an image").decode()},
            r"messages\[0\]\.content\[1\]\.source\.data: does not decode",
        ),
        "not its media type": (
            {**image, "media_type": "image/jpeg"},
            r"messages\[0\]\.content\[1\]\.source\.data: is a PNG image, not jpeg",
        ),
        "svg": (
            {**image, "media_type": "image/svg+xml"},
            r"messages\[0\]\.content\[1\]\.source\.media_type: 'image/svg\+xml' is not one of image/gif, "
            r"image/jpeg, image/jpg, image/png, image/webp",
        ),
    }
    for source, message_pattern in cases.values():
        with pytest.raises(anthropic.BadRequestError, match=message_pattern):
            claude.messages.create(
                model=str(vl_dir),
                messages=[{"role": "user", "content": [content[0], {"type": "image", "source": source}]}],
                max_tokens=2,
            )
    with pytest.raises(anthropic.BadRequestError, match=r"messages\[0\]\.content\[1\].*takes no images"):
        claude.messages.create(
            model=str(tiny_model_dir), messages=[{"role": "user", "content": content}], max_tokens=2
        )


def test_anthropic_tool_results_carry_images_on_a_vision_model(server, vl_dir, tiny_model_dir) -> None:
    """A `tool_result` whose content holds `image` blocks (Claude Code's screenshots) puts each image in
    the tool's turn, where it stands among the text; a model without vision refuses it naming the block."""
    import anthropic

    claude = anthropic.Anthropic(base_url=f"{server}/anthropic/api", api_key="unused", max_retries=0)
    image = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(RED).decode()}
    text = {"type": "text", "text": "the screen:"}

    def turn(*blocks) -> list[dict]:
        result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": list(blocks)}
        return [{"role": "user", "content": [result]}]

    with_image = turn(text, {"type": "image", "source": image})
    counted = claude.messages.count_tokens(model=str(vl_dir), messages=with_image)
    text_only = claude.messages.count_tokens(model=str(vl_dir), messages=turn(text))
    assert counted.input_tokens == text_only.input_tokens + IMAGE_TOKENS + 2
    message = claude.messages.create(model=str(vl_dir), messages=with_image, max_tokens=2)
    assert message.usage.input_tokens == counted.input_tokens
    with pytest.raises(
        anthropic.BadRequestError, match=r"messages\[0\]\.content\[0\]\.content\[1\].*takes no images"
    ):
        claude.messages.create(model=str(tiny_model_dir), messages=with_image, max_tokens=2)
    bad = turn(text, {"type": "image", "source": {**image, "data": "@@@"}})
    with pytest.raises(
        anthropic.BadRequestError,
        match=r"messages\[0\]\.content\[0\]\.content\[1\]\.source\.data: is not valid",
    ):
        claude.messages.create(model=str(vl_dir), messages=bad, max_tokens=2)


def test_text_that_looks_like_an_image_mark_is_only_text(server, vl_dir) -> None:
    """The server marks each image's place in the rendered chat; a client's text spelling such a mark
    (an index out of range, or an image's own) neither fails nor repeats an image."""
    oai = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    for index in (0, 7):
        text = f"look \ufff9eztinker-image-{index}\ufffb"
        with_image = [
            {"type": "image_url", "image_url": {"url": data_url(RED)}},
            {"type": "text", "text": text},
        ]
        answer = oai.chat.completions.create(
            model=str(vl_dir), messages=[{"role": "user", "content": with_image}], max_tokens=1
        )
        text_only = oai.chat.completions.create(
            model=str(vl_dir), messages=[{"role": "user", "content": [with_image[1]]}], max_tokens=1
        )
        assert answer.usage.prompt_tokens == text_only.usage.prompt_tokens + IMAGE_TOKENS + 2
