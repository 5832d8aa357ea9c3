"""The typed result of each op's job, and the JSON form the store keeps it in.

A job's `result` is one of these dataclasses (a job a caller submitted with its own function may hold
a plain JSON dict instead). Each facade encodes its own wire form from them; `to_json` / `decode` are
only the store's form, so a result read back after a restart is the same object the job held.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Self

from eztinker.engine.types import PromptAltTokens, SampledSequence, SampleResult
from eztinker.models import api


@dataclass(frozen=True)
class _Fields:
    """A result whose JSON form is its fields by name (read back leniently: extra keys are ignored, and a
    field with a default may be missing, as in rows written before it existed)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                values[f.name] = data[f.name]
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise KeyError(f.name)
        return cls(**values)


@dataclass(frozen=True)
class ForwardBackwardOutput(_Fields):
    """`forward_backward` / `forward`: the loss, each datum's target logprobs, and the metrics."""

    loss: float
    logprobs: list[Any]  # per datum: (N,) or (N, K) nested lists
    metrics: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"loss": self.loss, "logprobs": self.logprobs, "metrics": self.metrics}  # (no deep copy)


@dataclass(frozen=True)
class OptimStepOutput(_Fields):
    step: int
    grad_norm: float
    learning_rate: float


@dataclass(frozen=True)
class SaveOutput(_Fields):
    name: str
    step: int
    adapter_path: str
    optimizer_path: str | None
    size_bytes: int = 0  # 0 in rows written before it was recorded


@dataclass(frozen=True)
class SamplerOutput(_Fields):
    """`save_sampler`: the snapshot taken."""

    sampler_id: str
    base_model: str
    step: int | None


@dataclass(frozen=True)
class RunOutput:
    """`create_run` and `load`: the run as it is now."""

    run: api.Run
    from_checkpoint: bool = False  # created from a checkpoint (Tinker's create-via-load)

    def to_json(self) -> dict[str, Any]:
        return {**self.run.model_dump(mode="json"), "from_checkpoint": self.from_checkpoint}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunOutput:
        data = dict(data)
        from_checkpoint = bool(data.pop("from_checkpoint", False))
        return cls(api.Run.model_validate(data), from_checkpoint)


@dataclass(frozen=True)
class SampleOutput:
    """`sample`: one engine result per request, each request's prompt, and what the caller asked back."""

    results: list[SampleResult]
    prompts: list[list[int]]
    texts: list[list[str]] | None = None  # each sample's text (when the caller asked for it)
    echo: dict[str, Any] = field(default_factory=dict)  # request details the caller's encoding needs

    def to_json(self) -> dict[str, Any]:
        return {
            "results": [dataclasses.asdict(r) for r in self.results],
            "prompts": self.prompts,
            "texts": self.texts,
            "echo": self.echo,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SampleOutput:
        return cls([_sample_result(r) for r in data["results"]], data["prompts"], data["texts"], data["echo"])


def _sample_result(data: dict[str, Any]) -> SampleResult:
    alt = data.get("prompt_alt_tokens")
    return SampleResult(
        sequences=[SampledSequence(**s) for s in data["sequences"]],
        prompt_logprobs=data.get("prompt_logprobs"),
        topk_prompt_logprobs=data.get("topk_prompt_logprobs"),
        target_prompt_logprobs=data.get("target_prompt_logprobs"),
        prompt_alt_tokens=PromptAltTokens(**alt) if alt is not None else None,
    )


Result = ForwardBackwardOutput | OptimStepOutput | SaveOutput | SamplerOutput | RunOutput | SampleOutput

_BY_OP: dict[str, type[Result]] = {
    "forward_backward": ForwardBackwardOutput,
    "forward": ForwardBackwardOutput,
    "optim_step": OptimStepOutput,
    "save": SaveOutput,
    "save_sampler": SamplerOutput,
    "load": RunOutput,
    "create_run": RunOutput,
    "sample": SampleOutput,
}


def to_json(result: Result | dict[str, Any] | None) -> dict[str, Any] | None:
    """The store's form of a job's result (a plain dict result is kept as it is)."""
    if result is None or isinstance(result, dict):
        return result
    return result.to_json()


def decode(op: str, data: dict[str, Any] | None) -> Result | dict[str, Any] | None:
    """A stored result as its op's dataclass again; a result of another shape stays a dict."""
    cls = _BY_OP.get(op)
    if data is None or cls is None:
        return data
    try:
        return cls.from_json(data)
    except (KeyError, TypeError, ValueError):  # a job submitted with its own function, under an op's name
        return data
