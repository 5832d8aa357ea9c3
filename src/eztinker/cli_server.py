"""`eztinker server`: its flags are `Settings`' fields (defaults, types and help come from there, and
Settings reads the EZTINKER_* environment): `--max-queue`, `--token-budget`, ...

A user's mistake found here (an unknown plugin, a port in use, `--workers abc`) is raised as a ValueError,
which the CLI's group (`eztinker.cli`) prints as one `error:` line with exit code 1, before anything starts.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import socket
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console

from eztinker.settings import Settings

console = Console()

# A few flags read better under another name than their field's.
_FLAG_NAMES = {"models": "--model", "api_keys": "--api-key", "plugins": "--plugin"}
_NOT_FLAGS = ("worker_pool",)  # set by `--workers ray`
_METAVARS: dict[Any, str] = {int: "INTEGER", float: "FLOAT", Path: "PATH"}
_WORKERS_HELP = "Worker threads in this process (a number), or `ray`: model workers as Ray actors."


def _cli_type(annotation: Any) -> Any:
    """The type Typer parses a `Settings` field's flag as (Settings validates the value itself)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _cli_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _cli_type(args[0]) if len(args) == 1 else str
    if origin is Literal:
        return str
    if origin is list:
        return list[str]
    return annotation


def _server_flags() -> list[inspect.Parameter]:
    params = []
    for name, field in Settings.model_fields.items():
        if name in _NOT_FLAGS:
            continue
        default = field.get_default(call_default_factory=True)
        shown: str | bool = False if default in (None, []) else str(default)
        if name == "workers":
            option = typer.Option(
                None, "--workers", envvar="EZTINKER_WORKERS", help=_WORKERS_HELP, show_default=shown
            )
            params.append(
                inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=str | None)
            )
            continue
        kind = _cli_type(field.annotation)
        repeat = " Repeatable." if kind == list[str] else ""
        option = typer.Option(
            None,
            _FLAG_NAMES.get(name, "--" + name.replace("_", "-")),
            help=f"{field.description}{repeat} Or EZTINKER_{name.upper()}.",
            show_default=shown,
            metavar=_METAVARS.get(kind, "TEXT"),
        )
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind | None)
        )
    reload = typer.Option(False, "--reload", help="Restart on code changes (development).")
    params.append(
        inspect.Parameter("reload", inspect.Parameter.KEYWORD_ONLY, default=reload, annotation=bool)
    )
    return params


def server(**flags: Any) -> None:
    """Start the EZTinker server (SQLite and an in-process worker by default; models load on first use)."""
    from eztinker.server import run_server

    reload = flags.pop("reload")
    workers = flags.pop("workers")
    if workers == "ray":
        flags["worker_pool"] = "ray"
    elif workers is not None:
        flags["workers"] = _worker_threads(workers)
    # Flags given win; Settings reads the rest (EZTINKER_MODELS="a,b", EZTINKER_API_KEYS, ...) from the env.
    settings = Settings(**{name: value for name, value in flags.items() if value is not None and value != []})
    _check_plugins(settings.plugins)
    _check_port_free(settings.host, settings.port)
    console.print(f"EZTinker on http://{settings.host}:{settings.port}  (docs: /docs, health: /health)")
    run_server(settings, reload=reload)


_signature = inspect.Signature(_server_flags())
server.__signature__ = _signature  # ty: ignore[missing-attribute]  (Typer reads the flags from it)
server.__annotations__ = {p.name: p.annotation for p in _signature.parameters.values()}


def _worker_threads(value: str) -> int:
    if not value.isdigit():
        raise ValueError(f"--workers {value!r}: give a number of worker threads, or `ray`")
    return int(value)


def _check_port_free(host: str, port: int) -> None:
    """A taken port fails now, saying what to do (uvicorn finds out only after the whole startup)."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError:
        return  # an unresolvable host: uvicorn's own error says so
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as exc:
            message = f"cannot listen on {host}:{port} ({exc.strerror}): is another server running there?"
            raise ValueError(f"{message} Stop it, or choose another port with --port") from None


def _check_plugins(modules: list[str]) -> None:
    """Make `--plugin my_losses` find ./my_losses.py (as `python -m` would), and fail early if it is nowhere."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a console script's sys.path starts at its bin/ directory
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            raise ValueError(f"plugin {module!r}: no such module in {os.getcwd()} or the installed packages")
