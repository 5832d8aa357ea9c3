"""GSM8K: grade-school math word problems, from local files or the Hugging Face hub.

The official format is one record per problem with `question` and `answer`, where `answer` is a worked
solution (with `<<48/2=24>>` calculator annotations) whose last line is `#### 72`:

```python
problems = load_gsm8k("gsm8k/test.jsonl")          # .jsonl, .json or .parquet (parquet needs pyarrow)
problems = load_gsm8k("openai/gsm8k", split="test")  # the hub dataset (online, or in the local HF cache)
problems[0].question, problems[0].final_answer       # ("Janet's ducks lay 16 eggs ...", "18")
grade(model_output, problems[0].final_answer)        # True / False
```

`arithmetic_problems` makes GSM8K-style problems locally (deterministic for a seed), so examples and
tests run offline. `problem_messages` is the chat prompt the examples use.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from eztinker.dataset.base import DatasetFormatError
from eztinker.dataset.grading import extract_answer

__all__ = [
    "DEMONSTRATION",
    "GSM8K_HUB_ID",
    "SYSTEM_PROMPT",
    "GSM8KProblem",
    "arithmetic_problems",
    "load_gsm8k",
    "problem_messages",
    "split_problems",
    "write_jsonl",
]

GSM8K_HUB_ID = "openai/gsm8k"
"""The official GSM8K dataset on the Hugging Face hub (configs `main` and `socratic`; splits train, test)."""

_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

SYSTEM_PROMPT = "Solve the math word problem in one line, then give the final answer as: #### <number>"
"""The system prompt `problem_messages` uses: a short solution ending with GSM8K's own `#### N` line."""

DEMONSTRATION = (
    "Li has 5 pencils. Ben gives Li 3 more pencils. How many pencils does Li have now?",
    "Li has 5 + 3 = 8 pencils.\n#### 8",
)
"""The worked example `problem_messages` shows before the question: small models copy its format."""


@dataclass(frozen=True)
class GSM8KProblem:
    """One problem: the question, the reference solution (ending `#### N`) and its normalized final number."""

    question: str
    answer: str
    final_answer: str

    @classmethod
    def from_record(cls, record: Any, where: str = "record") -> GSM8KProblem:
        """A problem from an official-format record `{"question": ..., "answer": "... #### N"}`.

        Raises `DatasetFormatError` naming `where` and the field when a field is missing or the answer
        has no `#### N` line.
        """
        if not isinstance(record, dict):
            raise DatasetFormatError(where, "", f"expected an object, got {type(record).__name__}")
        for name in ("question", "answer"):
            if not isinstance(record.get(name), str) or not record[name].strip():
                raise DatasetFormatError(where, name, "missing, empty, or not a string")
        answer = record["answer"]
        if "####" not in answer:
            raise DatasetFormatError(where, "answer", "has no final `#### <number>` line")
        final = extract_answer(answer[answer.rindex("####") :])
        if final is None:
            raise DatasetFormatError(where, "answer", "the `####` line holds no number")
        return cls(question=record["question"].strip(), answer=answer.strip(), final_answer=final)

    def to_record(self) -> dict[str, str]:
        """The official-format record (`question`, `answer`)."""
        return {"question": self.question, "answer": self.answer}


def problem_messages(
    question: str,
    system_prompt: str | None = SYSTEM_PROMPT,
    demonstrations: Sequence[tuple[str, str]] = (DEMONSTRATION,),
) -> list[dict[str, str]]:
    """The chat that asks a model to solve `question`: the system prompt, each (question, solution)
    demonstration as a user/assistant turn pair, then the question."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for demo_question, demo_solution in demonstrations:
        messages += [
            {"role": "user", "content": demo_question},
            {"role": "assistant", "content": demo_solution},
        ]
    return [*messages, {"role": "user", "content": question}]


# --- loading -----------------------------------------------------------------------------------------


def load_gsm8k(
    source: str | os.PathLike[str] = GSM8K_HUB_ID,
    *,
    split: Literal["train", "test"] | str = "train",
    config: str = "main",
    limit: int | None = None,
) -> list[GSM8KProblem]:
    """Load GSM8K problems from a local file or directory, or from the hub.

    `source` is one of:
    - a `.jsonl`, `.json` (an array of records) or `.parquet` file in the official format;
    - a directory holding such files: the one whose name starts with `split` is read
      (`test.jsonl`, `test-00000-of-00001.parquet`, or `<config>/test-...` as in the hub layout);
    - a hub dataset id (default `openai/gsm8k`): `<config>/<split>-*.parquet` is fetched with
      `huggingface_hub` (needs the network, or the file in the local HF cache when `HF_HUB_OFFLINE=1`).

    `limit` keeps the first N problems. A malformed record raises `DatasetFormatError` with its line.
    """
    path = Path(source)
    if path.is_dir():
        path = _find_split_file(path, split, config)
    elif not path.exists():
        if not _HUB_ID_RE.fullmatch(str(source)) or path.suffix in (".jsonl", ".json", ".parquet"):
            raise FileNotFoundError(f"no GSM8K file or directory at {source}")
        path = _download_hub_split(str(source), split, config)
    problems: list[GSM8KProblem] = []
    for where, record in _records(path):
        problems.append(GSM8KProblem.from_record(record, where))
        if limit is not None and len(problems) >= limit:
            break
    return problems


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, record) for each record of a JSONL, JSON or Parquet file."""
    from eztinker.dataset.base import read_json_records

    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError(
                "reading .parquet needs pyarrow: pip install 'eztinker[data]' (or pyarrow)"
            ) from exc
        table = pq.read_table(path, columns=["question", "answer"])
        for i, row in enumerate(table.to_pylist()):
            yield f"{path.name} row {i}", row
        return
    yield from read_json_records(path)


def _find_split_file(directory: Path, split: str, config: str) -> Path:
    for folder in (directory / config, directory):
        if not folder.is_dir():
            continue
        for suffix in (".parquet", ".jsonl", ".json"):
            matches = sorted(p for p in folder.glob(f"{split}*{suffix}") if p.is_file())
            if matches:
                return matches[0]
    raise FileNotFoundError(f"no {split}*.parquet, {split}*.jsonl or {split}*.json under {directory}")


def _download_hub_split(repo_id: str, split: str, config: str) -> Path:
    """The hub's `<config>/<split>-00000-of-00001.parquet` (or whatever shard the repo lists) as a local file."""
    try:
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise ImportError("loading GSM8K from the hub needs huggingface_hub") from exc
    filename = f"{config}/{split}-00000-of-00001.parquet"
    try:
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset"))
    except EntryNotFoundError:
        pass
    files = HfApi().list_repo_files(repo_id, repo_type="dataset")
    shards = sorted(f for f in files if f.startswith(f"{config}/{split}") and f.endswith(".parquet"))
    if not shards:
        raise FileNotFoundError(f"{repo_id} has no {config}/{split}*.parquet; files: {files[:20]}")
    return Path(hf_hub_download(repo_id, shards[0], repo_type="dataset"))


# --- a local generator of GSM8K-style problems ---------------------------------------------------------

_NAMES = (
    "Janet", "Tom", "Maria", "Ahmed", "Li", "Sofia", "James", "Priya", "Olga", "Kenji", "Ana", "Ben",
    "Chloe", "Diego", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jack",
)  # fmt: skip
_ITEMS = (
    "apples", "books", "marbles", "cookies", "pencils", "stickers", "cupcakes", "stamps", "shells",
    "crayons", "balloons", "cards", "eggs", "oranges", "toy cars", "buttons",
)  # fmt: skip
_CONTAINERS = ("boxes", "bags", "packs", "jars", "baskets", "crates")

Difficulty = Literal["easy", "medium"]


@dataclass(frozen=True)
class _Draft:
    question: str
    steps: list[tuple[str, int]]  # (expression, value) per calculation, in order
    sentences: list[str]  # one explanatory sentence per step, with {value} and {calc} placeholders


def _solution(draft: _Draft) -> tuple[str, int]:
    lines = []
    for (expr, value), sentence in zip(draft.steps, draft.sentences, strict=True):
        calc = f"{expr} = <<{expr.replace(' ', '')}={value}>>{value}"
        lines.append(sentence.format(calc=calc, value=value))
    final = draft.steps[-1][1]
    return "\n".join([*lines, f"#### {final}"]), final


def _cast(rng: random.Random) -> tuple[str, str, str]:
    """Who a problem is about (two different people) and what they count."""
    name, other = rng.sample(_NAMES, 2)
    return name, other, rng.choice(_ITEMS)


def _one_step(rng: random.Random, hi: int) -> _Draft:
    name, other, item = _cast(rng)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, hi), rng.randint(2, hi)
        return _Draft(
            f"{name} has {a} {item}. {other} gives {name} {b} more {item}. How many {item} does {name} have now?",
            [(f"{a} + {b}", a + b)],
            [f"{name} has {{calc}} {item} now."],
        )
    if kind == 1:
        a = rng.randint(4, hi + 2)
        b = rng.randint(1, a - 1)
        return _Draft(
            f"{name} had {a} {item} and gave {b} of them to {other}. How many {item} does {name} have left?",
            [(f"{a} - {b}", a - b)],
            [f"{name} has {{calc}} {item} left."],
        )
    if kind == 2:
        a, b = rng.randint(2, max(3, hi // 2)), rng.randint(2, 10)
        box = rng.choice(_CONTAINERS)
        return _Draft(
            f"{name} buys {a} {box} of {item}. Each of the {box} holds {b} {item}. "
            f"How many {item} does {name} buy in total?",
            [(f"{a} * {b}", a * b)],
            [f"{name} buys {{calc}} {item}."],
        )
    each, people = rng.randint(2, 10), rng.randint(2, 6)
    total = each * people
    return _Draft(
        f"{name} shares {total} {item} equally among {people} friends. How many {item} does each friend get?",
        [(f"{total} / {people}", each)],
        [f"Each friend gets {{calc}} {item}."],
    )


def _two_step(rng: random.Random, hi: int) -> _Draft:
    name, other, item = _cast(rng)
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(2, hi), rng.randint(2, hi)
        c = rng.randint(1, a + b - 1)
        return _Draft(
            f"{name} has {a} {item}, buys {b} more, and then gives {c} to {other}. "
            f"How many {item} does {name} have now?",
            [(f"{a} + {b}", a + b), (f"{a + b} - {c}", a + b - c)],
            [
                f"After buying, {name} has {{calc}} {item}.",
                f"After giving some away, {name} has {{calc}} {item}.",
            ],
        )
    if kind == 1:
        price, count, paid_extra = rng.randint(2, 9), rng.randint(2, 8), rng.randint(1, 20)
        cost = price * count
        paid = cost + paid_extra
        return _Draft(
            f"{item.capitalize()} cost ${price} each. {name} buys {count} {item} and pays with ${paid}. "
            f"How many dollars of change does {name} get?",
            [(f"{count} * {price}", cost), (f"{paid} - {cost}", paid - cost)],
            [f"The {item} cost {{calc}} dollars.", "The change is {calc} dollars."],
        )
    per_day, days, extra = rng.randint(2, 12), rng.randint(2, 7), rng.randint(1, hi)
    made = per_day * days
    return _Draft(
        f"{name} makes {per_day} {item} every day for {days} days, and {other} adds {extra} more. "
        f"How many {item} are there in all?",
        [(f"{per_day} * {days}", made), (f"{made} + {extra}", made + extra)],
        [f"{name} makes {{calc}} {item}.", f"In all there are {{calc}} {item}."],
    )


def arithmetic_problems(
    n: int, *, seed: int = 0, difficulty: Difficulty = "easy", max_number: int | None = None
) -> list[GSM8KProblem]:
    """`n` GSM8K-style word problems with worked solutions ending `#### N`, the same for the same seed.

    `easy`: one operation (add, subtract, multiply or divide) on numbers up to `max_number` (default 20).
    `medium`: half one-step, half two-step problems (totals and change, production plus extra) on
    numbers up to `max_number` (default 50). Answers are non-negative integers; no two problems of one
    call share a question.
    """
    if difficulty not in ("easy", "medium"):
        raise ValueError(f"difficulty must be 'easy' or 'medium', not {difficulty!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    hi = max_number if max_number is not None else (20 if difficulty == "easy" else 50)
    if hi < 4:
        raise ValueError(f"max_number must be at least 4, not {hi}")
    rng = random.Random(seed)  # noqa: S311 - reproducible data, not security
    problems: list[GSM8KProblem] = []
    seen: set[str] = set()
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 50 * n + 100:
            raise ValueError(f"could not make {n} distinct problems with max_number={hi}")
        two = difficulty == "medium" and rng.random() < 0.5
        draft = _two_step(rng, hi) if two else _one_step(rng, hi)
        if draft.question in seen:
            continue
        seen.add(draft.question)
        solution, final = _solution(draft)
        problems.append(GSM8KProblem(question=draft.question, answer=solution, final_answer=str(final)))
    return problems


def split_problems(
    problems: Sequence[GSM8KProblem], held_out: int
) -> tuple[list[GSM8KProblem], list[GSM8KProblem]]:
    """(train, held-out): the last `held_out` problems are held out."""
    if not 0 <= held_out <= len(problems):
        raise ValueError(f"held_out={held_out} must be between 0 and {len(problems)}")
    cut = len(problems) - held_out
    return list(problems[:cut]), list(problems[cut:])


def write_jsonl(problems: Sequence[GSM8KProblem], path: str | os.PathLike[str]) -> Path:
    """Write problems in the official JSONL format (`question`, `answer`); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for problem in problems:
            f.write(json.dumps(problem.to_record(), ensure_ascii=False) + "\n")
    return out
