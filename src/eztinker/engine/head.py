"""Losses from hidden states, in chunks: the output head never makes (B, T, V) logits for training.

A pass's decoder stack gives final hidden states (B, T, H). For each loss the engine needs, per position,
only a few numbers from that position's logits: the log-prob of its target (or of K targets), and for a
native built-in its token term (`eztinker.engine.losses.TokenTerms`). So the positions a loss reads are
gathered — (n, H), row by row — and cut into chunks of `chunk` positions; each chunk goes through the
output head and the per-position maths, and only the per-position results are kept. When backward will
run and a pass has more positions than one chunk, each chunk is checkpointed: its logits are freed at once
and recomputed in backward, so a pass holds one chunk's logits at a time, whatever its length. A pass of
at most one chunk keeps its logits for backward instead (no recompute: short ops keep their speed).

The head may carry LoRA (Tinker's `train_unembed`). Every piece of a pass belongs to one run, and its
positions go through the head with the routing set to that run's adapter for exactly those positions —
`LoRALinear`'s own single-adapter path, the maths the unchunked head applies to those rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from eztinker.engine.lora import Routing, Segment, routed

__all__ = ["head_logits", "position_logprobs"]


def _upcast(z: torch.Tensor, family: str) -> torch.Tensor:
    """As the unchunked losses do: the token family in float32; native fp16/bf16 to fp32 (fp64 kept)."""
    if family == "token":
        return z.float()
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def head_logits(
    head: nn.Module, routing: Routing, hidden: torch.Tensor, adapter: str | None, train: bool
) -> torch.Tensor:
    """The head on `hidden` (rows, …, H) of one run: logits (rows, …, V), with that run's head adapter."""
    rows = hidden.shape[0]
    with routed(routing, [Segment(adapter, 0, rows)] if rows else [], train):
        return head(hidden)


def position_logprobs(
    head: nn.Module,
    routing: Routing,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    adapter: str | None,
    train: bool,
    family: str,
    chunk: int,
    recompute: bool,
    term: Callable[..., torch.Tensor] | None = None,
    term_kwargs: Mapping | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(targets), term) at `n` positions from their hidden states (n, H), chunk by chunk.

    `targets` (n,) or (n, K); log-probs are (n,) or (n, K), float32 for the token family (the native
    family's follow the logits' dtype, fp16/bf16 upcast). With `term` (a native `TokenTerms.term`), also
    its per-position term (n,). `recompute`: checkpoint each chunk (free its logits, recompute them in
    backward). Gradients flow to `hidden` and to the run's head adapter.
    """
    kwargs = dict(term_kwargs or {})

    def piece(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z = _upcast(head_logits(head, routing, h, adapter, train), family)
        if y.ndim == 1:  # one fused log-softmax + gather
            lp = -F.cross_entropy(z, y, reduction="none")
        else:  # top-K targets
            lp = torch.gather(z, -1, y) - torch.logsumexp(z, dim=-1, keepdim=True)
        if term is None:
            return (lp,)
        return lp, term(z, y, lp, **kwargs)

    n = hidden.shape[0]
    if n == 0:
        empty = hidden.new_zeros(targets.shape, dtype=torch.float32 if family == "token" else None)
        return empty, (hidden.new_zeros(0) if term is not None else None)
    outputs: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, n, chunk):
        h, y = hidden[start : start + chunk], targets[start : start + chunk]
        if recompute and torch.is_grad_enabled():
            outputs.append(checkpoint(piece, h, y, use_reentrant=False))
        else:
            outputs.append(piece(h, y))
    lp = outputs[0][0] if len(outputs) == 1 else torch.cat([o[0] for o in outputs])
    if term is None:
        return lp, None
    terms = outputs[0][1] if len(outputs) == 1 else torch.cat([o[1] for o in outputs])
    return lp, terms
