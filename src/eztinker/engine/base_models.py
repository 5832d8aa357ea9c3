"""`BaseModels`: the engine's frozen base models — loading each once, on first use — and what a facade
asks about their structure (tokenizer, default LoRA targets, Tinker's LoRA flags, layer kinds, the output
head, image placeholders). `Engine` is one; the runs and their ops are in `eztinker.engine.engine`."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from eztinker.engine import families, sampler, vision
from eztinker.engine.errors import InvalidInputError
from eztinker.engine.lora import output_head_path, resolve_targets
from eztinker.engine.model import BaseModel, load_base_model
from eztinker.engine.types import ImageChunk

if TYPE_CHECKING:
    from eztinker.engine.engine import EngineConfig


class BaseModels:
    """Base models by name, loaded on first use (see the module docstring)."""

    config: EngineConfig
    _models: dict[str, BaseModel]
    _registry_lock: threading.RLock

    def base_model(self, name: str) -> BaseModel:
        """The base model `name`, loading it on first use."""
        with self._registry_lock:
            if name not in self._models:
                self._models[name] = load_base_model(name, device=self.config.device, dtype=self.config.dtype)
            return self._models[name]

    @property
    def loaded_models(self) -> list[str]:
        return list(self._models)

    def load_model(self, name: str) -> None:
        """Load base model `name` now rather than on first use."""
        self.base_model(name)

    def tokenizer(self, name: str) -> Any:
        """The tokenizer of base model `name` (loading the model on first use)."""
        return self.base_model(name).tokenizer

    def default_targets(self, name: str) -> list[str]:
        """The module paths a run on base model `name` adapts when its LoRA config names none."""
        base = self.base_model(name)
        return resolve_targets(base.model, base.default_targets())

    def model_bytes(self) -> dict[str, int]:
        """Bytes of each loaded base model's weights and buffers."""
        return {
            name: sum(t.numel() * t.element_size() for t in (*base.model.parameters(), *base.model.buffers()))
            for name, base in self._models.items()
        }

    def lora_target_modules(
        self, name: str, *, train_attn: bool = True, train_mlp: bool = True, train_unembed: bool = False
    ) -> list[str] | None:
        """`target_modules` for Tinker's LoRA flags on base model `name` (None: the family default).

        `train_attn` adapts attention and linear attention, `train_mlp` the MLP and MoE experts,
        `train_unembed` the output head (`eztinker.engine.families`). `InvalidInputError` (field
        "lora_config") if every flag is off, or a flag asks for layers the model does not have.
        """
        if not (train_attn or train_mlp or train_unembed):
            raise InvalidInputError(
                "lora_config", "train_attn, train_mlp and train_unembed are all false: nothing to train"
            )
        base = self.base_model(name)
        kinds = base.layer_kinds()
        for flag, on in (
            ("train_attn", train_attn),
            ("train_mlp", train_mlp),
            ("train_unembed", train_unembed),
        ):
            if on and not any(kind in families.TINKER_KINDS[flag] for kind in kinds.values()):
                what = {"train_attn": "attention", "train_mlp": "MLP", "train_unembed": "output head"}[flag]
                raise InvalidInputError("lora_config", f"this model has no {what} layers LoRA can target")
        wanted = families.kinds_for_tinker_flags(
            train_attn=train_attn, train_mlp=train_mlp, train_unembed=train_unembed
        )
        chosen = base.targets_of_kinds(wanted)
        if chosen == base.default_targets():
            return None
        return families.short_targets(chosen, kinds)

    def layer_kinds(self, name: str) -> dict[str, families.LayerKind]:
        """Every adaptable layer of base model `name` (module or expert-weight path) and its kind."""
        return self.base_model(name).layer_kinds()

    def output_head_name(self, name: str) -> str | None:
        """The module path of base model `name`'s output head (unembedding), None if it has none."""
        return output_head_path(self.base_model(name).model)

    def check_requests(self, name: str, requests: Sequence[sampler.SampleRequest]) -> None:
        """Raise `InvalidInputError` / `NotFoundError` now (no compute) if sampling `requests` would."""
        sampler.check_requests(self.base_model(name), requests)

    def expand_chunks(
        self, name: str, chunks: Sequence[Sequence[int] | ImageChunk], field: str = "model_input.chunks"
    ) -> tuple[list[int], tuple[ImageChunk, ...]]:
        """(tokens, images) of a model input given as chunks (token lists and `ImageChunk`s) for base model
        `name`: each image becomes a run of the model's image placeholder token, as long as its token count.
        Images are checked before anything else (`InvalidInputError` naming `field[i]`): see
        `eztinker.engine.vision`. A facade turns Tinker's `ModelInput` chunks and OpenAI `image_url` parts
        into these, then into `Datum(tokens, ..., images=images)` or a `SampleRequest(..., images=images)`."""
        return vision.expand_chunks(self.base_model(name), chunks, field)
