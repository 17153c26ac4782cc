"""The browser side of the provider: authorize, sign in, consent, sign out.

Each step re-validates the whole authorization request it carries (``authz``, the original query
string), so a page posting back something altered gets the same checks as a fresh request. Forms
are CSRF-protected; the sign-in issues a new browser session (and cookie) every time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, BackgroundTasks, Request
from fastapi.responses import Response

from src.api.dependencies import (
    ClientDep,
    SecurityDep,
    SessionDep,
    SessionMakerDep,
    SettingsDep,
)
from src.auth import mfa, passkeys
from src.auth import service as auth_service
from src.auth.browser import (
    BrowserSignIn,
    cookie_name,
    current_browser_session,
    device_cookie_name,
    device_note,
    device_owner,
    end_browser_session,
)
from src.auth.challenge import BROWSER, amr_for, issue_ticket, open_ticket
from src.auth.context import Security
from src.auth.service import ClientInfo
from src.config.logging import audit_line
from src.config.settings import Settings
from src.db.models import User
from src.db.types import utcnow
from src.errors import OAuthError, TooManyRequests
from src.oauth import consents
from src.oauth.authorize import (
    AuthorizationRequest,
    PageError,
    Redirect,
    RedirectError,
    ShowConsent,
    ShowEnrolment,
    ShowSignIn,
    after_sign_in,
    client_origin_targets,
    decide,
    describe_scopes,
    error_url,
    origin_of,
    parse_request,
    without_prompt,
)
from src.oauth.logout import LogoutRequest, parse_logout_request
from src.users.service import commit_change
from src.web.csrf import checked_form
from src.web.render import (
    PageRoute,
    clear_session_cookie,
    redirect,
    render,
    render_error,
    set_device_cookie,
    set_session_cookie,
)

# PageRoute: a refused CSRF check is the 403 page, a domain error (429...) its error page.
router = APIRouter(route_class=PageRoute, include_in_schema=False)
audit = logging.getLogger("src.auth.audit")

MAX_FIELD = 4096
MAX_EMAIL = 320
MAX_PASSWORD = 1024
_REFUSED = "Sign-in request refused"
# Where a user the policy (MFA_REQUIRED) asks for a second factor goes before anything else.
ENROL_FIRST = "/account/security?required=1"


async def _authorization(
    request: Request, db: Any, settings: Settings, raw: str, status: int
) -> AuthorizationRequest | Response:
    """The validated request, or the answer to an invalid one: the error page while the client
    cannot be trusted, the error sent back to its redirect URI after that."""
    try:
        return await parse_request(db, settings, raw)
    except PageError as exc:
        return render_error(request, 400, _REFUSED, str(exc))
    except RedirectError as exc:
        return redirect(error_url(settings, exc), status)


def _cookie(request: Request, settings: Settings) -> str | None:
    return request.cookies.get(cookie_name(settings))


# --- authorize ------------------------------------------------------------------------------------


@router.get("/oauth2/authorize")
async def authorize(request: Request, db: SessionDep, settings: SettingsDep) -> Response:
    """OAuth 2.1 section 4.1.1 / OpenID Connect Core 3.1.2.1 (GET; response_type=code)."""
    auth = await _authorization(request, db, settings, request.url.query, 302)
    if isinstance(auth, Response):
        return auth
    signin = await current_browser_session(db, _cookie(request, settings))
    return await _next_step(request, db, settings, auth, signin, status=302)


async def _next_step(
    request: Request,
    db: Any,
    settings: Settings,
    auth: AuthorizationRequest,
    signin: BrowserSignIn | None,
    *,
    status: int,
    error: str | None = None,
) -> Response:
    try:
        decision = await decide(db, settings, auth, signin)
    except RedirectError as exc:
        return redirect(error_url(settings, exc), status)
    if isinstance(decision, Redirect):
        return redirect(decision.url, status)
    if isinstance(decision, ShowEnrolment):
        return redirect(ENROL_FIRST, status)
    if isinstance(decision, ShowConsent):
        return render(
            request,
            "consent.html",
            {
                "client_name": auth.client.name,
                "scopes": describe_scopes(decision.missing),
                "authz": auth.raw,
                "user_email": decision.signin.user.email,
            },
            form_targets=client_origin_targets(auth),
        )
    assert isinstance(decision, ShowSignIn)
    return _signin_page(request, settings, auth.raw, auth.login_hint or "", auth, error=error)


def _signin_page(
    request: Request,
    settings: Settings,
    authz: str,
    email: str,
    auth: AuthorizationRequest | None,
    *,
    error: str | None = None,
    notice: str | None = None,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    query = urlencode({"authz": authz}) if authz else ""
    response = render(
        request,
        "signin.html",
        {
            "authz": authz,
            "email": email,
            "error": error,
            "notice": notice,
            "client_name": auth.client.name if auth else None,
            "signup_url": (f"/account/signup?{query}" if query else "/account/signup")
            if settings.SELF_REGISTRATION_ENABLED
            else None,
            "forgot_url": f"/account/forgot-password?{query}"
            if query
            else "/account/forgot-password",
        },
        status=status,
        # The sign-in may end in a redirect back to the application.
        form_targets=client_origin_targets(auth) if auth else (),
    )
    response.headers.update(headers or {})
    return response


# --- sign in --------------------------------------------------------------------------------------

_NOTICES = {
    "registered": "Your account is ready: check your mail to verify the address, and sign in.",
    "reset": "Your password was changed. Sign in with the new one.",
}


@router.get("/account/signin")
async def signin_page(
    request: Request, db: SessionDep, settings: SettingsDep, authz: str = "", notice: str = ""
) -> Response:
    if len(authz) > MAX_FIELD:
        return render_error(request, 400, _REFUSED, "The sign-in request is too long.")
    auth = await _authorization(request, db, settings, authz, 302) if authz else None
    if isinstance(auth, Response):
        return auth
    if not authz and await current_browser_session(db, _cookie(request, settings)) is not None:
        return redirect("/account", 302)
    return _signin_page(
        request,
        settings,
        authz,
        auth.login_hint or "" if auth else "",
        auth,
        notice=_NOTICES.get(notice),
    )


@router.post("/account/signin")
async def signin(
    request: Request,
    db: SessionDep,
    sessions: SessionMakerDep,
    sec: SecurityDep,
    settings: SettingsDep,
    who: ClientDep,
    background: BackgroundTasks,
) -> Response:
    """Check the password (under the login guard, like the password grant), start a new browser
    session, then carry on with the authorization request, if there is one."""
    form = await checked_form(request)
    authz = form.get("authz", "")
    auth = await _authorization(request, db, settings, authz, 303) if authz else None
    if isinstance(auth, Response):
        return auth
    email, password = form.get("email", ""), form.get("password", "")
    if not email or not password or len(email) > MAX_EMAIL or len(password) > MAX_PASSWORD:
        return _signin_page(
            request, settings, authz, email[:MAX_EMAIL], auth,
            error="Enter your email address and password.", status=400,
        )  # fmt: skip
    try:
        device = device_owner(sec, request.cookies.get(device_cookie_name(settings)))
        user = await auth_service.check_password(
            db,
            sec,
            email,
            password,
            who,
            sessions=sessions,
            defer=background.add_task,
            device_user=device,
        )
    except OAuthError as exc:
        return _signin_page(
            request, settings, authz, email, auth, error=exc.description, status=400
        )
    except TooManyRequests as exc:
        return _signin_page(
            request, settings, authz, email, auth,
            error="Too many attempts. Wait a little and try again.",
            status=429, headers=exc.headers,
        )  # fmt: skip
    if await mfa.has_second_factor(db, user.id):
        # The sign-in waits for the second step; keep what the password check did (a rehash).
        await commit_change(db, sec, auth_service.changed_users(db, user))
        ticket = issue_ticket(sec, user.id, BROWSER)
        has_passkey = bool(await passkeys.list_passkeys(db, user.id))
        return _second_factor_page(request, ticket, authz, auth, has_passkey=has_passkey)
    return await _signed_in(request, db, sec, settings, user, who, auth, amr=["pwd"])


async def _signed_in(
    request: Request,
    db: Any,
    sec: Security,
    settings: Settings,
    user: Any,
    who: ClientInfo,
    auth: AuthorizationRequest | None,
    *,
    amr: list[str],
) -> Response:
    """A new browser session, its cookie, and the next step of the pending request (if any)."""
    signin_ = await _start_browser_session(request, db, sec, settings, user, who, amr)
    if auth is None:
        enrol = await mfa.missing_required_factor(db, settings, user)
        response: Response = redirect(ENROL_FIRST if enrol else "/account", 303)
    else:
        auth = after_sign_in(auth)
        response = await _next_step(request, db, settings, auth, signin_.value, status=303)
    set_session_cookie(response, settings, signin_.cookie)
    set_device_cookie(response, settings, device_note(sec, user.id))
    return response


def _second_factor_page(
    request: Request,
    ticket: str,
    authz: str,
    auth: AuthorizationRequest | None,
    *,
    has_passkey: bool,
    error: str | None = None,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    return render(
        request,
        "second_factor.html",
        {
            "ticket": ticket,
            "authz": authz,
            "error": error,
            "client_name": auth.client.name if auth else None,
            "has_passkey": has_passkey,
        },
        status=status,
        headers=headers,
        form_targets=client_origin_targets(auth) if auth else (),
    )


@router.post("/account/signin/second-factor")
async def second_factor(
    request: Request,
    db: SessionDep,
    sessions: SessionMakerDep,
    sec: SecurityDep,
    settings: SettingsDep,
    who: ClientDep,
    background: BackgroundTasks,
) -> Response:
    """The code after a right password: the ticket says whose password it was."""
    form = await checked_form(request)
    authz = form.get("authz", "")
    auth = await _authorization(request, db, settings, authz, 303) if authz else None
    if isinstance(auth, Response):
        return auth
    ticket = open_ticket(sec, form.get("ticket"), BROWSER)
    user = await db.get(User, ticket.user_id) if ticket is not None else None
    if ticket is None or user is None or not user.is_active:
        return _signin_page(
            request, settings, authz, "", auth,
            error="That took too long. Sign in again.", status=400,
        )  # fmt: skip
    code = form.get("code", "")
    has_passkey = bool(await passkeys.list_passkeys(db, user.id))
    try:
        if not code or len(code) > 64:
            raise mfa.SecondFactorRefused("Enter the code.")
        method = await mfa.verify_second_factor(
            db, sec, user, code, who, sessions=sessions, defer=background.add_task
        )
    except mfa.SecondFactorRefused:
        return _second_factor_page(
            request,
            form["ticket"],
            authz,
            auth,
            has_passkey=has_passkey,
            error="That code is not valid.",
            status=400,
        )
    except TooManyRequests as exc:
        return _second_factor_page(
            request, form["ticket"], authz, auth, has_passkey=has_passkey,
            error="Too many attempts. Wait a little and try again.",
            status=429, headers=exc.headers,
        )  # fmt: skip
    return await _signed_in(request, db, sec, settings, user, who, auth, amr=amr_for(method))


@dataclass(frozen=True)
class _NewSignIn:
    value: BrowserSignIn
    cookie: str


async def _start_browser_session(
    request: Request,
    db: Any,
    sec: Security,
    settings: Settings,
    user: Any,
    who: ClientInfo,
    amr: list[str],
) -> _NewSignIn:
    """A new session id at every sign-in (no fixation); the one the cookie named, if any, ends."""
    previous = await current_browser_session(db, _cookie(request, settings))
    ended = []
    if previous is not None:
        previous.session.revoked_at, previous.session.revoked_reason = utcnow(), "signed_in_again"
        ended.append(previous.session.id)
    # Before the session opens: the notice asks whether this address had one already.
    await auth_service.notice_new_address(db, sec, user, who)
    session, cookie = await auth_service.open_session(
        db, sec, user, who, None, amr=amr, kind="browser"
    )
    auth_service.record_sign_in(db, sec, session, who, "sign_in_page")
    await commit_change(db, sec, [user.id], ended)
    audit_line(audit, "browser sign-in", user=user.id, ip=who.ip, session=session.id)
    return _NewSignIn(BrowserSignIn(session=session, user=user), cookie)


# --- consent --------------------------------------------------------------------------------------


@router.post("/oauth2/consent")
async def consent(
    request: Request, db: SessionDep, sec: SecurityDep, settings: SettingsDep
) -> Response:
    form = await checked_form(request)
    auth = await _authorization(request, db, settings, form.get("authz", ""), 303)
    if isinstance(auth, Response):
        return auth
    signin_ = await current_browser_session(db, _cookie(request, settings))
    if signin_ is None:
        return _signin_page(request, settings, auth.raw, "", auth)
    if form.get("decision") != "allow":
        denied = RedirectError(auth, "access_denied", "The user did not allow the request.")
        audit_line(audit, "consent denied", user=signin_.user.id, client=auth.client.client_id)
        return redirect(error_url(settings, denied), 303)
    await consents.grant(db, signin_.user.id, auth.client.client_id, set(auth.scopes))
    await db.commit()
    audit_line(audit, "consent granted", user=signin_.user.id, client=auth.client.client_id)
    auth = without_prompt(auth, "consent")
    return await _next_step(request, db, settings, auth, signin_, status=303)


# --- sign out -------------------------------------------------------------------------------------


@router.get("/oauth2/logout")
async def logout_page(
    request: Request, db: SessionDep, sec: SecurityDep, settings: SettingsDep
) -> Response:
    """Ask before signing out: a link alone (an image, a prefetch) must not end a session."""
    try:
        logout = await parse_logout_request(db, sec, request.url.query)
    except PageError as exc:
        return render_error(request, 400, "Sign-out request refused", str(exc))
    signin_ = await current_browser_session(db, _cookie(request, settings))
    if signin_ is None:
        return _after_logout(request, logout)
    return render(
        request,
        "signout.html",
        {
            "state": "confirm",
            "logout_request": logout.raw,
            "client_name": logout.client.name if logout.client else None,
        },
        form_targets=_logout_targets(logout),
    )


@router.post("/oauth2/logout")
async def logout(
    request: Request, db: SessionDep, sec: SecurityDep, settings: SettingsDep
) -> Response:
    form = await checked_form(request)
    try:
        logout_ = await parse_logout_request(db, sec, form.get("logout_request", ""))
    except PageError as exc:
        return render_error(request, 400, "Sign-out request refused", str(exc))
    signin_ = await current_browser_session(db, _cookie(request, settings))
    if signin_ is not None:
        await end_browser_session(db, sec, signin_.session.id)
        audit_line(audit, "browser sign-out", user=signin_.user.id, session=signin_.session.id)
    response = _after_logout(request, logout_)
    clear_session_cookie(response, settings)
    return response


def _after_logout(request: Request, logout: LogoutRequest) -> Response:
    if logout.redirect_uri is None:
        return render(
            request,
            "signout.html",
            {"state": "done", "logout_request": "", "client_name": None},
        )
    params = urlencode({"state": logout.state}) if logout.state else ""
    separator = "&" if "?" in logout.redirect_uri else "?"
    return redirect(f"{logout.redirect_uri}{separator}{params}" if params else logout.redirect_uri)


def _logout_targets(logout: LogoutRequest) -> list[str]:
    origin = origin_of(logout.redirect_uri) if logout.redirect_uri else None
    return [origin] if origin else []
