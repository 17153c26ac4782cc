"""The console's OAuth client screens: list, register (the secret shown once), edit the
redirect URIs, delete (typing the client id to confirm)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from src.web.admin.api import API, ApiProblem, Console, open_console
from src.web.admin.pages import AdminRoute, page, remember
from src.web.csrf import checked_form
from src.web.render import redirect

router = APIRouter(route_class=AdminRoute, include_in_schema=False)

MAX_URIS_FIELD = 25_000
_CLIENT_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~-")


def _uris(text: str) -> list[str]:
    """One URI a line, blank lines ignored (the API checks each)."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def _client_path(client_id: str) -> str:
    # Client ids are unreserved URI characters (CLIENT_ID_PATTERN): nothing to escape; anything
    # else is no client, and must not reach the API's path as something else. "." and ".." are
    # unreserved too, but a URL resolves them: /clients/.. would be the API's root.
    if (
        not client_id
        or not set(client_id) <= _CLIENT_ID_CHARS
        or len(client_id) > 64
        or client_id in (".", "..")
    ):
        raise ApiProblem(404, "Not Found", "No such client.")
    return f"{API}/clients/{client_id}"


@router.get("/admin/clients")
async def list_clients(request: Request) -> Response:
    console = remember(request, await open_console(request))
    cursor = request.query_params.get("cursor", "")[:200] or None
    body = await console.get(f"{API}/clients", limit=50, cursor=cursor)
    return page(
        request,
        console,
        "admin/clients.html",
        {"clients": body["items"], "next_cursor": body["next_cursor"]},
        section="clients",
    )


def _new_form(
    request: Request,
    console: Console,
    values: dict[str, str],
    *,
    error: str | None = None,
    status: int = 200,
) -> Response:
    return page(
        request,
        console,
        "admin/client_new.html",
        {"values": values, "error": error},
        status=status,
        section="clients",
    )


_NEW_DEFAULTS = {
    "name": "",
    "client_id": "",
    "client_type": "confidential",
    "redirect_uris": "",
    "first_party": "",
}


@router.get("/admin/clients/new")
async def new_client(request: Request) -> Response:
    console = remember(request, await open_console(request))
    return _new_form(request, console, dict(_NEW_DEFAULTS))


@router.post("/admin/clients/new")
async def create_client(request: Request) -> Response:
    form = await checked_form(request, max_length=MAX_URIS_FIELD)
    console = remember(request, await open_console(request), "/admin/clients/new")
    values = {name: form.get(name, default) for name, default in _NEW_DEFAULTS.items()}
    values["first_party"] = "on" if form.get("first_party") == "on" else ""
    body: dict[str, Any] = {
        "name": values["name"],
        "client_type": values["client_type"],
        "redirect_uris": _uris(values["redirect_uris"]),
        "first_party": bool(values["first_party"]),
    }
    if values["client_id"].strip():
        body["client_id"] = values["client_id"].strip()
    if not body["redirect_uris"]:
        # A client with no redirect URI can only use client_credentials.
        body["grant_types"] = ["client_credentials"]
    try:
        created = (await console.call("POST", f"{API}/clients", json=body)).json()
    except ApiProblem as exc:
        if exc.status not in (409, 422):
            raise
        return _new_form(request, console, values, error=exc.message, status=exc.status)
    # The only time the secret is shown: rendered into this answer (never cached, no-store).
    return page(
        request, console, "admin/client_created.html", {"client": created}, section="clients"
    )


async def _edit_page(
    request: Request,
    console: Console,
    client_id: str,
    *,
    values: dict[str, str] | None = None,
    error: str | None = None,
    status: int = 200,
) -> Response:
    client = await console.get(_client_path(client_id))
    shown = values or {"name": client["name"], "redirect_uris": "\n".join(client["redirect_uris"])}
    return page(
        request,
        console,
        "admin/client.html",
        {"client": client, "values": shown, "error": error},
        status=status,
        section="clients",
    )


@router.get("/admin/clients/{client_id}")
async def show_client(request: Request, client_id: str) -> Response:
    console = remember(request, await open_console(request))
    return await _edit_page(request, console, client_id)


@router.post("/admin/clients/{client_id}")
async def update_client(request: Request, client_id: str) -> Response:
    form = await checked_form(request, max_length=MAX_URIS_FIELD)
    back = f"/admin/clients/{client_id}"
    console = remember(request, await open_console(request), back)
    values = {"name": form.get("name", ""), "redirect_uris": form.get("redirect_uris", "")}
    body = {"name": values["name"], "redirect_uris": _uris(values["redirect_uris"])}
    try:
        await console.call("PATCH", _client_path(client_id), json=body)
    except ApiProblem as exc:
        if exc.status not in (409, 422):
            raise
        return await _edit_page(
            request, console, client_id, values=values, error=exc.message, status=exc.status
        )
    return redirect(f"{back}?done=client-updated", 303)


@router.post("/admin/clients/{client_id}/delete")
async def delete_client(request: Request, client_id: str) -> Response:
    form = await checked_form(request)
    back = f"/admin/clients/{client_id}"
    console = remember(request, await open_console(request), back)
    if form.get("confirm", "").strip() != client_id:
        return await _edit_page(
            request,
            console,
            client_id,
            error=f"To delete the client, type its client id ({client_id}) in the box.",
            status=400,
        )
    await console.call("DELETE", _client_path(client_id))
    return redirect("/admin/clients?done=client-deleted", 303)
