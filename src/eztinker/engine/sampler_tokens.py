"""Choosing tokens and reading their log-probabilities (`eztinker.engine.sampler`): greedy or inverse-CDF
draws over each row's top-k / top-p filtered distribution, the prompt extras a request asked for, and
recording each new token (stop ids, stop strings, max tokens, cancellation) into the rows' results.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from eztinker.engine import grammar
from eztinker.engine.errors import EngineError
from eztinker.engine.model import BaseModel
from eztinker.engine.sampler_requests import SampleRequest, _PromptExtras, _Row, _row_seed, _Section
from eztinker.engine.types import PromptAltTokens, SampledSequence, SampleResult, SamplingParams, TopLogprobs

if TYPE_CHECKING:
    from eztinker.engine.sampler import _Batch

_MIN_TEMPERATURE = 1e-5  # below this, logits / T overflows float32: sample greedily instead


def _temperature(params: SamplingParams) -> float:
    return 0.0 if params.temperature < _MIN_TEMPERATURE else float(params.temperature)


# --- choosing tokens -----------------------------------------------------------------------------


def _choose_tokens(logits_BV: torch.Tensor, batch: _Batch, u_B: torch.Tensor) -> torch.Tensor:
    """Each row's next token: argmax where temperature is 0, else a draw from its filtered distribution
    (both after the row's logit bias and penalties, and within its grammar)."""
    logits_BV = _constrained(_biased(logits_BV, batch.rows), batch.rows)
    greedy_B = logits_BV.argmax(dim=-1)
    if all(_temperature(r.params) == 0 for r in batch.rows):
        return _with_forced(greedy_B, batch.rows)
    is_greedy_B = batch.temperature == 0
    scaled_BV = logits_BV / torch.where(is_greedy_B, 1.0, batch.temperature)[:, None]
    if any(r.params.top_k > 0 or r.params.top_p < 1 for r in batch.rows):
        scaled_BV = _filter_top_k_top_p(scaled_BV, batch.top_k, batch.top_p)
    sampled_B = _inverse_cdf(torch.softmax(scaled_BV, dim=-1), u_B)
    return _with_forced(torch.where(is_greedy_B, greedy_B, sampled_B), batch.rows)


def _with_forced(tokens_B: torch.Tensor, rows: Sequence[_Row]) -> torch.Tensor:
    """The chosen tokens, with each row that has tokens to force (a closed `Budget`) given its next one.
    A row's draw is still made, so that its stream of uniforms does not depend on the forcing."""
    forced = [(b, r.forced[0]) for b, r in enumerate(rows) if r.forced]
    if not forced:
        return tokens_B
    rows_F, tokens_F = (torch.tensor(column, device=tokens_B.device) for column in zip(*forced, strict=True))
    return tokens_B.index_put((rows_F,), tokens_F)


def _biased(logits_BV: torch.Tensor, rows: Sequence[_Row]) -> torch.Tensor:
    """The logits with each row's `logit_bias` added and its frequency and presence penalties taken off
    (`SamplingParams`), over the tokens the row has generated; the input itself when no row has any.

    The counts are rebuilt each step from the rows' tokens (one small copy to the device, only for the
    rows that penalize): rows join and leave the continuous batch, so a kept count table would have to
    follow every reorder."""
    biased = [b for b, r in enumerate(rows) if r.params.logit_bias]
    penalized = [
        b
        for b, r in enumerate(rows)
        if r.tokens and (r.params.frequency_penalty or r.params.presence_penalty)
    ]
    if not biased and not penalized:
        return logits_BV
    logits_BV = logits_BV.clone()
    device, V = logits_BV.device, logits_BV.shape[-1]
    if biased:
        where = [
            (b, token, bias) for b in biased for token, bias in (rows[b].params.logit_bias or {}).items()
        ]
        rows_N, tokens_N, bias_N = (torch.tensor(column) for column in zip(*where, strict=True))
        logits_BV.index_put_(
            (rows_N.to(device), tokens_N.to(device)), bias_N.to(device, logits_BV.dtype), accumulate=True
        )
    if penalized:
        longest = max(len(rows[b].tokens) for b in penalized)
        tokens_PL = torch.full((len(penalized), longest), V, dtype=torch.long)  # V: padding, dropped below
        for i, b in enumerate(penalized):
            tokens_PL[i, : len(rows[b].tokens)] = torch.tensor(rows[b].tokens)
        counts_PV = torch.zeros(len(penalized), V + 1, device=device, dtype=logits_BV.dtype)
        counts_PV.scatter_add_(1, tokens_PL.to(device), torch.ones_like(counts_PV[:, :1]).expand(-1, longest))
        counts_PV = counts_PV[:, :V]
        params = [rows[b].params for b in penalized]
        frequency_P1 = torch.tensor([[float(q.frequency_penalty)] for q in params], dtype=logits_BV.dtype)
        presence_P1 = torch.tensor([[float(q.presence_penalty)] for q in params], dtype=logits_BV.dtype)
        frequency_P1, presence_P1 = frequency_P1.to(device), presence_P1.to(device)
        index_P = torch.tensor(penalized).to(device)
        logits_BV[index_P] -= frequency_P1 * counts_PV + presence_P1 * (counts_PV > 0)
    return logits_BV


def _constrained(logits_BV: torch.Tensor, rows: Sequence[_Row]) -> torch.Tensor:
    """The logits with every token a row's grammar does not allow next at -inf (`eztinker.engine.grammar`).
    Once its grammar is complete a row may also draw one of its stop tokens, and once nothing more can
    follow it must: its sample ends on a stop token (end of turn), as an unconstrained one does. The
    input itself when no row has a grammar."""
    constrained = [b for b, r in enumerate(rows) if r.matcher is not None]
    if not constrained:
        return logits_BV
    matchers = [m for b in constrained if (m := rows[b].matcher) is not None]
    allowed_RV = grammar.allowed_tokens(matchers, logits_BV.shape[-1], logits_BV.device)
    for i, b in enumerate(constrained):
        row = rows[b]
        if row.grammar_ends:  # the grammar ends on EOS; a row that never stops (`stop=[]`) must not
            allowed_RV[i, list(row.grammar_ends)] = False
        stops = list(row.stops.token_ids)
        if stops and matchers[i].is_stopped():
            allowed_RV[i] = False
        if stops and matchers[i].is_accepting():
            allowed_RV[i, stops] = True
    if len(constrained) == len(rows):
        return logits_BV.masked_fill(~allowed_RV, -math.inf)
    logits_BV = logits_BV.clone()
    index_R = torch.tensor(constrained, device=logits_BV.device)
    logits_BV[index_R] = logits_BV[index_R].masked_fill(~allowed_RV, -math.inf)
    return logits_BV


def _filter_top_k_top_p(
    scaled_BV: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor
) -> torch.Tensor:
    """Set to -inf every token outside a row's top k, then outside its top-p nucleus (vLLM's order).

    A row with top_k = -1 and top_p = 1 keeps every token, so its result does not depend on whether
    other rows in the batch filter.
    """
    V = scaled_BV.shape[-1]
    sorted_BV, order_BV = scaled_BV.sort(dim=-1, descending=True, stable=True)
    k_B = torch.where(top_k_B < 0, V, top_k_B)
    drop_BV = torch.arange(V, device=scaled_BV.device)[None, :] >= k_B[:, None]
    probs_BV = torch.softmax(sorted_BV.masked_fill(drop_BV, -math.inf), dim=-1)
    mass_before_BV = probs_BV.cumsum(dim=-1) - probs_BV
    drop_BV |= (mass_before_BV >= top_p_B[:, None]) & (top_p_B < 1)[:, None]
    drop_vocab_BV = torch.zeros_like(drop_BV).scatter(-1, order_BV, drop_BV)
    return scaled_BV.masked_fill(drop_vocab_BV, -math.inf)


def _inverse_cdf(probs_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """The token where each row's cumulative probability first reaches u·total (u in (0, 1])."""
    cdf_BV = probs_BV.double().cumsum(dim=-1)
    target_B1 = (u_B * cdf_BV[:, -1])[:, None]
    tokens_B = torch.searchsorted(cdf_BV, target_B1).squeeze(-1).clamp(max=probs_BV.shape[-1] - 1)
    # A parallel scan may round so that a zero-probability token ties its predecessor: never pick one.
    impossible_B = probs_BV.gather(-1, tokens_B[:, None]).squeeze(-1) <= 0
    return torch.where(impossible_B, probs_BV.argmax(dim=-1), tokens_B)


def _token_logprobs(logits_BV: torch.Tensor, tokens_B: torch.Tensor) -> torch.Tensor:
    """log-softmax of the raw logits at the chosen tokens, in float32 (training's formula, not the sampler's)."""
    picked_B = logits_BV.gather(-1, tokens_B[:, None]).squeeze(-1)
    return picked_B - torch.logsumexp(logits_BV, dim=-1)


def _top_logprobs(logits_NV: torch.Tensor, k: int) -> list[TopLogprobs]:
    """The k most likely (token id, log-probability) pairs of each row, from raw logits (temperature 1)."""
    ids_Nk, values_Nk = _top_logprobs_device(logits_NV, k)
    return [
        list(zip(ids, values, strict=True))
        for ids, values in zip(ids_Nk.tolist(), values_Nk.tolist(), strict=True)
    ]


def _top_logprobs_device(logits_NV: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, log-probabilities), each (N, min(k, V)), of each row's k most likely tokens, on the device."""
    logprobs_NV = logits_NV.float().log_softmax(dim=-1)
    values_Nk, ids_Nk = logprobs_NV.topk(min(k, logprobs_NV.shape[-1]), dim=-1)
    return ids_Nk, values_Nk


def _top_pairs(ids: list[float], values: list[float], rows: int) -> list[TopLogprobs]:
    """`_top_logprobs`' lists from the flat host copies of `_top_logprobs_device`'s two tensors."""
    k = len(ids) // rows if rows else 0
    return [
        [(int(i), v) for i, v in zip(ids[b * k : (b + 1) * k], values[b * k : (b + 1) * k], strict=True)]
        for b in range(rows)
    ]


def _prompt_extras(logits_TV: torch.Tensor, request: SampleRequest) -> _PromptExtras:
    """A request's prompt extras from the logits at prompt positions 0..n-2 (each predicts the next token)."""
    prompt = request.prompt
    logits_TV = logits_TV.float()
    skipped = len(prompt) - request.prompt_logprobs_last_n if request.prompt_logprobs_last_n else 1
    extras = _PromptExtras()
    if request.prompt_logprobs:
        scored = _prompt_logprobs_from(logits_TV, list(prompt))
        extras.logprobs = [None] * skipped + scored[skipped:]
    if request.topk_prompt_logprobs:
        top = _top_logprobs(logits_TV[skipped - 1 :], request.topk_prompt_logprobs) if len(prompt) > 1 else []
        extras.topk = [None] * skipped + list(top)
    if request.target_prompt_tokens is not None:
        extras.targets = _target_logprobs(logits_TV, request.target_prompt_tokens)
    if request.prompt_alt_tokens_k:
        extras.alt_tokens = _alt_tokens(logits_TV, request)
    return extras


def _target_logprobs(
    logits_TV: torch.Tensor, targets: torch.Tensor | Sequence[Sequence[int]]
) -> list[list[float]]:
    """log p(targets[i][j]) at prompt position i+1 (from the logits at i); 0.0 where the id is -1."""
    if logits_TV.shape[0] == 0:
        return []
    targets_TK = torch.as_tensor(targets, dtype=torch.long, device=logits_TV.device).reshape(
        logits_TV.shape[0], -1
    )
    logprobs_TV = logits_TV.log_softmax(dim=-1)
    picked_TK = logprobs_TV.gather(-1, targets_TK.clamp(min=0))
    return picked_TK.masked_fill(targets_TK < 0, 0.0).tolist()


def _alt_tokens(logits_TV: torch.Tensor, request: SampleRequest) -> PromptAltTokens:
    """k draws per prompt position at the request's temperature, top-k and top-p, from a generator of their own."""
    k, params = request.prompt_alt_tokens_k, request.params
    T = logits_TV.shape[0]
    if T == 0:
        return PromptAltTokens(tokens=[], logprobs=[])
    temperature = _temperature(params)
    if temperature == 0:
        tokens_Tk = logits_TV.argmax(dim=-1, keepdim=True).expand(T, k)
    else:
        scaled_TV = logits_TV / temperature
        if params.top_k > 0 or params.top_p < 1:
            top_k_T = torch.full((T,), params.top_k, device=logits_TV.device)
            top_p_T = torch.full((T,), float(params.top_p), device=logits_TV.device)
            scaled_TV = _filter_top_k_top_p(scaled_TV, top_k_T, top_p_T)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generator = torch.Generator().manual_seed(_row_seed(seed, -1))  # apart from every sample's stream
        u_Tk = 1.0 - torch.rand(T, k, generator=generator, dtype=torch.float64)
        cdf_TV = torch.softmax(scaled_TV, dim=-1).double().cumsum(dim=-1)
        target_Tk = u_Tk.to(logits_TV.device) * cdf_TV[:, -1:]
        tokens_Tk = torch.searchsorted(cdf_TV, target_Tk).clamp(max=logits_TV.shape[-1] - 1)
    logprobs_Tk = logits_TV.log_softmax(dim=-1).gather(-1, tokens_Tk)
    return PromptAltTokens(tokens=tokens_Tk.tolist(), logprobs=logprobs_Tk.tolist())


def _prompt_logprobs_from(logits_TV: torch.Tensor, prompt: list[int]) -> list[float | None]:
    """[None, log p(prompt[1]), ...] from the logits at prompt positions 0..n-2."""
    logits_TV = logits_TV.float()
    targets_T = torch.tensor(prompt[1:], device=logits_TV.device)
    return [None, *_token_logprobs(logits_TV, targets_T).tolist()]


# --- stopping and results ------------------------------------------------------------------------


def _record(
    base: BaseModel,
    rows: list[_Row],
    tokens: list[int],
    logprobs: list[float],
    topk: list[TopLogprobs] | None = None,
) -> list[bool]:
    """Append each row's new token; return which rows are now finished (and set their stop reason)."""
    done = []
    for b, (row, token, logprob) in enumerate(zip(rows, tokens, logprobs, strict=True)):
        row.tokens.append(token)
        row.logprobs.append(logprob)
        if row.forced:
            row.forced.pop(0)
        if row.section is not None and not row.section.closed:
            _track_section(base, row, row.section)
        if row.topk and topk is not None:
            row.topk_logprobs.append(topk[b][: row.topk])
        if token in row.stops.token_ids or _hit_stop_string(base, row):
            row.stop_reason = "stop"
        elif row.matcher is not None and _grammar_done(row, token):
            row.stop_reason = "stop"  # complete with no stop token to end on, or failed (`row.error`)
        elif len(row.tokens) >= row.max_new or (row.cancelled is not None and row.cancelled()):
            row.stop_reason = "length"
        done.append(row.stop_reason is not None)
        if row.on_token is not None and row.error is None:  # a failed row's request ends with its error
            top = row.topk_logprobs[-1] if row.topk and topk is not None else None
            row.on_token(row.sample, token, logprob, top, row.stop_reason is not None)
    return done


def _grammar_done(row: _Row, token: int) -> bool:
    """Advance the row's grammar: True when it is complete and the row has no stop token to end on, or
    when the grammar failed (`row.error`: this row's request fails, never the rows decoding beside it)."""
    assert row.matcher is not None
    try:
        return grammar.advance(row.matcher, token) and not row.stops.token_ids
    except EngineError as exc:
        row.error = exc
        return True


def _track_section(base: BaseModel, row: _Row, section: _Section) -> None:
    """Open the row's budgeted section when its text writes `opens`; close it when the text writes
    `until`, or, once the section has had `tokens` tokens, force `until` next."""
    budget = section.budget
    if section.opened_at is None:
        if budget.opens is None or budget.opens not in _tail(base, row.tokens, section.window):
            return
        section.opened_at = len(row.tokens)
    since = row.tokens[section.opened_at :]
    if since and budget.until in _tail(base, since, section.window):
        section.closed = True
    elif len(since) >= budget.tokens:
        row.forced = list(section.until_ids)
        section.closed = True


def _tail(base: BaseModel, tokens: list[int], window: int) -> str:
    """The text of the last `window` tokens, special tokens included."""
    text = base.tokenizer.decode(tokens[-window:], skip_special_tokens=False)
    return text if isinstance(text, str) else "".join(text)


def _hit_stop_string(base: BaseModel, row: _Row) -> bool:
    """Whether the completion text now contains a stop string (checked after every token: the first wins)."""
    if not row.stops.strings:
        return False
    text = _tail(base, row.tokens, row.stops.window)
    return any(s in text for s in row.stops.strings)


def _collect(num_requests: int, rows: list[_Row]) -> list[SampleResult]:
    """Regroup rows into one result per request, samples in index order."""
    by_request: list[list[_Row]] = [[] for _ in range(num_requests)]
    for row in sorted(rows, key=lambda r: (r.request, r.sample)):
        by_request[row.request].append(row)
    return [_result(request_rows) for request_rows in by_request]


def _result(rows: list[_Row]) -> SampleResult:
    prompt = rows[0].extras or _PromptExtras()
    return SampleResult(
        sequences=[
            SampledSequence(
                tokens=r.tokens,
                logprobs=r.logprobs,
                stop_reason=r.stop_reason or "length",
                topk_logprobs=r.topk_logprobs if r.topk else None,
            )
            for r in rows
        ],
        prompt_logprobs=prompt.logprobs,
        topk_prompt_logprobs=prompt.topk,
        target_prompt_logprobs=prompt.targets,
        prompt_alt_tokens=prompt.alt_tokens,
    )
