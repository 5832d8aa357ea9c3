"""The engine imports no web stack or database, and the package's names load only when used."""

import subprocess
import sys
import textwrap

WEB_AND_DB = ("fastapi", "starlette", "uvicorn", "httpx", "sqlalchemy")


def _loaded_after(statement: str, modules: tuple[str, ...]) -> list[str]:
    """The `modules` in `sys.modules` after running `statement` in a fresh interpreter."""
    code = textwrap.dedent(
        f"""
        import sys
        {statement}
        print(",".join(m for m in {modules!r} if m in sys.modules))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    return [m for m in out.stdout.strip().split(",") if m]


def test_the_engine_imports_without_the_web_stack_or_a_database() -> None:
    assert _loaded_after("import eztinker.engine", WEB_AND_DB) == []


def test_the_engine_imports_without_the_constrained_decoding_library() -> None:
    # bench/gpu_check.py runs the engine on a bare GPU machine: llguidance loads with the first grammar.
    assert _loaded_after("import eztinker.engine", ("llguidance",)) == []


def test_the_backend_protocol_imports_without_the_web_stack() -> None:
    assert _loaded_after("import eztinker.backend", ("fastapi", "starlette", "uvicorn", "httpx")) == []


def test_the_clients_still_import_from_the_package_root() -> None:
    assert _loaded_after("from eztinker import EZTinkerClient, AsyncEZTinkerClient", ("httpx",)) == ["httpx"]
    assert _loaded_after("import eztinker", ("httpx", "torch")) == []
