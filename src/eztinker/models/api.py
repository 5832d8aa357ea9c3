"""Request and response bodies of the native REST API (`/v1/...`), shared by the server and the clients.

Field names follow the user's original API: `input_ids` / `target_ids` for training data,
`max_new_tokens` for sampling. Every op answers at once with a `JobRef`; its result arrives in the
`Job` fetched from `GET /v1/jobs/{job_id}` (long-poll with `?wait=seconds`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from eztinker.models.configs import LoRAConfig, LossFunctionConfig

JobStatus = Literal["queued", "running", "completed", "failed"]
Op = str  # forward_backward, forward, optim_step, sample, save, load, ... (open: facades add their own)


def field_path(loc: tuple | list) -> str:
    """A pydantic error location as a field name: `("body", "data", 0, "input_ids")` -> `data[0].input_ids`."""
    out = ""
    if len(loc) == 2 and loc[0] == "body" and isinstance(loc[1], int):
        return "body"  # a body that is not JSON: the number is the offset where decoding failed
    if loc and loc[0] in ("body", "query", "path", "header"):  # where it was, not a field: a body
        loc = loc[1:]  # may itself have a field named "path"
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_union_member(part):
            out += f".{part}" if out else str(part)
    return out or "body"


# A union's member is named in the location by its type: `content: str | list[Part]` sent as 5 is at
# ("messages", 0, "content", "str"). The caller sent `messages[0].content`; the type is not a field.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "bytes", "none", "dict", "list", "tuple", "set"})


def _is_union_member(part: object) -> bool:
    text = str(part)
    return text in _TYPE_TAGS or text.startswith(("function-", "constrained-")) or "[" in text


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- runs --------------------------------------------------------------------------------------------


class CreateRunRequest(_Strict):
    base_model: str = Field(..., min_length=1, description="Hub id, local directory or .gguf file.")
    lora_config: LoRAConfig = Field(default_factory=LoRAConfig)
    loss_config: LossFunctionConfig = Field(default_factory=LossFunctionConfig)
    run_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$",
        description="Choose the id (default: generated).",
    )
    from_checkpoint: CheckpointRef | None = Field(
        None, description="Start from a saved checkpoint (its LoRA config, weights, and optimizer if saved)."
    )
    optimizer: Literal["adamw", "dimuon"] | None = Field(
        None,
        description="The run's optimizer, fixed for its life (default: AdamW, or the one whose state "
        "`from_checkpoint` restores). Each optim_step then takes that optimizer's hyperparameters.",
    )


class CheckpointRef(_Strict):
    run_id: str
    name: str
    with_optimizer: bool = Field(
        True,
        description="Restore its optimizer state too (if saved); false: its weights only, a fresh optimizer.",
    )


class Run(BaseModel):
    run_id: str
    base_model: str
    lora_config: LoRAConfig
    loss_config: LossFunctionConfig
    step: int
    status: Literal["active", "lost", "copy"] = Field(
        description="`lost`: the server restarted and the adapter is not in memory; `load` a checkpoint to resume. "
        "`copy`: holds a copied checkpoint only (Tinker's `copy_weights`): sampled and trained from, never trained."
    )
    num_parameters: int | None = None
    created_at: float
    updated_at: float | None = Field(default=None, description="When an op last changed the run.")
    last_loss: float | None = None
    optimizer: Literal["adamw", "dimuon"] = "adamw"


# --- training ----------------------------------------------------------------------------------------


class NativeDatum(_Strict):
    """A sequence for the run's native loss: labels aligned to input_ids (the loss shifts them)."""

    input_ids: list[int] = Field(..., min_length=1)
    target_ids: list[int] | None = Field(
        None, description="Labels aligned to input_ids; -100 ignores a position."
    )
    weights: list[float] | None = None


class TokenDatum(_Strict):
    """A sequence for a Tinker token loss: target_tokens[i] is predicted at position i."""

    tokens: list[int] = Field(..., min_length=1)
    loss_inputs: dict[str, list[float] | list[int] | list[list[float]] | list[list[int]]]


class ForwardBackwardRequest(_Strict):
    """Either native data (`input_ids`/`target_ids`, the run's loss or `loss_config`), or token data
    with `loss_fn` (Tinker's losses: cross_entropy, importance_sampling, ppo, ...)."""

    data: list[NativeDatum] | list[TokenDatum] = Field(..., min_length=1)
    loss_config: LossFunctionConfig | None = None
    loss_fn: str | None = None
    loss_fn_config: dict[str, float] | None = None

    @model_validator(mode="after")
    def _one_family(self) -> ForwardBackwardRequest:
        token = bool(self.data) and isinstance(self.data[0], TokenDatum)
        if token and self.loss_fn is None:
            raise ValueError("data with `tokens`/`loss_inputs` needs `loss_fn`")
        if not token and self.loss_fn is not None:
            raise ValueError("`loss_fn` takes data as `tokens` + `loss_inputs` (target_tokens, ...)")
        if self.loss_fn is not None and self.loss_config is not None:
            raise ValueError("give either `loss_fn` (token loss) or `loss_config` (native loss), not both")
        return self


class OptimStepRequest(_Strict):
    """One step of the run's optimizer. AdamW takes the first six fields; Dimuon takes `learning_rate`,
    `beta1`, `grad_clip_norm`, `damping` and `rank_lr_correction_exponent` (and refuses a `weight_decay`,
    `beta2` or `eps` other than the default: it has none)."""

    learning_rate: float = Field(1e-4, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-12, gt=0)
    grad_clip_norm: float = Field(0.0, ge=0, description="0 = no clipping.")
    optimizer: Literal["adamw", "dimuon"] | None = Field(
        None, description="Whose step this is (None: the run's optimizer); another than the run's is refused."
    )
    damping: float | None = Field(
        None, gt=0, description="Dimuon: smooths its row and column preconditioner (default 1e-4)."
    )
    rank_lr_correction_exponent: float | None = Field(
        None, description="Dimuon: learning rate x (rank / 32) ** this (default 0.175; 0 = none)."
    )


class ForwardBackwardOutput(BaseModel):
    loss: float
    logprobs: list[list[float]] | list[list[list[float]]]
    metrics: dict[str, float]


class OptimStepOutput(BaseModel):
    step: int
    grad_norm: float
    learning_rate: float


# --- sampling ----------------------------------------------------------------------------------------


class ChatTurn(_Strict):
    role: str  # system, user, assistant... as the chat template knows them
    content: str


class SampleRequest(_Strict):
    prompt: str | None = Field(
        None, description="Text, tokenized by the server with the base model's tokenizer."
    )
    prompt_tokens: list[int] | None = Field(None, min_length=1)
    messages: list[ChatTurn] | None = Field(
        None,
        min_length=1,
        description="A chat, rendered by the base model's chat template, ready for the assistant's turn.",
    )
    base_model: str | None = Field(
        None, description="For POST /v1/sample: the base model (default: the server's)."
    )
    sampler_id: str | None = None
    max_new_tokens: int | None = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1)
    stop: list[str] | list[int] | str | None = None
    seed: int | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="OpenAI's, over the generated tokens.")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="OpenAI's, over the generated tokens.")
    logit_bias: dict[int, float] | None = Field(None, description="Token id -> added to its logit (±100).")
    n: int = Field(1, ge=1, description="Number of samples (at most the server's `max_samples`).")
    prompt_logprobs: bool = False
    json_schema: dict[str, Any] | None = Field(
        None, description="Constrained decoding: the text is JSON matching this JSON schema."
    )
    regex: str | None = Field(None, description="Constrained decoding: the text matches this regex.")
    choice: list[str] | None = Field(None, description="Constrained decoding: the text is one of these.")

    @model_validator(mode="after")
    def _one_prompt(self) -> SampleRequest:
        if sum(x is not None for x in (self.prompt, self.prompt_tokens, self.messages)) != 1:
            raise ValueError(
                "give exactly one of `prompt` (text), `prompt_tokens` (ids) or `messages` (a chat)"
            )
        if sum(x is not None for x in (self.json_schema, self.regex, self.choice)) > 1:
            raise ValueError("give at most one of `json_schema`, `regex` or `choice`")
        return self


class Sample(BaseModel):
    text: str
    tokens: list[int]
    logprobs: list[float]
    stop_reason: Literal["stop", "length"]


class SampleOutput(BaseModel):
    samples: list[Sample]
    prompt_tokens: list[int]
    prompt_logprobs: list[float | None] | None = None


# --- checkpoints -------------------------------------------------------------------------------------


class SaveRequest(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    kind: Literal["state", "weights"] = Field(
        "state", description="`state`: adapter + optimizer + step (resumable); `weights`: the adapter alone."
    )
    overwrite: bool = Field(
        False,
        description="Replace the run's checkpoint of this name, if any (atomically: the old one stays "
        "until the new one is complete). Without it, an existing name is a 409.",
    )


class LoadRequest(_Strict):
    name: str = Field(..., min_length=1)
    source_run_id: str | None = Field(
        None, description="Load another run's checkpoint (default: this run's)."
    )
    with_optimizer: bool = True


class Checkpoint(BaseModel):
    run_id: str
    name: str
    kind: Literal["state", "weights"]
    step: int
    adapter_path: str
    optimizer_path: str | None
    size_bytes: int
    created_at: float


class SaveOutput(BaseModel):
    status: Literal["completed"] = "completed"
    name: str
    step: int
    adapter_path: str
    optimizer_path: str | None


# --- jobs, metrics, health ---------------------------------------------------------------------------


class JobRef(BaseModel):
    job_id: str
    status: JobStatus
    run_id: str | None = None
    op: Op


class Job(JobRef):
    result: dict[str, Any] | None = None
    error: str | None = None
    error_category: Literal["user", "server"] | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    queue_position: int | None = Field(None, description="0-based place among queued jobs, in start order.")
    estimated_start: float | None = Field(
        None, description="When a queued job is expected to start (epoch s)."
    )
    pass_size: int | None = Field(None, description="How many jobs (of different runs) executed in its pass.")


class QueuedJob(BaseModel):
    """A job running or waiting, as the queue view shows it."""

    job_id: str
    op: str
    run_id: str | None
    status: Literal["queued", "running"]
    tokens: int
    created_at: float
    started_at: float | None = None
    position: int | None = None
    estimated_start: float | None = None


class QueueView(BaseModel):
    """The scheduler at a glance: what runs, what waits (in start order), and how busy it is."""

    queue_depth: int
    running: int
    passes: int
    jobs_per_pass: float = Field(description="Mean jobs executed together per pass, since start.")
    utilisation: float = Field(description="Busy fraction of the workers over the last minute.")
    tokens_per_second: float = Field(description="Recent training throughput of the scheduler's passes.")
    jobs: list[QueuedJob]


class StepMetrics(BaseModel):
    step: int
    loss: float | None
    learning_rate: float | None
    grad_norm: float | None
    num_tokens: int | None
    time: float


class RunMetrics(BaseModel):
    run_id: str
    history: list[StepMetrics]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    device: str
    loaded_models: list[str]
    queue_depth: int


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: what went wrong and which field, so the caller can fix it."""

    error: str
    field: str | None = None
    category: Literal["user", "server"] = "user"
    detail: list[dict[str, Any]] | None = None


CreateRunRequest.model_rebuild()
