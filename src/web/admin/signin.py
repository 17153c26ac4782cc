"""Signing in to the console: the authorization code flow with PKCE, as a first-party client.

``/admin/signin`` keeps a state and a PKCE verifier in a sealed, short-lived cookie and sends the
browser to ``/oauth2/authorize``; ``/admin/callback`` checks the state, exchanges the code at the
token endpoint (in-process) and keeps the tokens in the sealed console cookie. An account that is
not an administrator is refused there (403), and its new tokens are revoked at once.
"""

from __future__ import annotations

import time
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from starlette.responses import Response

from src.app.container import app_services
from src.oauth.clients import CONSOLE_CLIENT_ID, console_redirect_uri
from src.web.admin.api import ApiProblem, in_process_api
from src.web.admin.pages import AdminRoute, page
from src.web.admin.session import (
    ConsoleTokens,
    clear_pending,
    clear_tokens,
    new_pending,
    read_pending,
    read_tokens,
    safe_next,
    set_pending,
    set_tokens,
)
from src.web.csrf import checked_form
from src.web.render import redirect

router = APIRouter(route_class=AdminRoute, include_in_schema=False)
MAX_PARAM = 2048


@router.get("/admin/signin")
async def start_signin(request: Request) -> Response:
    """Off to the authorization endpoint; ``again=1`` asks for the password even when the
    browser is signed in (the API wanted a recent sign-in for a change)."""
    services = app_services(request.app)
    settings = services.settings
    pending = new_pending(safe_next(request.query_params.get("next")))
    query = {
        "response_type": "code",
        "client_id": CONSOLE_CLIENT_ID,
        "redirect_uri": console_redirect_uri(settings),
        "scope": "openid profile email",
        "state": pending.state,
        "code_challenge": pending.challenge,
        "code_challenge_method": "S256",
    }
    if request.query_params.get("again") == "1":
        query["prompt"] = "login"
    response = redirect(f"/oauth2/authorize?{urlencode(query)}", 302)
    set_pending(response, services.security.sealer, settings, pending)
    return response


def _refused(request: Request, title: str, message: str, status: int) -> Response:
    settings = app_services(request.app).settings
    response = page(
        request, None, "admin/error.html", {"title": title, "message": message}, status=status
    )
    clear_pending(response, settings)
    return response


@router.get("/admin/callback")
async def callback(request: Request) -> Response:
    services = app_services(request.app)
    settings, sealer = services.settings, services.security.sealer
    params = request.query_params
    pending = read_pending(request, sealer, settings)
    state, code = params.get("state", ""), params.get("code", "")
    if pending is None or len(state) > MAX_PARAM or state != pending.state:
        return _refused(
            request,
            "Sign-in expired",
            "The sign-in took too long or did not start here. Open the console again.",
            400,
        )
    if params.get("error") or not code or len(code) > MAX_PARAM:
        reason = params.get("error_description") or "The sign-in did not complete."
        return _refused(request, "Sign-in failed", reason[:300], 400)
    api = await in_process_api(request)
    try:
        body = await api.exchange(code, pending.verifier)
        me = await api.whoami(body["access_token"])
    except ApiProblem as exc:
        return _refused(request, "Sign-in failed", exc.message, 400)
    if me.get("role") != "admin":
        # Nothing this account could do here: its console tokens end now.
        for token in (body.get("refresh_token"), body["access_token"]):
            if token:
                await api.revoke(token)
        response = _refused(
            request,
            "Administrators only",
            f"You are signed in as {me.get('email')}, which is not an administrator account. "
            "Ask an administrator for access, or sign in with another account.",
            403,
        )
        clear_tokens(response, settings)
        return response
    tokens = ConsoleTokens(
        access_token=body["access_token"],
        refresh_token=body.get("refresh_token"),
        expires_at=time.time() + float(body.get("expires_in") or 0),
        user_id=str(me["id"]),
        email=str(me["email"]),
    )
    # A page that moves on by itself rather than a redirect: the tokens' cookie is SameSite=Strict,
    # and a redirect chain that began on another site would not send it to the next page.
    response = page(request, None, "admin/continue.html", {"next": pending.next})
    set_tokens(response, sealer, settings, tokens)
    clear_pending(response, settings)
    return response


@router.post("/admin/signout")
async def signout(request: Request) -> Response:
    """Revoke the console's tokens (the session they belong to ends) and forget them. The
    browser's own sign-in on the hosted pages stays, with a link to end it too."""
    await checked_form(request)
    services = app_services(request.app)
    settings = services.settings
    tokens = read_tokens(request, services.security.sealer, settings)
    if tokens is not None:
        api = await in_process_api(request)
        for token in (tokens.refresh_token, tokens.access_token):
            if token:
                await api.revoke(token)
    response = page(request, None, "admin/signed_out.html", {})
    clear_tokens(response, settings)
    return response
