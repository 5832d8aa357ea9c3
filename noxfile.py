"""Developer tasks. Run `uv run nox` for the default set (lint, type-check, security, test), or one with `-s`.

Every session runs its tool through `uv run` in the project's locked environment (`python=False`: nox
creates no virtualenv of its own), so a session checks exactly what `uv sync` installed. Arguments after
`--` go to the tool, e.g. `uv run nox -s test -- -k sampler -x`.
"""

import nox

nox.options.sessions = ["lint", "type-check", "security", "test"]  # fmt, fix and docs are opt-in


def _uv_run(session: nox.Session, *args: str) -> None:
    session.run("uv", "run", *args, *session.posargs, external=True)


@nox.session(python=False)
def fmt(session: nox.Session) -> None:
    """Format the code and sort imports."""
    session.run("uv", "run", "ruff", "format", external=True)
    session.run("uv", "run", "ruff", "check", "--select", "I", "--fix", external=True)


@nox.session(python=False)
def fix(session: nox.Session) -> None:
    """Apply ruff's safe fixes, then format."""
    session.run("uv", "run", "ruff", "check", "--fix", external=True)
    session.run("uv", "run", "ruff", "format", external=True)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    """Lint and check formatting without changing files."""
    session.run("uv", "run", "ruff", "check", external=True)
    session.run("uv", "run", "ruff", "format", "--check", external=True)


@nox.session(name="type-check", python=False)
def type_check(session: nox.Session) -> None:
    """Type-check the package with ty."""
    _uv_run(session, "ty", "check", "src")


@nox.session(python=False)
def security(session: nox.Session) -> None:
    """Static security scan of the package with bandit (config and skips: `[tool.bandit]` in pyproject.toml).

    Bandit rather than Semgrep: Semgrep downloads its rules at run time and CI has no network.
    """
    _uv_run(session, "bandit", "-q", "-c", "pyproject.toml", "-r", "src")


@nox.session(python=False)
def test(session: nox.Session) -> None:
    """Run the whole test suite, slow real-model tests included."""
    _uv_run(session, "pytest", "tests/")


@nox.session(name="test-fast", python=False)
def test_fast(session: nox.Session) -> None:
    """Run the tests not marked slow."""
    _uv_run(session, "pytest", "-m", "not slow", "tests/")


@nox.session(python=False)
def docs(session: nox.Session) -> None:
    """Build the API reference as HTML into documents/."""
    _uv_run(session, "pdoc", "eztinker", "--docformat", "markdown", "-o", "documents/")
