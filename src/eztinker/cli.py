"""The `eztinker` command: start a server, or talk to one (`--url`, default http://localhost:8000).

eztinker server --model ./my-model            start the server
eztinker runs list | show RUN | delete RUN    training runs
eztinker runs import DIR --base-model M       a PEFT adapter directory as a new run
eztinker checkpoints list RUN | delete RUN NAME | export RUN NAME DIR [--merge]
eztinker sample "Hello" [--run-id RUN]        sample text
eztinker train-sft data.jsonl --base-model M  a small SFT loop through the client

A user's mistake (a missing file, a malformed line, an unknown run, no server at `--url`) prints one
`error: ...` line to stderr and exits with code 1; only a bug shows a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column, Table
from typer.core import TyperGroup

from eztinker.cli_server import server
from eztinker.dataset.sft_jsonl import Example, encode_sft_records, read_sft_records

if TYPE_CHECKING:
    from eztinker.client import EZTinkerClient

console = Console()
err_console = Console(stderr=True)


# --- errors: one line, exit code 1 -----------------------------------------------------------------------


def _print_error(message: str) -> None:
    message = " ".join(message.split())  # one line, whatever the exception's text looks like
    err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)


def _fail(message: str) -> typer.Exit:
    """`raise _fail("...")`: report a user's mistake found by the CLI itself."""
    _print_error(message)
    return typer.Exit(code=1)


def _user_error_message(exc: Exception) -> str | None:
    """The message for an error the user can fix, or None for a bug (which keeps its traceback)."""
    import pydantic

    from eztinker.exceptions import EZTinkerError

    engine_errors = sys.modules.get("eztinker.engine.errors")  # imported only if the engine ran here
    if isinstance(exc, pydantic.ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, EZTinkerError | OSError | ValueError):
        return str(exc)  # the client's errors carry the server's status and message
    if engine_errors is not None and isinstance(exc, engine_errors.EngineError):
        return str(exc)
    return None


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not fail on the closed pipe again."""
    with contextlib.suppress(OSError, ValueError):  # (a test runner's stdout has no file descriptor)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class _FriendlyErrors(TyperGroup):
    """Every command runs inside `invoke`: user errors become one `error:` line and exit code 1."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # the reader of our output has gone (`eztinker runs list | head`)
            _silence_stdout()
            raise typer.Exit(code=1) from None
        except Exception as exc:
            message = _user_error_message(exc)
            if message is None:
                raise
            raise _fail(message) from None


app = typer.Typer(
    cls=_FriendlyErrors,
    help="EZTinker: a self-hosted Tinker.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
runs_app = typer.Typer(help="List, show, import and delete training runs.", no_args_is_help=True)
checkpoints_app = typer.Typer(help="List, delete and export checkpoints.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
app.add_typer(checkpoints_app, name="checkpoints")

Url = Annotated[str, typer.Option("--url", envvar="EZTINKER_URL", help="The server's base URL.")]
ApiKey = Annotated[
    str | None, typer.Option("--api-key", envvar="EZTINKER_API_KEY", help="API key, if the server needs one.")
]
DEFAULT_URL = "http://localhost:8000"


def _client(url: str, api_key: str | None) -> EZTinkerClient:
    from eztinker.client import EZTinkerClient

    return EZTinkerClient(base_url=url, api_key=api_key)


app.command()(server)  # `eztinker server`: its flags are `Settings`' fields (eztinker.cli_server)


# --- runs ------------------------------------------------------------------------------------------------


@runs_app.command("list")
def runs_list(url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """All runs you can see."""
    with _client(url, api_key) as client:
        runs = client.get_runs()
    table = Table(
        Column("run id", no_wrap=True),
        Column("base model", overflow="fold"),
        "rank",
        Column("loss", no_wrap=True),
        "step",
        "last loss",
        "status",
    )
    for run in runs:
        table.add_row(
            run.run_id,
            run.base_model,
            str(run.lora_config.r),
            run.loss_config.loss_type,
            str(run.step),
            _fmt(run.last_loss),
            run.status,
        )
    console.print(table)


@runs_app.command("show")
def runs_show(run_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """One run: its config, its checkpoints and its last 10 steps of loss history."""
    with _client(url, api_key) as client:
        run = client.get_run(run_id)
        checkpoints = client.get_checkpoints(run_id)
        metrics = client.get_metrics(run_id)
    console.print_json(run.model_dump_json())
    names = ", ".join(f"{c.name} (step {c.step}, {c.kind})" for c in checkpoints)
    console.print(f"checkpoints: {escape(names) or '-'}", soft_wrap=True, highlight=False)
    if metrics.history:
        table = Table("step", "loss", "lr", "grad norm", title="last 10 steps")
        for m in metrics.history[-10:]:
            table.add_row(str(m.step), _fmt(m.loss), _fmt(m.learning_rate), _fmt(m.grad_norm))
        console.print(table)


@app.command()
def queue(url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """The job queue: what runs now, what waits (in start order) and when it should start."""
    with _client(url, api_key) as client:
        view = client.get_queue()
    now = time.time()
    table = Table(
        "position", Column("job", no_wrap=True), "op", Column("run", no_wrap=True), "tokens", "starts in"
    )
    for job in view.jobs:
        position = "running" if job.position is None else str(job.position)
        starts = "-" if job.estimated_start is None else f"{max(0.0, job.estimated_start - now):.1f} s"
        table.add_row(position, job.job_id, job.op, job.run_id or "-", str(job.tokens), starts)
    console.print(table)
    console.print(
        f"{view.queue_depth} queued, {view.running} running · {view.jobs_per_pass:.2f} jobs per pass · "
        f"utilisation {view.utilisation:.0%} · {view.tokens_per_second:.0f} training tokens/s",
        highlight=False,
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def adapter_archive(adapter_dir: Path) -> bytes:
    """The adapter files of a PEFT directory as an uncompressed tar (what `POST /v1/runs/import` takes)."""
    import io
    import tarfile

    if not adapter_dir.is_dir():
        raise _fail(f"{adapter_dir} is not a directory")
    files = [adapter_dir / name for name in ADAPTER_FILES if (adapter_dir / name).is_file()]
    if not any(f.name == "adapter_config.json" for f in files) or len(files) < 2:
        raise _fail(f"{adapter_dir} is not a PEFT adapter directory (adapter_config.json + adapter_model.*)")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for file in files:
            tar.add(file, arcname=file.name)
    return buffer.getvalue()


@runs_app.command("import")
def runs_import(
    adapter_dir: Path,
    base_model: Annotated[str, typer.Option(help="The base model the adapter was trained on (as served).")],
    rank: Annotated[int | None, typer.Option(help="Refuse unless the adapter has this rank.")] = None,
    target_module: Annotated[
        list[str] | None, typer.Option(help="Refuse unless the adapter adapts exactly these (repeat it).")
    ] = None,
    run_id: Annotated[str | None, typer.Option(help="The new run's id (default: a fresh one).")] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Import a PEFT LoRA adapter directory as a new run that keeps training (uploaded as a tar)."""
    from eztinker.client_core import _read
    from eztinker.models.api import Run

    archive = adapter_archive(adapter_dir)
    params: dict[str, Any] = {"base_model": base_model}
    if rank is not None:
        params["lora_rank"] = rank
    if target_module:
        params["target_modules"] = target_module
    if run_id is not None:
        params["run_id"] = run_id
    with _client(url, api_key) as client:
        response = client._http.post(
            "/v1/runs/import",
            content=archive,
            params=params,
            headers={"Content-Type": "application/x-tar"},
            timeout=600.0,  # the server loads the base model on first use
        )
        run = Run.model_validate(_read(response))
    console.print(
        f"imported {escape(str(adapter_dir))} as run {escape(run.run_id)} "
        f"(rank {run.lora_config.r}, base {escape(run.base_model)})",
        soft_wrap=True,
        highlight=False,
    )


@runs_app.command("delete")
def runs_delete(
    run_id: str,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Delete a run with its checkpoints (copies made of them with copy_weights stay)."""
    if not yes:
        typer.confirm(f"Delete run {run_id}?", abort=True)
    with _client(url, api_key) as client:
        client.delete_run(run_id)
    console.print(f"deleted run {escape(run_id)}")


# --- checkpoints -----------------------------------------------------------------------------------------


@checkpoints_app.command("list")
def checkpoints_list(run_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """A run's checkpoints."""
    with _client(url, api_key) as client:
        checkpoints = client.get_checkpoints(run_id)
    table = Table(Column("name", no_wrap=True), "kind", "step", "size", Column("path", overflow="fold"))
    for c in checkpoints:
        table.add_row(c.name, c.kind, str(c.step), f"{c.size_bytes / 1e6:.1f} MB", c.adapter_path)
    console.print(table)


@checkpoints_app.command("delete")
def checkpoints_delete(run_id: str, name: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Delete a checkpoint and its files."""
    with _client(url, api_key) as client:
        client.delete_checkpoint(run_id, name)
    console.print(f"deleted checkpoint {escape(name)} of run {escape(run_id)}")


@checkpoints_app.command("export")
def checkpoints_export(
    run_id: str,
    name: str,
    out_dir: Path,
    merge: Annotated[
        bool, typer.Option(help="Merge into the base model: write a full Hugging Face model directory.")
    ] = False,
    base_model: Annotated[
        str | None, typer.Option(help="Base model to merge into, readable here (default: the run's).")
    ] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Copy a checkpoint out as a PEFT adapter directory, or (--merge) as a merged full model."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise _fail(f"{out_dir} exists and is not empty")
    with _client(url, api_key) as client:
        if not merge:
            client.download_checkpoint(run_id, name, out_dir)
            console.print(f"PEFT adapter written to {escape(str(out_dir))}")
            return
        base_model = base_model or client.get_run(run_id).base_model
        _check_local(base_model, "the merge reads the base model here: give --base-model with a local copy")
        with tempfile.TemporaryDirectory(prefix="eztinker-export-") as tmp:
            adapter_dir = client.download_checkpoint(run_id, name, Path(tmp) / "adapter")
            from eztinker.engine.checkpoint import merge_into_base

            merge_into_base(adapter_dir, base_model, out_dir)
    console.print(f"merged model written to {escape(str(out_dir))}")


def _check_local(model: str, hint: str) -> None:
    """A model named by a path must exist on this machine (a hub id is transformers' to look up)."""
    if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().exists():
        raise _fail(f"{model}: no such file or directory on this machine; {hint}")


def _local_tokenizer(name: str) -> Any:
    """The tokenizer train-sft encodes with, loaded here; one that cannot be is a user's error."""
    from transformers import AutoTokenizer

    hint = "the tokenizer is loaded on this machine: give --tokenizer with a local copy of it"
    _check_local(name, hint)
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:  # not on the hub or in its cache, offline, or not a tokenizer
        raise _fail(f"cannot load the tokenizer {name!r}: {exc}; {hint}") from None


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
    seed: Annotated[int | None, typer.Option(help="Same seed, same samples.")] = None,
    n: Annotated[int, typer.Option("-n", help="Number of samples.")] = 1,
    chat: Annotated[
        bool, typer.Option("--chat", help="Send PROMPT as a user turn through the model's chat template.")
    ] = False,
    system: Annotated[str | None, typer.Option(help="With --chat: a system turn before PROMPT.")] = None,
    json_schema: Annotated[
        str | None,
        typer.Option(help="Constrain the text to JSON matching this schema (its JSON, or @file.json)."),
    ] = None,
    regex: Annotated[str | None, typer.Option(help="Constrain the text to match this regex.")] = None,
    choice: Annotated[
        list[str] | None, typer.Option(help="Constrain the text to one of these (repeat the option).")
    ] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Sample continuations of PROMPT (or, with --chat, the assistant's reply to it), free or
    constrained (--json-schema, --regex or --choice)."""
    if system is not None and not chat:
        raise typer.BadParameter("--system needs --chat", param_hint="--system")
    schema = _json_option(json_schema, "--json-schema") if json_schema is not None else None
    turns = [{"role": "system", "content": system}] if system is not None else []
    with _client(url, api_key) as client:
        out = client.generate(
            [*turns, {"role": "user", "content": prompt}] if chat else prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            n=n,
            run_id=run_id,
            base_model=base_model,
            json_schema=schema,
            regex=regex,
            choice=choice or None,
        )
    for i, s in enumerate(out.samples):
        if n > 1:
            console.rule(f"sample {i} ({s.stop_reason})")
        typer.echo(s.text)  # verbatim: no markup, emoji codes or wrapping
        if not s.text and s.stop_reason == "stop" and not chat:
            typer.echo("(the model stopped at once; a chat model may answer PROMPT with --chat)", err=True)


def _json_option(value: str, name: str) -> dict:
    """A JSON object given inline or as @path."""
    text = value
    if value.startswith("@"):
        try:
            text = Path(value[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {value[1:]}: {exc.strerror}", param_hint=name) from None
    try:
        parsed = json.loads(text)
    except ValueError as exc:
        raise typer.BadParameter(f"is not JSON: {exc}", param_hint=name) from None
    if not isinstance(parsed, dict):
        raise typer.BadParameter("must be a JSON object (a schema)", param_hint=name)
    return parsed


# --- a small SFT loop --------------------------------------------------------------------------------------


@app.command("train-sft")
def train_sft(
    file: Annotated[Path, typer.Argument(help="JSONL of texts, prompt/completion pairs or chats.")],
    base_model: Annotated[
        str | None,
        typer.Option(help="Base model of a new run (hub id or a directory the server can read)."),
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="Tokenizer to use here (default: the base model's).")
    ] = None,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank of a new run (alpha: twice the rank).")] = 8,
    learning_rate: float = 1e-4,
    epochs: Annotated[int, typer.Option(min=1)] = 1,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    max_length: Annotated[int, typer.Option(min=2, help="Cut longer sequences to this many tokens.")] = 1024,
    run_id: Annotated[
        str | None, typer.Option(help="Continue this run (and its base model) instead of creating one.")
    ] = None,
    save: Annotated[str | None, typer.Option(help="Save a checkpoint with this name at the end.")] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Supervised fine-tuning over FILE through the client, with a progress bar showing the loss."""
    if save is not None:  # a name the server would refuse fails now, not after the whole loop has run
        from eztinker.client_core import _dump
        from eztinker.models.api import SaveRequest

        _dump(SaveRequest, name=save)
    records = read_sft_records(file)  # a bad file fails here, before anything loads
    with _client(url, api_key) as client:
        if run_id is not None:  # a run trains on its own base, so its tokenizer is that base's
            run_base = client.get_run(run_id).base_model
            if base_model is not None and base_model != run_base:
                message = f"--base-model {base_model!r}, but run {run_id} is on {run_base!r}"
                raise _fail(f"{message}: leave --base-model out to continue the run")
            base_model = run_base
        elif base_model is None:
            raise _fail("give --base-model to start a run, or --run-id to continue one")
        tok = _local_tokenizer(tokenizer or base_model)
        examples = encode_sft_records(file, records, tok, max_length)
        if len(examples) < len(records):
            console.print(f"left out {len(records) - len(examples)} examples with nothing to train on")
        batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
        run_id = run_id or client.create_run(base_model, lora_config={"r": rank, "lora_alpha": 2 * rank})
        console.print(f"run {run_id}: {len(examples)} examples, {len(batches)} batches × {epochs} epochs")
        _sft_loop(client, run_id, batches, epochs, learning_rate)
        if save:
            out = client.save_checkpoint(run_id, save)
            console.print(f"saved {escape(save)}: {escape(out['adapter_path'])}", soft_wrap=True)
    console.print(f"done: run {run_id}")


def _sft_loop(
    client: EZTinkerClient, run_id: str, batches: list[list[Example]], epochs: int, learning_rate: float
) -> None:
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


def main() -> None:  # pragma: no cover - console entry point
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
