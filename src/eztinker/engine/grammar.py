"""Constrained decoding: a sample whose `SamplingParams.grammar` is set only ever draws tokens that keep
its text inside that grammar, and ends as soon as the grammar is complete.

The grammar is a Lark grammar in llguidance's dialect (https://github.com/guidance-ai/llguidance, the
engine vLLM's `guidance` structured-output backend runs): Lark rules and `/regex/` terminals, plus
`%json {schema}` for a JSON value matching a JSON schema and `rule[stop="..."]: /.../` for free text up to
a stop string. The compatible APIs build it from what the client asked (`response_format`, a forced tool
call, `guided_*`: `eztinker.api.structured`); the engine knows nothing of those.

Per row, per decode step: llguidance computes the set of allowed tokens from the text so far (a bitmask,
on the host, all constrained rows of the step at once on its own threads); disallowed logits become -inf
before temperature, top-k and top-p, so the draw is over what the grammar allows. The reported
log-probabilities stay the model's own, as they do for `logit_bias`. Once the grammar is complete the row
may also draw one of its stop tokens; once nothing more can follow it must, so a constrained sample ends
on its end-of-turn token like any other (what RL trains on), as vLLM's do.

llguidance is imported on first use: the engine imports (and runs unconstrained) without it, as
`bench/gpu_check.py` needs on a bare GPU machine.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from eztinker.engine.errors import InvalidInputError

if TYPE_CHECKING:
    import llguidance
    from llguidance import LLMatcher as Matcher

_tokenizers: weakref.WeakKeyDictionary[Any, dict[int, llguidance.LLTokenizer]] = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def _tokenizer(tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> llguidance.LLTokenizer:
    """llguidance's view of a model's tokenizer (every token's bytes), built once per tokenizer and
    vocabulary width (the logits' width, which may exceed the tokenizer's own size)."""
    import llguidance.hf

    with _tokenizers_lock:
        by_width = _tokenizers.setdefault(tokenizer, {})
        if vocab_size not in by_width:
            by_width[vocab_size] = llguidance.hf.from_tokenizer(
                tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids) or None
            )
        return by_width[vocab_size]


def compile_grammar(
    tokenizer: Any, vocab_size: int, eos_token_ids: list[int], grammar: str, field: str
) -> Matcher:
    """A fresh matcher for `grammar`; a bad grammar is an `InvalidInputError` naming `field`, with
    llguidance's message (where in the grammar, what is wrong)."""
    import llguidance

    if not isinstance(grammar, str) or not grammar.strip():
        raise InvalidInputError(field, "must be a non-empty Lark grammar")
    matcher = llguidance.LLMatcher(_tokenizer(tokenizer, vocab_size, eos_token_ids), grammar, log_level=0)
    if matcher.is_error():
        raise InvalidInputError(field, f"is not a valid grammar: {_first_lines(matcher.get_error())}")
    return matcher


def _first_lines(message: str, lines: int = 4) -> str:
    """The head of llguidance's message: where and what; never a Rust panic's backtrace."""
    message = message.split("<backtrace>", 1)[0].split("<state>", 1)[0]
    return "\n".join(message.strip().splitlines()[:lines])


def allowed_tokens(matchers: list[Matcher], vocab_size: int, device: torch.device) -> torch.Tensor:
    """(R, V) bool: the tokens each matcher allows next, computed in parallel off the GIL.

    Unpacked on the host with numpy on a CPU (one C pass: 20× torch's shifts there); on a GPU the packed
    bitmask (V/8 bytes a row) is what crosses to the device, unpacked there."""
    words = (vocab_size + 31) // 32
    bitmask_RW = np.full((len(matchers), words), -1, dtype=np.int32)
    _executor().unsafe_compute_mask_ptr(
        [(m, i) for i, m in enumerate(matchers)], bitmask_RW.ctypes.data, words * 4, len(matchers)
    )
    if device.type == "cpu":
        return _unpacked_on_host(bitmask_RW, vocab_size)
    return _unpacked_on_device(bitmask_RW, vocab_size, device)


def _unpacked_on_host(bitmask_RW: np.ndarray, vocab_size: int) -> torch.Tensor:
    bits_RV = np.unpackbits(bitmask_RW.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(np.ascontiguousarray(bits_RV)).view(torch.bool)


def _unpacked_on_device(bitmask_RW: np.ndarray, vocab_size: int, device: torch.device) -> torch.Tensor:
    bits_RW = torch.from_numpy(bitmask_RW).to(device)
    shifts = torch.arange(32, device=device, dtype=torch.int32)
    return ((bits_RW[:, :, None] >> shifts) & 1).reshape(len(bitmask_RW), -1)[:, :vocab_size].bool()


@functools.cache
def _executor() -> llguidance.LLExecutor:
    import llguidance

    return llguidance.LLExecutor()


def advance(matcher: Matcher, token: int) -> bool:
    """Feed the drawn token to the row's matcher; True when the grammar is finished (nothing can follow).

    The draw was masked to what the grammar allows, so a refusal means llguidance gave up on the grammar
    itself: it builds its lexer lazily and stops at its size limits (`a{1000000}` compiles, then fails on
    its first token). That is the request's grammar being too big, so it is the caller's to fix."""
    if not matcher.consume_token(token):
        raise InvalidInputError(
            "sampling_params.grammar",
            f"is too large for the decoder ({_first_lines(matcher.get_error(), 1)}): simplify it, e.g. "
            "smaller repetition counts or fewer alternatives",
        )
    return matcher.is_stopped()
