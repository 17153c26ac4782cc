"""Passkeys on the hosted pages: the account's Passkeys page, signing in with a passkey alone,
and a passkey as the second step after the password (src.auth.passkeys does the ceremonies).

Two kinds of routes. Pages (GET, and the plain remove form) answer as pages. The ceremony
endpoints answer JSON to /assets/passkeys.js: ``{"options", "challenge_token"}`` to start one,
``{"redirect": url}`` when it is done (the browser goes there: a fetch cannot follow a redirect to
another origin and tell the page), ``{"error": "..."}`` with a 4xx status otherwise. They take
JSON only, with the CSRF token in an ``X-CSRF-Token`` header equal to the CSRF cookie (the
double submit of src/web/csrf.py, in a header instead of a field).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.responses import Response

from src.api.dependencies import (
    ClientDep,
    SecurityDep,
    SessionDep,
    SessionMakerDep,
    SettingsDep,
)
from src.auth import mfa, passkeys
from src.auth import service as auth_service
from src.auth.browser import BrowserSignIn, cookie_name, current_browser_session
from src.auth.challenge import BROWSER, MAX_TICKET_LENGTH, open_ticket
from src.auth.context import Security
from src.auth.service import ClientInfo
from src.config.logging import audit_line
from src.config.settings import Settings
from src.db.models import User
from src.errors import DomainError, NotFound, TooManyRequests
from src.oauth.authorize import AuthorizationRequest, after_sign_in
from src.web import oauth_pages
from src.web.csrf import CSRF_FIELD, CsrfError, check_csrf
from src.web.render import PageRoute, redirect, render, render_error

router = APIRouter(route_class=PageRoute, include_in_schema=False)
audit = logging.getLogger("src.auth.audit")

SCRIPTS = ("passkeys.js",)
CSRF_HEADER = "X-CSRF-Token"
PASSKEYS_URL = "/account/passkeys"
SIGNIN_URL = "/account/signin"
ACCOUNT_URL = "/account"
MAX_AUTHZ = 4096
MAX_PASSWORD = 1024
MAX_NAME = 200  # longer than any name kept (100): the domain says what is wrong with it

_TOO_MANY = "Too many attempts. Wait a little and try again."
_TOO_LATE = "That took too long. Sign in again."
_NOTICES = {
    "added": "Your passkey is added. Next time, sign in with it.",
    "removed": "The passkey is removed.",
}


class Refused(Exception):
    """A JSON endpoint's 4xx answer: ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, status_code=self.status, headers=self.headers)


# --- JSON plumbing --------------------------------------------------------------------------------


def check_csrf_header(request: Request) -> None:
    """The ``X-CSRF-Token`` header must equal the CSRF cookie (``Refused`` 403 otherwise). A
    page of another site can neither read the cookie nor send this header here."""
    try:
        check_csrf(request, request.headers.get(CSRF_HEADER))
    except CsrfError:
        raise Refused(403, "The page has expired. Reload it and try again.") from None


async def _json_body(request: Request) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise Refused(415, "Send the request as JSON.")
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise Refused(400, "The request is not valid JSON.") from None
    if not isinstance(body, dict):
        raise Refused(400, "The request must be a JSON object.")
    return body


def _text(body: dict[str, Any], name: str, limit: int, *, required: bool = False) -> str:
    """A string member, at most ``limit`` characters, no NUL (``Refused`` 400 otherwise)."""
    value = body.get(name)
    if value is None:
        value = ""
    if not isinstance(value, str) or len(value) > limit or "\x00" in value:
        raise Refused(400, f"The field {name} is not valid.")
    if required and not value:
        raise Refused(400, f"The field {name} is required.")
    return value


def _credential(body: dict[str, Any]) -> dict[str, Any]:
    credential = body.get("credential")
    if not isinstance(credential, dict):
        raise Refused(400, "The field credential is not valid.")
    return credential


Handler = Callable[[dict[str, Any]], Awaitable[Response]]


async def _json_endpoint(request: Request, handler: Handler) -> Response:
    """CSRF header, JSON body, then ``handler``; every refusal as ``{"error"}`` JSON."""
    try:
        check_csrf_header(request)
        return await handler(await _json_body(request))
    except Refused as exc:
        return exc.response()
    except passkeys.PasskeyError as exc:
        return Refused(400, str(exc)).response()
    except TooManyRequests as exc:
        return Refused(429, _TOO_MANY, exc.headers).response()
    except DomainError as exc:
        return Refused(exc.status, exc.detail, exc.headers).response()


def _options_answer(options: passkeys.Options) -> JSONResponse:
    return JSONResponse({"options": options.options, "challenge_token": options.challenge_token})


async def _browser_session(
    request: Request, db: AsyncSession, settings: Settings
) -> BrowserSignIn | None:
    return await current_browser_session(db, request.cookies.get(cookie_name(settings)))


# --- the Passkeys page ----------------------------------------------------------------------------


def _when(moment: Any) -> str:
    return f"{moment:%d %B %Y}" if moment is not None else ""


async def _passkeys_page(
    request: Request,
    db: AsyncSession,
    user: User,
    *,
    notice: str | None = None,
    error: str | None = None,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    listed = [
        {
            "name": factor.name,
            "created": _when(factor.created_at),
            "last_used": _when(factor.last_used_at) or None,
            "remove_url": f"{PASSKEYS_URL}/{factor.id}/remove",
            "field_id": f"password-{factor.id}",
        }
        for factor in await passkeys.list_passkeys(db, user.id)
    ]
    return render(
        request,
        "passkeys.html",
        {"email": user.email, "passkeys": listed, "notice": notice, "error": error},
        status=status,
        headers=headers,
        scripts=SCRIPTS,
    )


@router.get(PASSKEYS_URL)
async def passkeys_page(
    request: Request, db: SessionDep, settings: SettingsDep, notice: str = ""
) -> Response:
    signin = await _browser_session(request, db, settings)
    if signin is None:
        return redirect(SIGNIN_URL)
    return await _passkeys_page(request, db, signin.user, notice=_NOTICES.get(notice))


@router.post(f"{PASSKEYS_URL}/options")
async def registration_options(
    request: Request, db: SessionDep, sec: SecurityDep, settings: SettingsDep, who: ClientDep
) -> Response:
    """Start adding a passkey: the current password first (a passkey signs in on its own, so
    adding one is as sensitive as changing the password), then the options."""

    async def handle(body: dict[str, Any]) -> Response:
        signin = await _browser_session(request, db, settings)
        if signin is None:
            raise Refused(401, "You are signed out. Sign in again.")
        passkeys.passkey_name(_text(body, "name", MAX_NAME))
        password = _text(body, "password", MAX_PASSWORD, required=True)
        if not await auth_service.verify_password(db, sec, signin.user, password, who):
            raise Refused(400, "The current password is not correct.")
        return _options_answer(await passkeys.registration_options(db, sec, signin.user))

    return await _json_endpoint(request, handle)


@router.post(PASSKEYS_URL)
async def add_passkey(
    request: Request, db: SessionDep, sec: SecurityDep, settings: SettingsDep
) -> Response:
    async def handle(body: dict[str, Any]) -> Response:
        signin = await _browser_session(request, db, settings)
        if signin is None:
            raise Refused(401, "You are signed out. Sign in again.")
        name = _text(body, "name", MAX_NAME)
        token = _text(body, "challenge_token", passkeys.MAX_CHALLENGE_TOKEN, required=True)
        added = await passkeys.register_passkey(
            db, sec, signin.user, name, _credential(body), token
        )
        return JSONResponse(
            {
                "redirect": f"{PASSKEYS_URL}?notice=added",
                "recovery_codes": added.recovery_codes,
            },
            status_code=201,
        )

    return await _json_endpoint(request, handle)


async def _form(request: Request) -> FormData:
    """The posted form once its CSRF token matched the cookie (CsrfError: the 403 page)."""
    try:
        form = await request.form()
    except HTTPException:  # a malformed multipart body
        raise CsrfError from None
    check_csrf(request, form.get(CSRF_FIELD))
    return form


@router.post(PASSKEYS_URL + "/{factor_id}/remove")
async def remove_passkey(
    factor_id: str,
    request: Request,
    db: SessionDep,
    sec: SecurityDep,
    settings: SettingsDep,
    who: ClientDep,
) -> Response:
    """Remove one of the account's passkeys, with the current password."""
    form = await _form(request)
    signin = await _browser_session(request, db, settings)
    if signin is None:
        return redirect(SIGNIN_URL)
    user = signin.user
    try:
        wanted = uuid.UUID(factor_id) if len(factor_id) <= 36 else None
    except ValueError:
        wanted = None
    if wanted is None or wanted not in {f.id for f in await passkeys.list_passkeys(db, user.id)}:
        return await _passkeys_page(request, db, user, error="No such passkey.", status=404)
    password = form.get("password")
    if not isinstance(password, str) or not password or len(password) > MAX_PASSWORD:
        return await _passkeys_page(
            request, db, user, error="Enter your current password to remove it.", status=422
        )
    # Nothing is written before the checks pass: a refusal leaves the session as it was (its
    # objects not expired by a rollback), and the page is drawn from it.
    try:
        await mfa.remove_factor(db, sec, user, wanted, password=password, code=None, client=who)
    except TooManyRequests as exc:
        return await _passkeys_page(
            request, db, user, error=_TOO_MANY, status=429, headers=exc.headers
        )
    except NotFound:
        return await _passkeys_page(request, db, user, error="No such passkey.", status=404)
    except DomainError as exc:  # the wrong password
        return await _passkeys_page(request, db, user, error=exc.detail, status=exc.status)
    return redirect(f"{PASSKEYS_URL}?notice=removed")


# --- signing in -----------------------------------------------------------------------------------


def _signin_url(authz: str) -> str:
    return f"{SIGNIN_URL}?{urlencode({'authz': authz})}" if authz else SIGNIN_URL


def _signin_page(
    request: Request,
    mode: str,
    authz: str,
    auth: AuthorizationRequest | None,
    *,
    ticket: str = "",
    error: str | None = None,
    status: int = 200,
) -> Response:
    return render(
        request,
        "passkey_signin.html",
        {
            "mode": mode,
            "authz": authz,
            "ticket": ticket,
            "error": error,
            "client_name": auth.client.name if auth else None,
            "signin_url": _signin_url(authz),
        },
        status=status,
        scripts=SCRIPTS,
    )


async def _parse_authz(
    request: Request, db: AsyncSession, settings: Settings, authz: str
) -> AuthorizationRequest | Response | None:
    """The pending authorization request (None when there is none), or the answer to an
    invalid one (the error page, or the error sent back to the application)."""
    if not authz:
        return None
    return await oauth_pages._authorization(request, db, settings, authz, 303)


@router.get(SIGNIN_URL + "/passkey")
async def passkey_signin_page(
    request: Request, db: SessionDep, settings: SettingsDep, authz: str = ""
) -> Response:
    if len(authz) > MAX_AUTHZ:
        return render_error(
            request, 400, "Sign-in request refused", "Start again from the application."
        )
    auth = await _parse_authz(request, db, settings, authz)
    if isinstance(auth, Response):
        return auth
    if auth is None and await _browser_session(request, db, settings) is not None:
        return redirect(ACCOUNT_URL, 302)
    return _signin_page(request, "signin", authz, auth)


@router.post(SIGNIN_URL + "/second-factor/use-passkey")
async def second_factor_passkey_page(
    request: Request, db: SessionDep, sec: SecurityDep, settings: SettingsDep
) -> Response:
    """The second step with a passkey instead of a code (from the second-factor page)."""
    form = await _form(request)
    authz = form.get("authz")
    authz = authz if isinstance(authz, str) and len(authz) <= MAX_AUTHZ else ""
    auth = await _parse_authz(request, db, settings, authz)
    if isinstance(auth, Response):
        return auth
    ticket_text = form.get("ticket")
    ticket_text = ticket_text if isinstance(ticket_text, str) else ""
    user = await _ticket_user(db, sec, ticket_text)
    if user is None:
        return _signin_page(request, "second_factor", authz, auth, error=_TOO_LATE, status=400)
    if not await passkeys.list_passkeys(db, user.id):
        return _signin_page(
            request, "second_factor", authz, auth, status=400,
            error="This account has no passkey. Go back and enter a code instead.",
        )  # fmt: skip
    return _signin_page(request, "second_factor", authz, auth, ticket=ticket_text)


async def _ticket_user(db: AsyncSession, sec: Security, ticket: str) -> User | None:
    """The active user whose password the (hosted pages') ticket vouches for, or None."""
    opened = open_ticket(sec, ticket, BROWSER) if len(ticket) <= MAX_TICKET_LENGTH else None
    user = await db.get(User, opened.user_id) if opened is not None else None
    return user if user is not None and user.is_active else None


async def _signed_in_answer(
    request: Request,
    db: AsyncSession,
    sec: Security,
    settings: Settings,
    user: User,
    who: ClientInfo,
    auth: AuthorizationRequest | None,
    amr: list[str],
) -> Response:
    """Sign in as the password form does (a new browser session, then the pending request), but
    answer ``{"redirect": url}`` with the new session's cookie, for the script to follow."""
    answer = await oauth_pages._signed_in(request, db, sec, settings, user, who, auth, amr=amr)
    if 300 <= answer.status_code < 400:
        target = answer.headers["location"]
    elif auth is not None:  # the consent page: the authorization endpoint shows it again
        target = f"/oauth2/authorize?{after_sign_in(auth).raw}"
    else:
        target = ACCOUNT_URL
    response = JSONResponse({"redirect": target})
    for cookie in answer.headers.getlist("set-cookie"):
        response.headers.append("set-cookie", cookie)
    return response


def _authz_refusal(answer: Response) -> Response:
    """An invalid authorization request: back to the application with its error when the
    client is known, else a 400."""
    if 300 <= answer.status_code < 400:
        return JSONResponse({"redirect": answer.headers["location"]})
    raise Refused(400, "The sign-in request is not valid. Start again from the application.")


@router.post(SIGNIN_URL + "/passkey/options")
async def signin_options(request: Request, db: SessionDep, sec: SecurityDep) -> Response:
    async def handle(body: dict[str, Any]) -> Response:
        return _options_answer(await passkeys.authentication_options(db, sec, None))

    return await _json_endpoint(request, handle)


@router.post(SIGNIN_URL + "/passkey")
async def signin_with_passkey(
    request: Request, db: SessionDep, sec: SecurityDep, settings: SettingsDep, who: ClientDep
) -> Response:
    """Passwordless: a discoverable credential with user verification signs in on its own
    (``amr`` ``hwk`` + ``mfa``: something held, unlocked by something known or a biometric)."""

    async def handle(body: dict[str, Any]) -> Response:
        auth = await _parse_authz(request, db, settings, _text(body, "authz", MAX_AUTHZ))
        if isinstance(auth, Response):
            return _authz_refusal(auth)
        token = _text(body, "challenge_token", passkeys.MAX_CHALLENGE_TOKEN, required=True)
        asserted = await passkeys.verify_assertion(db, sec, _credential(body), token, user=None)
        audit_line(audit, "passkey sign-in", user=asserted.user.id, ip=who.ip)
        return await _signed_in_answer(
            request, db, sec, settings, asserted.user, who, auth, ["hwk", "mfa"]
        )

    return await _json_endpoint(request, handle)


@router.post(SIGNIN_URL + "/second-factor/passkey/options")
async def second_factor_options(request: Request, db: SessionDep, sec: SecurityDep) -> Response:
    async def handle(body: dict[str, Any]) -> Response:
        user = await _ticket_user(db, sec, _text(body, "ticket", MAX_TICKET_LENGTH, required=True))
        if user is None:
            raise Refused(400, _TOO_LATE)
        return _options_answer(await passkeys.authentication_options(db, sec, user))

    return await _json_endpoint(request, handle)


@router.post(SIGNIN_URL + "/second-factor/passkey")
async def second_factor_with_passkey(
    request: Request,
    db: SessionDep,
    sessions: SessionMakerDep,
    sec: SecurityDep,
    settings: SettingsDep,
    who: ClientDep,
) -> Response:
    """The second step after the password (the ticket says whose): the passkey must be that
    user's; counted by the login guard like a code. ``amr`` ``pwd`` + ``hwk`` + ``mfa``."""

    async def handle(body: dict[str, Any]) -> Response:
        auth = await _parse_authz(request, db, settings, _text(body, "authz", MAX_AUTHZ))
        if isinstance(auth, Response):
            return _authz_refusal(auth)
        user = await _ticket_user(db, sec, _text(body, "ticket", MAX_TICKET_LENGTH, required=True))
        if user is None:
            raise Refused(400, _TOO_LATE)
        token = _text(body, "challenge_token", passkeys.MAX_CHALLENGE_TOKEN, required=True)
        await passkeys.verify_second_factor(
            db, sec, user, _credential(body), token, who, sessions=sessions
        )
        return await _signed_in_answer(
            request, db, sec, settings, user, who, auth, ["pwd", "hwk", "mfa"]
        )

    return await _json_endpoint(request, handle)
