"""Start-up and shut-down handlers, wired through FastAPI's ``lifespan``.

The specification puts them here; what they do — the order, the degradation rules — lives with
the rest of the composition in ``src.app.wiring``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from src.app import wiring
from src.app.wiring import StartupError

__all__ = ["StartupError", "lifespan", "on_shutdown", "on_startup"]


async def on_startup(app: FastAPI) -> None:
    await wiring.start(app)


async def on_shutdown(app: FastAPI) -> None:
    await wiring.stop(app)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    try:
        await on_startup(app)
    except BaseException:
        # Whatever started before the failure is closed again; nothing is left dangling.
        await on_shutdown(app)
        raise
    try:
        yield
    finally:
        await on_shutdown(app)
