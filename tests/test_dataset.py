"""eztinker.dataset: GSM8K loading and grading, the word-problem generator, ShareGPT dialects and rendering."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from eztinker.dataset import (
    ChatDataset,
    DatasetFormatError,
    GSM8KProblem,
    SupervisedExample,
    arithmetic_problems,
    batches,
    extract_answer,
    grade,
    load_gsm8k,
    load_sharegpt,
    normalize_number,
    parse_conversation,
    problem_messages,
    render_chat,
    split_problems,
    write_jsonl,
)

GSM8K_RECORDS = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
        "May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
        "altogether in April and May.\n#### 72",
    },
    {
        "question": "A shop earns $1,200 a day. How much in 3 days?",
        "answer": "1200*3=<<1200*3=3600>>3600\n#### 3,600",
    },
    {"question": "It is -4 degrees and falls 3 more. What now?", "answer": "-4-3=-7\n#### -7"},
]


# --- grading ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#### 72", "72"),
        ("so 1,234 in all\n#### 1,234", "1234"),
        ("The answer is $1,234.50.", "1234.5"),
        ("The answer is 3.0 apples", "3"),
        ("x = -3", "-3"),
        ("\\boxed{\u22127}", "-7"),
        ("answer: +12 apples", "12"),
        ("half is 3/4", "0.75"),
        ("a third: 1/3", "1/3"),
        ("12 + 30 = 42. Then 42 - 2 = 40 and the answer is 40.", "40"),
        ("#### 18\nThe answer is 20.", "18"),  # #### wins over later numbers
        ("The answer is 5. Then some 99 trailing", "5"),  # "answer is" wins over the last number
        ("1, 2, 3", "3"),  # a list, not thousands
        ("she has 0.5 left", "0.5"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1,234.50", "1234.5"),
        ("+7", "7"),
        ("\u22123", "-3"),
        ("-0", "0"),
        ("$5", "5"),
        ("2.", "2"),
        ("abc", None),
    ],
)
def test_normalize_number(value: str, expected: str | None) -> None:
    assert normalize_number(value) == expected


def test_grade_compares_values_not_strings() -> None:
    assert grade("so the total is 72.0", "72")
    assert grade("It costs $3,600.", "#### 3,600")
    assert grade("The answer is -7.", GSM8K_RECORDS[2]["answer"])
    assert not grade("The answer is 7.", "-7")
    assert not grade("I do not know", "72")
    assert not grade("72", "not a number")


# --- GSM8K -----------------------------------------------------------------------------------------------


def test_gsm8k_problem_from_record() -> None:
    problem = GSM8KProblem.from_record(GSM8K_RECORDS[1])
    assert problem.final_answer == "3600"
    assert problem.to_record() == {
        "question": GSM8K_RECORDS[1]["question"],
        "answer": GSM8K_RECORDS[1]["answer"],
    }


def test_load_gsm8k_jsonl_json_and_parquet(tmp_path: Path) -> None:
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_RECORDS))
    as_json = tmp_path / "train.json"
    as_json.write_text(json.dumps(GSM8K_RECORDS, indent=2))
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    parquet = tmp_path / "hub" / "main" / "test-00000-of-00001.parquet"
    parquet.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(GSM8K_RECORDS), parquet)

    expected = ["72", "3600", "-7"]
    assert [p.final_answer for p in load_gsm8k(jsonl)] == expected
    assert [p.final_answer for p in load_gsm8k(as_json)] == expected
    assert [p.final_answer for p in load_gsm8k(parquet)] == expected
    assert [p.final_answer for p in load_gsm8k(tmp_path / "hub", split="test")] == expected  # hub layout dir
    assert [p.final_answer for p in load_gsm8k(tmp_path, split="train")] == expected
    assert len(load_gsm8k(jsonl, limit=2)) == 2


def test_load_gsm8k_from_the_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id downloads `<config>/<split>-00000-of-00001.parquet` with huggingface_hub."""
    pq = pytest.importorskip("pyarrow.parquet")
    import huggingface_hub
    import pyarrow as pa

    local = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(GSM8K_RECORDS), local)
    calls = []

    def fake_download(repo_id: str, filename: str, **kwargs) -> str:
        calls.append((repo_id, filename, kwargs.get("repo_type")))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    problems = load_gsm8k("openai/gsm8k", split="test")
    assert calls == [("openai/gsm8k", "main/test-00000-of-00001.parquet", "dataset")]
    assert [p.final_answer for p in problems] == ["72", "3600", "-7"]


def test_load_gsm8k_missing_file_is_not_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_gsm8k(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    ("record", "field", "reason"),
    [
        ({"question": "q?"}, "answer", "missing"),
        ({"question": "q?", "answer": "it is 5"}, "answer", "####"),
        ({"question": "q?", "answer": "#### many"}, "answer", "no number"),
        ({"question": "", "answer": "#### 5"}, "question", "empty"),
    ],
)
def test_malformed_gsm8k_record_names_line_and_field(tmp_path: Path, record, field: str, reason: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GSM8K_RECORDS[0]) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(DatasetFormatError, match=f"bad.jsonl line 3: {field}: .*{reason}") as info:
        load_gsm8k(path)
    assert info.value.field == field


def test_arithmetic_problems_are_deterministic_and_correct() -> None:
    first = arithmetic_problems(50, seed=7)
    assert first == arithmetic_problems(50, seed=7)
    assert first != arithmetic_problems(50, seed=8)
    assert len({p.question for p in first}) == 50
    for problem in first + arithmetic_problems(50, seed=7, difficulty="medium"):
        # Every calculator annotation <<expr=value>> is right, and the last value is the final answer.
        annotations = re.findall(r"<<([^=]+)=([^>]+)>>", problem.answer)
        assert annotations
        for expr, value in annotations:
            assert eval(expr) == int(value), problem.answer
        assert problem.final_answer == annotations[-1][1]
        assert GSM8KProblem.from_record(problem.to_record()) == problem
        assert int(problem.final_answer) >= 0


def test_medium_problems_include_two_steps() -> None:
    steps = [p.answer.count("<<") for p in arithmetic_problems(40, seed=0, difficulty="medium")]
    assert 1 in steps and 2 in steps
    assert all(p.answer.count("<<") == 1 for p in arithmetic_problems(40, seed=0, difficulty="easy"))


def test_arithmetic_problems_round_trip_through_jsonl(tmp_path: Path) -> None:
    problems = arithmetic_problems(10, seed=1)
    train, held_out = split_problems(problems, 3)
    assert len(train) == 7 and held_out == problems[7:]
    assert load_gsm8k(write_jsonl(problems, tmp_path / "gen.jsonl")) == problems


def test_problem_messages_has_system_demo_and_question() -> None:
    messages = problem_messages("How many?")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "####" in messages[0]["content"] and "####" in messages[2]["content"]
    assert messages[-1] == {"role": "user", "content": "How many?"}
    assert problem_messages("Q", system_prompt=None, demonstrations=()) == [{"role": "user", "content": "Q"}]


# --- ShareGPT --------------------------------------------------------------------------------------------

EXPECTED_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye!"},
]
DIALECTS = {
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "Bye"},
            {"from": "gpt", "value": "Goodbye!"},
        ]
    },
    "sharegpt_top_level_system": {
        "system": "Be brief.",
        "conversations": [
            {"from": "user", "value": "Hi"},
            {"from": "assistant", "value": "Hello!"},
            {"from": "human", "value": "Bye"},
            {"from": "chatgpt", "value": "Goodbye!"},
        ],
    },
    "messages": {"messages": EXPECTED_CHAT},
    "openai": {
        "messages": [
            {
                "role": "developer",
                "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
            },
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye!"},
        ]
    },
}


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_every_dialect_reads_the_same_conversation(dialect: str) -> None:
    assert parse_conversation(DIALECTS[dialect]) == EXPECTED_CHAT


def test_load_sharegpt_jsonl_and_json_array(tmp_path: Path) -> None:
    records = [DIALECTS[d] for d in sorted(DIALECTS)]
    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    array = tmp_path / "chats.json"
    array.write_text(json.dumps(records, indent=2))
    assert load_sharegpt(jsonl) == [EXPECTED_CHAT] * 4
    assert load_sharegpt(array) == [EXPECTED_CHAT] * 4
    assert load_sharegpt(array, limit=1) == [EXPECTED_CHAT]


def test_the_example_data_file_loads() -> None:
    path = Path(__file__).parent.parent / "examples" / "data" / "pip_chats.jsonl"
    conversations = load_sharegpt(path)
    assert len(conversations) == 8
    assert any(m.get("weight") == 0 for c in conversations for m in c)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]},
            "conversations[1].from: unknown speaker 'bot'",
        ),
        (
            {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
            "conversations[0].value: expected a string",
        ),
        (
            {"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]},
            "conversations[0].value: is missing",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages: has no assistant"),
        ({"messages": [{"content": "hi"}]}, "messages[0]: has neither"),
        ({"messages": []}, "messages: is empty"),
        ({"messages": "hi"}, "messages: expected a list"),
        ({"text": "hi"}, "expected a `conversations` or `messages` list"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0]: only text",
        ),
        (
            {"messages": [{"role": "assistant", "content": "x", "weight": 2}]},
            "messages[0].weight: must be 0 or 1",
        ),
        ({"system": 5, "messages": [{"role": "assistant", "content": "x"}]}, "system: expected a string"),
    ],
)
def test_malformed_chat_record_names_line_and_field(tmp_path: Path, record, message: str) -> None:
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(DIALECTS["messages"]) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DatasetFormatError, match=re.escape(f"chats.jsonl line 2: {message}")):
        load_sharegpt(path)


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text(json.dumps(DIALECTS["messages"]) + "\n{not json\n")
    with pytest.raises(DatasetFormatError, match="chats.jsonl line 2: invalid JSON"):
        load_sharegpt(jsonl)
    truncated = tmp_path / "chats.json"
    text = json.dumps([DIALECTS["messages"], DIALECTS["sharegpt"]], indent=1)
    truncated.write_text(text[: len(text) // 2 + 40])
    first_line_of_second = text.index('"conversations"')
    with pytest.raises(DatasetFormatError, match=r"chats.json line \d+: invalid JSON") as info:
        load_sharegpt(truncated)
    assert int(info.value.where.split()[-1]) <= text.count("\n", 0, first_line_of_second) + 1


def test_a_file_that_is_not_utf8_names_the_file_and_line(tmp_path: Path) -> None:
    latin1 = tmp_path / "chats.jsonl"
    latin1.write_bytes(json.dumps(DIALECTS["messages"]).encode() + b'\n{"text": "caf\xe9"}\n')
    with pytest.raises(DatasetFormatError, match="chats.jsonl line 2: is not UTF-8 text"):
        load_sharegpt(latin1)
    with pytest.raises(DatasetFormatError, match="chats.jsonl line 2: is not UTF-8 text"):
        load_gsm8k(latin1)


# --- rendering -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


def _trained_text(tokenizer, example: SupervisedExample) -> list[str]:
    """The trained (weight 1) stretches of an example, decoded."""
    pieces, current = [], []
    for token, weight in zip(example.tokens, example.weights, strict=True):
        if weight:
            current.append(token)
        elif current:
            pieces.append(tokenizer.decode(current))
            current = []
    if current:
        pieces.append(tokenizer.decode(current))
    return pieces


def test_render_chat_trains_on_assistant_tokens_only(tiny_tokenizer) -> None:
    example = render_chat(tiny_tokenizer, EXPECTED_CHAT)
    assert example is not None
    full = tiny_tokenizer.apply_chat_template(EXPECTED_CHAT, tokenize=False)
    assert tiny_tokenizer.decode(example.tokens) == full
    assert _trained_text(tiny_tokenizer, example) == ["Hello!<|im_end|>\n", "Goodbye!<|im_end|>\n"]


def test_render_chat_skips_weight_zero_turns(tiny_tokenizer) -> None:
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Wrong.", "weight": 0},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Right."},
    ]
    example = render_chat(tiny_tokenizer, chat)
    assert example is not None
    assert _trained_text(tiny_tokenizer, example) == ["Right.<|im_end|>\n"]


def test_render_chat_truncates_and_drops_empty(tiny_tokenizer) -> None:
    full = render_chat(tiny_tokenizer, EXPECTED_CHAT)
    assert full is not None
    first_trained = full.weights.index(1.0)
    cut = render_chat(tiny_tokenizer, EXPECTED_CHAT, max_length=first_trained + 2)
    assert cut is not None and len(cut.tokens) == first_trained + 2 and cut.num_loss_tokens == 2
    assert render_chat(tiny_tokenizer, EXPECTED_CHAT, max_length=first_trained) is None
    dataset = ChatDataset([EXPECTED_CHAT, EXPECTED_CHAT], tiny_tokenizer, max_length=first_trained)
    assert len(dataset) == 0 and dataset.num_dropped == 2


def test_render_chat_with_a_real_template(smollm2_model_dir: Path) -> None:
    """SmolLM2's template adds a default system prompt when there is none: it is never trained on."""
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_model_dir))
    chat = EXPECTED_CHAT[1:]
    example = render_chat(tokenizer, chat)
    assert example is not None
    assert "SmolLM" in tokenizer.decode(example.tokens)
    assert _trained_text(tokenizer, example) == ["Hello!<|im_end|>\n", "Goodbye!<|im_end|>\n"]


def test_render_chat_needs_a_template(tiny_tokenizer) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        render_chat(tokenizer, EXPECTED_CHAT)


# --- examples and batches --------------------------------------------------------------------------------


def test_supervised_example_converts_to_every_datum_shape() -> None:
    example = SupervisedExample.from_prompt_completion([5, 6, 7], [8, 9])
    assert example.weights == [0, 0, 0, 1, 1] and example.num_loss_tokens == 2
    assert example.to_native() == {"input_ids": [5, 6, 7, 8, 9], "target_ids": [-100, -100, -100, 8, 9]}
    assert example.to_datum() == {
        "tokens": [5, 6, 7, 8],
        "loss_inputs": {"target_tokens": [6, 7, 8, 9], "weights": [0, 0, 1, 1]},
    }
    tinker_datum = example.to_tinker()
    assert tinker_datum.model_input.to_ints() == [5, 6, 7, 8]
    assert example.truncated(4).tokens == [5, 6, 7, 8]
    with pytest.raises(ValueError, match="weights"):
        SupervisedExample([1, 2], [0.0])


def test_batches_cover_the_dataset_once() -> None:
    data = list(range(10))
    got = list(batches(data, 3, seed=1))
    assert [len(b) for b in got] == [3, 3, 3, 1]
    assert sorted(x for b in got for x in b) == data
    assert got == list(batches(data, 3, seed=1))
    assert list(batches(data, 4, shuffle=False, drop_last=True)) == [[0, 1, 2, 3], [4, 5, 6, 7]]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TOOL_USE_RECORD = {
    "tools": [WEATHER_TOOL],
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ],
}


def test_tool_use_records_train_on_the_calls_in_the_templates_format(tiny_tokenizer_dir: Path) -> None:
    """OpenAI's fine-tuning format with tools: the template renders the tools and the assistant's call in
    the model's own format (here `<tool_call>` JSON), and the call is trained on like any assistant text."""
    from eztinker.testing import TOOLS_JSON_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.chat_template = TOOLS_JSON_TEMPLATE
    chat = parse_conversation(TOOL_USE_RECORD)
    assert chat.tools == [WEATHER_TOOL]
    assert chat[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    }
    example = render_chat(tokenizer, chat)
    assert example is not None
    full = tokenizer.apply_chat_template(list(chat), tools=[WEATHER_TOOL], tokenize=False)
    assert tokenizer.decode(example.tokens) == full and "<tools>" in full
    trained = tokenizer.decode([t for t, w in zip(example.tokens, example.weights, strict=True) if w])
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert trained == f"{call}<|im_end|>\nIt is sunny.<|im_end|>\n"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tools": "get_weather"}, "tools"),
        ({"arguments": "{city"}, "messages[1].tool_calls[0].function.arguments"),
        ({"arguments": "[1, 2]"}, "messages[1].tool_calls[0].function.arguments"),
    ],
)
def test_a_malformed_tool_use_record_names_the_field(change: dict, field: str) -> None:
    record = json.loads(json.dumps(TOOL_USE_RECORD))
    if "arguments" in change:
        record["messages"][1]["tool_calls"][0]["function"]["arguments"] = change["arguments"]
    else:
        record.update(change)
    with pytest.raises(DatasetFormatError, match=re.escape(field)):
        parse_conversation(record, "chats.jsonl line 1")
