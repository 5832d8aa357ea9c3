"""Chat datasets in the dialects people use, rendered through the tokenizer's chat template.

Three record shapes are read, from JSONL or from a JSON array, and may be mixed in one file:

- ShareGPT: `{"conversations": [{"from": "human" | "gpt" | "system", "value": "..."}], "system": "..."}`
  (`user`, `assistant`, `chatgpt`, `bard`, `bing`, `model` and `tool` are also accepted as speakers);
- `{"messages": [{"role": "user" | "assistant" | "system", "content": "..."}]}`;
- OpenAI's chat fine-tuning format: the same `messages`, where `content` may also be a list of text
  parts (`[{"type": "text", "text": "..."}]`), `developer` is a system role, and an assistant message
  may carry `"weight": 0` to be kept as context but not trained on. A bare list of messages is accepted too.
  Tool use as that format writes it: the record's `tools` (function schemas), an assistant's
  `tool_calls` (arguments as a JSON string or an object) and `tool` messages with their `tool_call_id`;
  the chat template renders them in the model's own call format, which the OpenAI and Anthropic routes
  read back (`api/tool_calls.py`), so a run trained here calls tools there.

```python
conversations = load_sharegpt("chats.jsonl")                     # list[list[{"role", "content"}]]
dataset = ChatDataset(conversations, tokenizer, max_length=1024)  # SupervisedExample per conversation
client.forward_backward(run_id, data=[ex.to_native() for ex in dataset[:8]])
```

Rendering (`render_chat`) applies the tokenizer's chat template to the whole conversation and puts
loss weight 1 on the tokens of each assistant message (its content and the end-of-turn token that
closes it), 0 on everything else: system prompt, user turns and the template's role headers.
A malformed record raises `DatasetFormatError` naming the file, the line and the field:
`chats.jsonl line 7: conversations[2].from: unknown speaker 'bot' (expected one of ...)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from eztinker.dataset.base import DatasetFormatError, SupervisedExample, read_json_records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Chat", "ChatDataset", "Message", "load_sharegpt", "parse_conversation", "render_chat"]

Message = dict[str, Any]
"""`{"role": "system" | "user" | "assistant" | "tool", "content": str}`, plus `"weight": 0 | 1` on an
assistant message that should not (0) be trained on; an assistant's `tool_calls`
(`[{"id", "type": "function", "function": {"name", "arguments": {...}}}]`) and a tool message's
`tool_call_id` where the record has them."""


class Chat(list[Message]):
    """A parsed conversation: its messages (it is the list), and `tools`, the function schemas its
    assistant could call (the record's `tools`; None without)."""

    def __init__(self, messages: Sequence[Message] = (), tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(messages)
        self.tools = tools


_SPEAKERS = {
    "system": "system",
    "developer": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}


# --- reading -------------------------------------------------------------------------------------------


def load_sharegpt(path: str | os.PathLike[str], *, limit: int | None = None) -> list[Chat]:
    """Read a JSONL or JSON file of chat records (any dialect above) as lists of `{"role", "content"}`.

    `limit` keeps the first N conversations. Raises `DatasetFormatError` naming the line and field of the
    first malformed record.
    """
    conversations = []
    for where, record in read_json_records(Path(path)):
        conversations.append(parse_conversation(record, where))
        if limit is not None and len(conversations) >= limit:
            break
    return conversations


def parse_conversation(record: Any, where: str = "record") -> Chat:
    """One record, in any supported dialect, as a list of `{"role", "content"}` (plus `weight` and tool
    use if given), with the record's `tools`."""
    tools = None
    if isinstance(record, list):
        key, turns, system = "", record, None
    elif isinstance(record, dict):
        if "conversations" in record:
            key = "conversations"
        elif "messages" in record:
            key = "messages"
        else:
            raise DatasetFormatError(where, "", "expected a `conversations` or `messages` list")
        turns, system, tools = record[key], record.get("system"), record.get("tools")
        if not isinstance(turns, list):
            raise DatasetFormatError(where, key, f"expected a list, got {type(turns).__name__}")
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
            raise DatasetFormatError(where, "tools", "expected a list of function schemas")
    else:
        raise DatasetFormatError(where, "", f"expected an object or a list, got {type(record).__name__}")
    if not turns:
        raise DatasetFormatError(where, key, "is empty")

    messages = Chat(tools=tools or None)
    if system is not None:
        if not isinstance(system, str):
            raise DatasetFormatError(where, "system", f"expected a string, got {type(system).__name__}")
        if system.strip():
            messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        messages.append(_parse_message(turn, where, f"{key}[{i}]" if key else f"[{i}]"))
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetFormatError(where, key, "has no assistant (gpt) message to train on")
    return messages


def _parse_message(turn: Any, where: str, field: str) -> Message:
    if not isinstance(turn, dict):
        raise DatasetFormatError(where, field, f"expected an object, got {type(turn).__name__}")
    if "from" in turn:
        speaker_key, content_key = "from", "value"
    elif "role" in turn:
        speaker_key, content_key = "role", "content"
    else:
        raise DatasetFormatError(where, field, "has neither `from` (ShareGPT) nor `role` (messages)")
    speaker = turn[speaker_key]
    role = _SPEAKERS.get(speaker.lower()) if isinstance(speaker, str) else None
    if role is None:
        raise DatasetFormatError(
            where,
            f"{field}.{speaker_key}",
            f"unknown speaker {speaker!r} (expected one of {sorted(_SPEAKERS)})",
        )
    calls = turn.get("tool_calls")
    if content_key not in turn and not calls:
        raise DatasetFormatError(where, f"{field}.{content_key}", "is missing")
    content = turn.get(content_key)
    content = "" if content is None and calls else _text_content(content, where, f"{field}.{content_key}")
    message: Message = {"role": role, "content": content}
    if calls:
        if role != "assistant":
            raise DatasetFormatError(where, f"{field}.tool_calls", "only assistant messages carry tool calls")
        message["tool_calls"] = _tool_calls(calls, where, f"{field}.tool_calls")
    if role == "tool" and isinstance(turn.get("tool_call_id"), str):
        message["tool_call_id"] = turn["tool_call_id"]
    if "weight" in turn:
        weight = turn["weight"]
        if weight not in (0, 1) or isinstance(weight, bool):
            raise DatasetFormatError(where, f"{field}.weight", f"must be 0 or 1, not {weight!r}")
        if role != "assistant":
            raise DatasetFormatError(where, f"{field}.weight", "is only allowed on assistant messages")
        message["weight"] = int(weight)
    return message


def _tool_calls(calls: Any, where: str, field: str) -> list[dict[str, Any]]:
    """OpenAI's `tool_calls`, arguments decoded to objects (templates write them in their own format)."""
    if not isinstance(calls, list):
        raise DatasetFormatError(where, field, f"expected a list, got {type(calls).__name__}")
    out = []
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DatasetFormatError(
                where, f"{field}[{k}].function", "expected {'name': ..., 'arguments': ...}"
            )
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise DatasetFormatError(where, f"{field}[{k}].function.arguments", "is not JSON") from None
        if not isinstance(arguments, dict):
            raise DatasetFormatError(where, f"{field}[{k}].function.arguments", "must be a JSON object")
        call_id = call.get("id") if isinstance(call.get("id"), str) else f"call_{k}"
        out.append(
            {
                "id": call_id,
                "type": "function",
                "function": {"name": function["name"], "arguments": arguments},
            }
        )
    return out


def _text_content(content: Any, where: str, field: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        texts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise DatasetFormatError(
                    where, f"{field}[{j}]", "only text parts {'type': 'text', 'text': ...}"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise DatasetFormatError(where, field, f"expected a string, got {type(content).__name__}")


# --- rendering -----------------------------------------------------------------------------------------


_TEMPLATE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    plain = [{k: m[k] for k in _TEMPLATE_KEYS if k in m} for m in messages]
    schemas: Any = tools  # transformers types them as a list of dicts or callables
    text = tokenizer.apply_chat_template(
        plain, tools=schemas, tokenize=False, add_generation_prompt=generation_prompt
    )
    if not isinstance(text, str):  # pragma: no cover - tokenize=False always gives text
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def _assistant_spans(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    full: str,
    tools: list[dict[str, Any]] | None = None,
) -> list[tuple[int, int]]:
    """Character spans of `full` to train on: each trained assistant message, up to its end of turn.

    A message's span ends where the conversation rendered up to that message ends, and starts where the
    conversation before it, plus the assistant header (`add_generation_prompt`), ends. Templates whose
    renderings are not prefixes of one another fall back to finding the message's content in the text.
    """
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False, tools=tools)
        before = _render(tokenizer, messages[:i], generation_prompt=True, tools=tools) if i > 0 else ""
        if i > 0 and full.startswith(upto) and upto.startswith(before) and len(before) >= cursor:
            start, end = len(before), len(upto)
        else:
            start = full.find(message["content"], cursor) if message["content"] else -1
            if start < 0:
                raise ValueError(
                    f"cannot locate assistant message {i} in the chat template's output; the template "
                    "changes earlier turns or the message text"
                )
            end = start + len(message["content"])
            eos = tokenizer.eos_token
            if isinstance(eos, str) and full.startswith(eos, end):
                end += len(eos)
        cursor = end
        if message.get("weight", 1):
            spans.append((start, end))
    return spans


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    *,
    max_length: int | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> SupervisedExample | None:
    """Render `messages` (and the tools, `tools` or a `Chat`'s own) with the tokenizer's chat template;
    weight 1 on assistant tokens (tool calls included), 0 elsewhere.

    With `max_length`, the example keeps its first `max_length` tokens. Returns None when nothing is
    left to train on (every assistant token was cut, or the conversation has fewer than 2 tokens).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template first")
    if tools is None:
        tools = getattr(messages, "tools", None)
    full = _render(tokenizer, messages, generation_prompt=False, tools=tools)
    spans = _assistant_spans(tokenizer, messages, full, tools)
    tokens, weights = _tokenize_with_spans(tokenizer, full, spans)
    if max_length is not None:
        tokens, weights = tokens[:max_length], weights[:max_length]
    if len(tokens) < 2 or not any(weights[1:]):
        return None
    return SupervisedExample(tokens=tokens, weights=weights)


def _tokenize_with_spans(
    tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]]
) -> tuple[list[int], list[float]]:
    """Token ids of `text` and, per token, 1.0 if the token starts inside a span, else 0.0."""
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoding["input_ids"])
        weights = [
            1.0 if any(s <= start < e for s, e in spans) else 0.0 for start, _ in encoding["offset_mapping"]
        ]
        return ids, weights
    # Slow tokenizers have no offsets: tokenize the pieces between span boundaries one by one.
    ids, weights, pos = [], [], 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, weight in ((text[pos:start], 0.0), (text[start:end], 1.0)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                weights += [weight] * len(piece_ids)
        pos = end
    return ids, weights


class ChatDataset:
    """Conversations rendered for training: a `Dataset` of `SupervisedExample`.

    Every conversation is rendered when the dataset is built; those with nothing left to train on after
    truncation to `max_length` are dropped, and counted in `num_dropped`.
    """

    def __init__(
        self,
        conversations: Sequence[Sequence[Message]],
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int | None = None,
    ) -> None:
        self.examples: list[SupervisedExample] = []
        self.num_dropped = 0
        for conversation in conversations:
            example = render_chat(tokenizer, conversation, max_length=max_length)
            if example is None:
                self.num_dropped += 1
            else:
                self.examples.append(example)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int | None = None,
        limit: int | None = None,
    ) -> ChatDataset:
        """`load_sharegpt(path)`, rendered."""
        return cls(load_sharegpt(path, limit=limit), tokenizer, max_length=max_length)

    def __len__(self) -> int:
        return len(self.examples)

    @overload
    def __getitem__(self, index: int) -> SupervisedExample: ...
    @overload
    def __getitem__(self, index: slice) -> list[SupervisedExample]: ...
    def __getitem__(self, index: int | slice) -> SupervisedExample | list[SupervisedExample]:
        return self.examples[index]
