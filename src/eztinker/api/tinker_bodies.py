"""The JSON bodies of the Tinker routes, as pydantic models: a wrong type or an out-of-range value is a
422 naming the field (which the SDK raises at once), never a 500 (which it retries for minutes).

Field names, defaults and ranges are those of the `tinker` SDK's request types (`tinker/types/*.py`,
SDK 0.38.0). Unknown fields are ignored, as the hosted API does: the SDK adds `type` to every body and
newer SDKs add fields older servers never heard of. The `forward_backward` body is protobuf (or an
older SDK's JSON), decoded by `tinker_wire`; these models cover the JSON routes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from eztinker.models.configs import SEED_RANGE

JsonObject = dict[str, Any]
T = TypeVar("T")


@dataclass(frozen=True)
class Page:
    """A listing route's `limit` and `offset` query parameters."""

    limit: int
    offset: int

    def of(self, items: Sequence[T]) -> list[T]:
        return list(items[self.offset : self.offset + self.limit])

    def cursor(self, total: int) -> dict[str, int]:
        return {"offset": self.offset, "limit": self.limit, "total_count": total}


def _paging(default_limit: int) -> Callable[..., Page]:
    def page(
        limit: Annotated[int, Query(ge=0)] = default_limit, offset: Annotated[int, Query(ge=0)] = 0
    ) -> Page:
        return Page(limit, offset)

    return page


Page20 = Annotated[Page, Depends(_paging(20))]
Page100 = Annotated[Page, Depends(_paging(100))]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class CreateSession(_Body):
    tags: list[str] = Field(default_factory=list)
    user_metadata: JsonObject | None = None
    sdk_version: str | None = None
    project_id: str | None = None
    display_name: str | None = None


class SessionHeartbeat(_Body):
    session_id: str | None = None


class FinishReason(_Body):
    type: str | None = None


class FinishSession(_Body):
    reason: FinishReason | None = None


class AssignProject(_Body):
    project_id: str | None = None


class LoraConfig(_Body):
    rank: int = Field(32, ge=1, le=1024)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


class CreateModel(_Body):
    session_id: str = Field(..., min_length=1)
    model_seq_id: int = Field(0, ge=0)
    base_model: str = Field(..., min_length=1)
    lora_config: LoraConfig = Field(default_factory=LoraConfig)
    user_metadata: JsonObject | None = None
    optimizer_config: JsonObject | None = None


class ModelRef(_Body):
    model_id: str = Field(..., min_length=1)


class _ModelOp(_Body):
    model_id: str = Field(..., min_length=1)
    seq_id: int | None = Field(None, ge=0)


class OptimStep(_ModelOp):
    adam_params: JsonObject | None = None
    optimizer_params: JsonObject | None = None


class SaveWeights(_ModelOp):
    path: str | None = None
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: JsonObject | None = None


class SaveWeightsForSampler(SaveWeights):
    sampling_session_seq_id: int | None = Field(None, ge=0)
    kind: Literal["snapshot", "inflight"] = "snapshot"


class SaveWeightsExternal(_ModelOp):
    path: str | None = None
    ttl_seconds: int | None = None
    age_encryption_recipients: list[str] | None = None


class LoadWeights(_Body):
    model_id: str | None = None  # None: create a model from the checkpoint (create-via-load)
    path: str = Field(..., min_length=1)
    optimizer: bool = False
    seq_id: int | None = Field(None, ge=0)
    session_id: str | None = None
    model_seq_id: int = Field(0, ge=0)
    base_model: str | None = None
    user_metadata: JsonObject | None = None
    optimizer_config: JsonObject | None = None
    weights_access_token: str | None = None


class CreateSamplingSession(_Body):
    session_id: str = Field(..., min_length=1)
    sampling_session_seq_id: int = Field(0, ge=0)
    base_model: str | None = None
    model_path: str | None = None


class SamplingParams(_Body):
    max_tokens: int | None = Field(None, ge=0)
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(1.0, ge=0)
    top_k: int = -1
    top_p: float = Field(1.0, gt=0, le=1)


class ASample(_Body):
    """`asample` (sample and compute_logprobs): `prompt` is a `ModelInput`, decoded by `tinker_wire`."""

    sampling_session_id: str = Field(..., min_length=1)
    seq_id: int = Field(0, ge=0)
    num_samples: int = Field(1, ge=1)
    prompt: JsonObject
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int | None = Field(None, ge=0)
    topk_sample_logprobs: int | None = Field(None, ge=0)
    prompt_logprobs_last_n: int | None = Field(None, ge=0)
    target_prompt_logprobs: Any = None
    prompt_alt_tokens_k: int | None = Field(None, ge=0)

    def wire(self) -> JsonObject:
        """The validated body as the JSON `tinker_wire.sample_request` reads."""
        return self.model_dump(exclude_none=True)


class WeightsInfo(_Body):
    tinker_path: str = Field(..., min_length=1)


class CheckpointTtl(_Body):
    ttl_seconds: int | None = None


class CopyWeights(_Body):
    """`copy_weights`: into a new run of `session_id`/`model_seq_id`, or of project `destination_project_id`."""

    source_path: str = Field(..., min_length=1)
    session_id: str | None = None
    model_seq_id: int | None = Field(None, ge=0)
    destination_project_id: str | None = None
    ttl_seconds: int | None = None
    weights_access_token: str | None = None


class RetrieveFuture(_Body):
    request_id: str = Field(..., min_length=1)
    allow_metadata_only: bool = False


class SamplingSessionTarget(_Body):
    type: Literal["sampling_session"] = "sampling_session"
    sampling_session_id: str = Field(..., min_length=1)
    cloned_sampler_id: int = Field(0, ge=0)


class RetrieveFutures(_Body):
    """`retrieve_futures`: one sampling client's completion queue (`tinker_completions`)."""

    target: SamplingSessionTarget
    prev_cursor: int = Field(0, ge=0)
    timeout: float | None = Field(None, ge=0)  # None: long-poll; 0: answer at once (an ack-only poll)
    retrieved_request_ids: list[str] = Field(default_factory=list, max_length=100_000)


class JoinSamplingSession(_Body):
    sampling_session_id: str = Field(..., min_length=1)


class CancelFuture(_Body):
    request_id: str = Field(..., min_length=1)
