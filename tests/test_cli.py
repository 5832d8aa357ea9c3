"""The `eztinker` command through Typer's CliRunner, against an in-process server with the tiny model."""

from __future__ import annotations

import importlib.util
import json
import re
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner, Result

import eztinker
import eztinker.client
from eztinker import EZTinkerClient
from eztinker.cli import app
from eztinker.dataset.sft_jsonl import read_sft_examples
from eztinker.exceptions import NotFoundError
from eztinker.settings import Settings

runner = CliRunner()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir) -> Iterator[str]:
    with eztinker.serve(data_dir=tmp_path_factory.mktemp("cli-data"), models=[str(tiny_model_dir)]) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[EZTinkerClient]:
    with EZTinkerClient(base_url=server) as client:
        yield client


@pytest.fixture(scope="module")
def trained_run(client: EZTinkerClient, tiny_model_dir) -> str:
    """A run with a few optimizer steps (so its adapter is not the identity) and a checkpoint `ckpt`."""
    run_id = client.create_run(str(tiny_model_dir), lora_config={"r": 4, "lora_alpha": 8})
    for _ in range(3):
        client.forward_backward(run_id, input_ids=[ids(16), ids(9, 5)])
        client.optim_step(run_id, learning_rate=2e-2)
    client.save_checkpoint(run_id, "ckpt")
    return run_id


def ids(n: int, start: int = 7) -> list[int]:
    return [(start + 13 * i) % 900 + 3 for i in range(n)]


def cli(server: str, *args: str, input: str | None = None) -> Result:
    return runner.invoke(app, [*args, "--url", server], input=input)


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def friendly_error(result: Result) -> str:
    """The one line a user error prints: exit 1, `error: ...`, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# --- runs ----------------------------------------------------------------------------------------------------


def test_runs_list_shows_a_run(server: str, trained_run: str) -> None:
    out = ok(cli(server, "runs", "list"))
    assert trained_run in out


def test_runs_show_prints_config_checkpoints_and_loss_history(server: str, trained_run: str) -> None:
    out = ok(cli(server, "runs", "show", trained_run))
    config = json.loads(out[: out.index("\ncheckpoints:")])
    assert config["run_id"] == trained_run and config["lora_config"]["r"] == 4 and config["step"] == 3
    assert "checkpoints: ckpt (step 3, state)" in out
    history = re.findall(r"^\s*│?\s*(\d)\s+│\s+(\d\.\d+)", out, flags=re.MULTILINE)
    assert [step for step, _ in history] == ["1", "2", "3"]


def test_runs_delete_asks_unless_yes(server: str, client: EZTinkerClient, tiny_model_dir) -> None:
    run_id = client.create_run(str(tiny_model_dir), lora_config={"r": 1})
    result = cli(server, "runs", "delete", run_id, input="n\n")
    assert result.exit_code == 1 and "Aborted" in result.output
    client.get_run(run_id)  # still there
    assert f"deleted run {run_id}" in ok(cli(server, "runs", "delete", run_id, "--yes"))
    with pytest.raises(NotFoundError):
        client.get_run(run_id)


# --- checkpoints ---------------------------------------------------------------------------------------------


def test_checkpoints_list_and_delete(server: str, client: EZTinkerClient, trained_run: str) -> None:
    client.save_checkpoint(trained_run, "scratch", kind="weights")
    out = ok(cli(server, "checkpoints", "list", trained_run))
    assert "ckpt" in out and "scratch" in out and "weights" in out
    ok(cli(server, "checkpoints", "delete", trained_run, "scratch"))
    assert [c.name for c in client.get_checkpoints(trained_run)] == ["ckpt"]


def test_checkpoints_export_writes_a_peft_adapter_and_a_merged_model(
    server: str, trained_run: str, tiny_model_dir, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    ok(cli(server, "checkpoints", "export", trained_run, "ckpt", str(adapter_dir)))
    ok(cli(server, "checkpoints", "export", trained_run, "ckpt", str(merged_dir), "--merge"))
    assert not any(p.name.startswith(".") for p in merged_dir.iterdir())  # no download left behind

    x = torch.tensor([ids(12)])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(x).logits
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir
        )
        adapted = peft_model.eval()(x).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(x).logits
    assert (adapted - base).abs().max() > 1e-3  # the adapter changes the model...
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)  # ...and merging keeps exactly that
    assert (merged_dir / "tokenizer.json").exists()

    line = friendly_error(cli(server, "checkpoints", "export", trained_run, "ckpt", str(adapter_dir)))
    assert "not empty" in line


def test_checkpoints_export_merge_names_a_base_model_missing_here(
    server: str, trained_run: str, tmp_path: Path
) -> None:
    missing, out = tmp_path / "no-such-model", tmp_path / "merged"
    args = ("checkpoints", "export", trained_run, "ckpt", str(out), "--merge", "--base-model", str(missing))
    line = friendly_error(cli(server, *args))
    assert str(missing) in line and "give --base-model with a local copy" in line
    assert not out.exists()


# --- sampling ------------------------------------------------------------------------------------------------


def test_sample_prints_text_reproducibly_with_a_seed(server: str, trained_run: str) -> None:
    args = ("sample", "Hello", "--max-new-tokens", "8", "--seed", "3")
    first = ok(cli(server, *args))
    assert first.strip() and first == ok(cli(server, *args))
    two = ok(cli(server, *args, "-n", "2", "--run-id", trained_run))
    assert "sample 0" in two and "sample 1" in two


def test_sample_chat_renders_the_chat_template_on_the_server(
    server: str, client: EZTinkerClient, tiny_model_dir
) -> None:
    """`--chat` (and `--system`) send the prompt as chat turns; the server renders the base model's
    template, so the reply is the one a client gets for the template's token ids."""
    from transformers import AutoTokenizer

    turns = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello"}]
    rendered = AutoTokenizer.from_pretrained(tiny_model_dir).apply_chat_template(
        turns, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    by_ids = client.generate(list(rendered), 8, 0.0)
    by_chat = client.generate(turns, 8, 0.0)
    assert by_chat.prompt_tokens == list(rendered) and by_chat.samples[0].tokens == by_ids.samples[0].tokens
    args = (
        "sample",
        "Hello",
        "--chat",
        "--system",
        "Be terse.",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
    )
    assert ok(cli(server, *args)) == by_ids.samples[0].text + "\n"
    refused = cli(server, "sample", "Hello", "--system", "Be terse.")
    assert refused.exit_code != 0 and "--system needs --chat" in refused.output


# --- train-sft -----------------------------------------------------------------------------------------------


SFT_LINES = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"prompt": "Capital of France?", "completion": " Paris."},
    {"prompt": "Two plus two?", "completion": " Four."},
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "Again."},
            {"role": "assistant", "content": "Hi again."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Colour of the sky?"},
            {"role": "assistant", "content": "Blue."},
        ]
    },
]


def write_jsonl(path: Path, records: Sequence[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_train_sft_lowers_the_loss_and_saves(
    server: str, client: EZTinkerClient, tiny_model_dir, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_LINES)
    result = cli(
        server,
        "train-sft", str(data), "--base-model", str(tiny_model_dir),
        "--epochs", "8", "--batch-size", "5", "--learning-rate", "2e-2", "--rank", "4", "--save", "sft",
    )  # fmt: skip
    out = ok(result)
    [run_id] = re.findall(r"done: run (\S+)", out)
    losses = [m.loss for m in client.get_metrics(run_id).history if m.loss is not None]
    assert len(losses) == 8, losses  # one batch an epoch
    assert losses[-1] < losses[0] - 0.4 and sum(losses[-3:]) < sum(losses[:3]) - 0.9, losses
    assert client.get_run(run_id).last_loss == losses[-1]
    assert [c.name for c in client.get_checkpoints(run_id)] == ["sft"]
    assert "5 examples" in out and "loss" in out


def test_train_sft_continues_a_run(
    server: str, client: EZTinkerClient, tiny_model_dir, tmp_path: Path
) -> None:
    run_id = client.create_run(str(tiny_model_dir), lora_config={"r": 2})
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_LINES[:2])
    ok(cli(server, "train-sft", str(data), "--run-id", run_id))  # --base-model: the run's
    assert client.get_run(run_id).step == 1


def test_train_sft_refuses_a_base_model_other_than_the_runs_it_continues(
    server: str, client: EZTinkerClient, tiny_model_dir, tiny_model_dirs, tmp_path: Path
) -> None:
    """The examples would be tokenized with another model's tokenizer and trained into this run."""
    run_id = client.create_run(str(tiny_model_dir), lora_config={"r": 2})
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_LINES[:2])
    other = str(tiny_model_dirs["gpt2"])
    line = friendly_error(cli(server, "train-sft", str(data), "--run-id", run_id, "--base-model", other))
    assert other in line and str(tiny_model_dir) in line and "leave --base-model out" in line
    assert client.get_run(run_id).step == 0
    ok(cli(server, "train-sft", str(data), "--run-id", run_id, "--base-model", str(tiny_model_dir)))
    assert client.get_run(run_id).step == 1


def test_read_sft_examples_trains_on_completions_and_assistant_turns_only(
    tiny_model_dir, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_LINES)
    text, pc, _, chat, _ = read_sft_examples(data, tok, max_length=1024)

    assert text[1] == text[0] and text[0][-1] == tok.eos_token_id  # plain text: all trained, EOS added

    prompt = tok("Capital of France?")["input_ids"]
    completion = [*tok(" Paris.", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert pc == (prompt + completion, [-100] * len(prompt) + completion)

    ids_, labels = chat
    messages = SFT_LINES[3]["messages"]
    assert ids_ == list(tok.apply_chat_template(messages, tokenize=True, return_dict=False))
    trained = tok.decode([t for t, label in zip(ids_, labels) if label != -100])
    assert trained == "Hi.<|im_end|>\nHi again.<|im_end|>\n"  # no role headers, no user or system text
    assert all(label in (-100, t) for t, label in zip(ids_, labels))

    short = read_sft_examples(data, tok, max_length=6)
    assert all(len(x) == len(y) <= 6 and set(y[1:]) != {-100} for x, y in short)
    assert len(short) < 5  # examples with nothing to train on before the cut are left out


# --- errors: one line, exit 1, no traceback ------------------------------------------------------------------


def test_train_sft_reports_a_missing_file(server: str, tiny_model_dir, tmp_path: Path) -> None:
    line = friendly_error(
        cli(server, "train-sft", str(tmp_path / "nope.jsonl"), "--base-model", str(tiny_model_dir))
    )
    assert "nope.jsonl" in line and "No such file" in line


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"prompt": "only a prompt"}', "expected a 'text'"),
        ('{"text": 3}', "'text' must be a string"),
        ('{"messages": [{"role": "user"}]}', "'messages' must be a non-empty list"),
    ],
)
def test_train_sft_reports_a_bad_line_with_its_number(
    server: str, tiny_model_dir, tmp_path: Path, bad_line: str, expected: str
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(SFT_LINES[0]) + "\n\n" + bad_line + "\n")
    line = friendly_error(cli(server, "train-sft", str(data), "--base-model", str(tiny_model_dir)))
    assert f"bad.jsonl:3: {expected}" in line


def test_train_sft_reports_a_file_that_is_not_utf8_with_its_line(
    server: str, tiny_model_dir, tmp_path: Path
) -> None:
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(json.dumps(SFT_LINES[0]).encode() + b'\n{"text": "caf\xe9"}\n')
    line = friendly_error(cli(server, "train-sft", str(data), "--base-model", str(tiny_model_dir)))
    assert "latin1.jsonl:2: not UTF-8 text" in line


def test_train_sft_refuses_a_bad_checkpoint_name_before_it_trains(
    server: str, client: EZTinkerClient, tiny_model_dir, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_LINES)
    runs_before = {r.run_id for r in client.get_runs()}
    line = friendly_error(
        cli(server, "train-sft", str(data), "--base-model", str(tiny_model_dir), "--save", "bad name/x")
    )
    assert "name" in line and "should match pattern" in line
    assert {r.run_id for r in client.get_runs()} == runs_before  # no run created, nothing trained


def test_train_sft_names_a_tokenizer_it_cannot_load_here_before_it_creates_a_run(
    server: str, client: EZTinkerClient, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_LINES)
    runs_before = {r.run_id for r in client.get_runs()}
    for base_model in (str(tmp_path / "no-such-model"), str(tmp_path)):  # missing; not a tokenizer
        line = friendly_error(cli(server, "train-sft", str(data), "--base-model", base_model))
        assert base_model in line and "give --tokenizer with a local copy" in line
    assert {r.run_id for r in client.get_runs()} == runs_before


def test_train_sft_says_which_turns_train_when_none_does(server: str, tiny_model_dir, tmp_path: Path) -> None:
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello!"}]}
    data = write_jsonl(tmp_path / "bots.jsonl", [chat])
    line = friendly_error(cli(server, "train-sft", str(data), "--base-model", str(tiny_model_dir)))
    assert "no example has a token to train on" in line and "role 'assistant'" in line


def test_train_sft_needs_a_base_model_or_a_run(server: str, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_LINES)
    assert "--base-model" in friendly_error(cli(server, "train-sft", str(data)))


def test_an_unknown_run_gives_the_servers_404_message(server: str, client: EZTinkerClient) -> None:
    with pytest.raises(NotFoundError) as info:
        client.get_run("no-such-run")
    for args in (("runs", "show", "no-such-run"), ("checkpoints", "list", "no-such-run")):
        line = friendly_error(cli(server, *args))
        assert info.value.message in line and "404" in line


def test_an_unknown_checkpoint_gives_the_servers_404_message(
    server: str, trained_run: str, tmp_path: Path
) -> None:
    line = friendly_error(cli(server, "checkpoints", "export", trained_run, "nope", str(tmp_path / "x")))
    assert "no checkpoint named 'nope'" in line
    assert not (tmp_path / "x").exists()


def test_an_unreachable_server_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eztinker.client, "_sleep", lambda seconds: None)  # skip the retries' backoff
    line = friendly_error(cli("http://127.0.0.1:9", "runs", "list"))
    assert "could not reach the EZTinker server at http://127.0.0.1:9" in line and "is it running" in line


def test_error_messages_are_not_read_as_markup(server: str) -> None:
    line = friendly_error(cli(server, "runs", "show", "[bold]x"))
    assert "no run '[bold]x'" in line


def test_a_bug_keeps_its_traceback(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: EZTinkerClient) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(EZTinkerClient, "get_runs", broken)
    result = cli(server, "runs", "list")
    assert isinstance(result.exception, RuntimeError) and "error:" not in result.output


def test_a_closed_output_pipe_ends_the_command_quietly(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`eztinker runs list | head`: once the reader has gone there is nothing to report, and no one to
    report it to."""

    def reader_gone(self: object, *args: object, **kwargs: object) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("eztinker.cli.console.print", reader_gone)  # stdout's; stderr still works
    result = cli(server, "runs", "list")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "error" not in result.output


def test_help_lists_the_commands() -> None:
    out = ok(runner.invoke(app, ["--help"]))
    for command in ("server", "runs", "checkpoints", "sample", "train-sft"):
        assert command in out


# --- server: options parsed into Settings, uvicorn never started ---------------------------------------------


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Settings, bool]]:
    """What `run_server` was called with; the environment cleared of EZTINKER_*, sys.path restored after."""
    calls: list[tuple[Settings, bool]] = []
    monkeypatch.setattr(sys, "path", list(sys.path))  # `server` adds the working directory for plugins
    monkeypatch.setattr("eztinker.server.run_server", lambda s, *, reload=False: calls.append((s, reload)))
    monkeypatch.setattr(
        "eztinker.cli_server._check_port_free", lambda host, port: None
    )  # whatever else listens
    for name in ("PORT", "HOST", "MODELS", "API_KEYS", "PLUGINS", "DATA_DIR", "DTYPE", "DEVICE", "WORKERS"):
        monkeypatch.delenv(f"EZTINKER_{name}", raising=False)
    return calls


def test_server_options(
    started: list[tuple[Settings, bool]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_losses.py").write_text("")  # a plugin in the current directory, as users write them
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    args = ["server", "--model", "a", "--model", "b", "--api-key", "k", "--plugin", "my_losses"]
    ok(runner.invoke(app, [*args, "--data-dir", str(tmp_path), "--port", "9001", "--reload"]))
    [(settings, reload)] = started
    assert settings.models == ["a", "b"] and settings.api_keys == ["k"] and settings.plugins == ["my_losses"]
    assert settings.data_dir == tmp_path and settings.port == 9001 and settings.host == "127.0.0.1"
    assert reload is True
    assert importlib.util.find_spec("my_losses") is not None  # the server will import it


def test_server_refuses_a_plugin_it_cannot_find(started: list[tuple[Settings, bool]]) -> None:
    for module in ("no_such_plugin", "no_such_package.losses"):
        line = friendly_error(runner.invoke(app, ["server", "--plugin", module]))
        assert f"plugin '{module}': no such module" in line
    assert started == []


def test_server_defaults(started: list[tuple[Settings, bool]]) -> None:
    ok(runner.invoke(app, ["server"]))
    [(settings, reload)] = started
    assert settings.host == "127.0.0.1" and settings.port == 8000 and not reload
    assert settings.data_dir == Path(".eztinker")
    assert settings.models == settings.api_keys == settings.plugins == []


def test_server_options_from_the_environment(
    started: list[tuple[Settings, bool]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EZTINKER_PORT", "9123")
    monkeypatch.setenv("EZTINKER_API_KEYS", "k1,k2")
    monkeypatch.setenv("EZTINKER_MODELS", "m1")
    ok(runner.invoke(app, ["server"]))
    ok(runner.invoke(app, ["server", "--api-key", "k3", "--port", "9200"]))  # flags win over the environment
    [(from_env, _), (from_flags, _)] = started
    assert from_env.port == 9123 and from_env.api_keys == ["k1", "k2"] and from_env.models == ["m1"]
    assert from_flags.port == 9200 and from_flags.api_keys == ["k3"] and from_flags.models == ["m1"]


def test_server_refuses_a_port_in_use_before_it_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[Settings] = []
    monkeypatch.setattr("eztinker.server.run_server", lambda s, *, reload=False: calls.append(s))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        line = friendly_error(runner.invoke(app, ["server", "--port", port, "--data-dir", str(tmp_path)]))
    assert f"127.0.0.1:{port}" in line and "--port" in line
    assert calls == []


def test_server_rejects_a_bad_option_in_one_line(started: list[tuple[Settings, bool]]) -> None:
    line = friendly_error(runner.invoke(app, ["server", "--dtype", "float64"]))
    assert "dtype" in line
    assert started == []


def test_server_workers_ray_selects_the_ray_pool(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    started: list[Settings] = []
    monkeypatch.setattr("eztinker.server.run_server", lambda settings, reload=False: started.append(settings))
    result = runner.invoke(
        app, ["server", "--workers", "ray", "--ray-workers", "4", "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert started[0].worker_pool == "ray" and started[0].ray_workers == 4

    result = runner.invoke(app, ["server", "--workers", "3", "--data-dir", str(tmp_path)])
    assert started[1].worker_pool == "local" and started[1].workers == 3

    result = runner.invoke(app, ["server", "--workers", "many"])
    assert result.exit_code == 1 and "number of worker threads, or `ray`" in result.output


def test_sample_within_a_schema_a_regex_or_a_choice(server: str, tmp_path) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["n"],
        "additionalProperties": False,
    }
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    for given in (json.dumps(schema), f"@{tmp_path / 'schema.json'}"):
        out = ok(
            cli(server, "sample", "Count:", "--json-schema", given, "--seed", "1", "--max-new-tokens", "30")
        )
        assert isinstance(json.loads(out)["n"], int)
    digits = ok(cli(server, "sample", "Year:", "--regex", "[0-9]{4}", "--seed", "2")).strip()
    assert len(digits) == 4 and digits.isdigit()
    picked = ok(cli(server, "sample", "Sky:", "--choice", "blue", "--choice", "grey", "--seed", "3")).strip()
    assert picked in ("blue", "grey")
    refused = cli(server, "sample", "x", "--json-schema", "[1]")
    assert refused.exit_code != 0 and "must be a JSON object" in refused.output
