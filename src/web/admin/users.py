"""The console's user screens: search, a user's page, and what an admin does to an account.

Each handler reads its input, makes the API calls and renders; the API decides what is allowed.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from src.web.admin.api import API, ApiProblem, Console, open_console
from src.web.admin.pages import AdminRoute, page, remember
from src.web.csrf import checked_form
from src.web.render import redirect

router = APIRouter(route_class=AdminRoute, include_in_schema=False)
# /admin/users/new, installed before ``router``: its /admin/users/{user_id} would take "new".
new_router = APIRouter(route_class=AdminRoute, include_in_schema=False)

PAGE_SIZE = 20
HISTORY_PAGES = 10
HISTORY_SHOWN = 50
MAX_QUERY = 200
_ROLES = ("user", "admin")
_ACTIVE = {"true": True, "false": False}


@router.get("/admin")
async def home(request: Request) -> Response:
    await open_console(request)
    return redirect("/admin/users", 302)


@router.get("/admin/users")
async def search(request: Request) -> Response:
    console = remember(request, await open_console(request))
    params = request.query_params
    q = params.get("q", "").strip()[:MAX_QUERY]
    role = params.get("role", "")
    active = params.get("active", "")
    cursor = params.get("cursor", "")[:MAX_QUERY]
    filters: dict[str, Any] = {
        "q": q or None,
        "role": role if role in _ROLES else None,
        "is_active": _ACTIVE.get(active),
    }
    body = await console.get(f"{API}/users", limit=PAGE_SIZE, cursor=cursor or None, **filters)
    kept = {"q": q, "role": filters["role"] or "", "active": active if active in _ACTIVE else ""}
    return page(
        request,
        console,
        "admin/users.html",
        {
            "users": body["items"],
            "next_cursor": body["next_cursor"],
            "filters": kept,
            "paged": bool(cursor),
        },
        section="users",
    )


async def with_actors(console: Console, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each event with ``actor``: who caused it (``label``, their address; ``id``), or None.

    Admins are looked up once each. The trail is read back from Kafka and holds whatever was
    published there: an ``actor_id`` that is no user id is shown as text, linked nowhere, and
    never becomes part of an API path."""
    labels: dict[str, str] = {}
    for event in events:
        raw = event["data"].get("actor_id")
        event["actor"] = None
        if raw is None or raw == "":
            continue
        try:
            actor_id = str(uuid.UUID(str(raw)))
        except ValueError:
            event["actor"] = {"label": f"an unknown actor ({str(raw)[:100]})", "id": None}
            continue
        if actor_id not in labels:
            try:
                found = await console.get(f"{API}/users/{actor_id}")
                labels[actor_id] = str(found["email"])
            except ApiProblem:
                labels[actor_id] = f"a former administrator ({actor_id})"
        event["actor"] = {"label": labels[actor_id], "id": actor_id}
    return events


async def _history(console: Console, user_id: uuid.UUID) -> list[dict[str, Any]]:
    """The newest events of the user's audit trail, newest first."""
    events: list[dict[str, Any]] = []
    cursor = None
    for _ in range(HISTORY_PAGES):
        body = await console.get(f"{API}/users/{user_id}/events", limit=100, cursor=cursor)
        events += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    return list(reversed(events[-HISTORY_SHOWN:]))


async def user_page(
    request: Request,
    console: Console,
    user_id: uuid.UUID,
    *,
    error: str | None = None,
    status: int = 200,
) -> Response:
    user = await console.get(f"{API}/users/{user_id}")
    sessions = await console.get(f"{API}/users/{user_id}/sessions")
    factors = await console.get(f"{API}/users/{user_id}/mfa")
    events = await with_actors(console, await _history(console, user_id))
    return page(
        request,
        console,
        "admin/user.html",
        {
            "user": user,
            "sessions": sessions,
            "factors": factors,
            "events": events,
            "is_self": str(user_id) == console.tokens.user_id,
            "error": error,
        },
        status=status,
        section="users",
    )


@router.get("/admin/users/{user_id}")
async def show_user(request: Request, user_id: uuid.UUID) -> Response:
    console = remember(request, await open_console(request))
    return await user_page(request, console, user_id)


async def _act(
    request: Request, user_id: uuid.UUID, method: str, path: str, done: str, json: Any = None
) -> Response:
    """One change through the API, then back to the user's page: with ``done``'s message, or
    with the API's reason on the page when it refused."""
    await checked_form(request)
    back = f"/admin/users/{user_id}"
    console = remember(request, await open_console(request), back)
    try:
        await console.call(method, path, json=json)
    except ApiProblem as exc:
        if exc.status == 404:
            raise
        return await user_page(request, console, user_id, error=exc.message, status=exc.status)
    return redirect(f"{back}?done={done}", 303)


@router.post("/admin/users/{user_id}/sessions/{session_id}/revoke")
async def revoke_session(request: Request, user_id: uuid.UUID, session_id: uuid.UUID) -> Response:
    path = f"{API}/users/{user_id}/sessions/{session_id}"
    return await _act(request, user_id, "DELETE", path, "revoked")


@router.post("/admin/users/{user_id}/deactivate")
async def deactivate(request: Request, user_id: uuid.UUID) -> Response:
    path = f"{API}/users/{user_id}"
    return await _act(request, user_id, "PATCH", path, "deactivated", {"is_active": False})


@router.post("/admin/users/{user_id}/activate")
async def activate(request: Request, user_id: uuid.UUID) -> Response:
    path = f"{API}/users/{user_id}"
    return await _act(request, user_id, "PATCH", path, "activated", {"is_active": True})


@router.post("/admin/users/{user_id}/password-reset")
async def password_reset(request: Request, user_id: uuid.UUID) -> Response:
    path = f"{API}/users/{user_id}/password-reset"
    return await _act(request, user_id, "POST", path, "reset-sent")


@router.post("/admin/users/{user_id}/factors/reset")
async def reset_factors(request: Request, user_id: uuid.UUID) -> Response:
    path = f"{API}/users/{user_id}/mfa"
    return await _act(request, user_id, "DELETE", path, "factors-reset")


# --- create and delete ----------------------------------------------------------------------------

_NEW_USER = {"email": "", "full_name": "", "role": "user", "email_verified": ""}


def _new_user_page(
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
        "admin/user_new.html",
        {"values": values, "error": error},
        status=status,
        section="users",
    )


@new_router.get("/admin/users/new")
async def new_user(request: Request) -> Response:
    console = remember(request, await open_console(request))
    return _new_user_page(request, console, dict(_NEW_USER))


@new_router.post("/admin/users/new")
async def create_user(request: Request) -> Response:
    form = await checked_form(request)
    console = remember(request, await open_console(request), "/admin/users/new")
    values = {name: form.get(name, default) for name, default in _NEW_USER.items()}
    values["email_verified"] = "on" if form.get("email_verified") == "on" else ""
    body: dict[str, Any] = {
        "email": values["email"],
        "password": form.get("password", ""),
        "role": values["role"] if values["role"] in _ROLES else "user",
        "email_verified": bool(values["email_verified"]),
    }
    if values["full_name"].strip():
        body["full_name"] = values["full_name"].strip()
    try:
        created = (await console.call("POST", f"{API}/users", json=body)).json()
    except ApiProblem as exc:
        if exc.status not in (409, 422):
            raise
        return _new_user_page(request, console, values, error=exc.message, status=exc.status)
    return redirect(f"/admin/users/{created['id']}?done=created", 303)


@router.get("/admin/users/{user_id}/delete")
async def confirm_delete(request: Request, user_id: uuid.UUID) -> Response:
    console = remember(request, await open_console(request))
    user = await console.get(f"{API}/users/{user_id}")
    return page(request, console, "admin/user_delete.html", {"user": user}, section="users")


@router.post("/admin/users/{user_id}/delete")
async def delete_user(request: Request, user_id: uuid.UUID) -> Response:
    """Only once the admin typed the account's address: a deletion cannot be undone."""
    form = await checked_form(request)
    back = f"/admin/users/{user_id}/delete"
    console = remember(request, await open_console(request), back)
    user = await console.get(f"{API}/users/{user_id}")
    if form.get("confirm", "").strip().lower() != str(user["email"]).lower():
        return page(
            request,
            console,
            "admin/user_delete.html",
            {"user": user, "error": "To delete the account, type its email address in the box."},
            status=400,
            section="users",
        )
    await console.call("DELETE", f"{API}/users/{user_id}")
    return redirect("/admin/users?done=deleted", 303)
