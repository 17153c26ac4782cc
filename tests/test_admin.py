"""The admin API and who may call what: the authorization matrix, listing, creating, changing and
deleting users, and the rule that the last active admin cannot be removed."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from src.config.settings import Settings
from tests.conftest import ADMIN_PASSWORD
from tests.support.app import PASSWORD, bearer, login, unique_email
from tests.support.auth import (
    API,
    PUBLIC_FIELDS,
    QUICK_SETTINGS,
    assert_problem,
    assert_unauthenticated,
    session_of,
)
from tests.support.users import (
    admin_creates,
    admin_creates_signed_in,
    assert_outbox_carries_no_secrets,
    event_types,
    fetch,
    last_event,
)

AdminApp = tuple[FastAPI, httpx.AsyncClient, dict[str, str]]


@pytest.fixture
def make_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        return make_settings(**{**QUICK_SETTINGS, **overrides})

    return factory


# --- the authorization matrix ---------------------------------------------------------------------
# Each row: method, path, JSON body, and the status for (anonymous, user, admin). In paths, {self}
# is the caller's own id, {other} another account's, {unknown} an id nobody has, {session} the
# caller's session. The user and the admin are fresh accounts per case (the admin is a second
# admin, so even deleting itself is allowed); refused calls must change nothing.

NEW_PASSWORD = "a brand new passphrase"
MATRIX: list[tuple[str, str, dict[str, Any] | None, tuple[int, int, int]]] = [
    ("GET", "/users/me", None, (401, 200, 200)),
    ("PATCH", "/users/me", {"full_name": "Me"}, (401, 200, 200)),
    ("DELETE", "/users/me", {"current_password": PASSWORD}, (401, 204, 204)),
    # A stolen access token alone cannot delete the account, nor move it to another address.
    ("DELETE", "/users/me", None, (401, 422, 422)),
    ("DELETE", "/users/me", {"current_password": "not the password"}, (401, 400, 400)),
    ("PATCH", "/users/me", {"email": "{new_email}"}, (401, 422, 422)),
    (
        "POST",
        "/users/me/email",
        {"new_email": "{new_email}", "current_password": PASSWORD},
        (401, 202, 202),
    ),
    (
        "POST",
        "/users/me/email",
        {"new_email": "{new_email}", "current_password": "not the password"},
        (401, 400, 400),
    ),
    (
        "POST",
        "/users/me/password",
        {"current_password": PASSWORD, "new_password": NEW_PASSWORD},
        (401, 204, 204),
    ),
    ("GET", "/users/me/sessions", None, (401, 200, 200)),
    ("DELETE", "/users/me/sessions/{session}", None, (401, 204, 204)),
    ("GET", "/users", None, (401, 403, 200)),
    ("POST", "/users", {"email": "{new_email}", "password": PASSWORD}, (401, 403, 201)),
    ("GET", "/users/{self}", None, (401, 200, 200)),
    ("PATCH", "/users/{self}", {"full_name": "Self"}, (401, 200, 200)),
    ("PATCH", "/users/{self}", {"role": "admin"}, (401, 403, 200)),
    ("PATCH", "/users/{self}", {"is_active": True}, (401, 403, 200)),
    ("PATCH", "/users/{self}", {"email_verified": True}, (401, 403, 200)),
    ("PATCH", "/users/{self}", {"email": "{new_email}"}, (401, 422, 422)),
    ("DELETE", "/users/{self}", {"current_password": PASSWORD}, (401, 204, 204)),
    ("DELETE", "/users/{self}", None, (401, 422, 422)),
    ("GET", "/users/{other}", None, (401, 403, 200)),
    ("PATCH", "/users/{other}", {"full_name": "Other"}, (401, 403, 200)),
    ("PATCH", "/users/{other}", {"role": "admin"}, (401, 403, 200)),
    ("PATCH", "/users/{other}", {"email": "{new_email}"}, (401, 403, 200)),
    ("DELETE", "/users/{other}", None, (401, 403, 204)),
    ("GET", "/users/{unknown}", None, (401, 403, 404)),
    ("GET", "/users/{self}/events", None, (401, 200, 200)),
    ("GET", "/users/{other}/events", None, (401, 403, 200)),
    ("POST", "/auth/logout", None, (401, 204, 204)),
    ("POST", "/auth/logout-all", None, (401, 204, 204)),
]
CALLERS = ("anonymous", "user", "admin")


def _case_id(row: tuple[str, str, dict[str, Any] | None, tuple[int, int, int]]) -> str:
    method, path, body, _ = row
    fields = ",".join(body) if body and path.startswith("/users/{") else ""
    return f"{method} {path}" + (f" {fields}" if fields else "")


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("row", MATRIX, ids=[_case_id(row) for row in MATRIX])
async def test_authorization_matrix(
    admin_app: AdminApp,
    row: tuple[str, str, dict[str, Any] | None, tuple[int, int, int]],
    caller: str,
) -> None:
    _, client, boss = admin_app
    method, path, body, statuses = row
    expected = statuses[CALLERS.index(caller)]
    other = await admin_creates(client, boss, full_name="Bystander")
    headers: dict[str, str] = {}
    me: dict[str, Any] = other  # for anonymous, {self} is just some account
    session = str(uuid.uuid4())
    if caller != "anonymous":
        me, tokens = await admin_creates_signed_in(client, boss, role=caller)
        headers, session = bearer(tokens), session_of(tokens)
    before = {u["id"]: await fetch(client, boss, u["id"]) for u in (me, other)}

    url = API + path.format(self=me["id"], other=other["id"], unknown=uuid.uuid4(), session=session)
    payload = body and {
        key: value.format(new_email=unique_email()) if isinstance(value, str) else value
        for key, value in body.items()
    }
    response = await client.request(method, url, json=payload, headers=headers)

    assert response.status_code == expected, response.text
    if expected == 401:
        assert_unauthenticated(response)
    elif expected in (403, 404):
        assert_problem(response, expected)
    if expected >= 400:
        for user_id, was in before.items():
            assert await fetch(client, boss, user_id) == was
    elif expected == 204:
        assert response.content == b""
    else:
        assert response.headers["content-type"] == "application/json"


# --- listing --------------------------------------------------------------------------------------


async def _walk(
    client: httpx.AsyncClient, admin: dict[str, str], limit: int, **filters: Any
) -> tuple[list[dict[str, Any]], int]:
    """Every page of GET /users: (all items in order, number of pages)."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"limit": limit, **filters, **({"cursor": cursor} if cursor else {})}
        response = await client.get(f"{API}/users", params=params, headers=admin)
        assert response.status_code == 200, response.text
        page = response.json()
        assert set(page) == {"items", "next_cursor"}
        assert len(page["items"]) <= limit
        items += page["items"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            return items, pages
        assert page["items"], "a cursor after an empty page"
        assert pages < 50, "pagination does not end"


async def test_list_walks_every_user_once_in_a_stable_order(admin_app: AdminApp) -> None:
    _, client, admin = admin_app
    created = [await admin_creates(client, admin) for _ in range(25)]

    items, pages = await _walk(client, admin, limit=7)
    ids = [item["id"] for item in items]
    assert len(ids) == len(set(ids)) == 26  # the 25 and the first admin
    assert {c["id"] for c in created} <= set(ids)
    assert pages == 4
    assert all(set(item) == PUBLIC_FIELDS for item in items)
    keys = [(item["created_at"], item["id"]) for item in items]
    assert keys == sorted(keys)
    # The same walk again gives the same order; one big page agrees with it.
    assert [i["id"] for i in (await _walk(client, admin, limit=7))[0]] == ids
    assert [i["id"] for i in (await _walk(client, admin, limit=100))[0]] == ids

    # Keyset pages are stable while users are added mid-walk: nobody is skipped or repeated.
    first = (await client.get(f"{API}/users", params={"limit": 7}, headers=admin)).json()
    late = await admin_creates(client, admin)
    rest = (
        await client.get(
            f"{API}/users", params={"limit": 100, "cursor": first["next_cursor"]}, headers=admin
        )
    ).json()
    walked = [i["id"] for i in first["items"] + rest["items"]]
    assert walked == [*ids, late["id"]] and rest["next_cursor"] is None

    # The exact multiple of the page size still ends with next_cursor null, not an empty page.
    exact, exact_pages = await _walk(client, admin, limit=27)
    assert len(exact) == 27 and exact_pages == 1


async def test_list_filters_and_search(admin_app: AdminApp) -> None:
    _, client, admin = admin_app
    admin_id = (await client.get(f"{API}/users/me", headers=admin)).json()["id"]
    tag = uuid.uuid4().hex[:6]
    people = {
        "alice": await admin_creates(client, admin, email=f"alice-{tag}@example.com"),
        "bob": await admin_creates(client, admin, full_name="Bob ALICEson"),
        "carol": await admin_creates(client, admin, full_name="Carol", role="admin"),
        "dave": await admin_creates(client, admin, full_name="Dave", is_active=False),
        "erin": await admin_creates(
            client, admin, full_name="Erin Alice", role="admin", is_active=False
        ),
        "percent": await admin_creates(client, admin, full_name="100% Real"),
        "under": await admin_creates(client, admin, email=f"under_score-{tag}@example.com"),
    }
    by_id = {user["id"]: name for name, user in people.items()}
    by_id[admin_id] = "root"

    async def names(**filters: Any) -> set[str]:
        items, _ = await _walk(client, admin, limit=3, **filters)
        return {by_id[item["id"]] for item in items}

    everyone = set(by_id.values())
    assert await names() == everyone
    assert await names(is_active="false") == {"dave", "erin"}
    assert await names(is_active="true") == everyone - {"dave", "erin"}
    assert await names(role="admin") == {"root", "carol", "erin"}
    assert await names(role="user") == everyone - {"root", "carol", "erin"}
    # q searches email and full name, case-insensitively.
    assert await names(q="ALICE") == {"alice", "bob", "erin"}
    assert await names(q="aliceson") == {"bob"}
    assert await names(q=f"ALICE-{tag}@EXAMPLE") == {"alice"}
    # LIKE wildcards in q are literal characters.
    assert await names(q="%") == {"percent"}
    assert await names(q="_") == {"under"}
    assert await names(q="0%_R") == set()
    assert await names(q="nobody-has-this") == set()
    # Filters combine with AND.
    assert await names(q="alice", role="admin") == {"erin"}
    assert await names(q="alice", is_active="true") == {"alice", "bob"}
    assert await names(role="admin", is_active="true") == {"root", "carol"}
    assert await names(q="alice", role="admin", is_active="true") == set()
    assert await names(role="user", is_active="false") == {"dave"}


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "params",
    [
        {"cursor": "garbage"},
        {"cursor": "!!!"},
        {"cursor": "é"},
        {"cursor": _b64("not a cursor")},
        {"cursor": _b64(f"2024-01-01T00:00:00+00:00|{'x' * 8}")},
        {"cursor": _b64(f"2024-01-01T00:00:00|{uuid.uuid4()}")},  # no time zone
        {"cursor": _b64(f"yesterday|{uuid.uuid4()}")},
        {"cursor": "x" * 201},
        {"limit": 0},
        {"limit": 101},
        {"limit": -1},
        {"limit": "ten"},
        {"is_active": "maybe"},
        {"role": "superuser"},
        {"q": ""},
    ],
    ids=lambda p: next(iter(p)) + "=" + str(next(iter(p.values())))[:20],
)
async def test_list_refuses_bad_parameters(admin_app: AdminApp, params: dict[str, Any]) -> None:
    _, client, admin = admin_app
    response = await client.get(f"{API}/users", params=params, headers=admin)
    assert_problem(response, 422)


# --- create, read, change, delete ----------------------------------------------------------------


async def test_admin_creates_users(admin_app: AdminApp) -> None:
    app, client, admin = admin_app
    admin_id = (await client.get(f"{API}/users/me", headers=admin)).json()["id"]
    email = unique_email("made")
    response = await client.post(
        f"{API}/users",
        json={
            "email": email.upper(),
            "password": PASSWORD,
            "full_name": "Made By Admin",
            "role": "admin",
            "is_active": False,
            "email_verified": True,
        },
        headers=admin,
    )
    assert response.status_code == 201, response.text
    made = response.json()
    assert set(made) == PUBLIC_FIELDS
    assert (made["email"], made["role"], made["is_active"], made["email_verified"]) == (
        email,
        "admin",
        False,
        True,
    )
    assert response.headers["location"] == f"{API}/users/{made['id']}"
    assert response.headers["etag"] == '"1"'
    registered = await last_event(app, made["id"], "user.registered")
    assert registered.payload["actor_id"] == admin_id
    assert registered.payload["role"] == "admin"
    # Already verified: no verification mail; inactive: cannot sign in.
    assert await event_types(app, made["id"]) == ["user.registered"]
    refused = await client.post(
        f"{API}/auth/login",
        data={"grant_type": "password", "username": email, "password": PASSWORD},
    )
    assert refused.status_code == 400

    # Defaults: an active, unverified user, who is asked to verify.
    plain = await admin_creates(client, admin)
    assert (plain["role"], plain["is_active"], plain["email_verified"]) == ("user", True, False)
    await last_event(app, plain["id"], "user.verification_requested")

    for body, status in (
        ({"email": unique_email(), "password": "short"}, 422),
        ({"email": unique_email(), "password": "password123"}, 422),  # a common password
        ({"email": unique_email(), "password": "x" * 129}, 422),
        ({"email": "not-an-email", "password": PASSWORD}, 422),
        ({"email": unique_email(), "password": PASSWORD, "role": "root"}, 422),
        ({"email": unique_email(), "password": PASSWORD, "id": str(uuid.uuid4())}, 422),
        ({"email": unique_email(), "password": PASSWORD, "version": 7}, 422),
        ({"password": PASSWORD}, 422),
        ({"email": email, "password": PASSWORD}, 409),
        ({"email": email.title(), "password": PASSWORD}, 409),
    ):
        answer = await client.post(f"{API}/users", json=body, headers=admin)
        assert_problem(answer, status)
        assert PASSWORD not in answer.text
    items = (await client.get(f"{API}/users", params={"limit": 100}, headers=admin)).json()
    assert len(items["items"]) == 3  # the admin, "made" and "plain": nothing else was created


async def test_admin_reads_users(admin_app: AdminApp) -> None:
    _, client, admin = admin_app
    user = await admin_creates(client, admin, full_name="Readable")
    response = await client.get(f"{API}/users/{user['id']}", headers=admin)
    assert response.status_code == 200
    assert response.json() == user
    assert response.headers["etag"] == '"1"'
    assert_problem(await client.get(f"{API}/users/{uuid.uuid4()}", headers=admin), 404)
    for bad in ("not-a-uuid", "123", f"{user['id']}x"):
        assert_problem(await client.get(f"{API}/users/{bad}", headers=admin), 422)
        assert_problem(
            await client.patch(f"{API}/users/{bad}", json={"full_name": "x"}, headers=admin), 422
        )
        assert_problem(await client.delete(f"{API}/users/{bad}", headers=admin), 422)


async def test_admin_changes_role_and_activity(admin_app: AdminApp) -> None:
    app, client, admin = admin_app
    admin_id = (await client.get(f"{API}/users/me", headers=admin)).json()["id"]
    user, tokens = await admin_creates_signed_in(client, admin)
    url = f"{API}/users/{user['id']}"
    auth = bearer(tokens)
    assert (await client.get(f"{API}/users/me", headers=auth)).status_code == 200

    promoted = await client.patch(url, json={"role": "admin"}, headers=admin)
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["role"] == "admin" and promoted.json()["version"] == 2
    role_changed = await last_event(app, user["id"], "user.role_changed")
    assert role_changed.payload["role"] == "admin"
    assert role_changed.payload["previous_role"] == "user"
    assert role_changed.payload["actor_id"] == admin_id
    assert (await client.get(f"{API}/users", headers=auth)).status_code == 200
    demoted = await client.patch(url, json={"role": "user"}, headers=admin)
    assert demoted.status_code == 200
    assert (await event_types(app, user["id"])).count("user.role_changed") == 2

    # Deactivation ends every session: the token fails on the very next request.
    second = await login(client, user["email"])
    off = await client.patch(url, json={"is_active": False}, headers=admin)
    assert off.status_code == 200, off.text
    assert off.json()["is_active"] is False
    deactivated = await last_event(app, user["id"], "user.deactivated")
    assert deactivated.payload["is_active"] is False
    for token in (tokens, second):
        assert_unauthenticated(await client.get(f"{API}/users/me", headers=bearer(token)))
        refresh = await client.post(
            f"{API}/auth/login",
            data={"grant_type": "refresh_token", "refresh_token": token["refresh_token"]},
        )
        assert refresh.status_code == 400
    login_refused = await client.post(
        f"{API}/auth/login",
        data={"grant_type": "password", "username": user["email"], "password": PASSWORD},
    )
    assert login_refused.status_code == 400

    on = await client.patch(url, json={"is_active": True}, headers=admin)
    assert on.status_code == 200 and on.json()["is_active"] is True
    await last_event(app, user["id"], "user.activated")
    # Old sessions stay ended; signing in again works.
    assert_unauthenticated(await client.get(f"{API}/users/me", headers=auth))
    fresh = await login(client, user["email"])
    assert (await client.get(f"{API}/users/me", headers=bearer(fresh))).status_code == 200

    verified = await client.patch(url, json={"email_verified": True}, headers=admin)
    assert verified.status_code == 200 and verified.json()["email_verified"] is True
    await last_event(app, user["id"], "user.email_verified")

    # Several fields at once: one version step, one event per kind of change.
    both = await client.patch(
        url, json={"role": "admin", "full_name": "Both", "is_active": False}, headers=admin
    )
    assert both.status_code == 200, both.text
    assert both.json()["version"] == verified.json()["version"] + 1
    types = await event_types(app, user["id"])
    assert types[-3:] == ["user.updated", "user.role_changed", "user.deactivated"]

    # If-Match works here as on /users/me.
    stale = await client.patch(url, json={"full_name": "X"}, headers={**admin, "If-Match": '"1"'})
    assert_problem(stale, 412)
    assert_problem(
        await client.patch(f"{API}/users/{uuid.uuid4()}", json={"full_name": "x"}, headers=admin),
        404,
    )
    assert_problem(await client.patch(url, json={"role": None}, headers=admin), 422)
    assert_problem(await client.patch(url, json={"password": "x" * 12}, headers=admin), 422)
    assert (await fetch(client, admin, user["id"]))["version"] == both.json()["version"]
    await assert_outbox_carries_no_secrets(app)


async def test_admin_deletes_users(admin_app: AdminApp) -> None:
    app, client, admin = admin_app
    admin_id = (await client.get(f"{API}/users/me", headers=admin)).json()["id"]
    user, tokens = await admin_creates_signed_in(client, admin)
    url = f"{API}/users/{user['id']}"
    response = await client.delete(url, headers=admin)
    assert response.status_code == 204 and response.content == b""
    deleted = await last_event(app, user["id"], "user.deleted")
    assert deleted.payload == {
        "id": user["id"],
        "actor_id": admin_id,
        "deleted_at": deleted.payload["deleted_at"],
    }
    assert_problem(await client.get(url, headers=admin), 404)
    assert_problem(await client.delete(url, headers=admin), 404)
    assert_unauthenticated(await client.get(f"{API}/users/me", headers=bearer(tokens)))
    assert_problem(await client.delete(f"{API}/users/{uuid.uuid4()}", headers=admin), 404)


# --- the last admin -------------------------------------------------------------------------------


async def test_the_last_admin_stays(admin_app: AdminApp) -> None:
    app, client, admin = admin_app
    me = (await client.get(f"{API}/users/me", headers=admin)).json()
    url = f"{API}/users/{me['id']}"
    # An inactive admin does not count.
    await admin_creates(client, admin, role="admin", is_active=False)

    attempts = [
        client.patch(url, json={"role": "user"}, headers=admin),
        client.patch(url, json={"is_active": False}, headers=admin),
        client.patch(url, json={"role": "user", "full_name": "Demoted"}, headers=admin),
        client.request("DELETE", url, json={"current_password": ADMIN_PASSWORD}, headers=admin),
        client.request(
            "DELETE", f"{API}/users/me", json={"current_password": ADMIN_PASSWORD}, headers=admin
        ),
    ]
    for attempt in attempts:
        assert_problem(await attempt, 409)
    assert await fetch(client, admin, me["id"]) == me
    assert await event_types(app, me["id"]) == ["user.registered", "user.logged_in"]

    # With a second active admin, the first may step down.
    second, second_tokens = await admin_creates_signed_in(client, admin)
    promote = await client.patch(
        f"{API}/users/{second['id']}", json={"role": "admin"}, headers=admin
    )
    assert promote.status_code == 200, promote.text
    demote = await client.patch(url, json={"role": "user"}, headers=admin)
    assert demote.status_code == 200, demote.text
    assert_problem(await client.get(f"{API}/users", headers=admin), 403)
    # Now the second admin is the last one.
    second_auth = bearer(second_tokens)
    own_password = {"current_password": PASSWORD}
    assert_problem(
        await client.request("DELETE", f"{API}/users/me", json=own_password, headers=second_auth),
        409,
    )
    assert (await client.delete(url, headers=second_auth)).status_code == 204
    assert_unauthenticated(await client.get(f"{API}/users/me", headers=admin))


async def test_two_admins_stepping_down_at_once_leave_one(admin_app: AdminApp) -> None:
    """Both admins remove themselves concurrently: whichever comes second must be refused."""
    _, client, first = admin_app
    first_me = (await client.get(f"{API}/users/me", headers=first)).json()
    second_me, tokens = await admin_creates_signed_in(client, first, role="admin")
    admins = {first_me["id"]: first, second_me["id"]: bearer(tokens)}
    passwords = {first_me["id"]: ADMIN_PASSWORD, second_me["id"]: PASSWORD}
    emails = {first_me["id"]: first_me["email"], second_me["id"]: second_me["email"]}

    async def remaining_admins(auth: dict[str, str]) -> list[str]:
        params = {"role": "admin", "is_active": "true"}
        listing = await client.get(f"{API}/users", params=params, headers=auth)
        assert listing.status_code == 200, listing.text
        return [item["id"] for item in listing.json()["items"]]

    for change in ({"role": "user"}, {"is_active": False}, None):
        answers = await asyncio.gather(
            *(
                client.request(
                    "DELETE" if change is None else "PATCH",
                    f"{API}/users/{user_id}",
                    json=change or {"current_password": passwords[user_id]},
                    headers=auth,
                )
                for user_id, auth in admins.items()
            )
        )
        codes = [answer.status_code for answer in answers]
        assert sorted(codes) == [200 if change else 204, 409], [a.text for a in answers]
        survivor = list(admins)[codes.index(409)]
        assert await remaining_admins(admins[survivor]) == [survivor]
        if change is None:
            break
        # Put the other admin back (and sign it in again) for the next round.
        gone = next(user_id for user_id in admins if user_id != survivor)
        restore = await client.patch(
            f"{API}/users/{gone}",
            json={"role": "admin", "is_active": True},
            headers=admins[survivor],
        )
        assert restore.status_code == 200, restore.text
        admins[gone] = bearer(await login(client, emails[gone], passwords[gone]))
