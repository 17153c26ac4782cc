"""The console's signing keys screen: the ring as it is, and a rotation."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from src.web.admin.api import API, ApiProblem, Console, open_console
from src.web.admin.pages import AdminRoute, page, remember
from src.web.csrf import checked_form
from src.web.render import redirect

router = APIRouter(route_class=AdminRoute, include_in_schema=False)


async def _keys_page(
    request: Request, console: Console, *, error: str | None = None, status: int = 200
) -> Response:
    keys = await console.get(f"{API}/keys")
    return page(
        request,
        console,
        "admin/keys.html",
        {"keys": keys, "error": error, "refused": error is not None},
        status=status,
        section="keys",
    )


@router.get("/admin/keys")
async def list_keys(request: Request) -> Response:
    console = remember(request, await open_console(request))
    return await _keys_page(request, console)


@router.post("/admin/keys/rotate")
async def rotate_keys(request: Request) -> Response:
    form = await checked_form(request)
    console = remember(request, await open_console(request), "/admin/keys")
    body = {"force": form.get("force") == "on"}
    try:
        await console.call("POST", f"{API}/keys/rotate", json=body)
    except ApiProblem as exc:
        if exc.status != 409:
            raise
        return await _keys_page(request, console, error=exc.message, status=409)
    return redirect("/admin/keys?done=key-rotated", 303)
