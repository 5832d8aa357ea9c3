"""Tinker's ids and checkpoint paths (`eztinker.api.tinker_wire`): model and sampling-session ids,
`tinker://<run>/<kind>/<name>` paths, and the native checkpoint names and REST ids behind them.
"""

from __future__ import annotations

import re

from eztinker.engine.errors import InvalidInputError

_CHECKPOINT_KINDS = ("weights", "sampler_weights", "external_weights")
_TINKER_PATH = re.compile(r"^tinker://([^/]+)/([^/]+)/([^/]+)$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def model_id(session_id: str, model_seq_id: int) -> str:
    """The SDK's own format for a training model's id (it derives it client-side for create-via-load)."""
    return f"{session_id}:train:{model_seq_id}"


def sampling_session_id(session_id: str, seq_id: int) -> str:
    return f"{session_id}:sample:{seq_id}"


def check_name(name: str) -> str:
    if not _SAFE_NAME.match(name):
        raise InvalidInputError("path", f"checkpoint name {name!r} must match {_SAFE_NAME.pattern}")
    return name


def native_checkpoint_name(kind: str, name: str) -> str:
    """The native checkpoint name of `tinker://<run>/<kind>/<name>`: weights keep their name."""
    return name if kind == "weights" else f"{kind}.{name}"


def parse_tinker_path(path: str) -> tuple[str, str, str]:
    """(run id, native checkpoint name, kind) of `tinker://<run>/<weights|sampler_weights|external_weights>/<name>`."""
    match = _TINKER_PATH.match(path)
    if match is None or match.group(2) not in _CHECKPOINT_KINDS:
        raise InvalidInputError(
            "path", f"{path!r} is not tinker://<run>/<{'|'.join(_CHECKPOINT_KINDS)}>/<name>"
        )
    run_id, kind, name = match.groups()
    return run_id, native_checkpoint_name(kind, name), kind


# --- checkpoint ids -----------------------------------------------------------------------------------

_KIND_PREFIXES = ("sampler_weights.", "external_weights.")


def checkpoint_id(native_name: str) -> str:
    """The REST `checkpoint_id` (`<kind>/<name>`) of a native checkpoint name."""
    for prefix in _KIND_PREFIXES:
        if native_name.startswith(prefix):
            return f"{prefix[:-1]}/{native_name.removeprefix(prefix)}"
    return f"weights/{native_name}"


def tinker_path_of(run_id: str, native_name: str) -> str:
    """`tinker://<run>/<kind>/<name>` of a native checkpoint."""
    return f"tinker://{run_id}/{checkpoint_id(native_name)}"
