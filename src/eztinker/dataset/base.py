"""What every dataset here turns its examples into: token sequences with a per-token loss weight.

A `SupervisedExample` is one sequence, `tokens`, and `weights` aligned with it: `weights[i]` is the loss
weight of predicting `tokens[i]` from `tokens[:i]` (0 for prompt tokens, 1 for the assistant's). It
converts to the three shapes `forward_backward` takes:

- `to_native()`: `{"input_ids", "target_ids"}` for `EZTinkerClient.forward_backward(data=...)` with the
  run's native loss (labels aligned with the inputs, -100 where the weight is 0);
- `to_datum()`: Tinker's token datum `{"tokens", "loss_inputs": {"target_tokens", "weights"}}` (inputs
  and targets shifted by one) for `loss_fn="cross_entropy"`;
- `to_tinker()`: the same as an official `tinker.types.Datum`.

A `Dataset` is anything with `len()` and indexing that yields such examples (a plain list is one);
`batches` walks one in shuffled, seeded batches.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    import tinker

__all__ = [
    "IGNORE_INDEX",
    "Dataset",
    "DatasetFormatError",
    "SupervisedExample",
    "batches",
    "read_json_records",
]

IGNORE_INDEX = -100
"""The label that the native losses ignore."""

T_co = TypeVar("T_co", covariant=True)
T = TypeVar("T")


class DatasetFormatError(ValueError):
    """A record that cannot be read: `where` (file and line) and `field` say which part."""

    def __init__(self, where: str, field: str, message: str) -> None:
        self.where = where
        self.field = field
        self.reason = message
        location = f"{where}: {field}" if field else where
        super().__init__(f"{location}: {message}")


@runtime_checkable
class Dataset(Protocol[T_co]):
    """A sized, indexable collection of examples (a list qualifies)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> T_co: ...


@dataclass(frozen=True)
class SupervisedExample:
    """One training sequence: `tokens`, and `weights[i]`, the loss weight of predicting `tokens[i]`.

    `weights[0]` is never used (nothing predicts the first token). Build one from a prompt and a
    completion with `from_prompt_completion`, or from a chat with `eztinker.dataset.render_chat`.
    """

    tokens: list[int]
    weights: list[float]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.weights):
            raise ValueError(f"tokens has {len(self.tokens)} entries but weights has {len(self.weights)}")
        if len(self.tokens) < 2:
            raise ValueError("an example needs at least 2 tokens (one input, one target)")

    @classmethod
    def from_prompt_completion(cls, prompt: Sequence[int], completion: Sequence[int]) -> SupervisedExample:
        """Train on `completion` only: weight 0 on the prompt, 1 on every completion token."""
        return cls(tokens=[*prompt, *completion], weights=[0.0] * len(prompt) + [1.0] * len(completion))

    @property
    def num_loss_tokens(self) -> int:
        """How many targets carry a loss (non-zero weight, first position excluded)."""
        return sum(1 for w in self.weights[1:] if w != 0)

    def truncated(self, max_length: int) -> SupervisedExample:
        """The first `max_length` tokens (and their weights)."""
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, not {max_length}")
        return SupervisedExample(self.tokens[:max_length], self.weights[:max_length])

    def to_native(self) -> dict[str, list[int]]:
        """`{"input_ids", "target_ids"}` for the native losses: labels aligned with the inputs, -100 where
        the weight is 0 (the loss shifts them). Non-binary weights are dropped: see `to_datum`."""
        labels = [t if w != 0 else IGNORE_INDEX for t, w in zip(self.tokens, self.weights, strict=True)]
        return {"input_ids": list(self.tokens), "target_ids": labels}

    def to_datum(self) -> dict[str, Any]:
        """Tinker's token datum for `loss_fn="cross_entropy"`: inputs `tokens[:-1]`, targets `tokens[1:]`,
        weights `weights[1:]` (the loss is their weighted **sum**)."""
        return {
            "tokens": list(self.tokens[:-1]),
            "loss_inputs": {"target_tokens": list(self.tokens[1:]), "weights": list(self.weights[1:])},
        }

    def to_tinker(self) -> tinker.types.Datum:
        """`to_datum` as an official `tinker.types.Datum` (needs the `tinker` package)."""
        from tinker import types

        n = len(self.tokens) - 1
        return types.Datum(
            model_input=types.ModelInput.from_ints(list(self.tokens[:-1])),
            loss_fn_inputs={
                "target_tokens": types.TensorData(data=list(self.tokens[1:]), dtype="int64", shape=[n]),
                "weights": types.TensorData(data=list(self.weights[1:]), dtype="float32", shape=[n]),
            },
        )


def batches(
    dataset: Dataset[T], batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False
) -> Iterator[list[T]]:
    """One epoch of `dataset` in batches of `batch_size` (shuffled with `seed` unless `shuffle=False`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    order = list(range(len(dataset)))
    if shuffle:
        random.Random(seed).shuffle(order)  # noqa: S311 - data order, not security
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        if drop_last and len(chunk) < batch_size:
            return
        yield [dataset[i] for i in chunk]


def read_json_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(location, record) for each record of a JSONL file, or of a JSON file holding an array of records
    (or a single object). The location is `"<file> line <n>"`: the line where the record starts.

    A JSON array is decoded record by record, so a file truncated mid-way still yields every complete
    record before the error, and the error names the line where the bad record starts.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:  # named like any bad record: the file and where, not a bare codec error
        line = exc.object.count(b"\n", 0, exc.start) + 1
        raise DatasetFormatError(f"{path.name} line {line}", "", "is not UTF-8 text") from None
    stripped = text.lstrip()
    if path.suffix == ".jsonl" or not stripped.startswith(("[", "{")) or _looks_like_jsonl(stripped):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetFormatError(where, "", f"invalid JSON: {exc.msg} (column {exc.colno})") from None
        return
    if stripped.startswith("{"):
        try:
            yield (
                f"{path.name} line {text.count(chr(10), 0, len(text) - len(stripped)) + 1}",
                json.loads(text),
            )
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(
                f"{path.name} line {exc.lineno}", "", f"invalid JSON: {exc.msg}"
            ) from None
        return
    yield from _array_records(path.name, text)


def _looks_like_jsonl(text: str) -> bool:
    """A `.json` file that is really JSONL: its first line is a whole JSON object."""
    first = text.split("\n", 1)[0].strip()
    if not first.startswith("{"):
        return False
    try:
        json.loads(first)
    except json.JSONDecodeError:
        return False
    return "\n" in text.strip()


def _array_records(name: str, text: str) -> Iterator[tuple[str, Any]]:
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    line, counted = 1, 0  # line number of text[counted]: counted incrementally, so large files stay linear
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        line += text.count("\n", counted, i)
        counted = i
        if i >= len(text):
            raise DatasetFormatError(f"{name} line {line}", "", "the JSON array is not closed")
        if text[i] == "]":
            return
        where = f"{name} line {line}"
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(where, "", f"invalid JSON: {exc.msg} (line {exc.lineno})") from None
        yield where, record
