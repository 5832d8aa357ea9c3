"""The `eztinker` command: start a server, or talk to one (`--url`, default http://localhost:8000).

eztinker server --model ./my-model            start the server
eztinker runs list | show RUN | delete RUN    training runs
eztinker checkpoints list RUN | delete RUN NAME | export RUN NAME DIR [--merge]
eztinker sample "Hello" [--run-id RUN]        sample text
eztinker train-sft data.jsonl --base-model M  a small SFT loop through the client
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

if TYPE_CHECKING:
    from eztinker.client import EZTinkerClient

app = typer.Typer(
    help="EZTinker: a self-hosted Tinker.", no_args_is_help=True, pretty_exceptions_enable=False
)
runs_app = typer.Typer(help="List, show and delete training runs.", no_args_is_help=True)
checkpoints_app = typer.Typer(help="List, delete and export checkpoints.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
app.add_typer(checkpoints_app, name="checkpoints")
console = Console()

Url = Annotated[str, typer.Option("--url", envvar="EZTINKER_URL", help="The server's base URL.")]
ApiKey = Annotated[
    str | None, typer.Option("--api-key", envvar="EZTINKER_API_KEY", help="API key, if the server needs one.")
]
DEFAULT_URL = "http://localhost:8000"


def _client(url: str, api_key: str | None) -> EZTinkerClient:
    from eztinker.client import EZTinkerClient

    return EZTinkerClient(base_url=url, api_key=api_key)


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=1)


# --- server ----------------------------------------------------------------------------------------------


@app.command()
def server(
    host: Annotated[str, typer.Option(envvar="EZTINKER_HOST", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="EZTINKER_PORT")] = 8000,
    reload: Annotated[bool, typer.Option(help="Restart on code changes (development).")] = False,
    data_dir: Annotated[
        Path, typer.Option(envvar="EZTINKER_DATA_DIR", help="Database and checkpoints.")
    ] = Path(".eztinker"),
    database_url: Annotated[
        str | None,
        typer.Option(envvar="EZTINKER_DATABASE_URL", help="SQLAlchemy URL (default SQLite in data dir)."),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model", help="Base model to load at start (repeatable); the first is the default for sampling."
        ),
    ] = None,
    api_key: Annotated[
        list[str] | None, typer.Option("--api-key", help="Require this API key (repeatable).")
    ] = None,
    plugin: Annotated[
        list[str] | None,
        typer.Option("--plugin", help="Module to import at start, e.g. one registering losses (repeatable)."),
    ] = None,
    device: Annotated[str | None, typer.Option(envvar="EZTINKER_DEVICE", help="cuda, cuda:1 or cpu.")] = None,
    dtype: Annotated[
        str | None, typer.Option(envvar="EZTINKER_DTYPE", help="float32, bfloat16 or float16.")
    ] = None,
    workers: Annotated[int, typer.Option(envvar="EZTINKER_WORKERS", help="Worker threads.")] = 2,
) -> None:
    """Start the EZTinker server (SQLite and an in-process worker by default; models load on first use)."""
    from eztinker.server import run_server
    from eztinker.settings import Settings

    overrides: dict[str, Any] = {
        "host": host,
        "port": port,
        "data_dir": data_dir,
        "database_url": database_url,
        "device": device,
        "dtype": dtype,
        "workers": workers,
    }
    # Repeatable flags add to what EZTINKER_MODELS / EZTINKER_API_KEYS / EZTINKER_PLUGINS already say.
    env = Settings()
    overrides["models"] = [*env.models, *(model or [])]
    overrides["api_keys"] = [*env.api_keys, *(api_key or [])]
    overrides["plugins"] = [*env.plugins, *(plugin or [])]
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    console.print(f"EZTinker on http://{settings.host}:{settings.port}  (docs: /docs, health: /health)")
    run_server(settings, reload=reload)


# --- runs ------------------------------------------------------------------------------------------------


@runs_app.command("list")
def runs_list(url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """All runs you can see."""
    with _client(url, api_key) as client:
        runs = client.get_runs()
    table = Table("run id", "base model", "rank", "loss", "step", "last loss", "status")
    for run in runs:
        last = f"{run.last_loss:.4f}" if run.last_loss is not None else "-"
        table.add_row(
            run.run_id,
            run.base_model,
            str(run.lora_config.r),
            run.loss_config.loss_type,
            str(run.step),
            last,
            run.status,
        )
    console.print(table)


@runs_app.command("show")
def runs_show(run_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """One run, its checkpoints and its recent loss history."""
    with _client(url, api_key) as client:
        run = client.get_run(run_id)
        checkpoints = client.get_checkpoints(run_id)
        metrics = client.get_metrics(run_id)
    console.print_json(run.model_dump_json())
    if checkpoints:
        console.print("checkpoints: " + ", ".join(f"{c.name} (step {c.step}, {c.kind})" for c in checkpoints))
    if metrics.history:
        table = Table("step", "loss", "lr", "grad norm", title="last 10 steps")
        for m in metrics.history[-10:]:
            table.add_row(str(m.step), _fmt(m.loss), _fmt(m.learning_rate), _fmt(m.grad_norm))
        console.print(table)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


@runs_app.command("delete")
def runs_delete(
    run_id: str,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Delete a run (its checkpoints stay until deleted)."""
    if not yes:
        typer.confirm(f"Delete run {run_id}?", abort=True)
    with _client(url, api_key) as client:
        client.delete_run(run_id)
    console.print(f"deleted run {run_id}")


# --- checkpoints -----------------------------------------------------------------------------------------


@checkpoints_app.command("list")
def checkpoints_list(run_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """A run's checkpoints."""
    with _client(url, api_key) as client:
        checkpoints = client.get_checkpoints(run_id)
    table = Table("name", "kind", "step", "size", "path")
    for c in checkpoints:
        table.add_row(c.name, c.kind, str(c.step), f"{c.size_bytes / 1e6:.1f} MB", c.adapter_path)
    console.print(table)


@checkpoints_app.command("delete")
def checkpoints_delete(run_id: str, name: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Delete a checkpoint and its files."""
    with _client(url, api_key) as client:
        client.delete_checkpoint(run_id, name)
    console.print(f"deleted checkpoint {name} of run {run_id}")


@checkpoints_app.command("export")
def checkpoints_export(
    run_id: str,
    name: str,
    out_dir: Path,
    merge: Annotated[
        bool, typer.Option(help="Merge into the base model: write a full Hugging Face model directory.")
    ] = False,
    base_model: Annotated[
        str | None, typer.Option(help="Base model to merge into (default: the run's).")
    ] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Copy a checkpoint out as a PEFT adapter directory, or (--merge) as a merged full model."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise _fail(f"{out_dir} exists and is not empty")
    with _client(url, api_key) as client:
        run = client.get_run(run_id)
        adapter_dir = client.download_checkpoint(run_id, name, out_dir if not merge else out_dir / ".adapter")
    if not merge:
        console.print(f"PEFT adapter written to {adapter_dir}")
        return
    from eztinker.engine.checkpoint import merge_into_base

    merge_into_base(adapter_dir, base_model or run.base_model, out_dir)
    import shutil

    shutil.rmtree(out_dir / ".adapter", ignore_errors=True)
    console.print(f"merged model written to {out_dir}")


# --- sampling --------------------------------------------------------------------------------------------


@app.command()
def sample(
    prompt: str,
    run_id: Annotated[str | None, typer.Option(help="Sample from this run (default: a base model).")] = None,
    base_model: Annotated[str | None, typer.Option(help="Base model (default: the server's first).")] = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    seed: int | None = None,
    n: Annotated[int, typer.Option("-n", help="Number of samples.")] = 1,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Sample continuations of PROMPT."""
    with _client(url, api_key) as client:
        out = client.generate(
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            n=n,
            run_id=run_id,
            base_model=base_model,
        )
    for i, s in enumerate(out.samples):
        if n > 1:
            console.rule(f"sample {i} ({s.stop_reason})")
        console.print(s.text, markup=False, highlight=False)


# --- a small SFT loop --------------------------------------------------------------------------------------


def read_sft_examples(path: Path, tokenizer: Any, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per JSONL line: `{"text"}`, `{"prompt", "completion"}` or `{"messages": [...]}`.

    Only completions and assistant turns are trained on; everything else is labelled -100.
    """
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc})") from exc
        if "messages" in record:
            ids, labels = _chat_ids(tokenizer, record["messages"])
        elif "prompt" in record and "completion" in record:
            prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
            completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                completion = [*completion, tokenizer.eos_token_id]
            ids, labels = prompt + completion, [-100] * len(prompt) + completion
        elif "text" in record:
            ids = tokenizer(record["text"])["input_ids"]
            labels = list(ids)
        else:
            raise ValueError(f"{path}:{number}: expected a 'text', 'prompt'+'completion' or 'messages' field")
        if len(ids) >= 2:
            examples.append((ids[:max_length], labels[:max_length]))
    if not examples:
        raise ValueError(f"{path}: no usable examples")
    return examples


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Tokenize a chat with its template; label the assistant turns only."""
    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(messages):
        rendered = tokenizer.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=False)
        rendered = list(rendered["input_ids"] if isinstance(rendered, dict) else rendered)
        new = rendered[len(ids) :]
        ids.extend(new)
        labels.extend(new if message.get("role") == "assistant" else [-100] * len(new))
    return ids, labels


@app.command("train-sft")
def train_sft(
    file: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, help="JSONL of texts, prompt/completion pairs or chats."),
    ],
    base_model: Annotated[str, typer.Option(help="Base model (hub id or a directory the server can read).")],
    tokenizer: Annotated[
        str | None, typer.Option(help="Tokenizer to use locally (default: the base model).")
    ] = None,
    rank: int = 8,
    learning_rate: float = 1e-4,
    epochs: int = 1,
    batch_size: int = 8,
    max_length: int = 1024,
    run_id: Annotated[str | None, typer.Option(help="Continue this run instead of creating one.")] = None,
    save: Annotated[str | None, typer.Option(help="Save a checkpoint with this name at the end.")] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Supervised fine-tuning over FILE through the client, with a progress bar showing the loss."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer or base_model)
    examples = read_sft_examples(file, tok, max_length)
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    with _client(url, api_key) as client:
        run_id = run_id or client.create_run(base_model, lora_config={"r": rank, "lora_alpha": 2 * rank})
        console.print(f"run {run_id}: {len(examples)} examples, {len(batches)} batches × {epochs} epochs")
        columns = (
            TextColumn("[bold]SFT"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("sft", total=len(batches) * epochs, loss="-")
            for _ in range(epochs):
                for batch in batches:
                    # Submit both ops before waiting: the server is never idle between them.
                    fb = client.forward_backward(
                        run_id, input_ids=[x for x, _ in batch], target_ids=[y for _, y in batch]
                    )
                    step = client.optim_step(run_id, learning_rate=learning_rate)
                    loss = fb.result()["loss"]
                    step.result()
                    progress.update(task, advance=1, loss=f"{loss:.4f}")
        if save:
            out = client.save_checkpoint(run_id, save)
            console.print(f"saved {save}: {out['adapter_path']}")
    console.print(f"done: run {run_id}")


def main() -> None:  # pragma: no cover - console entry point
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
