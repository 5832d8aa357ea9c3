"""Fuzzing the HTTP API from its own OpenAPI schema: whatever a client sends, no 5xx and JSON errors.

schemathesis generates requests for every native (`/v1/...`) and OpenAI route from the schema the app
publishes, valid and invalid alike, against a running service with a tiny model loaded. Each example must
be answered below 500, and every 4xx must be a JSON body that says what was wrong.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from eztinker.api import create_app  # noqa: E402
from eztinker.service import Service  # noqa: E402
from eztinker.settings import Settings  # noqa: E402
from eztinker.testing import make_tiny_model, make_tiny_tokenizer  # noqa: E402

# The schema is read when the module is collected, so the app (and its tiny model) exist at import.
_workdir = Path(tempfile.mkdtemp(prefix="eztinker-fuzz-"))
atexit.register(shutil.rmtree, _workdir, ignore_errors=True)
_model = make_tiny_model(
    _workdir / "model", "qwen2", tokenizer_dir=make_tiny_tokenizer(_workdir / "tokenizer")
)
_service = Service(Settings(data_dir=_workdir / "data", models=[str(_model)], max_body_bytes=1 << 20))
_app = create_app(service=_service)


async def app(scope, receive, send) -> None:
    """The app with its lifespan left to the fixture below: schemathesis would run it once per route,
    and a service starts once."""
    if scope["type"] != "lifespan":
        await _app(scope, receive, send)
        return
    while True:
        message = await receive()
        await send({"type": f"{message['type']}.complete"})
        if message["type"] == "lifespan.shutdown":
            return


schema = schemathesis.openapi.from_asgi("/openapi.json", app)
EXAMPLES = int(os.environ.get("EZTINKER_FUZZ_EXAMPLES", "12"))


@pytest.fixture(scope="module", autouse=True)
def running_service():
    """The service, started once, with a live run so requests can reach `/v1/runs/{run_id}/...` ops."""
    _service.start()
    _service.backend.engine.create_run(str(_model), {"r": 2}, run_id="fuzz-run")
    yield
    _service.stop()


@schema.include(path_regex="^/v1/").parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_makes_the_server_fail(case) -> None:
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text[:500]}"
    if response.status_code >= 400:
        body = response.json()
        message = body.get("error")
        if isinstance(message, dict):  # the OpenAI routes answer in OpenAI's error shape
            message = message.get("message")
        assert message, f"a {response.status_code} without a message: {response.text[:300]}"
