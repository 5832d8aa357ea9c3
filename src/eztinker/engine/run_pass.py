"""`forward_backward` (and `forward`) of one or many runs on one base model (`eztinker.engine.run`).

Each request is checked and chunked as it would be alone (`_prepare`); the chunks of every request are
packed into blocks of rows within the token budget (`_pack`); each block goes through one forward (and
backward) pass, each row routed to its own run's adapter (`_run_block`); a request's gradients land in
buffers of its own and reach its run only once all of them succeeded and are finite (`_commit`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from eztinker.engine import vision
from eztinker.engine.batch import Chunk, budget_for, check_data, chunk_batch
from eztinker.engine.errors import ComputeError, EngineError, InvalidInputError, NonFiniteError
from eztinker.engine.head import head_logits
from eztinker.engine.lora import Segment, routed
from eztinker.engine.losses import LossSpec, get_loss_spec
from eztinker.engine.memory import (
    MemoryProfile,
    PassMemory,
    checkpointed,
    last_hidden_state,
    memory_profile,
    pass_memory,
)
from eztinker.engine.model import BaseModel
from eztinker.engine.run_losses import (
    _chunked_native_loss,
    _chunked_token_loss,
    _native_loss,
    _Outputs,
    _token_loss,
)
from eztinker.engine.types import Datum, ForwardBackwardResult, TokenLoss
from eztinker.models import LossFunctionConfig

if TYPE_CHECKING:
    from eztinker.engine.run import TrainingRun


def resolve_loss(
    run: TrainingRun, loss: LossFunctionConfig | TokenLoss | str | None
) -> tuple[LossSpec, dict]:
    """The loss spec and its keyword arguments: the run's default, a native config, or a token loss (a
    registered one by name, or a server-side custom loss's graph carried in the op)."""
    if loss is None:
        loss = run.loss_config
    if isinstance(loss, str):
        loss = TokenLoss(loss)
    if isinstance(loss, TokenLoss):
        spec = get_loss_spec(loss.name, "token") if loss.graph is None else loss.graph.loss_spec(loss.name)
        return spec, spec.resolve_config(loss.config)
    return get_loss_spec(loss.loss_type, "native"), loss.params


@dataclass(frozen=True)
class PassOptions:
    """How `forward_backward_many` cuts, checkpoints and bounds its passes (`EngineConfig`'s fields).

    * `token_budget`: padded tokens per chunk of a request and per shared block (a longer sequence gets a
      block of its own).
    * `logits_budget`: logits elements per chunk, for the losses that take full (B, T, V) logits (a
      registered native loss without `token_terms`, or a model whose head is not plain); others never
      make them.
    * `checkpoint_tokens`: gradient checkpointing of the decoder layers for backward passes of more
      padded tokens than this (also below it when a pass would not fit `memory_limit` without).
    * `logits_chunk`: logits elements per head chunk of the chunked losses (`eztinker.engine.head`).
    * `memory_limit`: bytes one pass may use on top of what is allocated; None: 90 % of the device's free
      memory at the time. A sequence whose pass would need more is refused (`InvalidInputError`).
    """

    token_budget: int = 8192
    logits_budget: int = 2**28
    checkpoint_tokens: int = 1024
    logits_chunk: int = 2**25
    memory_limit: int | None = None

    def memory(self, base: BaseModel) -> PassMemory:
        return pass_memory(
            base.device,
            checkpoint_tokens=self.checkpoint_tokens,
            logits_chunk=self.logits_chunk,
            memory_limit=self.memory_limit,
        )


@dataclass
class TrainRequest:
    """One run's `forward_backward` (or `forward`, with `backward=False`) in a pass that may serve many."""

    run: TrainingRun
    data: Sequence[Datum]
    loss: LossFunctionConfig | TokenLoss | str | None = None
    backward: bool = True


def forward_backward(
    run: TrainingRun,
    data: Sequence[Datum],
    loss: LossFunctionConfig | TokenLoss | str | None = None,
    *,
    options: PassOptions | None = None,
    backward: bool = True,
) -> ForwardBackwardResult:
    """Run `data` through the run's adapter; with `backward`, add the loss's gradients to the run's."""
    request = TrainRequest(run, data, loss, backward)
    (outcome,) = forward_backward_many([request], options)
    if isinstance(outcome, EngineError):
        raise outcome
    return outcome


def check_request(
    run: TrainingRun,
    data: Sequence[Datum],
    loss: LossFunctionConfig | TokenLoss | str | None = None,
    *,
    options: PassOptions | None = None,
    backward: bool = True,
) -> None:
    """Raise `InvalidInputError` now (no compute) if `forward_backward` would refuse this request: bad
    data, or a sequence longer than memory allows."""
    _prepare(TrainRequest(run, data, loss, backward), options or PassOptions())


def forward_backward_many(
    requests: Sequence[TrainRequest], options: PassOptions | None = None
) -> list[ForwardBackwardResult | EngineError]:
    """Execute requests of several runs on one base model together; one outcome per request.

    Each request is chunked exactly as it would be alone, and chunks of different runs share blocks of
    rows (padded B·T within the budget) that go through one forward and one backward pass, each row
    routed to its own run's adapter. A request's loss and gradients involve only its rows and its
    adapter, so its outcome equals running it alone. A request that fails (bad data, a NaN loss, a
    custom loss that raises, a sequence longer than memory allows) fails alone and leaves its run
    unchanged; if the shared pass itself fails (out of memory, say), each of its requests is run again
    on its own.
    """
    if not requests:
        return []
    options = options or PassOptions()
    base = requests[0].run.base
    if any(r.run.base is not base for r in requests):
        raise ValueError("requests executed together must share one base model")
    memory = options.memory(base)
    outcomes: list[ForwardBackwardResult | EngineError | None] = [None] * len(requests)
    works: list[_Work | None] = []
    for i, request in enumerate(requests):
        try:
            works.append(_prepare(request, options, memory))
        except EngineError as exc:
            outcomes[i] = exc
            works.append(None)
    live = [w for w in works if w is not None]
    budget = min([options.token_budget, *(w.max_tokens for w in live)])
    with base.lock, routed(base.routing, []):
        for block in _pack(live, budget):
            _run_block(base, block, memory)
        for i, work in enumerate(works):
            if work is None:
                continue
            if work.shared_failure:  # not this request's fault: give it a pass of its own
                outcomes[i] = forward_backward_many([work.request], options)[0]
            elif work.error is not None:
                outcomes[i] = work.error
            else:
                outcomes[i] = _commit(work)
    return [o for o in outcomes if o is not None]


@dataclass
class _Work:
    """A request under way: its chunks, and what it has computed so far (not yet committed to the run)."""

    request: TrainRequest
    spec: LossSpec
    kwargs: Mapping
    chunks: list[Chunk]
    chunk_scales: list[float]  # native losses: each chunk's share of the normaliser; token losses: 1
    params: list[nn.Parameter]
    logprobs: list[torch.Tensor | None]
    full_logits: bool = False  # its loss takes (B, T, V) logits
    max_tokens: int = 2**62  # the longest sequence memory allows for it
    grads: list[torch.Tensor] | None = None
    loss_total: float = 0.0
    metric_sums: dict[str, float] = field(default_factory=dict)  # a loss's own metrics, summed over datums
    num_tokens: int = 0
    error: EngineError | None = None
    shared_failure: bool = False  # a pass shared with other runs failed: retry this request alone


@dataclass
class _Piece:
    """One chunk of one request, at rows [start, start + rows) of a block."""

    work: _Work
    chunk: Chunk
    scale: float
    start: int = 0

    @property
    def rows(self) -> int:
        return self.chunk.input_ids.shape[0]

    @property
    def width(self) -> int:
        return self.chunk.input_ids.shape[1]


def _needs_full_logits(spec: LossSpec, profile: MemoryProfile) -> bool:
    """Whether `spec` is computed from full (B, T, V) logits rather than from hidden states in chunks."""
    return not profile.plain_head or (spec.family == "native" and spec.token_terms is None)


def _prepare(request: TrainRequest, options: PassOptions, memory: PassMemory | None = None) -> _Work:
    """Check and chunk a request's data (raises `InvalidInputError` before any compute)."""
    run = request.run
    spec, kwargs = resolve_loss(run, request.loss)
    checked = check_data(request.data, spec, vocab_size=run.base.vocab_size, max_length=run.base.max_length)
    vision.check_data(run.base, request.data)
    profile = memory_profile(run.base)
    memory = memory or options.memory(run.base)
    full_logits = _needs_full_logits(spec, profile)
    longest = max(datum.tokens.numel() for datum in checked)
    budget = options.token_budget
    max_tokens = max(longest, budget)  # a lower bound of the longest that fits (all a block needs) ...
    # One estimate when everything fits (the estimate grows with the length); the search for the longest
    # sequence that fits only when something may not (about 40 estimates: a cost every short op would pay).
    if not memory.fits(profile, 1, max_tokens, backward=request.backward, full_logits=full_logits):
        # ... or, when something may not fit, the longest exactly
        max_tokens = memory.largest_sequence(profile, backward=request.backward, full_logits=full_logits)
        for datum in checked:
            n = datum.tokens.numel()
            if n > max_tokens:
                raise _too_long(datum.index, n, max_tokens, memory, profile, request.backward, full_logits)
        budget = max(1, min(budget, max_tokens))
    if full_logits:
        budget = min(budget, budget_for(run.base.vocab_size, options.token_budget, options.logits_budget))
    chunks = chunk_batch(checked, budget)
    scales = [1.0] * len(chunks)
    if spec.family == "native":
        normalizer = spec.normalizer or _count_targets
        denominators = [float(normalizer(c.inputs["labels"], c.inputs.get("weights"))) for c in chunks]
        total = sum(denominators)
        if total <= 0:
            raise InvalidInputError("data", "has no target to train on: every label is -100 or weight 0")
        scales = [d / total for d in denominators]
    return _Work(
        request=request,
        spec=spec,
        kwargs=kwargs,
        chunks=chunks,
        chunk_scales=scales,
        params=run.params,
        logprobs=[None] * len(checked),
        full_logits=full_logits,
        max_tokens=max(1, max_tokens),
    )


def _too_long(
    index: int,
    n: int,
    max_tokens: int,
    memory: PassMemory,
    profile: MemoryProfile,
    backward: bool,
    full_logits: bool,
) -> InvalidInputError:
    op = "forward_backward" if backward else "forward"
    need = memory.estimate(profile, 1, n, backward=backward, checkpoint=backward, full_logits=full_logits)
    why = " (its loss takes full logits: register it with token_terms to lift that)" if full_logits else ""
    return InvalidInputError(
        f"data[{index}].tokens",
        f"has {n} tokens: {op} on a sequence that long needs about {need / 2**30:.1f} GiB, more than the "
        f"{memory.limit / 2**30:.1f} GiB this server allows a pass{why}; the longest sequence it can take "
        f"is {max_tokens} tokens",
    )


def _pack(works: Sequence[_Work], budget: int) -> list[list[_Piece]]:
    """Blocks of chunks whose rows × widest row fit the budget (first fit, widest first).

    Forward-only and backward requests never share a block: adapter dropout is on only while training.
    Nor do two backward requests of one run: a block's backward yields one gradient per parameter, which
    could not be split between them (each would get their sum).
    """
    pieces = [_Piece(w, c, s) for w in works for c, s in zip(w.chunks, w.chunk_scales, strict=True)]
    pieces.sort(key=lambda p: p.width, reverse=True)
    blocks: list[list[_Piece]] = []
    for piece in pieces:
        for block in blocks:  # block[0] is the block's widest piece
            fits = (sum(p.rows for p in block) + piece.rows) * block[0].width <= budget
            if fits and _may_share(block, piece):
                block.append(piece)
                break
        else:
            blocks.append([piece])
    order = {id(w): i for i, w in enumerate(works)}
    for block in blocks:  # a run's rows side by side: one routing segment per run
        block.sort(key=lambda p: order[id(p.work)])
    return blocks


def _may_share(block: list[_Piece], piece: _Piece) -> bool:
    """Whether `piece` may join `block`: the same direction (forward or backward), and with backward no
    other request of the same run in it (a chunk of the same request is fine: its gradients add up)."""
    backward = piece.work.request.backward
    if block[0].work.request.backward != backward:
        return False
    run = piece.work.request.run
    return not backward or all(p.work is piece.work or p.work.request.run is not run for p in block)


def _run_block(base: BaseModel, block: list[_Piece], memory: PassMemory) -> None:
    """One forward (and backward) pass over a block; results and gradients go into each piece's work.

    Rows are right-padded and no attention mask is passed: causal attention alone keeps every real token
    from seeing padding (positions are 0..T-1 either way), and SDPA then takes its O(T)-memory kernels.
    """
    block = [p for p in block if p.work.error is None]
    if not block:
        return
    backward = block[0].work.request.backward
    width = max(p.width for p in block)
    rows = sum(p.rows for p in block)
    input_ids = torch.zeros(rows, width, dtype=torch.int64)
    segments: list[Segment] = []
    start = 0
    for piece in block:
        piece.start = start
        input_ids[start : start + piece.rows, : piece.width] = piece.chunk.input_ids
        run_id = piece.work.request.run.run_id
        if segments and segments[-1].adapter == run_id:
            segments[-1].stop += piece.rows
        else:
            segments.append(Segment(run_id, start, start + piece.rows))
        start += piece.rows
    works = list({id(p.work): p.work for p in block}.values())
    profile = memory_profile(base)
    full_logits = any(w.full_logits for w in works)
    layers_checkpointed = backward and memory.should_checkpoint(profile, rows, width, full_logits=full_logits)
    real_tokens = sum(sum(p.chunk.lengths) for p in block)
    base.routing.segments, base.routing.train = segments, backward
    try:
        with torch.set_grad_enabled(backward), checkpointed(profile.layers, layers_checkpointed):
            ids = input_ids.to(base.device)
            images = _vision_inputs(base, block, ids)
            if profile.plain_head:
                outputs = _Outputs(
                    hidden=last_hidden_state(profile.backbone(input_ids=ids, use_cache=False, **images)),
                    head=profile.head(base.model),
                    chunk=memory.chunk_tokens(profile),
                    recompute=backward and real_tokens > memory.chunk_tokens(profile),
                )
            else:
                outputs = _Outputs(logits=base.model(input_ids=ids, use_cache=False, **images).logits)
            losses = [(p, _piece_loss(base, outputs, p)) for p in block]
            if backward:
                _backward(losses)
    except torch.OutOfMemoryError as exc:
        _fail_block(works, ComputeError(f"out of memory on a block of {input_ids.numel()} tokens"), exc)
    except Exception as exc:
        _fail_block(
            works, ComputeError(f"the forward/backward pass failed: {type(exc).__name__}: {exc}"), exc
        )


def _vision_inputs(base: BaseModel, block: list[_Piece], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The images of the block's rows for a vision-language model (`engine.vision`); empty without images."""
    rows = [piece.work.request.data[i].images for piece in block for i in piece.chunk.indices]
    return vision.model_inputs(base, rows, input_ids)


def _fail_block(works: list[_Work], error: ComputeError, cause: BaseException) -> None:
    error.__cause__ = cause
    error.args = (f"{error.args[0]}; the run is unchanged",)
    for work in works:
        if work.error is None:
            work.error = error
            work.shared_failure = len(works) > 1


def _piece_loss(base: BaseModel, outputs: _Outputs, piece: _Piece) -> torch.Tensor | None:
    """The piece's scaled loss (None if it failed: its request is marked failed); records its log-probs."""
    work, chunk = piece.work, piece.chunk
    if work.error is not None:
        return None
    rows = slice(piece.start, piece.start + piece.rows)
    try:
        if outputs.logits is not None:
            own_logits = outputs.logits[rows, : piece.width]
            if work.spec.family == "native":
                loss, rows_logprobs, metrics = _native_loss(base, own_logits, chunk, work.spec, work.kwargs)
            else:
                loss, rows_logprobs, metrics = _token_loss(base, own_logits, chunk, work.spec, work.kwargs)
        else:
            assert outputs.hidden is not None
            own_hidden = outputs.hidden[rows, : piece.width]
            if work.spec.family == "token":
                loss, rows_logprobs, metrics = _chunked_token_loss(base, outputs, own_hidden, piece)
            elif work.spec.token_terms is not None:
                loss, rows_logprobs, metrics = _chunked_native_loss(base, outputs, own_hidden, piece)
            else:  # a registered loss takes full logits, by contract
                assert outputs.head is not None
                own_logits = head_logits(
                    outputs.head, base.routing, own_hidden, work.request.run.run_id, base.routing.train
                )
                loss, rows_logprobs, metrics = _native_loss(base, own_logits, chunk, work.spec, work.kwargs)
        if work.spec.family == "native":
            loss = loss * piece.scale
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteError(
                f"loss {work.spec.name!r} is {value} on data {chunk.indices}; the run is unchanged"
            )
    except EngineError as exc:
        work.error = exc
        return None
    except torch.OutOfMemoryError:
        raise  # the block's problem, not this request's
    except Exception as exc:  # a custom loss may raise anything
        work.error = ComputeError(
            f"loss {work.spec.name!r} raised {type(exc).__name__}: {exc}; the run is unchanged"
        )
        work.error.__cause__ = exc
        return None
    work.loss_total += value
    for key, total in metrics.items():
        work.metric_sums[key] = work.metric_sums.get(key, 0.0) + total
    work.num_tokens += int(chunk.mask.sum())
    for row, index in enumerate(chunk.indices):
        work.logprobs[index] = rows_logprobs[row]
    return loss


def _backward(losses: list[tuple[_Piece, torch.Tensor | None]]) -> None:
    """One backward pass through the block's summed loss; each run's gradients go to its own buffers.

    A run's adapter touches only its own rows, so d(sum)/d(its params) is exactly its own loss's gradient.
    A loss with no path to any adapter (e.g. no target in its chunk) contributes zero gradients.
    """
    live = [(p, loss) for p, loss in losses if loss is not None and p.work.error is None]
    if not live:
        return
    works = list({id(p.work): p.work for p, _ in live}.values())
    params = [param for w in works for param in w.params]
    connected = [loss for _, loss in live if loss.requires_grad]
    grads: Sequence[torch.Tensor | None] = [None] * len(params)
    if connected:
        total = connected[0] if len(connected) == 1 else torch.stack(connected).sum()
        grads = torch.autograd.grad(total, params, allow_unused=True)
    offset = 0
    for work in works:
        n = len(work.params)
        # A shared layer computes several runs' adapters side by side, so a gradient may arrive as a strided
        # view into a common buffer: give each run dense tensors of its own (the fused optimizer needs them).
        mine = [
            torch.zeros_like(p) if g is None else g.contiguous()
            for p, g in zip(work.params, grads[offset : offset + n], strict=True)
        ]
        offset += n
        if work.grads is None:
            work.grads = mine
        else:
            torch._foreach_add_(work.grads, mine)


def _commit(work: _Work) -> ForwardBackwardResult | EngineError:
    """Add the request's gradients to its run's (only now does the run change) and build its result."""
    run, spec = work.request.run, work.spec
    if work.request.backward and work.grads is not None:
        if not bool(torch.isfinite(torch.stack(torch._foreach_norm(work.grads))).all()):
            return NonFiniteError(f"gradients of loss {spec.name!r} are not finite; the run is unchanged")
        for p, g in zip(work.params, work.grads, strict=True):
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        run.pending_grad_ops += 1
    reduction = "sum" if spec.family == "token" else "mean"
    return ForwardBackwardResult(
        loss=work.loss_total,
        logprobs=[lp if lp is not None else torch.empty(0) for lp in work.logprobs],
        metrics={
            f"loss:{reduction}": work.loss_total,
            "num_tokens:sum": float(work.num_tokens),
            **_own_metrics(work),
        },
        loss_family=spec.family,
    )


def _own_metrics(work: _Work) -> dict[str, float]:
    """The loss's own metrics over the request, as the SDK combines them client-side: a `:mean` key is
    the mean over the request's datums, any other key their sum."""
    datums = len(work.logprobs)
    return {
        key: total / datums if key.endswith(":mean") else total for key, total in work.metric_sums.items()
    }


def _count_targets(labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return (labels[:, 1:] != -100).sum()
