"""Loading a base model once, frozen, to be shared by every run on it.

A base model is named by a Hugging Face hub id (`Qwen/Qwen2-0.5B-Instruct`), a local model directory,
or a `.gguf` file (dequantised by transformers' `gguf_file=`). It is loaded in bf16 on CUDA and fp32 on
CPU unless told otherwise, with SDPA attention, in eval mode, with every weight frozen.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from eztinker.engine.errors import InvalidInputError, NotFoundError
from eztinker.engine.lora import LoRALinear, Routing, resolve_targets, wrap_layers

_ATTENTION_AND_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Default LoRA targets per `config.model_type`: every attention and MLP projection of the family.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "qwen2": _ATTENTION_AND_MLP,
    "qwen3": _ATTENTION_AND_MLP,
    "qwen2_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "llama": _ATTENTION_AND_MLP,
    "mistral": _ATTENTION_AND_MLP,
    "gemma": _ATTENTION_AND_MLP,
    "gemma2": _ATTENTION_AND_MLP,
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


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
    lora_layers: dict[str, LoRALinear] = field(default_factory=dict)  # module path -> wrapped layer
    # Routing is shared state: one forward pass at a time per base model.
    lock: threading.RLock = field(default_factory=threading.RLock)

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
        config = self.model.config
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

    def default_targets(self) -> list[str] | str:
        return DEFAULT_TARGET_MODULES.get(self.family, "all-linear")

    def lora_targets(self, target_modules: list[str] | str | None) -> dict[str, LoRALinear]:
        """Resolve `target_modules` (None: the family's default) and wrap those layers for LoRA."""
        targets = self.default_targets() if target_modules is None else target_modules
        paths = resolve_targets(self.model, targets)
        layers = wrap_layers(self.model, paths, self.routing)
        self.lora_layers.update(layers)
        return layers


def _source_kwargs(name: str) -> tuple[str, dict]:
    """(pretrained_model_name_or_path, extra from_pretrained kwargs) for a hub id, directory or GGUF file."""
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise NotFoundError(f"GGUF file {name!r} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise InvalidInputError("base_model", f"{name!r} is a path but has no config.json")
        return str(path), {}
    return name, {}


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
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa", **extra)
    except OSError as exc:  # transformers reports a missing hub repo or file as OSError
        raise NotFoundError(f"cannot load base model {name!r}: {exc}") from exc
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return BaseModel(name=name, model=model, tokenizer=tokenizer, device=device, dtype=dtype)


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
