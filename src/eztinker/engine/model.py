"""Loading a base model once, frozen, to be shared by every run on it.

A base model is named by a Hugging Face hub id (`Qwen/Qwen2-0.5B-Instruct`), a local model directory,
or a `.gguf` file (dequantised by transformers' `gguf_file=`). It is loaded in bf16 on CUDA and fp32 on
CPU unless told otherwise, with SDPA attention where the family supports it (else eager), in eval mode,
with every weight frozen. Families that transformers serves only as image-text-to-text (Qwen3-VL) load
as that class, vision tower included. Which of its layers are what lives in `eztinker.engine.families`.

Which SDPA kernel runs (on CUDA, bf16): training passes are right-padded and pass no mask, so SDPA gets
`is_causal=True` and no mask and takes its flash kernel; sampling passes no mask when no row is
left-padded (flash again), and a boolean mask when some row is, which rules flash out (it takes no mask)
and selects the memory-efficient kernel. Left padding is what lets rows of different prompt lengths share
one decode step, so that mask is the price of continuous batching. `bench/gpu_check.py` records the
kernel chosen for each call (`cuda_paths.attention_kernels`); tests/test_cuda_paths.py what reaches SDPA.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from eztinker.engine import families
from eztinker.engine.errors import InvalidInputError, NotFoundError
from eztinker.engine.families import LayerKind
from eztinker.engine.lora import (
    AdaptedLayer,
    Routing,
    adaptable_layers,
    output_head_path,
    resolve_targets,
    wrap_layers,
)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class BaseModel:
    """A frozen causal LM shared by many adapters, with the tokenizer it was trained with."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    routing: Routing = field(default_factory=Routing)
    lora_layers: dict[str, AdaptedLayer] = field(
        default_factory=dict
    )  # path -> wrapped layer / expert weight
    # Routing is shared state: one forward pass at a time per base model.
    lock: threading.RLock = field(default_factory=threading.RLock)
    vision: Any = None  # a vision-language model's image processing, loaded on first use (`engine.vision`)

    @property
    def family(self) -> str:
        return self.model.config.model_type

    @property
    def vocab_size(self) -> int:
        """Token ids must be below this (the input embedding's size, which may exceed the tokenizer's)."""
        weight = self.model.get_input_embeddings().weight
        assert isinstance(weight, torch.Tensor)
        return int(weight.shape[0])

    @property
    def max_length(self) -> int:
        """Longest sequence (prompt + completion) the model's positions allow."""
        config = self.model.config.get_text_config()
        for key in ("max_position_embeddings", "n_positions", "seq_length"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    @property
    def eos_token_ids(self) -> list[int]:
        """Tokens that end a sample by default: the generation config's EOS ids, else the tokenizer's."""
        ids = getattr(self.model.generation_config, "eos_token_id", None)
        if ids is None:
            ids = self.tokenizer.eos_token_id
        if ids is None:
            return []
        return [ids] if isinstance(ids, int) else list(ids)

    def default_targets(self) -> list[str]:
        """The paths a run adapts when its LoRA config names none: every attention, linear-attention, MLP
        and expert weight (`families.DEFAULT_KINDS`)."""
        return self.targets_of_kinds(families.DEFAULT_KINDS)

    def layer_kinds(self, paths: list[str] | None = None) -> dict[str, LayerKind]:
        """What each adaptable path (or each of `paths`) is: attention, MLP, experts, ... (`families`)."""
        layers = adaptable_layers(self.model, include_head=True)
        head = output_head_path(self.model)
        chosen = layers if paths is None else {p: layers.get(p, False) for p in paths}
        return {p: families.layer_kind(p, head_path=head, expert=expert) for p, expert in chosen.items()}

    def targets_of_kinds(self, kinds: frozenset[LayerKind] | set[LayerKind]) -> list[str]:
        """Every adaptable path of the given kinds, sorted."""
        return sorted(p for p, kind in self.layer_kinds().items() if kind in kinds)

    def lora_targets(self, target_modules: list[str] | str | None) -> dict[str, AdaptedLayer]:
        """Resolve `target_modules` (None: the family's default) and wrap those layers for LoRA."""
        targets = self.default_targets() if target_modules is None else target_modules
        paths = resolve_targets(self.model, targets)
        layers = wrap_layers(self.model, paths, self.routing)
        self.lora_layers.update(layers)
        return layers


def _source_kwargs(name: str) -> tuple[str, dict]:
    """(pretrained_model_name_or_path, extra from_pretrained kwargs) for a hub id, directory or GGUF file.

    A name that is neither an existing path nor a well-formed hub id is refused here, naming `base_model`,
    so that the hub client's own messages ("Repo id must be ...") and the file system's errors (a name too
    long for it) never reach the caller."""
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not _exists(path, name, file=True):
            raise InvalidInputError("base_model", f"GGUF file {name!r} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if _exists(path, name):
        if not (path / "config.json").is_file():
            raise InvalidInputError("base_model", f"{name!r} is a path but has no config.json")
        return str(path), {}
    if _looks_like_path(name):
        raise InvalidInputError("base_model", f"path {name!r} does not exist on the server")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise InvalidInputError(
            "base_model",
            f"{_shown(name)} is neither a path on the server nor a Hugging Face repo id "
            "('name' or 'namespace/name', at most 96 letters, digits, '-', '_' or '.')",
        ) from None
    return name, {}


def _exists(path: Path, name: str, *, file: bool = False) -> bool:
    """Whether `path` exists (is a file, with `file`); a name the file system cannot even look up (too long)
    is refused as the caller's mistake rather than raised as an OSError."""
    try:
        return path.is_file() if file else path.exists()
    except OSError as exc:
        raise InvalidInputError(
            "base_model", f"{_shown(name)} is not a usable path: {exc.strerror}"
        ) from None


def _looks_like_path(name: str) -> bool:
    """A name only a path can mean: absolute, home- or dot-relative, or with more than one '/'."""
    return name.startswith(("/", "~", "./", "../", "\\")) or name.count("/") > 1


def _shown(name: str, limit: int = 120) -> str:
    """`name` quoted for a message, cut short if it is long (a 5,000-character name is not echoed back)."""
    return repr(name) if len(name) <= limit else f"{name[:limit]!r}... ({len(name)} characters)"


def load_base_model(
    name: str, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> BaseModel:
    """Load `name` (hub id, directory or .gguf file) frozen, in eval mode, on `device`."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    source, extra = _source_kwargs(name)
    hf_logging.disable_progress_bar()  # per-load bars are noise in a server's log
    tokenizer = load_tokenizer(name)
    try:
        model = _from_pretrained(source, dtype, extra)
    except OSError as exc:  # transformers reports a missing hub repo or file as OSError
        raise NotFoundError(f"cannot load base model {name!r}: {exc}") from exc
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return BaseModel(name=name, model=model, tokenizer=tokenizer, device=device, dtype=dtype)


def _from_pretrained(source: str, dtype: torch.dtype, extra: dict) -> PreTrainedModel:
    """The causal LM at `source`, loaded as its family's causal-LM class, or — for vision-language families
    that transformers serves only as image-text-to-text (Qwen3-VL) — as that; with SDPA attention where the
    family supports it, else eager (gpt-oss's attention sinks)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, **extra)
    auto: Any = AutoModelForCausalLM
    causal: Any = AutoModelForCausalLM._model_mapping  # type: ignore[attr-defined]
    image_text: Any = AutoModelForImageTextToText._model_mapping  # type: ignore[attr-defined]
    if type(config) not in causal and type(config) in image_text:
        auto = AutoModelForImageTextToText
    try:
        concrete: Any = auto._model_mapping[type(config)]
        attn = families.preferred_attn_implementation(concrete)
    except KeyError:  # an unknown family: let from_pretrained say so
        attn = "sdpa"
    return auto.from_pretrained(source, dtype=dtype, attn_implementation=attn, **extra)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of base model `name` alone (hub id, directory or .gguf file), with a pad token."""
    source, extra = _source_kwargs(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except OSError as exc:
        raise NotFoundError(f"cannot load base model {name!r}: {exc}") from exc
    if tokenizer is None:
        raise NotFoundError(f"base model {name!r} has no tokenizer files")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
