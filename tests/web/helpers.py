"""Helpers for the hosted-page tests: read a page as a browser would, post its forms, make a
browser session and OAuth rows directly in the database."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import select

from src.app.container import app_services
from src.auth.service import ClientInfo, open_session
from src.db.models import OAuthClient, OAuthConsent, User, UserSession
from src.db.types import utcnow

App = tuple[FastAPI, httpx.AsyncClient]

PAGE_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
CSRF_COOKIE = "ums_csrf"  # on plain http (secure_cookies is false in the tests)
SESSION_COOKIE = "ums_session"


@dataclass
class Form:
    method: str
    action: str
    fields: dict[str, str] = field(default_factory=dict)
    # (name, value) of each submit button
    buttons: list[tuple[str, str]] = field(default_factory=list)


class PageScan(HTMLParser):
    """What the tests check in a page: forms, inputs and their labels, headings, and anything a
    strict CSP would refuse (scripts, inline styles, event handler attributes)."""

    def __init__(self) -> None:
        super().__init__()
        self.lang: str | None = None
        self.forms: list[Form] = []
        self.inputs: list[dict[str, str]] = []
        self.label_targets: set[str] = set()
        self.headings: list[int] = []
        self.alerts = 0
        self.scripts = 0
        self.inline_styles: list[str] = []
        self.handlers: list[str] = []
        self.stylesheets: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        self.handlers += [name for name in values if name.startswith("on")]
        if "style" in values or tag == "style":
            self.inline_styles.append(tag)
        if values.get("role") == "alert":
            self.alerts += 1
        if tag == "html":
            self.lang = values.get("lang")
        elif tag == "script":
            self.scripts += 1
        elif tag == "link" and values.get("rel") == "stylesheet":
            self.stylesheets.append(values.get("href", ""))
        elif tag == "img":
            self.images.append(values.get("src", ""))
        elif tag == "form":
            self.forms.append(Form(values.get("method", ""), values.get("action", "")))
        elif tag == "input":
            self.inputs.append(values)
            if self.forms and "name" in values:
                self.forms[-1].fields[values["name"]] = values.get("value", "")
        elif tag == "button" and self.forms:
            self.forms[-1].buttons.append((values.get("name", ""), values.get("value", "")))
        elif tag == "label" and "for" in values:
            self.label_targets.add(values["for"])
        elif len(tag) == 2 and tag[0] == "h" and tag[1].isdigit():
            self.headings.append(int(tag[1]))


def scan(response: httpx.Response) -> PageScan:
    assert response.headers["content-type"] == "text/html; charset=utf-8", response.headers
    page = PageScan()
    page.feed(response.text)
    page.close()
    return page


def form_at(response: httpx.Response, action: str) -> Form:
    forms = [form for form in scan(response).forms if form.action == action]
    assert len(forms) == 1, f"no single form posting to {action}: {response.text[:2000]}"
    return forms[0]


async def submit(
    client: httpx.AsyncClient,
    page: httpx.Response,
    action: str,
    values: dict[str, str] | None = None,
    *,
    drop: tuple[str, ...] = (),
) -> httpx.Response:
    """Post the page's form to ``action`` as a browser would: its hidden fields (the CSRF token
    among them), with ``values`` typed in, and without the fields named in ``drop``."""
    form = form_at(page, action)
    assert form.method == "post"
    data = {**form.fields, **(values or {})}
    for name in drop:
        data.pop(name, None)
    return await client.post(action, data=data)


async def browser_session(app: FastAPI, email: str) -> str:
    """Sign the account in on the hosted pages (a browser session row): the cookie's value."""
    services = app_services(app)
    async with services.sessionmaker() as db:
        user = (await db.execute(select(User).where(User.email == email))).scalar_one()
        _, cookie = await open_session(
            db,
            services.security,
            user,
            ClientInfo(ip="127.0.0.1", user_agent="tests"),
            None,
            amr=["pwd"],
            kind="browser",
        )
        await db.commit()
    return cookie


async def add_client(app: FastAPI, name: str) -> str:
    """An application registered with the provider: its client_id."""
    client_id = f"app-{uuid.uuid4().hex[:12]}"
    async with app_services(app).sessionmaker() as db:
        db.add(
            OAuthClient(
                client_id=client_id,
                name=name,
                client_type="public",
                redirect_uris=["https://app.example/callback"],
                post_logout_redirect_uris=[],
                grant_types=["authorization_code", "refresh_token"],
                scopes=["openid", "profile", "email"],
                first_party=False,
            )
        )
        await db.commit()
    return client_id


async def add_consent(app: FastAPI, user_id: str, client_id: str, scope: str) -> str:
    """The user's consent for the application, and a session the application holds for the
    user (its id): revoking the consent must end it."""
    services = app_services(app)
    async with services.sessionmaker() as db:
        db.add(
            OAuthConsent(
                user_id=uuid.UUID(user_id), client_id=client_id, scope=scope, granted_at=utcnow()
            )
        )
        user = await db.get(User, uuid.UUID(user_id))
        assert user is not None
        session, _ = await open_session(
            db,
            services.security,
            user,
            ClientInfo(ip="127.0.0.1", user_agent="tests"),
            client_id,
            amr=["pwd"],
            scope=scope,
        )
        await db.commit()
        return str(session.id)


async def consent_exists(app: FastAPI, user_id: str, client_id: str) -> bool:
    async with app_services(app).sessionmaker() as db:
        return await db.get(OAuthConsent, (uuid.UUID(user_id), client_id)) is not None


async def session_row(app: FastAPI, session_id: str | uuid.UUID) -> UserSession:
    async with app_services(app).sessionmaker() as db:
        row = await db.get(UserSession, uuid.UUID(str(session_id)))
        assert row is not None
        return row


async def browser_session_row(app: FastAPI, user_id: str) -> UserSession:
    async with app_services(app).sessionmaker() as db:
        query = select(UserSession).where(
            UserSession.user_id == uuid.UUID(user_id), UserSession.kind == "browser"
        )
        return (await db.execute(query)).scalar_one()


def cookie_header(response: httpx.Response, name: str) -> str:
    """The Set-Cookie header that sets ``name``."""
    found = [
        value for value in response.headers.get_list("set-cookie") if value.startswith(f"{name}=")
    ]
    assert len(found) == 1, response.headers.get_list("set-cookie")
    return found[0]


def attributes(set_cookie: str) -> dict[str, Any]:
    """A Set-Cookie header's attributes, names lower-cased (flags map to True)."""
    parts = [part.strip() for part in set_cookie.split(";")][1:]
    found: dict[str, Any] = {}
    for part in parts:
        name, _, value = part.partition("=")
        found[name.lower()] = value if value else True
    return found
