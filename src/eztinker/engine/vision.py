"""Images in model inputs, for vision-language base models (Qwen3-VL).

A model input with images is a list of chunks — token lists and `ImageChunk`s (an encoded image's bytes
and format: what Tinker's `ImageChunk` carries, and what an OpenAI `image_url` data URL decodes to).
`expand_chunks` turns it into the engine's form: one token list in which each image is a run of the model's
image placeholder token (`<|image_pad|>`) as long as the image's token count, plus the images in order. The
text around an image carries the model's `<|vision_start|>` / `<|vision_end|>` tokens, as the family's chat
template writes them.

The model's own image processor (`AutoImageProcessor` of the base model's directory or hub id) turns each
image into patches and a (t, h, w) grid; its token count is t·h·w / merge². In a forward pass the images of
every row go to the model's vision tower together (`model_inputs`), whose features replace the placeholder
tokens; positions are the family's multimodal RoPE positions (`rope_positions`).

Validation happens before any compute and raises `InvalidInputError` naming the chunk: an unknown format,
bytes that do not decode as an image of that format, an image over `MAX_IMAGE_BYTES` or `MAX_IMAGE_PIXELS`,
a token count other than the chunk's `expected_tokens`, placeholder runs that do not match the images, or
images for a model without a vision tower.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from eztinker.engine.errors import InvalidInputError
from eztinker.engine.types import ImageChunk

if TYPE_CHECKING:
    from eztinker.engine.model import BaseModel

FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP", "gif": "GIF"}
"""Image formats accepted (`ImageChunk.format`, case-insensitive) and the PIL format each must decode as."""

MAX_IMAGE_BYTES = 20 * 2**20
"""Largest encoded image accepted (20 MiB, as OpenAI's API)."""

MAX_IMAGE_PIXELS = 6000 * 6000
"""Largest decoded image accepted (width × height), checked from the header before decoding."""

_CACHE_ENTRIES = 256  # processed images kept per base model (validation and the forward share the work)


@dataclass
class Vision:
    """A vision-language base model's image processing: its processor, placeholder ids and processed images."""

    processor: Any
    image_token_id: int
    vision_start_token_id: int | None
    vision_end_token_id: int | None
    merge_size: int
    _cache: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def encode(self, chunk: ImageChunk, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(patches (n, dim), grid (3,)) of a valid image; `InvalidInputError` naming `where` otherwise."""
        if not isinstance(getattr(chunk, "data", None), bytes | bytearray | memoryview):
            decode_image(chunk, where)  # raises, naming what is wrong
        key = hashlib.sha256(bytes(chunk.data)).digest() + str(chunk.format).lower().encode()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
        if cached is None:
            image = decode_image(chunk, where)
            out = self.processor(images=[image], return_tensors="pt")
            cached = (out["pixel_values"], out["image_grid_thw"][0])
            with self._lock:
                self._cache[key] = cached
                while len(self._cache) > _CACHE_ENTRIES:
                    self._cache.popitem(last=False)
        tokens = int(cached[1].prod()) // self.merge_size**2
        if chunk.expected_tokens is not None and chunk.expected_tokens != tokens:
            raise InvalidInputError(
                f"{where}.expected_tokens",
                f"is {chunk.expected_tokens}, but this model's processor makes {tokens} tokens of the image",
            )
        return cached

    def num_tokens(self, chunk: ImageChunk, where: str) -> int:
        return int(self.encode(chunk, where)[1].prod()) // self.merge_size**2


def decode_image(chunk: ImageChunk, where: str) -> Any:
    """The chunk's image as an RGB `PIL.Image`, after checking its format, size and that it decodes."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(chunk, ImageChunk):
        raise InvalidInputError(where, f"must be an image chunk, got {type(chunk).__name__}")
    fmt = str(chunk.format).lower()
    if fmt not in FORMATS:
        raise InvalidInputError(f"{where}.format", f"{chunk.format!r} is not one of {sorted(FORMATS)}")
    if not isinstance(chunk.data, bytes | bytearray | memoryview):
        raise InvalidInputError(
            f"{where}.data", f"must be the image file's bytes, got {type(chunk.data).__name__}"
        )
    data = bytes(chunk.data)
    if not data:
        raise InvalidInputError(f"{where}.data", "is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidInputError(
            f"{where}.data", f"has {len(data)} bytes; at most {MAX_IMAGE_BYTES} are accepted"
        )
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            width, height = probe.size
            actual = probe.format
            if width * height > MAX_IMAGE_PIXELS:
                raise InvalidInputError(
                    f"{where}.data",
                    f"is a {width}×{height} image; at most {MAX_IMAGE_PIXELS} pixels are accepted",
                )
            if actual != FORMATS[fmt]:
                raise InvalidInputError(f"{where}.data", f"is a {actual} image, not {chunk.format}")
            probe.load()
            return probe.convert("RGB")
    except InvalidInputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidInputError(f"{where}.data", f"does not decode as a {chunk.format} image") from None


def vision_of(base: BaseModel) -> Vision | None:
    """The base model's image processing (loaded on first use), or None if it takes no images."""
    if base.vision is not None:
        return base.vision
    config = base.model.config
    token_id = getattr(config, "image_token_id", None)
    inner = getattr(base.model, "model", base.model)
    if token_id is None or getattr(config, "vision_config", None) is None or not hasattr(inner, "visual"):
        return None
    from transformers import AutoImageProcessor

    from eztinker.engine.model import _source_kwargs

    source, extra = _source_kwargs(base.name)
    processor = AutoImageProcessor.from_pretrained(source, **extra)
    base.vision = Vision(
        processor=processor,
        image_token_id=int(token_id),
        vision_start_token_id=getattr(config, "vision_start_token_id", None),
        vision_end_token_id=getattr(config, "vision_end_token_id", None),
        merge_size=int(getattr(processor, "merge_size", None) or config.vision_config.spatial_merge_size),
    )
    return base.vision


def _require(base: BaseModel, where: str) -> Vision:
    vision = vision_of(base)
    if vision is None:
        raise InvalidInputError(where, f"base model {base.name!r} takes no images (it has no vision tower)")
    return vision


def expand_chunks(
    base: BaseModel,
    chunks: Sequence[Sequence[int] | ImageChunk],
    where: str = "model_input.chunks",
    *,
    frame: bool = False,
) -> tuple[list[int], tuple[ImageChunk, ...]]:
    """(tokens, images) for a model input given as chunks: token lists kept as they are, each image a run
    of placeholder tokens as long as its token count. Images are checked (see the module docstring).

    `frame`: put the model's `<|vision_start|>` / `<|vision_end|>` tokens around each image, as its chat
    template writes an image part (the OpenAI facade's chunks come from rendered text, without them);
    Tinker's chunks carry them already, as the client's renderer wrote them."""
    tokens: list[int] = []
    images: list[ImageChunk] = []
    for i, chunk in enumerate(chunks):
        if isinstance(chunk, ImageChunk):
            vision = _require(base, f"{where}[{i}]")
            run = [vision.image_token_id] * vision.num_tokens(chunk, f"{where}[{i}]")
            if frame and vision.vision_start_token_id is not None:
                run = [int(vision.vision_start_token_id), *run]
            if frame and vision.vision_end_token_id is not None:
                run = [*run, int(vision.vision_end_token_id)]
            tokens += run
            images.append(chunk)
        else:
            tokens += [int(t) for t in chunk]
    return tokens, tuple(images)


def check_images(
    base: BaseModel,
    tokens: Sequence[int],
    images: Sequence[ImageChunk],
    where: str,
    tokens_field: str = "tokens",
) -> None:
    """Refuse images a model cannot take, bad images, and placeholder runs that do not match the images.

    `where` names the sequence (`data[3]`; "" for a lone request); an image is named `data[3].images[1]`.
    """
    vision = vision_of(base)
    if not images:
        if vision is not None and vision.image_token_id in tokens:
            raise InvalidInputError(
                _field(where, tokens_field),
                "holds image placeholder tokens but no images: send the image chunks",
            )
        return
    if vision is None:
        raise InvalidInputError(
            _field(where, "images"), f"base model {base.name!r} takes no images (it has no vision tower)"
        )
    runs = _placeholder_runs(list(tokens), vision.image_token_id)
    counts = [vision.num_tokens(image, _field(where, f"images[{i}]")) for i, image in enumerate(images)]
    if len(runs) != len(images) or any(run != count for run, count in zip(runs, counts, strict=False)):
        raise InvalidInputError(
            _field(where, "images"),
            f"has {len(images)} images of {counts} tokens, but tokens hold placeholder runs of {runs}",
        )


def check_data(base: BaseModel, data: Sequence[Any]) -> None:
    """`check_images` for every datum of a training request (`data[i]`)."""
    for i, datum in enumerate(data):
        check_images(base, list(datum.tokens), tuple(getattr(datum, "images", ()) or ()), f"data[{i}]")


def _field(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _placeholder_runs(tokens: list[int], token_id: int) -> list[int]:
    runs: list[int] = []
    previous = None
    for t in tokens:
        if t == token_id:
            if previous == token_id:
                runs[-1] += 1
            else:
                runs.append(1)
        previous = t
    return runs


def model_inputs(
    base: BaseModel, rows: Sequence[Sequence[ImageChunk]], input_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The vision keyword arguments of a forward over `input_ids` (B, T) whose row b holds `rows[b]`'s
    images (already checked): patches and grids of every image in row order, and the modality of each
    position. Empty when no row has images."""
    if not any(rows):
        return {}
    vision = _require(base, "images")
    encoded = [vision.encode(image, "images") for images in rows for image in images]
    device = base.device
    dtype = base.dtype
    return {
        "pixel_values": torch.cat([patches for patches, _ in encoded]).to(device=device, dtype=dtype),
        "image_grid_thw": torch.stack([grid for _, grid in encoded]).to(device),
        "mm_token_type_ids": (input_ids == vision.image_token_id).to(device=device, dtype=torch.int32),
    }


def rope_positions(
    base: BaseModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, inputs: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's multimodal RoPE positions (3, B, T) of left-padded rows with images, and each row's next
    text position (B,): the largest position so far + 1."""
    inner: Any = getattr(base.model, "model", base.model)
    positions, _ = inner.get_rope_index(
        input_ids,
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=attention_mask,
    )
    return positions, positions.amax(dim=(0, 2)) + 1
