"""The console's events view: the audit trail across users, by type, user and time range."""

from __future__ import annotations

import re
import uuid
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from src.events.outbox import EventType
from src.web.admin.api import API, ApiProblem, Console, open_console
from src.web.admin.pages import AdminRoute, page, remember
from src.web.admin.users import with_actors

router = APIRouter(route_class=AdminRoute, include_in_schema=False)

PAGE_SIZE = 50
EVENT_TYPES = sorted(str(t) for t in EventType)
# What <input type="datetime-local"> sends: read as UTC, as every time the console shows.
_LOCAL_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?", re.ASCII)


def _utc(value: str) -> str | None:
    if not _LOCAL_TIME.fullmatch(value):
        return None
    return value + (":00Z" if len(value) == 16 else "Z")


async def _user_id(console: Console, text: str) -> str | None:
    """A user id as given, or the id of the account with exactly this address."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        pass
    found = await console.get(f"{API}/users", q=text, limit=100)
    exact = [u for u in found["items"] if str(u["email"]).lower() == text.lower()]
    return str(exact[0]["id"]) if exact else None


@router.get("/admin/events")
async def events(request: Request) -> Response:
    console = remember(request, await open_console(request))
    params = request.query_params
    values = {
        name: params.get(name, "").strip()[:320] for name in ("type", "user", "since", "until")
    }
    query: dict[str, Any] = {"limit": PAGE_SIZE, "cursor": params.get("cursor", "")[:32] or None}
    problems = []
    if values["type"] in EVENT_TYPES:
        query["type"] = values["type"]
    if values["user"]:
        query["user_id"] = await _user_id(console, values["user"])
        if query["user_id"] is None:
            problems.append(f"No account has the address or id {values['user']}.")
    for name in ("since", "until"):
        if values[name]:
            query[name] = _utc(values[name])
            if query[name] is None:
                problems.append(f"{name.capitalize()}: enter a date and time.")
    items: list[dict[str, Any]] = []
    next_cursor = None
    if not problems:
        try:
            body = await console.get(f"{API}/events", **query)
            items, next_cursor = body["items"], body["next_cursor"]
        except ApiProblem as exc:
            if exc.status != 422:
                raise
            problems.append(exc.message)
    return page(
        request,
        console,
        "admin/events.html",
        {
            "events": await with_actors(console, items),
            "next_cursor": next_cursor,
            "values": values,
            "event_types": EVENT_TYPES,
            "error": " ".join(problems) or None,
            "paged": bool(query["cursor"]),
        },
        status=400 if problems else 200,
        section="events",
    )
