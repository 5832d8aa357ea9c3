"""`create_app(settings)`: the FastAPI application with its service started in the lifespan."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Response

from eztinker import __version__
from eztinker.api import anthropic, dashboard, native, openai, responses, tinker, tinker_futures, tinker_rest
from eztinker.api.deps import ServiceDep, get_owner, text_is_unicode
from eztinker.api.errors import install_error_handlers
from eztinker.api.limits import BodySizeLimit
from eztinker.models.api import Health
from eztinker.service import Service
from eztinker.settings import Settings
from eztinker.telemetry import CONTENT_TYPE


def create_app(settings: Settings | None = None, *, service: Service | None = None) -> FastAPI:
    """The app for `settings` (default: from the environment). The service starts with the app."""
    service = service or Service(settings or Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncGenerator[None]:
        service.start()
        try:
            yield
        finally:
            service.stop()
            tinker_futures.close(app.state)

    app = FastAPI(
        dependencies=[Depends(text_is_unicode)],
        title="EZTinker",
        version=__version__,
        description="A self-hosted Tinker: LoRA training and sampling over HTTP. Every op returns a job.",
        lifespan=lifespan,
    )
    app.state.service = service
    tinker_rest.forget_deleted_checkpoints(service)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=service.settings.max_body_bytes)
    app.include_router(native.router, dependencies=[Depends(get_owner)])
    app.include_router(tinker.router)
    for prefix in openai.PREFIXES:  # one implementation, at EZTinker's path and hosted Tinker's
        app.include_router(openai.router, prefix=prefix)
        app.include_router(responses.router, prefix=prefix)
    for prefix in anthropic.PREFIXES:
        app.include_router(anthropic.router, prefix=prefix)
    app.include_router(dashboard.router)
    app.mount(dashboard.STATIC_PATH, dashboard.static_files(), name="dashboard-static")

    @app.get("/health", tags=["server"])
    def health(service: ServiceDep) -> Health:
        """Liveness and what is loaded; needs no API key."""
        return service.views.health()

    @app.get("/metrics", tags=["server"], dependencies=[Depends(get_owner)])
    def metrics(service: ServiceDep) -> Response:
        """Prometheus metrics: ops, latency, tokens, queue depth."""
        return Response(service.telemetry.render(), media_type=CONTENT_TYPE)

    return app
