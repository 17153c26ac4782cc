"""Mount the hosted pages and their stylesheet on the app."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from src.web import oauth_pages, pages

STATIC = Path(__file__).resolve().parent / "static"


def install_pages(app: FastAPI) -> None:
    app.include_router(oauth_pages.router)
    app.include_router(pages.router)
    app.mount("/assets", StaticFiles(directory=STATIC), name="assets")
