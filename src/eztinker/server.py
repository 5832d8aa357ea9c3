"""Running the server: in this process for notebooks and tests (`serve()`), or as `eztinker server`.

With `serve()`, losses registered with `register_loss_function` in your own process are available to
runs at once — the server shares your interpreter, so no code ever travels over the wire.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

import uvicorn

from eztinker.api.app import create_app
from eztinker.service import Service
from eztinker.settings import Settings

STARTUP_TIMEOUT_SECONDS = 120.0


@contextmanager
def serve(
    settings: Settings | None = None, *, service: Service | None = None, **overrides: Any
) -> Generator[str]:
    """Start an EZTinker server in a background thread; yield its URL; stop it on exit.

    ```python
    with eztinker.serve(data_dir=tmp, models=["./my-model"]) as url:
        with EZTinkerClient(base_url=url) as client:
            ...
    ```
    `overrides` are `Settings` fields; the port defaults to a free one. Or pass a `Service` you built
    (and keep a handle on, e.g. to inspect its scheduler in a test); it is started and stopped with the server.
    """
    if service is not None:
        if settings is not None or overrides:
            raise TypeError("serve() takes either a service or settings/overrides, not both")
        app, host, port = create_app(service=service), service.settings.host, 0
    else:
        base = (
            settings or Settings()
        ).model_dump()  # the environment fills in only when no settings are given
        settings = Settings.model_validate(
            {**base, "port": 0, **overrides}
        )  # validated: data_dir="x" -> Path
        app, host, port = create_app(settings), settings.host, settings.port
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="eztinker-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the EZTinker server failed to start; see the log above")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"the EZTinker server did not start within {STARTUP_TIMEOUT_SECONDS:.0f} s")
        time.sleep(0.01)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def run_server(settings: Settings, *, reload: bool = False) -> None:
    """Serve until interrupted (what `eztinker server` calls)."""
    if reload:
        # Reload needs an import string: the factory reads the same settings back from the environment.
        for key, value in settings.model_dump(exclude_none=True).items():
            os.environ[f"EZTINKER_{key.upper()}"] = ",".join(value) if isinstance(value, list) else str(value)
        uvicorn.run(
            "eztinker.api.app:create_app", factory=True, host=settings.host, port=settings.port, reload=True
        )
    else:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port)
