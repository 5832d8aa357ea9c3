"""A reasoning model's thinking, split from its answer on the compatible APIs: OpenAI's
`reasoning_content` (as vLLM's reasoning parsers and hosted Tinker return it), Anthropic's `thinking`
blocks.

A model reasons inside `<think>…</think>` when its chat template says so (Qwen3, Qwen3.5, DeepSeek-R1
templates hold `</think>`). Its answer may open the block itself, or the prompt may already have opened
it (a template whose generation prompt ends in `<think>`): then the answer starts inside the thinking.
Which one is read from the prompt's own tail, so a template that closes the block in the prompt (Qwen3's
`enable_thinking: false`) yields an answer with no thinking at all. An answer cut off before `</think>`
is all thinking, as the model left it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eztinker.api.tool_calls import held_prefix, template_source
from eztinker.engine.errors import InvalidInputError
from eztinker.engine.types import Budget

THINK_START, THINK_END = "<think>", "</think>"


@dataclass(frozen=True)
class Thought:
    """A piece of the model's thinking (as opposed to a piece of its answer, a plain `str`)."""

    text: str


def opens_thinking(tokenizer: Any, prompt: list[int]) -> bool | None:
    """Whether the answer to `prompt` starts inside the thinking (True), may open it itself (False), or
    the model does not reason in `<think>` blocks (None: its template never closes one)."""
    if THINK_END not in template_source(tokenizer, with_tools=True):
        return None
    tail = tokenizer.decode(prompt[-32:], skip_special_tokens=False)
    return tail.rfind(THINK_START) > tail.rfind(THINK_END)


def require_reasoning(tokenizer: Any, base_model: str, field: str) -> None:
    """A 400 naming `field` when the model's chat template does not reason in `<think>` blocks."""
    if THINK_END not in template_source(tokenizer, with_tools=True):
        raise InvalidInputError(
            field, f"the chat template of {base_model!r} does not reason (no <think> blocks)"
        )


def thinking_budget(tokens: int, opened: bool) -> Budget:
    """At most `tokens` of thinking, then `</think>` (vLLM's `thinking_token_budget`): counted from the
    answer's start when the prompt opened the thinking, else from the `<think>` the model writes."""
    return Budget(tokens, THINK_END, opens=None if opened else THINK_START)


@dataclass
class ThoughtReader:
    """One choice's text, fed as it is released, split into thinking (`Thought`) and answer (`str`).

    Text that might begin the tag it waits for is held until it can tell. Once the thinking is over,
    everything is answer; a `<think>` that opens the answer is the format's, not text, and so are the
    line breaks after either tag.
    """

    inside: bool  # the answer starts inside the thinking (the prompt opened it)
    _held: str = ""
    _done: bool = False  # the thinking is over: the rest is answer
    _strip: bool = False  # right after a tag: its line breaks are dropped

    def feed(self, text: str, final: bool) -> list[str | Thought]:
        self._held += text
        out: list[str | Thought] = []
        while self._held:
            if self._strip:  # the line breaks after a tag are the format's
                stripped = self._held.lstrip("\n")
                if not stripped and not final:
                    self._held = ""
                    break
                self._held, self._strip = stripped, False
                continue
            if self._done:
                out.append(self._held)
                self._held = ""
                break
            if self.inside:
                end = self._held.find(THINK_END)
                if end >= 0:
                    if self._held[:end]:
                        out.append(Thought(self._held[:end]))
                    self._held = self._held[end + len(THINK_END) :]
                    self._done = self._strip = True
                    continue
                keep = 0 if final else held_prefix(self._held, THINK_END)
                if len(self._held) > keep:
                    out.append(Thought(self._held[: len(self._held) - keep]))
                self._held = self._held[len(self._held) - keep :]
                break
            # Not inside yet: the answer may open the thinking, after nothing but whitespace.
            lead = self._held.lstrip()
            if lead.startswith(THINK_START):
                self._held, self.inside, self._strip = lead[len(THINK_START) :], True, True
                continue
            if not final and (not lead or THINK_START.startswith(lead)):
                break  # could still be the tag
            self._done = True  # an answer without thinking
        if final and self._held:
            out.append(Thought(self._held) if self.inside and not self._done else self._held)
            self._held = ""
        return out
