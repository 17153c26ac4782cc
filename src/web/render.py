"""Responses of the hosted pages: templates, headers, cookies.

Every page goes out through ``render`` (or ``render_error``, ``redirect``), so every page gets
the same strict Content-Security-Policy, is never cached, and carries a CSRF token for its forms.
The policy allows styles and images from this origin and nothing else: no script at all, no
inline style, no frame. Forms may post here, and to the origins a route names in
``form_targets``: Chrome applies ``form-action`` to the redirect that follows a form POST, so a
page whose form ends in a redirect to an application (its redirect URI) must list that origin.
A page that needs a script of ours (``scripts``: the passkey pages) also allows scripts from this
origin and requests to it (``script-src 'self'; connect-src 'self'``); still nothing inline.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Coroutine, Sequence
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.responses import Response

from src.auth.browser import cookie_name as session_cookie_name
from src.auth.browser import device_cookie_name
from src.config.settings import Settings
from src.errors import DomainError
from src.web.csrf import CsrfError, csrf_token, new_csrf_token, set_csrf_cookie

STATIC_DIR = Path(__file__).parent / "static"
ASSETS_PATH = "/assets"

_environment = Environment(
    loader=PackageLoader("src.web", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    # A misspelt variable fails the page (and its test) instead of rendering as nothing.
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)

# What a form-action source may look like once built: nothing that could end the directive
# (";", ","), start another token (whitespace) or quote.
_SOURCE = re.compile(r"[a-z][a-z0-9+.-]*:(//[A-Za-z0-9.\-\[\]:]+)?")


@cache
@functools.cache
def asset_url(name: str) -> str:
    """``/assets/<name>?v=<hash of its content>``: a changed file gets a new URL, so the mount
    may let browsers cache assets for ever while a deployment still shows its new look."""
    digest = hashlib.sha256((STATIC_DIR / name).read_bytes()).hexdigest()[:16]
    return f"{ASSETS_PATH}/{name}?v={digest}"


_environment.globals["asset_url"] = asset_url


def _form_source(target: str) -> str:
    """The CSP source for a form target: ``https://host[:port]`` for a web URL or origin, the
    bare ``scheme:`` for another scheme (a native application's redirect URI). A value that
    would not make exactly one source is refused: it must never reach a header."""
    parts = urlsplit(target)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        host = parts.hostname or ""
        if not host:
            raise ValueError(f"{target!r} names no host")
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
        source = f"{scheme}://{host}{port}"
    else:
        source = f"{scheme}:"
    if not _SOURCE.fullmatch(source):
        raise ValueError(f"{target!r} cannot be a form-action source")
    return source


def content_security_policy(form_targets: Sequence[str] = (), *, scripts: bool = False) -> str:
    """The pages' policy; directives that do not fall back to default-src are spelled out.
    ``scripts``: the page loads a script from /assets, which calls this origin (fetch)."""
    sources = ["'self'"]
    for target in form_targets:
        source = _form_source(target)
        if source not in sources:
            sources.append(source)
    return "; ".join(
        (
            "default-src 'none'",
            *(("script-src 'self'", "connect-src 'self'") if scripts else ()),
            "style-src 'self'",
            "img-src 'self'",
            f"form-action {' '.join(sources)}",
            "frame-ancestors 'none'",
            "base-uri 'none'",
        )
    )


def _secure(response: Response, form_targets: Sequence[str] = (), *, scripts: bool = False) -> None:
    response.headers["Content-Security-Policy"] = content_security_policy(
        form_targets, scripts=scripts
    )
    # Pages hold one-time tokens, CSRF tokens and account details: never kept, never leaked
    # to the next site in a Referer header.
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def render(
    request: Request,
    template: str,
    context: dict[str, Any],
    *,
    status: int = 200,
    form_targets: Sequence[str] = (),
    headers: dict[str, str] | None = None,
    scripts: Sequence[str] = (),
) -> HTMLResponse:
    """A page from ``template`` with ``context`` plus ``csrf_token`` and ``project_name``.

    ``scripts``: files of src/web/static the page loads (the template names them as
    ``scripts``, their fingerprinted URLs); only then does the policy allow this origin's
    scripts."""
    settings = _settings(request)
    token = csrf_token(request)
    html = _environment.get_template(template).render(
        {
            **context,
            "csrf_token": token,
            "project_name": settings.PROJECT_NAME,
            "scripts": [asset_url(name) for name in scripts],
        }
    )
    response = HTMLResponse(html, status_code=status, headers=headers)
    _secure(response, form_targets, scripts=bool(scripts))
    fresh = new_csrf_token(request)
    if fresh is not None:
        set_csrf_cookie(response, settings, fresh)
    return response


def render_error(
    request: Request,
    status: int,
    title: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    """The error page: a title, a sentence saying what to do next, the status it deserves."""
    return render(
        request, "error.html", {"title": title, "message": message}, status=status, headers=headers
    )


def render_csrf_error(request: Request) -> HTMLResponse:
    """403 for a form without its token, or with another one (often a form left open too long,
    or cookies blocked). The page sets a fresh token, so going back and retrying works."""
    return render_error(
        request,
        403,
        "This form has expired",
        "For your security the form could not be accepted. Go back, reload the page and try "
        "again. If this keeps happening, check that your browser accepts cookies from this site.",
    )


def redirect(url: str, status: int = 303) -> RedirectResponse:
    """A redirect with the pages' headers (303 by default: after a POST, the browser GETs)."""
    response = RedirectResponse(url, status_code=status)
    _secure(response)
    return response


def set_session_cookie(response: Response, settings: Settings, value: str) -> None:
    """The browser session's cookie. HttpOnly and SameSite=Lax: no script reads it, and other
    sites' requests carry it only on top-level navigations (what the authorization flow needs).
    It lives as long as the session may (SESSION_MAX_LIFETIME_DAYS); the server ends it sooner."""
    response.set_cookie(
        session_cookie_name(settings),
        value,
        max_age=settings.SESSION_MAX_LIFETIME_DAYS * 86400,
        httponly=True,
        samesite="lax",
        secure=settings.secure_cookies,
        path="/",
    )


def set_device_cookie(response: Response, settings: Settings, value: str) -> None:
    """The known-device note (src.auth.browser): kept across sign-outs, for as long as an
    address stays known to the login guard (LOGIN_KNOWN_ADDRESS_DAYS)."""
    response.set_cookie(
        device_cookie_name(settings),
        value,
        max_age=settings.LOGIN_KNOWN_ADDRESS_DAYS * 86400,
        httponly=True,
        samesite="lax",
        secure=settings.secure_cookies,
        path="/",
    )


def clear_session_cookie(response: Response, settings: Settings) -> None:
    """Expire the session cookie, with the attributes it was set with (a ``__Host-`` cookie is
    replaced only by one that is Secure with Path=/)."""
    response.delete_cookie(
        session_cookie_name(settings),
        httponly=True,
        samesite="lax",
        secure=settings.secure_cookies,
        path="/",
    )


class PageRoute(APIRoute):
    """A route that answers as a page, never as JSON: a refused CSRF check is the 403 page, and
    a domain error no route caught becomes the error page with its status (and headers, such as
    Retry-After). Use it as ``APIRouter(route_class=PageRoute)``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def page_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except CsrfError:
                return render_csrf_error(request)
            except DomainError as exc:
                return render_error(request, exc.status, exc.title, exc.detail, headers=exc.headers)

        return page_handler
