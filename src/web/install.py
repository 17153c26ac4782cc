"""Mount the hosted pages and their stylesheet on the app."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from src.api.docs import FingerprintedAssets
from src.web.admin.routes import admin_routers
from src.web.oauth_pages import router as oauth_router
from src.web.pages import router as account_router
from src.web.passkey_pages import router as passkey_router
from src.web.security_pages import router as security_router

STATIC = Path(__file__).resolve().parent / "static"


def install_pages(app: FastAPI) -> None:
    app.include_router(oauth_router)
    app.include_router(account_router)
    app.include_router(passkey_router)
    app.include_router(security_router)
    # The admin console (/admin): pages, not API, so not in the OpenAPI schema.
    for router in admin_routers:
        app.include_router(router)
    # The pages name each asset with a hash of its content: browsers may keep them for a year.
    app.mount("/assets", FingerprintedAssets(directory=STATIC), name="assets")
