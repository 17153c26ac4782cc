"""The ASGI application: ``uvicorn src.main:app``."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from src import __version__
from src.api.dependencies import API_V1
from src.api.docs import install_docs
from src.api.errors import install_error_handlers
from src.api.middleware import (
    Load,
    OverloadMiddleware,
    RequestGuardMiddleware,
    RequestIdMiddleware,
    SecurityHeadersMiddleware,
)
from src.api.router import api_routers
from src.api.routes import oauth, well_known
from src.api.routes.metrics import install_metrics
from src.config.events import lifespan
from src.config.logging import configure_logging
from src.config.settings import Settings, load_settings
from src.dev.mail_page import install_dev_mail
from src.services.connections import Connections
from src.services.metrics import http_metrics
from src.web.install import install_pages


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build an app; tests pass their own settings, production reads the environment."""
    settings = settings or load_settings()
    configure_logging(
        settings.LOG_LEVEL,
        settings.LOG_REPEAT_INTERVAL_SECONDS,
        settings.LOG_FORMAT,
        production=settings.is_production,
    )
    app = FastAPI(
        title=settings.PROJECT_NAME,
        version=__version__,
        lifespan=lifespan,
        openapi_url=f"{API_V1}/openapi.json",
        # Served by install_docs from vendored assets, under a strict CSP (no CDN, no inline JS).
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.connections = Connections()
    install_error_handlers(app)
    # The last added runs first: security headers wrap everything, even a refused request; the
    # overload cap comes after the request guard, so a request counts once its body is in (a
    # client dribbling bodies holds its own connections, not everyone's places).
    app.state.load = Load()
    # Requests are counted where they are already timed and routed; None when METRICS=off.
    recorder = http_metrics(settings)
    app.add_middleware(
        OverloadMiddleware,
        limit=settings.MAX_REQUESTS_IN_FLIGHT,
        load=app.state.load,
        exempt_prefix=f"{API_V1}/health",
        log_interval=settings.LOG_REPEAT_INTERVAL_SECONDS,
        metrics=recorder,
    )
    app.add_middleware(
        RequestGuardMiddleware,
        max_body_bytes=settings.MAX_REQUEST_BODY_BYTES,
        max_header_bytes=settings.MAX_REQUEST_HEADER_BYTES,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "If-Match"],
            expose_headers=["ETag", "Location", "Retry-After"],
            max_age=600,
        )
    hsts = settings.PUBLIC_BASE_URL.lower().startswith("https://")
    app.add_middleware(SecurityHeadersMiddleware, hsts=hsts)
    # Outermost of all: every answer, refused or not, carries its request id, and is timed whole.
    app.add_middleware(
        RequestIdMiddleware,
        quiet_paths=(f"{API_V1}/health/live", f"{API_V1}/health/ready", "/metrics"),
        metrics=recorder,
    )
    for router in api_routers:
        app.include_router(router, prefix=API_V1)
    app.include_router(well_known.router)
    app.include_router(oauth.discovery)
    app.include_router(oauth.router)
    install_pages(app)
    install_docs(app)
    install_metrics(app, settings)
    # /dev/mail, the development mail catcher's inbox: only in development (src/dev).
    install_dev_mail(app, settings)
    return app


app = create_app()
