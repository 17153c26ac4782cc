"""The console's client for the service's own REST API, called in-process.

Every console action is one or more calls to ``/api/v1`` (or ``/oauth2``) through
``httpx.ASGITransport`` on the running app: the same routes, dependencies, authorization rules,
step-up checks and events as any other client, with the admin's bearer token. The admin's address,
browser and request id go along, so the API's logs and sessions name them.

Refresh tokens rotate and a reused one ends its session, so two requests of one browser that find
the access token expired at the same moment (a page and the health panel's refresh) must not both
refresh: ``Refresher`` lets the first do it and hands its result to the others.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI
from starlette.requests import Request

from src.api.dependencies import API_V1, get_client_info
from src.app.container import app_services
from src.config.logging import request_id_var
from src.config.settings import Settings
from src.oauth.clients import CONSOLE_CLIENT_ID, console_redirect_uri
from src.security.sealing import Sealer
from src.web.admin.session import ConsoleTokens, read_tokens

API = API_V1
# How long a refresh's result answers the other requests that presented the same refresh token.
_REFRESH_REUSE_SECONDS = 60.0
_TIMEOUT = 30.0


class SignInNeeded(Exception):
    """No usable tokens: the admin signs in (again) through the authorization endpoint.
    ``again``: the API asked for a recent authentication (step-up), so the password is asked."""

    def __init__(self, *, again: bool = False) -> None:
        super().__init__("sign-in needed")
        self.again = again


class ApiProblem(Exception):
    """An API answer that is not a success, read from its problem+json (or OAuth error) body."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


def problem_of(response: httpx.Response) -> ApiProblem:
    """A readable message from an error answer: its detail, then what each field got wrong."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    title = str(body.get("title") or body.get("error") or f"Error {response.status_code}")
    detail = str(body.get("detail") or body.get("error_description") or title)
    parts = [detail]
    for error in body.get("errors") or []:
        if isinstance(error, dict) and error.get("msg"):
            loc = [str(p) for p in error.get("loc") or [] if p not in ("body", "query")]
            where = f"{'.'.join(loc)}: " if loc else ""
            parts.append(f"{where}{error['msg']}")
    return ApiProblem(response.status_code, title, " ".join(parts))


class Refresher:
    """One refresh per refresh token per process; later callers get the first one's result."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._results: dict[str, tuple[float, ConsoleTokens | None]] = {}

    async def refresh(self, api: InProcessApi, tokens: ConsoleTokens) -> ConsoleTokens | None:
        assert tokens.refresh_token is not None
        key = hashlib.sha256(tokens.refresh_token.encode()).hexdigest()
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            now = time.monotonic()
            self._results = {
                k: v for k, v in self._results.items() if now - v[0] <= _REFRESH_REUSE_SECONDS
            }
            if key in self._results:
                return self._results[key][1]
            fresh = await api.refresh(tokens)
            self._results[key] = (now, fresh)
        self._locks.pop(key, None)
        return fresh


def refresher(app: FastAPI) -> Refresher:
    found: Refresher | None = getattr(app.state, "admin_console_refresher", None)
    if found is None:
        found = app.state.admin_console_refresher = Refresher()
    return found


@dataclass
class InProcessApi:
    """Calls to this app, as the browser's admin (address, user agent and request id kept)."""

    app: FastAPI
    settings: Settings
    ip: str
    user_agent: str | None

    def client(self) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app, client=(self.ip, 0))
        headers = {"User-Agent": self.user_agent or "admin-console"}
        request_id = request_id_var.get()
        if request_id:
            headers["X-Request-ID"] = request_id
        return httpx.AsyncClient(
            transport=transport,
            base_url=self.settings.PUBLIC_BASE_URL.rstrip("/"),
            headers=headers,
            timeout=_TIMEOUT,
        )

    async def _token_request(self, form: dict[str, str]) -> httpx.Response:
        async with self.client() as http:
            return await http.post("/oauth2/token", data={**form, "client_id": CONSOLE_CLIENT_ID})

    async def exchange(self, code: str, verifier: str) -> dict[str, Any]:
        response = await self._token_request(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": console_redirect_uri(self.settings),
                "code_verifier": verifier,
            }
        )
        if response.status_code != 200:
            raise problem_of(response)
        body: dict[str, Any] = response.json()
        return body

    async def refresh(self, tokens: ConsoleTokens) -> ConsoleTokens | None:
        assert tokens.refresh_token is not None
        response = await self._token_request(
            {"grant_type": "refresh_token", "refresh_token": tokens.refresh_token}
        )
        if response.status_code != 200:
            return None
        body = response.json()
        return ConsoleTokens(
            access_token=body["access_token"],
            refresh_token=body.get("refresh_token") or tokens.refresh_token,
            expires_at=time.time() + float(body.get("expires_in") or 0),
            user_id=tokens.user_id,
            email=tokens.email,
        )

    async def revoke(self, token: str) -> None:
        async with self.client() as http:
            await http.post("/oauth2/revoke", data={"token": token, "client_id": CONSOLE_CLIENT_ID})

    async def whoami(self, access_token: str) -> dict[str, Any]:
        async with self.client() as http:
            response = await http.get(
                "/api/v1/users/me", headers={"Authorization": f"Bearer {access_token}"}
            )
        if response.status_code != 200:
            raise problem_of(response)
        body: dict[str, Any] = response.json()
        return body


async def in_process_api(request: Request) -> InProcessApi:
    who = await get_client_info(request)
    return InProcessApi(
        app=request.app,
        settings=request.app.state.settings,
        ip=who.ip or "127.0.0.1",
        user_agent=request.headers.get("user-agent"),
    )


class Console:
    """The signed-in admin of one request: their tokens, and the API as them.

    ``changed``: the tokens were refreshed, so the response must carry the new cookie."""

    def __init__(self, api: InProcessApi, sealer: Sealer, tokens: ConsoleTokens) -> None:
        self.api, self.sealer, self.tokens = api, sealer, tokens
        self.changed = False

    @property
    def email(self) -> str:
        return self.tokens.email

    async def _refresh(self) -> None:
        if self.tokens.refresh_token is None:
            raise SignInNeeded
        fresh = await refresher(self.api.app).refresh(self.api, self.tokens)
        if fresh is None:
            raise SignInNeeded
        self.tokens, self.changed = fresh, True

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        accept: tuple[int, ...] = (),
    ) -> httpx.Response:
        """The API's answer to a call made as the admin; SignInNeeded when the tokens no longer
        work (after one refresh), ApiProblem for any other error (but those in ``accept``)."""
        if self.tokens.expiring():
            await self._refresh()
        for attempt in range(2):
            async with self.api.client() as http:
                response = await http.request(
                    method,
                    path,
                    json=json,
                    params={k: v for k, v in (params or {}).items() if v is not None},
                    headers={"Authorization": f"Bearer {self.tokens.access_token}"},
                )
            if response.status_code != 401:
                break
            if "insufficient_user_authentication" in response.headers.get("www-authenticate", ""):
                raise SignInNeeded(again=True)
            if attempt == 0:
                await self._refresh()
        else:
            raise SignInNeeded
        if response.status_code >= 400 and response.status_code not in accept:
            raise problem_of(response)
        return response

    async def get(self, path: str, **params: Any) -> Any:
        return (await self.call("GET", path, params=params)).json()


class NotAnAdmin(ApiProblem):
    """The console's tokens belong to an account that is no longer an administrator (demoted
    while signed in): no console page is shown, and the console's session with it ends."""

    def __init__(self, console: Console) -> None:
        super().__init__(
            403,
            "Administrators only",
            f"{console.email} is not an administrator account (any more), so the console's "
            "access to it has ended. Ask an administrator for access.",
        )
        self.console = console


async def open_console(request: Request) -> Console:
    """The console of a signed-in admin; SignInNeeded without usable tokens, NotAnAdmin when
    the account is no longer an administrator. Asked of the API on every page, even one that
    would call no admin-only endpoint (a form, the health panel), so a demotion or a
    deactivation takes effect on the next request."""
    services = app_services(request.app)
    tokens = read_tokens(request, services.security.sealer, services.settings)
    if tokens is None:
        raise SignInNeeded
    console = Console(await in_process_api(request), services.security.sealer, tokens)
    me = await console.get(f"{API}/users/me")
    if not isinstance(me, dict) or me.get("role") != "admin":
        raise NotAnAdmin(console)
    return console
