"""SFT examples from a JSONL file (what `eztinker train-sft` trains on): one record per line, `{"text"}`,
`{"prompt", "completion"}` or `{"messages": [...]}`, tokenized into (input_ids, labels)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Example = tuple[list[int], list[int]]  # (input_ids, labels), -100 where nothing is trained


def read_sft_examples(path: Path, tokenizer: Any, max_length: int) -> list[Example]:
    """(input_ids, labels) per JSONL line: `{"text"}`, `{"prompt", "completion"}` or `{"messages": [...]}`.

    Texts are trained on whole; of the others only completions and assistant turns, the rest is -100.
    EOS ends texts and completions. Sequences are cut at `max_length`; one left with nothing to train
    on is left out.
    """
    return encode_sft_records(path, read_sft_records(path), tokenizer, max_length)


def read_sft_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The JSONL file's records with their line numbers; ValueError names the first bad line."""
    records = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg} at column {exc.colno})") from None
        problem = _record_problem(record)
        if problem is not None:
            raise ValueError(f"{path}:{number}: {problem}")
        records.append((number, record))
    if not records:
        raise ValueError(f"{path}: no examples")
    return records


def _record_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return 'expected a JSON object such as {"text": ...}'
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(_is_message(m) for m in messages):
            return '\'messages\' must be a non-empty list of {"role": ..., "content": ...} strings'
        return None
    if "prompt" in record and "completion" in record:
        fields = ("prompt", "completion")
    elif "text" in record:
        fields = ("text",)
    else:
        return "expected a 'text', 'prompt'+'completion' or 'messages' field"
    for field in fields:
        if not isinstance(record[field], str):
            return f"{field!r} must be a string"
    return None


def _is_message(message: Any) -> bool:
    return (
        isinstance(message, dict)
        and isinstance(message.get("role"), str)
        and isinstance(message.get("content"), str)
    )


def encode_sft_records(
    path: Path, records: list[tuple[int, dict[str, Any]]], tokenizer: Any, max_length: int
) -> list[Example]:
    """Tokenize `read_sft_records`'s records (see `read_sft_examples`); ValueError names a bad line."""
    examples = []
    for number, record in records:
        try:
            ids, labels = _encode(record, tokenizer)
        except Exception as exc:  # a chat template refusing the turns, a tokenizer without one, ...
            raise ValueError(f"{path}:{number}: cannot tokenize: {exc}") from exc
        ids, labels = ids[:max_length], labels[:max_length]
        if any(label != -100 for label in labels[1:]):  # labels[0] is never predicted
            examples.append((ids, labels))
    if not examples:
        raise ValueError(
            f"{path}: no example has a token to train on within {max_length} tokens (texts, completions "
            "and the turns of role 'assistant' are trained on; a chat's other turns are context)"
        )
    return examples


def _encode(record: dict[str, Any], tokenizer: Any) -> Example:
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if "messages" in record:
        return _chat_ids(tokenizer, record["messages"])
    if "prompt" in record:
        prompt = tokenizer(record["prompt"])["input_ids"]  # with the BOS, if the model has one
        completion = [*tokenizer(record["completion"], add_special_tokens=False)["input_ids"], *eos]
        return prompt + completion, [-100] * len(prompt) + completion
    ids = list(tokenizer(record["text"])["input_ids"])
    if eos and ids[-1:] != eos:
        ids += eos
    return ids, list(ids)


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> Example:
    """Tokenize a chat with its template; train on the assistant turns only, not on their role headers.

    Renders the chat one turn longer at a time (with the generation prompt before an assistant turn) and
    labels each turn's new tokens, so the template must render a chat's turns as prefixes of it.
    """
    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(messages):
        before_assistant = i + 1 < len(messages) and messages[i + 1]["role"] == "assistant"
        rendered = list(
            tokenizer.apply_chat_template(
                messages[: i + 1], tokenize=True, return_dict=False, add_generation_prompt=before_assistant
            )
        )
        if rendered[: len(ids)] != ids:
            raise ValueError("the chat template does not render earlier turns as a prefix of later ones")
        new = rendered[len(ids) :]
        ids.extend(new)
        labels.extend(new if message["role"] == "assistant" else [-100] * len(new))
    return ids, labels
