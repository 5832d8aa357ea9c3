"""Typed inputs and outputs of the engine. Facades convert wire formats to these at the boundary.

Conventions (Tinker's): a `Datum` is one sequence. `tokens[i]` is the model input at position i, and a
token-family loss reads `loss_inputs["target_tokens"][i]` as the token predicted at position i (targets
are already shifted). A native-family loss reads `loss_inputs["labels"]`, aligned with `tokens`, and
shifts them itself (ignore index -100).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from eztinker.engine.loss_graph import LossGraph

__all__ = [  # all of them re-exported by `eztinker.engine`
    "IGNORE_INDEX",
    "AdamParams",
    "Budget",
    "Datum",
    "DimuonParams",
    "ForwardBackwardResult",
    "ImageChunk",
    "OptimStepResult",
    "PromptAltTokens",
    "SampleResult",
    "SampledSequence",
    "SamplingParams",
    "TokenLoss",
    "TopLogprobs",
]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ImageChunk:
    """An image in a model input (Tinker's `ImageChunk`; an OpenAI `image_url` data URL decoded): the encoded
    file's bytes and its format ("png", "jpeg", "webp", "gif"). `expected_tokens`, when given, is the number of
    tokens the client believes the image takes; the engine refuses the input if the model's processor says
    otherwise. See `eztinker.engine.vision`."""

    data: bytes
    format: str
    expected_tokens: int | None = None


@dataclass(frozen=True)
class Datum:
    """One training sequence and the per-token inputs of its loss.

    `loss_inputs` values are tensors (or lists) of shape (N,) — or (N, K) for top-K cross-entropy —
    where N = len(tokens).

    `images` (vision-language models only) are the sequence's images in order; `tokens` holds each one as a
    run of the model's image placeholder token, as long as the image's token count
    (`eztinker.engine.vision.expand_chunks` builds both from a list of text and image chunks).
    """

    tokens: Sequence[int]
    loss_inputs: Mapping[str, torch.Tensor | Sequence[Any]] = field(default_factory=dict)
    images: Sequence[ImageChunk] = ()

    @classmethod
    def from_labels(
        cls,
        input_ids: Sequence[int],
        labels: Sequence[int] | None = None,
        weights: Sequence[float] | None = None,
    ) -> Datum:
        """A datum for the native loss family: labels aligned with `input_ids` (default: the inputs)."""
        inputs: dict[str, Sequence[int] | Sequence[float]] = {
            "labels": list(labels if labels is not None else input_ids)
        }
        if weights is not None:
            inputs["weights"] = list(weights)
        return cls(tokens=list(input_ids), loss_inputs=inputs)

    @classmethod
    def from_targets(cls, tokens: Sequence[int], target_tokens: Sequence[int], **loss_inputs) -> Datum:
        """A datum for the token loss family: `target_tokens[i]` is predicted at position i."""
        return cls(tokens=list(tokens), loss_inputs={"target_tokens": list(target_tokens), **loss_inputs})


@dataclass(frozen=True)
class TokenLoss:
    """A token-family (Tinker) loss, by name, with its scalar config (e.g. `clip_low_threshold`).

    `graph`: a server-side custom loss (`eztinker.engine.loss_graph`) that travels with the op as data, so
    whichever process computes it (an in-process worker, a Ray model worker, after a restart) runs the
    same checked graph; `name` then only labels it in messages.
    """

    name: str
    config: Mapping[str, float] = field(default_factory=dict)
    graph: LossGraph | None = None


@dataclass(frozen=True)
class AdamParams:
    """One AdamW step (decoupled weight decay). Defaults are Tinker's; every field may change per step."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0  # 0 = no clipping


@dataclass(frozen=True)
class DimuonParams:
    """One Dimuon step (Tinker's `DimuonParams`; the maths is in `eztinker.engine.optimizers`).

    Defaults are Tinker's; omitted settings take them at every step (nothing carries over).
    """

    learning_rate: float  # for a direction of Frobenius norm sqrt(rank)
    beta1: float = 0.9  # the momentum's running-average coefficient
    grad_clip_norm: float = 0.0  # <= 0 = no clipping
    damping: float = 1e-4  # > 0: smooths the row and column preconditioner
    rank_lr_correction_exponent: float = 0.175  # learning rate x (rank / 32) ** this; 0 = no correction


@dataclass(frozen=True)
class ForwardBackwardResult:
    """What `forward_backward` and `forward` return.

    `logprobs[d]` holds the learner's log-probabilities of datum d's targets: shape (N,) or (N, K) for the
    token family, (N-1,) for the native family (the shifted labels; 0.0 where a label is ignored).
    `metrics` keys are `name:reduction` (Tinker's convention), always including `loss:sum`.
    """

    loss: float
    logprobs: list[torch.Tensor]
    metrics: dict[str, float]
    loss_family: Literal["native", "token"]


@dataclass(frozen=True)
class OptimStepResult:
    step: int  # the run's step count after this update
    grad_norm: float  # global L2 norm of the gradients before clipping
    learning_rate: float


@dataclass(frozen=True)
class Budget:
    """At most `tokens` sampled tokens in a section that ends with `until`: if the text has not closed it
    by then, `until`'s tokens are forced next (the model's own log-probabilities reported for them), and
    sampling goes on. The section is open from the first token, or from when the text writes `opens`.
    A reasoning model's thinking budget is `Budget(n, "</think>")` (after a prompt that opened the
    thinking) or `Budget(n, "</think>", opens="<think>")`, as vLLM's `thinking_token_budget` is."""

    tokens: int
    until: str
    opens: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `stop=None` stops at the tokenizer's EOS; `stop=[]` never stops early (not even EOS).

    The penalties and `logit_bias` are OpenAI's, counted over the tokens this sample has generated (as vLLM
    counts them, not the prompt): at every step a token's logit gets `logit_bias[token]`, minus
    `frequency_penalty` times how often it was generated, minus `presence_penalty` if it was at all; then
    temperature, top-k and top-p apply. They shape which token is drawn, not the reported log-probabilities
    (the model's own, as training computes them).

    `grammar` constrains the text to a Lark grammar in llguidance's dialect (`eztinker.engine.grammar`):
    only tokens that keep the text inside it are drawn, and the sample ends once it is complete.
    `budget` closes a section (a reasoning model's thinking) after so many tokens (`Budget`).
    """

    max_tokens: int | None = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = no limit
    stop: Sequence[str] | Sequence[int] | str | None = None
    seed: int | None = None
    frequency_penalty: float = 0.0  # in [-2, 2]
    presence_penalty: float = 0.0  # in [-2, 2]
    logit_bias: Mapping[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    grammar: str | None = None  # a Lark grammar (llguidance's dialect) the completion must match
    budget: Budget | None = None  # e.g. a thinking budget: Budget(1024, "</think>")


TopLogprobs = list[tuple[int, float]]  # (token id, log-probability) pairs, most likely first


@dataclass(frozen=True)
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]  # the model's log-probability of each sampled token (temperature 1, unfiltered)
    stop_reason: Literal["stop", "length"]
    topk_logprobs: list[TopLogprobs] | None = None  # per sampled token, when top-k was asked for


@dataclass(frozen=True)
class PromptAltTokens:
    """k independent draws at every prompt position after the first: `tokens[i]` are alternatives to prompt[i+1]."""

    tokens: list[list[int]]  # (P-1, k)
    logprobs: list[list[float]]  # (P-1, k): the model's log-probability of each draw (temperature 1)


@dataclass(frozen=True)
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None  # position 0 is None: nothing predicts it
    topk_prompt_logprobs: list[TopLogprobs | None] | None = None  # per prompt position; None where unscored
    target_prompt_logprobs: list[list[float]] | None = None  # (P-1, K): log p of the asked ids, 0.0 for -1
    prompt_alt_tokens: PromptAltTokens | None = None
