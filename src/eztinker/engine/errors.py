"""The engine's exceptions, one tree.

```
EngineError                      every error the engine raises on purpose
├── InvalidInputError            bad data or arguments: rejected before any compute (category "user")
│   └── UnknownLossError         a loss name no registry knows
├── NotFoundError                no such run, sampler, base model or checkpoint (category "user")
├── ConflictError                a name already taken (category "user")
├── NonFiniteError               the op produced NaN/inf; the run was rolled back (category "user")
├── CancelledRequestError        the caller cancelled the request (a sample) before it finished
└── ComputeError                 the op failed inside compute (OOM, a custom loss raised); rolled back
```

A facade maps each class to its own status code once (`eztinker.api.errors`); nothing below the facade
knows about HTTP. Every class pickles with its fields, so an error raised on a Ray worker is raised again
as itself on the API server.
"""

from __future__ import annotations

from typing import Literal


class EngineError(Exception):
    """Root of every error the engine raises on purpose.

    `category` says whose fault it is, as Tinker's futures report it: "user" (fix the request) or
    "server" (retry or report a bug).
    """

    category: Literal["user", "server"] = "user"


class InvalidInputError(EngineError, ValueError):
    """The request is malformed. `field` names the offending input, e.g. `data[3].weights`."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self) -> tuple[type[InvalidInputError], tuple[str, str]]:
        return type(self), (self.field, self.message)  # pickles whole: it crosses to Ray workers and back


class UnknownLossError(InvalidInputError):
    """A loss name that neither loss family knows."""


class NotFoundError(EngineError, KeyError):
    """No such run, sampler, base model or checkpoint."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class ConflictError(EngineError):
    """The name is already taken (a run id, a checkpoint name)."""


class NonFiniteError(EngineError, ArithmeticError):
    """The loss or a gradient came out NaN or infinite; nothing about the run changed."""


class CancelledRequestError(EngineError):
    """The caller cancelled the request before it finished (Tinker's `cancel_future` of a sample)."""


class ComputeError(EngineError, RuntimeError):
    """The op failed during compute (out of memory, an exception inside a loss); nothing changed."""

    category: Literal["user", "server"] = "server"
