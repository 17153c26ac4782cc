"""The account's security page: authenticator apps, recovery codes, and the re-prompt that
sensitive changes need (step-up, the hosted pages' side of RFC 9470).

Every change here needs a recent sign-in with the strongest factor the user has; when the browser
session is older (or signed in with the password alone while a factor exists), the page asks for
the password (and a code) again first.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, BackgroundTasks, Request
from fastapi.responses import Response

from src.api.dependencies import ClientDep, SecurityDep, SessionDep, SessionMakerDep, SettingsDep
from src.auth import mfa, step_up
from src.auth.browser import BrowserSignIn, cookie_name, current_browser_session
from src.auth.context import Security
from src.errors import DomainError, TooManyRequests
from src.web.csrf import checked_form
from src.web.render import PageRoute, redirect, render, render_error

router = APIRouter(route_class=PageRoute, include_in_schema=False)

SECURITY = "/account/security"
MAX_FIELD = 1024


async def _signed_in(request: Request, db: Any) -> BrowserSignIn | None:
    settings = request.app.state.settings
    return await current_browser_session(db, request.cookies.get(cookie_name(settings)))


async def _reprompt(
    request: Request,
    db: Any,
    signin: BrowserSignIn,
    *,
    error: str | None = None,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    """The step-up re-prompt: the password, and a code when a factor is enrolled."""
    return render(
        request,
        "reauthenticate.html",
        {
            "email": signin.user.email,
            "needs_code": await mfa.has_second_factor(db, signin.user.id),
            "next": SECURITY,
            "error": error,
        },
        status=status,
        headers=headers,
    )


@router.get(SECURITY)
async def security_page(request: Request, db: SessionDep, required: str = "") -> Response:
    signin = await _signed_in(request, db)
    if signin is None:
        return redirect("/account/signin", 302)
    notice = None
    if required and await mfa.missing_required_factor(db, request.app.state.settings, signin.user):
        notice = (
            "Your account must have a second factor: add an authenticator app (or a passkey), "
            "then go back to the application you were signing in to."
        )
    return await _overview(request, db, signin, notice=notice)


async def _overview(
    request: Request, db: Any, signin: BrowserSignIn, *, notice: str | None = None
) -> Response:
    factors = await mfa.list_factors(db, signin.user.id)
    return render(
        request,
        "security.html",
        {
            "factors": [
                {
                    "id": str(f.id),
                    "kind": f.kind,
                    "name": f.name,
                    "confirmed": f.confirmed_at is not None,
                    "last_used_at": f.last_used_at,
                }
                for f in factors
                if f.confirmed_at is not None
            ],
            "recovery_codes_left": await mfa.recovery_codes_left(db, signin.user.id),
            "notice": notice,
        },
    )


@router.post("/account/reauthenticate")
async def reauthenticate(
    request: Request,
    db: SessionDep,
    sessions: SessionMakerDep,
    sec: SecurityDep,
    who: ClientDep,
    background: BackgroundTasks,
) -> Response:
    form = await checked_form(request, MAX_FIELD)
    signin = await _signed_in(request, db)
    if signin is None:
        return redirect("/account/signin", 303)
    try:
        await step_up.refresh_authentication(
            db,
            sec,
            signin.user,
            signin.session,
            form.get("password", ""),
            form.get("code") or None,
            who,
            sessions=sessions,
            defer=background.add_task,
        )
    except TooManyRequests as exc:
        return await _reprompt(
            request, db, signin, error="Too many attempts. Wait a little and try again.",
            status=429, headers=exc.headers,
        )  # fmt: skip
    except DomainError as exc:
        return await _reprompt(request, db, signin, error=exc.detail, status=400)
    return redirect(SECURITY, 303)


async def _gate(
    request: Request, db: Any, sec: Security
) -> tuple[BrowserSignIn | None, Response | None]:
    """The signed-in user if the session may make a sensitive change now; else the answer (the
    sign-in page, or the re-prompt)."""
    signin = await _signed_in(request, db)
    if signin is None:
        return None, redirect("/account/signin", 303)
    if not await step_up.session_is_strong_enough(db, sec, signin.session):
        return None, await _reprompt(request, db, signin)
    return signin, None


@router.post(f"{SECURITY}/totp")
async def start_authenticator(request: Request, db: SessionDep, sec: SecurityDep) -> Response:
    form = await checked_form(request, MAX_FIELD)
    signin, answer = await _gate(request, db, sec)
    if signin is None:
        assert answer is not None
        return answer
    name = form.get("name") or None
    try:
        factor, secret, uri, svg = await mfa.start_totp_enrolment(db, sec, signin.user, name)
    except DomainError as exc:
        return render_error(request, exc.status, "Cannot add an authenticator", exc.detail)
    return _setup_page(request, str(factor.id), factor.name, secret, uri, svg)


def _setup_page(
    request: Request,
    factor_id: str,
    name: str,
    secret: str,
    uri: str,
    svg: str,
    *,
    error: str | None = None,
    status: int = 200,
) -> Response:
    return render(
        request,
        "totp_setup.html",
        {
            "factor_id": factor_id,
            "name": name,
            "secret": secret,
            "otpauth_uri": uri,
            "qr_svg": svg,
            "error": error,
        },
        status=status,
    )


@router.post(SECURITY + "/totp/{factor_id}/confirm")
async def confirm_authenticator(
    factor_id: uuid.UUID,
    request: Request,
    db: SessionDep,
    sec: SecurityDep,
    who: ClientDep,
) -> Response:
    form = await checked_form(request, MAX_FIELD)
    signin, answer = await _gate(request, db, sec)
    if signin is None:
        assert answer is not None
        return answer
    try:
        _, codes = await mfa.confirm_totp(
            db, sec, signin.user, factor_id, form.get("code", ""), who
        )
    except TooManyRequests:
        return render_error(request, 429, "Too many attempts", "Wait a little and try again.")
    except mfa.SecondFactorRefused:
        # Show the same secret again: it was sealed at the start, the form carries it back.
        secret = form.get("secret", "")
        uri = mfa.provisioning_uri(sec, signin.user, secret) if secret else ""
        return _setup_page(
            request, str(factor_id), form.get("name", ""), secret, uri,
            mfa.qr_svg(uri) if uri else "", error="That code is not valid.", status=400,
        )  # fmt: skip
    if codes:
        return render(request, "recovery_codes.html", {"codes": codes, "first": True})
    return await _overview(request, db, signin, notice="The authenticator app is added.")


@router.post(SECURITY + "/factors/{factor_id}/remove")
async def remove_authenticator(
    factor_id: uuid.UUID,
    request: Request,
    db: SessionDep,
    sec: SecurityDep,
    who: ClientDep,
) -> Response:
    form = await checked_form(request, MAX_FIELD)
    signin, answer = await _gate(request, db, sec)
    if signin is None:
        assert answer is not None
        return answer
    # Each factor's form names its password field after it (unique ids on the page).
    password = form.get(f"password-{factor_id}") or form.get("password", "")
    await mfa.remove_factor(
        db, sec, signin.user, factor_id, password=password, code=None, client=who
    )
    return await _overview(request, db, signin, notice="The second factor is removed.")


@router.post(SECURITY + "/recovery-codes")
async def new_recovery_codes(
    request: Request, db: SessionDep, sec: SecurityDep, settings: SettingsDep, who: ClientDep
) -> Response:
    form = await checked_form(request, MAX_FIELD)
    signin, answer = await _gate(request, db, sec)
    if signin is None:
        assert answer is not None
        return answer
    codes = await mfa.regenerate_recovery_codes(
        db, sec, signin.user, password=form.get("password", ""), client=who
    )
    return render(request, "recovery_codes.html", {"codes": codes, "first": False})
