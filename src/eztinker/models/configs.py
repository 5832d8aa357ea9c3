"""The two configurations a run is created with: its LoRA adapter and its default loss."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch's generators take: a seed outside is the caller's mistake


class LoRAConfig(BaseModel):
    """A LoRA adapter: `delta W = B @ A * lora_alpha / r` on each targeted linear layer (PEFT's convention)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1, le=1024, description="Rank of the adapter.")
    lora_alpha: float = Field(
        16.0, gt=0, description="Scale numerator: the update is multiplied by alpha / r."
    )
    lora_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input while training."
    )
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None,
        description="Module names to adapt (suffix match, as PEFT), 'all-linear', or None for the model "
        "family's default: every attention and MLP projection.",
    )
    seed: int | None = Field(
        None,
        ge=SEED_RANGE[0],
        le=SEED_RANGE[1],
        description="Seed for a reproducible initialisation of A (B starts at zero).",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: list[str] | str | None) -> list[str] | str | None:
        if isinstance(value, list) and not value:
            raise ValueError("target_modules must name at least one module, or be 'all-linear' or null")
        return value


class LossFunctionConfig(BaseModel):
    """Which loss a run trains with, and its parameters.

    Every field beyond `loss_type` reaches the loss function as a keyword argument, so
    `LossFunctionConfig(loss_type="focal_loss", focal_alpha=0.3, focal_gamma=2.5)` calls
    `focal_loss(logits, labels, weights, focal_alpha=0.3, focal_gamma=2.5)`.
    """

    model_config = ConfigDict(extra="allow")

    loss_type: str = Field("cross_entropy", min_length=1, description="A registered loss name.")

    @property
    def params(self) -> dict[str, Any]:
        """The keyword arguments for the loss function (every field but `loss_type`)."""
        return dict(self.model_extra or {})
