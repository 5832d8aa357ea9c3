"""The loss of one chunk of a `forward_backward` request (`eztinker.engine.run_pass`), and its log-probs.

A block's forward gives either the final hidden states (a plain head: the loss is computed in head
chunks, never making (B, T, V) logits) or full logits (a head that is not plain, or a registered native
loss without `token_terms`). Native losses see shifted labels; Tinker's token losses see target tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from eztinker.engine.batch import Chunk
from eztinker.engine.head import position_logprobs
from eztinker.engine.losses import LossSpec, reduce_token_terms, shifted_target_logprobs
from eztinker.engine.model import BaseModel
from eztinker.engine.types import IGNORE_INDEX

if TYPE_CHECKING:
    from eztinker.engine.run_pass import _Piece


@dataclass
class _Outputs:
    """What a block's forward gives the losses: final hidden states (the chunked head), or full logits
    (a model whose head is not plain)."""

    hidden: torch.Tensor | None = None  # (B, T, H)
    logits: torch.Tensor | None = None  # (B, T, V)
    head: nn.Module | None = None
    chunk: int = 1  # positions per head chunk
    recompute: bool = False  # checkpoint head chunks (recompute their logits in backward)

    def head_logprobs(
        self,
        base: BaseModel,
        adapter: str,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        family: str,
        term: Callable[..., torch.Tensor] | None = None,
        term_kwargs: Mapping | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`position_logprobs` of `targets` from `hidden` through the block's head, for `adapter`'s rows."""
        assert self.head is not None
        return position_logprobs(
            self.head,
            base.routing,
            hidden,
            targets,
            adapter=adapter,
            train=base.routing.train,
            family=family,
            chunk=self.chunk,
            recompute=self.recompute,
            term=term,
            term_kwargs=term_kwargs,
        )


ChunkLoss = tuple[torch.Tensor, list[torch.Tensor], dict[str, float]]
"""One chunk's loss: its (scaled-later) scalar loss, each row's log-probs, and its metrics summed over rows."""


def _per_datum(
    out: torch.Tensor | tuple[torch.Tensor, Mapping[str, torch.Tensor]],
) -> tuple[torch.Tensor, dict[str, float]]:
    """A token loss's per-datum losses (B,), and its own metrics summed over the chunk's datums: a token
    loss returns (B,) losses, or ``((B,) losses, {key: (B,) values})`` when it reports metrics of its own
    (an uploaded custom loss does). How a key combines across the request's datums is its suffix's
    business (`run_pass._metrics`)."""
    if not isinstance(out, tuple):
        return out, {}
    losses, metrics = out
    return losses, {key: float(values.detach().double().sum()) for key, values in metrics.items()}


def _scatter(values: torch.Tensor, index: tuple[torch.Tensor, ...], shape: torch.Size) -> torch.Tensor:
    """A tensor of `shape`, `values` at the (row, column) positions of `index` and 0 elsewhere."""
    out = values.new_zeros(shape)
    return out.index_put(index, values) if values.numel() else out


def _chunked_native_loss(
    base: BaseModel, outputs: _Outputs, hidden: torch.Tensor, piece: _Piece
) -> ChunkLoss:
    """A native built-in (or `token_terms` loss) from the piece's hidden states, in head chunks: its token
    terms at every non-ignored shifted target, reduced as `fn` reduces them; and each row's log-probs."""
    work, chunk = piece.work, piece.chunk
    terms_spec = work.spec.token_terms
    assert terms_spec is not None
    labels = chunk.inputs["labels"].to(base.device)
    targets = labels[:, 1:]  # position t predicts labels[t + 1]
    valid = targets != IGNORE_INDEX
    index = valid.nonzero(as_tuple=True)
    lp_sel, term_sel = outputs.head_logprobs(
        base,
        work.request.run.run_id,
        hidden[:, :-1][index],
        targets[index],
        "native",
        terms_spec.term,
        work.kwargs,
    )
    assert term_sel is not None
    lp = _scatter(lp_sel, index, targets.shape)
    terms = _scatter(term_sel.to(lp.dtype), index, targets.shape)
    weights = chunk.inputs.get("weights")
    w = torch.ones_like(lp) if weights is None else weights.to(base.device)[:, 1:].to(lp.dtype)
    w = torch.where(valid, w, torch.zeros_like(w))
    loss = reduce_token_terms(terms, valid, w, weighted_mean=terms_spec.weighted_mean)
    out = lp.detach().cpu()
    return loss.reshape(()), [out[row, : n - 1] for row, n in enumerate(chunk.lengths)], {}


def _chunked_token_loss(base: BaseModel, outputs: _Outputs, hidden: torch.Tensor, piece: _Piece) -> ChunkLoss:
    """Tinker's token-level loss from the piece's hidden states, in head chunks: the log-probs of its
    targets at every real position (0 at padding, which every loss masks), then the loss on them."""
    work, chunk = piece.work, piece.chunk
    targets = chunk.inputs["target_tokens"].to(base.device)  # (B, T) or (B, T, K)
    mask = chunk.mask.to(base.device)
    index = mask.nonzero(as_tuple=True)
    lp_sel, _ = outputs.head_logprobs(base, work.request.run.run_id, hidden[index], targets[index], "token")
    logprobs = _scatter(lp_sel, index, targets.shape)
    inputs = {k: v.to(base.device) for k, v in chunk.inputs.items() if k != "target_tokens"}
    per_datum, metrics = _per_datum(work.spec.fn(logprobs, inputs, mask, **work.kwargs))  # (B,)
    out = logprobs.detach().cpu()
    return per_datum.sum(), [out[row, :n] for row, n in enumerate(chunk.lengths)], metrics


def _native_loss(
    base: BaseModel, logits: torch.Tensor, chunk: Chunk, spec: LossSpec, kwargs: Mapping
) -> ChunkLoss:
    """The user's loss on one chunk's logits, and each row's log-probs of its shifted labels (N-1,)."""
    labels = chunk.inputs["labels"].to(base.device)
    weights = chunk.inputs.get("weights")
    loss = spec.fn(logits, labels, weights.to(base.device) if weights is not None else None, **kwargs)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"a loss function must return a scalar tensor, got {type(loss).__name__}")
    with torch.no_grad():
        lp = shifted_target_logprobs(logits.detach(), labels).cpu()  # (B, T-1)
    return loss.reshape(()), [lp[row, : n - 1] for row, n in enumerate(chunk.lengths)], {}


def _token_loss(
    base: BaseModel, logits: torch.Tensor, chunk: Chunk, spec: LossSpec, config: Mapping
) -> ChunkLoss:
    """Tinker's token-level loss on one chunk: the chunk's summed loss, and each row's target log-probs."""
    targets = chunk.inputs["target_tokens"].to(base.device)
    logprobs = target_logprobs(logits, targets)  # (B, T) or (B, T, K)
    inputs = {k: v.to(base.device) for k, v in chunk.inputs.items() if k != "target_tokens"}
    per_datum, metrics = _per_datum(spec.fn(logprobs, inputs, chunk.mask.to(base.device), **config))  # (B,)
    out = logprobs.detach().cpu()
    return per_datum.sum(), [out[row, :n] for row, n in enumerate(chunk.lengths)], metrics


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under `logits` (B, T, V), in float32; targets (B, T) or (B, T, K)."""
    logits = logits.float()
    if targets.ndim == 2:  # one fused log-softmax + gather: the fastest path, forward and backward
        flat = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        return -flat.view(targets.shape)
    picked = torch.gather(logits, -1, targets)  # (B, T, K)
    return picked - torch.logsumexp(logits, dim=-1, keepdim=True)
