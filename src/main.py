"""The ASGI application: ``uvicorn src.main:app``."""

from __future__ import annotations

from fastapi import FastAPI

from src import __version__
from src.api.dependencies import API_V1
from src.api.errors import install_error_handlers
from src.api.middleware import BodySizeLimitMiddleware
from src.api.router import api_router
from src.api.routes import well_known
from src.config.events import lifespan
from src.config.logging import configure_logging
from src.config.settings import Settings, load_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build an app; tests pass their own settings, production reads the environment."""
    settings = settings or load_settings()
    configure_logging(settings.LOG_LEVEL)
    app = FastAPI(
        title=settings.PROJECT_NAME,
        version=__version__,
        lifespan=lifespan,
        openapi_url=f"{API_V1}/openapi.json",
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.MAX_REQUEST_BODY_BYTES)
    app.include_router(api_router, prefix=API_V1)
    app.include_router(well_known.router)
    return app


app = create_app()
