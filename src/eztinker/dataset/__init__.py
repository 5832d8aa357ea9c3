"""Training data for EZTinker loops: GSM8K, ShareGPT-style chats, and a local word-problem generator.

Everything here turns examples into `SupervisedExample`s — token ids with a per-token loss weight
(0 on prompts, 1 on what the model should learn to say) — which convert to each `forward_backward`
shape: `to_native()` for `EZTinkerClient` with a native loss, `to_datum()` for Tinker's token losses,
`to_tinker()` for the official `tinker` SDK.

- `load_gsm8k` reads GSM8K (JSONL, JSON, Parquet, or the hub id `openai/gsm8k`); `extract_answer` and
  `grade` check a model's final number; `arithmetic_problems` makes GSM8K-style problems offline.
- `load_sharegpt` reads chat records (`conversations` from/value, `messages` role/content, OpenAI chat
  format) and `ChatDataset` / `render_chat` render them with the loss on assistant tokens only.

Nothing here talks to a server, and torch is never imported: a tokenizer (for chats) is all it needs.
"""

from eztinker.dataset.base import (
    IGNORE_INDEX,
    Dataset,
    DatasetFormatError,
    SupervisedExample,
    batches,
    read_json_records,
)
from eztinker.dataset.grading import extract_answer, grade, normalize_number, parse_number
from eztinker.dataset.gsm8k import (
    DEMONSTRATION,
    GSM8K_HUB_ID,
    SYSTEM_PROMPT,
    GSM8KProblem,
    arithmetic_problems,
    load_gsm8k,
    problem_messages,
    split_problems,
    write_jsonl,
)
from eztinker.dataset.sharegpt import (
    Chat,
    ChatDataset,
    Message,
    load_sharegpt,
    parse_conversation,
    render_chat,
)

__all__ = [
    "DEMONSTRATION",
    "GSM8K_HUB_ID",
    "IGNORE_INDEX",
    "SYSTEM_PROMPT",
    "Chat",
    "ChatDataset",
    "Dataset",
    "DatasetFormatError",
    "GSM8KProblem",
    "Message",
    "SupervisedExample",
    "arithmetic_problems",
    "batches",
    "extract_answer",
    "grade",
    "load_gsm8k",
    "load_sharegpt",
    "normalize_number",
    "parse_conversation",
    "parse_number",
    "problem_messages",
    "read_json_records",
    "render_chat",
    "split_problems",
    "write_jsonl",
]
