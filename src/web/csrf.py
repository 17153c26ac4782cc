"""Cross-site request forgery protection for the hosted pages: a double-submit cookie.

Every page with a form sets a random token in a cookie and repeats it in a hidden field; a POST
is accepted only when the two agree. Another site can make a browser send our cookie, but it can
neither read it nor set it (``__Host-`` over https, SameSite=Lax everywhere), so it cannot put
the same value in the form. The token is not tied to a sign-in: the sign-in and sign-up forms
need protection before anyone is signed in (login CSRF).
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from starlette.responses import Response

from src.config.settings import Settings

CSRF_FIELD = "csrf_token"
# secrets.token_urlsafe(32): 43 characters of base64url. Anything else is not ours.
_WELL_FORMED = re.compile(r"[A-Za-z0-9_-]{43}")
# Where a request keeps the token it made. In the request's own scope, not in request.state: that
# is the lifespan state, which a server may share between requests rather than copy.
_NEW_TOKEN_KEY = "ums.new_csrf_token"


class CsrfError(Exception):
    """The form's token is missing or does not match the cookie: refuse, change nothing."""


def cookie_name(settings: Settings) -> str:
    """``__Host-`` where browsers accept it (https): no subdomain can then plant its own token."""
    return "__Host-ums_csrf" if settings.secure_cookies else "ums_csrf"


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _cookie_token(request: Request) -> str | None:
    value = request.cookies.get(cookie_name(_settings(request)))
    return value if value is not None and _WELL_FORMED.fullmatch(value) else None


def csrf_token(request: Request) -> str:
    """The token this request's forms must carry: the cookie's, or a new one that ``render``
    then sets as the cookie (one per request, however many forms ask)."""
    existing = _cookie_token(request)
    if existing is not None:
        return existing
    fresh: str | None = request.scope.get(_NEW_TOKEN_KEY)
    if fresh is None:
        fresh = secrets.token_urlsafe(32)
        request.scope[_NEW_TOKEN_KEY] = fresh
    return fresh


def new_csrf_token(request: Request) -> str | None:
    """The token ``csrf_token`` made for this request, if it had to make one (to set as cookie)."""
    token: str | None = request.scope.get(_NEW_TOKEN_KEY)
    return token


def check_csrf(request: Request, submitted: object) -> None:
    """Raise CsrfError unless the cookie and the submitted value are present and equal.

    ``submitted`` is whatever the form held (a file upload or nothing at all fails too)."""
    cookie = _cookie_token(request)
    if cookie is None or not isinstance(submitted, str) or not _WELL_FORMED.fullmatch(submitted):
        raise CsrfError
    # Constant time: how much of a guess matched must not show in the answer's timing.
    if not hmac.compare_digest(cookie.encode(), submitted.encode()):
        raise CsrfError


async def require_csrf(request: Request, form: Mapping[str, Any] | None = None) -> None:
    """``check_csrf`` on a form (read from the request when not given)."""
    if form is None:
        form = await request.form()
    check_csrf(request, form.get(CSRF_FIELD))


def set_csrf_cookie(response: Response, settings: Settings, token: str) -> None:
    """HttpOnly: no script needs it (the page carries the token in its form), so none may read
    it. A session cookie (no Max-Age): a form left open past a browser restart asks again."""
    response.set_cookie(
        cookie_name(settings),
        token,
        httponly=True,
        samesite="lax",
        secure=settings.secure_cookies,
        path="/",
    )


async def checked_form(request: Request, max_length: int = 4096) -> dict[str, str]:
    """A posted form as plain strings, once its CSRF token is checked (CsrfError otherwise):
    the first value of each field, a value longer than ``max_length`` read as empty (a page
    then says what is missing rather than storing or hashing it), uploaded files ignored."""
    form = await request.form()
    values: dict[str, str] = {}
    for name, value in form.multi_items():
        if isinstance(value, str) and name not in values:
            values[name] = value if len(value) <= max_length else ""
    check_csrf(request, values.get(CSRF_FIELD))
    return values
