"""Helpers for OpenID Connect tests: clients, PKCE, the hosted sign-in form, live servers, and a
stock relying party."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import secrets
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from src.db.models import OAuthClient
from tests.support.app import register, unique_email
from tests.support.servers import free_port, wait_for_port

if TYPE_CHECKING:
    from authlib.integrations.starlette_client import OAuth

REDIRECT_URI = "https://app.example.com/callback"
# The provider's public URL in the in-process tests: https, as in production, so the cookies are
# __Host- and Secure.
ISSUER = "https://id.example.com"
ADMIN_PASSWORD = "admin password for tests"
# The app, a client that talks to it at ISSUER, and the first admin's bearer header.
Provider = tuple[Any, httpx.AsyncClient, dict[str, str]]


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge), RFC 7636 appendix B."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


async def create_client(
    client: httpx.AsyncClient, admin: dict[str, str], **fields: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "Test app",
        "client_type": "confidential",
        "redirect_uris": [REDIRECT_URI],
        "grant_types": ["authorization_code", "refresh_token"],
        "scopes": ["openid", "profile", "email", "offline_access"],
        "first_party": True,
    }
    body.update(fields)
    response = await client.post("/api/v1/clients", json=body, headers=admin)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def authorize_query(client_id: str, challenge: str, **extra: str) -> str:
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": "openid profile email",
        "state": "state-" + secrets.token_hex(4),
        "nonce": "nonce-" + secrets.token_hex(4),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(extra)
    return urlencode({k: v for k, v in params.items() if v != ""})


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag == "form":
            self.forms.append({"action": values.get("action", ""), "fields": {}})
        elif tag == "input" and self.forms and values.get("name"):
            self.forms[-1]["fields"].setdefault(values["name"], values.get("value", ""))


def forms_of(html: str) -> list[dict[str, Any]]:
    parser = _Forms()
    parser.feed(html)
    return parser.forms


def form_posting_to(html: str, action: str) -> dict[str, str]:
    """The fields (hidden ones with their values) of the form that posts to ``action``."""
    for form in forms_of(html):
        if form["action"] == action:
            fields: dict[str, str] = form["fields"]
            return fields
    raise AssertionError(f"no form posting to {action} in:\n{html[:2000]}")


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def sign_in(
    client: httpx.AsyncClient, query: str, email: str, password: str
) -> httpx.Response:
    """Follow the hosted pages like a browser: authorize, then the sign-in form. Returns the
    answer to the form (a redirect to the application, or the consent page)."""
    page = await client.get(f"/oauth2/authorize?{query}")
    assert page.status_code == 200, page.text
    fields = form_posting_to(page.text, "/account/signin")
    fields.update(email=email, password=password)
    return await client.post("/account/signin", data=fields)


async def allow(client: httpx.AsyncClient, consent_page: httpx.Response) -> httpx.Response:
    fields = form_posting_to(consent_page.text, "/oauth2/consent")
    fields["decision"] = "allow"
    return await client.post("/oauth2/consent", data=fields)


async def code_flow(
    client: httpx.AsyncClient, client_id: str, email: str, password: str, **extra: str
) -> tuple[str, str, dict[str, str]]:
    """(code, verifier, authorization response parameters) for a first-party client."""
    verifier, challenge = pkce_pair()
    query = authorize_query(client_id, challenge, **extra)
    page = await client.get(f"/oauth2/authorize?{query}")
    if page.status_code == 302:  # signed in already: straight back with a code
        params = query_of(page.headers["location"])
        return params["code"], verifier, params
    assert page.status_code == 200, page.text
    fields = form_posting_to(page.text, "/account/signin")
    fields.update(email=email, password=password)
    answer = await client.post("/account/signin", data=fields)
    assert answer.status_code == 303, answer.text
    params = query_of(answer.headers["location"])
    return params["code"], verifier, params


async def exchange(
    client: httpx.AsyncClient,
    code: str,
    verifier: str | None,
    client_id: str,
    secret: str | None = None,
    redirect_uri: str = REDIRECT_URI,
) -> httpx.Response:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
    if verifier is not None:
        data["code_verifier"] = verifier
    if secret is None:  # a public client: no authentication, just its id
        data["client_id"] = client_id
        return await client.post("/oauth2/token", data=data)
    return await client.post("/oauth2/token", data=data, auth=(client_id, secret))


def strip_cookies(client: httpx.AsyncClient) -> None:
    client.cookies.clear()


@contextlib.contextmanager
def live_server(app: ASGIApp, port: int | None = None) -> Iterator[str]:
    """An ASGI app on a real uvicorn socket, in a thread of this process."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        wait_for_port(port, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')


def relying_party(oauth: OAuth, rp_base: str, seen: dict[str, Any]) -> Starlette:
    """The smallest Authlib web app, for the client ``oauth`` registered as "ums".

    /login starts the flow; /callback finishes it and answers ``{"signed_in": <email>}``;
    /logout sends the browser to the provider's end-session endpoint (RP-initiated logout, the ID
    token as hint, back to /bye); /bye checks the state the provider echoes and says "signed out".
    ``seen`` gets ``iss`` (RFC 9207), ``token`` (the last token response) and ``logout_state``.
    """

    def ums() -> Any:
        client = oauth.create_client("ums")
        assert client is not None
        return client

    async def login(request: Request) -> Response:
        response: Response = await ums().authorize_redirect(request, f"{rp_base}/callback")
        return response

    async def callback(request: Request) -> Response:
        seen["iss"] = request.query_params.get("iss")
        seen["token"] = await ums().authorize_access_token(request)
        return JSONResponse({"signed_in": seen["token"]["userinfo"]["email"]})

    async def logout(request: Request) -> Response:
        response: Response = await ums().logout_redirect(
            request,
            post_logout_redirect_uri=f"{rp_base}/bye",
            id_token_hint=seen["token"]["id_token"],
        )
        return response

    async def bye(request: Request) -> Response:
        from authlib.integrations.base_client import OAuthError

        try:
            seen["logout_state"] = await ums().validate_logout_response(request)
        except OAuthError as exc:
            return PlainTextResponse(f"sign-out not confirmed: {exc}", status_code=400)
        return PlainTextResponse("signed out")

    return Starlette(
        routes=[
            Route("/login", login),
            Route("/callback", callback),
            Route("/logout", logout),
            Route("/bye", bye),
        ],
        middleware=[Middleware(SessionMiddleware, secret_key="relying party test secret")],
    )


async def register_client(app: Any, client_id: str, **fields: Any) -> OAuthClient:
    """A client row written straight to the database (for tests that do not need an admin):
    public and first-party with the password and refresh-token grants unless told otherwise."""
    values: dict[str, Any] = {
        "client_id": client_id,
        "name": client_id,
        "client_type": "public",
        "redirect_uris": [],
        "post_logout_redirect_uris": [],
        "grant_types": ["password", "refresh_token"],
        "scopes": ["openid", "profile", "email", "offline_access"],
        "first_party": True,
    }
    values.update(fields)
    async with app.state.services.sessionmaker() as db:
        row = OAuthClient(**values)
        db.add(row)
        await db.commit()
        return row


async def new_user(client: httpx.AsyncClient) -> str:
    """A registered account's email (its password is ``tests.support.app.PASSWORD``)."""
    email = unique_email()
    await register(client, email)
    return email


async def introspect(
    client: httpx.AsyncClient, creds: tuple[str, str], token: str
) -> dict[str, Any]:
    response = await client.post("/oauth2/introspect", data={"token": token}, auth=creds)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer
