"""How console pages go out: the hosted pages' ``render`` (policy, CSRF cookie, no caching) with
the console's script and layout, the refreshed tokens' cookie, and its errors as pages."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import Any
from urllib.parse import urlencode

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from src.app.container import app_services
from src.web.admin.api import ApiProblem, Console, NotAnAdmin, SignInNeeded
from src.web.admin.session import clear_tokens, set_tokens
from src.web.render import PageRoute, redirect, render

logger = logging.getLogger(__name__)

# Where the request keeps its console (in its scope, like the CSRF token: never shared state).
CONSOLE_KEY = "ums.admin_console"
# The page a form was posted from: where a sign-in that interrupts the post returns to.
BACK_KEY = "ums.admin_back"
SCRIPTS = ("admin.js",)
# Fixed messages a redirect after an action may name (?done=...): nothing from the URL is shown.
DONE = {
    "revoked": "The session was revoked.",
    "deactivated": "The account was deactivated; all its sessions ended.",
    "activated": "The account was activated.",
    "created": "The account was created.",
    "client-updated": "The client was saved.",
    "client-deleted": "The client was deleted.",
    "key-rotated": "A new signing key is now in use; the previous one still verifies tokens.",
    "reset-sent": "A password reset link was mailed to the account's address.",
    "factors-reset": "Every second factor of the account was removed; all its sessions ended.",
    "deleted": "The account was deleted.",
}


def remember(request: Request, console: Console, back: str | None = None) -> Console:
    """Keep the request's console (for its refreshed cookie) and the page to come back to."""
    request.scope[CONSOLE_KEY] = console
    if back is not None:
        request.scope[BACK_KEY] = back
    return console


def page(
    request: Request,
    console: Console | None,
    template: str,
    context: dict[str, Any],
    *,
    status: int = 200,
    section: str = "",
) -> Response:
    done = request.query_params.get("done")
    return render(
        request,
        template,
        {
            "admin_email": console.email if console else None,
            "section": section,
            "done": DONE.get(done or ""),
            "error": None,
            **context,
        },
        status=status,
        scripts=SCRIPTS,
    )


def signin_url(request: Request, *, again: bool = False) -> str:
    """Back to this page after signing in (the page a form was on, for a POST)."""
    target = request.url.path
    if request.method == "GET" and request.url.query:
        target += f"?{request.url.query}"
    elif request.method != "GET":
        target = str(request.scope.get(BACK_KEY) or "/admin")
    query = {"next": target, **({"again": "1"} if again else {})}
    return f"/admin/signin?{urlencode(query)}"


class AdminRoute(PageRoute):
    """A console page: signed out (or the tokens refused) goes to the sign-in, a step-up the API
    asks for to a fresh sign-in, an API error no route caught to the error page with its status;
    refreshed tokens go out in the answer's cookie."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def console_handler(request: Request) -> Response:
            try:
                response = await handler(request)
            except SignInNeeded as exc:
                if request.headers.get("x-admin-fragment"):
                    # The health panel's script: it says "sign in again" instead of following.
                    return Response(status_code=401)
                response = redirect(signin_url(request, again=exc.again), 303)
            except NotAnAdmin as exc:
                return await not_an_admin(request, exc)
            except ApiProblem as exc:
                response = error_page(request, exc.status, exc.title, exc.message)
            except RequestValidationError:
                # Only a path parameter is validated (forms are read by hand): a malformed id
                # names no page.
                response = error_page(request, 404, "Not Found", "There is no such page.")
            except HTTPException as exc:
                # Starlette's own refusals, such as a form body it cannot parse (400).
                phrase = HTTPStatus(exc.status_code).phrase
                message = exc.detail if isinstance(exc.detail, str) else phrase
                response = error_page(request, exc.status_code, phrase, message)
            except Exception:
                # A readable page rather than the API's problem+json; the trace stays in the log.
                logger.exception("Unhandled error on console page %s", request.url.path)
                response = error_page(
                    request,
                    500,
                    "Something went wrong",
                    "The console could not show this page. Try again; if it keeps failing, "
                    "the service's log has the details.",
                )
            console = request.scope.get(CONSOLE_KEY)
            if isinstance(console, Console) and console.changed:
                services = app_services(request.app)
                set_tokens(response, services.security.sealer, services.settings, console.tokens)
            return response

        return console_handler


def error_page(request: Request, status: int, title: str, message: str) -> Response:
    """The console's error page, with its menu when the request has a signed-in admin."""
    console = request.scope.get(CONSOLE_KEY)
    context = {"title": title, "message": message}
    return page(request, console, "admin/error.html", context, status=status)


async def not_an_admin(request: Request, exc: NotAnAdmin) -> Response:
    """Refuse an account demoted while signed in, as the callback refuses a non-admin: its
    console tokens are revoked and their cookie goes."""
    for token in (exc.console.tokens.refresh_token, exc.console.tokens.access_token):
        if token:
            await exc.console.api.revoke(token)
    context = {"title": exc.title, "message": exc.message}
    response = page(request, None, "admin/error.html", context, status=exc.status)
    clear_tokens(response, app_services(request.app).settings)
    return response
