"""The account pages: sign-up, password reset, email links, and the signed-in account page.

Each route reads its form, checks the CSRF token before anything else, bounds every field, calls
one domain function and renders the outcome. Links that arrive by mail (reset, verification,
email change) show a page with a button on GET and act only on its POST: mail scanners open
links, and a link that acted on GET would be spent before its owner clicked it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlencode

from fastapi import APIRouter, BackgroundTasks, Request
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.exceptions import HTTPException
from starlette.responses import Response

from src.api.dependencies import (
    ClientDep,
    SecurityDep,
    SessionDep,
    SessionMakerDep,
    SettingsDep,
)
from src.auth import account
from src.auth import service as auth_service
from src.auth.browser import (
    BrowserSignIn,
    cookie_name,
    current_browser_session,
    end_browser_session,
)
from src.auth.context import Security
from src.auth.passwords import PasswordPolicyError, check_password_policy
from src.config.settings import Settings
from src.errors import DomainError, InvalidInput
from src.oauth.clients import SCOPES
from src.oauth.consents import list_consents, revoke_consent
from src.users.emails import MAX_LENGTH as MAX_EMAIL
from src.users.schemas import EmailRequest, UserRegister
from src.web.csrf import CSRF_FIELD, check_csrf
from src.web.render import PageRoute, clear_session_cookie, redirect, render, render_error

router = APIRouter(route_class=PageRoute, include_in_schema=False)

# Bounds on what a form or a query may hold: nothing longer reaches a hash, a query or a page.
MAX_PASSWORD = 1024
MAX_TOKEN = 512
MAX_NAME = 200
MAX_AUTHZ = 4096
MAX_CLIENT_ID = 255

SIGNIN_URL = "/account/signin"
ACCOUNT_URL = "/account"
_BAD_LINK = "The link is invalid, expired or already used."
_EMAIL_FORMAT = "Enter an email address in the correct format, like name@example.com."
_PASSWORDS_DIFFER = "The two passwords are not the same. Type the new password twice."


class UnreadableForm(DomainError):
    status, title = 400, "The form could not be read"


class Fields:
    """A posted form read field by field, each bounded. Every problem is collected (a field
    missing, too long, or a file where text belongs), so the page can name them all at once;
    a field with a problem reads as ""."""

    def __init__(self, form: Mapping[str, Any]) -> None:
        self.form = form
        self.errors: dict[str, str] = {}

    def text(self, name: str, limit: int, label: str, *, required: bool = False) -> str:
        value = self.form.get(name)
        if value is None:
            value = ""
        if not isinstance(value, str):
            self.errors[name] = f"{label} must be text."
        elif len(value) > limit:
            self.errors[name] = f"{label} must be at most {limit} characters long."
        elif required and not value.strip():
            self.errors[name] = f"Enter {label[0].lower()}{label[1:]}."
        else:
            return value
        return ""

    def token(self) -> str | None:
        """The one-time token a mailed link's page posts back, or None when unusable."""
        token = self.text("token", MAX_TOKEN, "The link", required=True)
        return token or None


async def _posted_form(request: Request) -> Fields:
    """The form, once its CSRF token matched the cookie (CsrfError otherwise: the 403 page)."""
    try:
        form = await request.form()
    except HTTPException:  # a malformed multipart body
        raise UnreadableForm("Reload the page and try again.") from None
    check_csrf(request, form.get(CSRF_FIELD))
    return Fields(form)


def _query(request: Request, name: str, limit: int) -> str | None:
    """A query parameter, or None when absent or longer than any value we hand out."""
    value = request.query_params.get(name)
    return value if value and len(value) <= limit else None


def _field_errors(exc: DomainError | ValidationError) -> dict[str, str]:
    """Messages per form field, from a domain error's ``errors`` or pydantic's."""
    if isinstance(exc, ValidationError):
        return {str(error["loc"][0]): _friendly(str(error["loc"][0])) for error in exc.errors()}
    found: dict[str, str] = {}
    for error in exc.extra.get("errors", []):
        loc = error.get("loc") or []
        if loc:
            found.setdefault(str(loc[-1]), exc.detail)
    return found


def _friendly(field: str) -> str:
    return {
        "email": _EMAIL_FORMAT,
        "full_name": f"Enter a name of at most {MAX_NAME} characters, or leave it empty.",
        "password": "Enter a password.",
    }.get(field, "This value is not accepted.")


# --- sign-up --------------------------------------------------------------------------------------


@dataclass
class _SignUp:
    email: str = ""
    full_name: str = ""
    password: str = ""
    authz: str = ""


def _signup_page(
    request: Request,
    form: _SignUp,
    *,
    error: str | None = None,
    errors: dict[str, str] | None = None,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    query = f"?{urlencode({'authz': form.authz})}" if form.authz else ""
    return render(
        request,
        "signup.html",
        {
            "authz": form.authz,
            "email": form.email,
            "full_name": form.full_name,
            "error": error,
            "errors": errors or {},
            "signin_url": SIGNIN_URL + query,
        },
        status=status,
        headers=headers,
    )


def _signup_closed(request: Request) -> Response:
    return render_error(
        request,
        404,
        "Sign-up is closed",
        "New accounts cannot be created here. Ask the service's administrators for an account.",
    )


def _summary(errors: dict[str, str]) -> str:
    return "There is a problem: " + " ".join(errors.values())


def _registration(form: _SignUp) -> tuple[UserRegister | None, dict[str, str]]:
    """The registration the form asks for, or every problem with it at once: the password
    policy is checked here too, so a bad address and a weak password show together (the
    domain checks it again, after the address)."""
    errors: dict[str, str] = {}
    body = None
    try:
        body = UserRegister(
            email=form.email, password=form.password, full_name=form.full_name.strip() or None
        )
    except ValidationError as exc:
        errors = _field_errors(exc)
    try:
        check_password_policy(form.password, body.email if body else None)
    except PasswordPolicyError as exc:
        errors["password"] = str(exc)
    return (body if not errors else None), errors


@router.get("/account/signup")
async def signup_page(request: Request, settings: SettingsDep) -> Response:
    if not settings.SELF_REGISTRATION_ENABLED:
        return _signup_closed(request)
    authz = request.query_params.get("authz", "")
    if len(authz) > MAX_AUTHZ:
        return render_error(request, 400, "Link too long", "Start again from the application.")
    return _signup_page(request, _SignUp(authz=authz))


@router.post("/account/signup")
async def signup(
    request: Request, db: SessionDep, sec: SecurityDep, client: ClientDep, settings: SettingsDep
) -> Response:
    """Create the account, then send the user to sign in (with the authorization request it came
    with, if any). The answers are the API's: 409 for a taken address, 422, 429."""
    if not settings.SELF_REGISTRATION_ENABLED:
        return _signup_closed(request)
    fields = await _posted_form(request)
    form = _SignUp(
        authz=fields.text("authz", MAX_AUTHZ, "The sign-in request"),
        email=fields.text("email", MAX_EMAIL, "Your email address", required=True),
        full_name=fields.text("full_name", MAX_NAME, "Your name"),
        password=fields.text("password", MAX_PASSWORD, "A password", required=True),
    )
    if fields.errors:
        return _signup_page(
            request, form, error=_summary(fields.errors), errors=fields.errors, status=422
        )
    body, errors = _registration(form)
    if body is None:
        return _signup_page(request, form, error=_summary(errors), errors=errors, status=422)
    try:
        await auth_service.register(db, sec, body, client)
    except DomainError as exc:
        errors = _field_errors(exc)
        if exc.status == 409:
            errors = {"email": exc.detail}
        return _signup_page(
            request, form, error=exc.detail, errors=errors, status=exc.status, headers=exc.headers
        )
    return redirect(f"{SIGNIN_URL}?{urlencode({'notice': 'registered', 'authz': form.authz})}")


# --- forgotten password ---------------------------------------------------------------------------


def _forgot_page(
    request: Request,
    state: Literal["ask", "sent"],
    authz: str,
    *,
    email: str = "",
    error: str | None = None,
    status: int = 200,
) -> Response:
    query = f"?{urlencode({'authz': authz})}" if authz else ""
    return render(
        request,
        "forgot_password.html",
        {
            "state": state,
            "email": email,
            "error": error,
            "authz": authz,
            "signin_url": SIGNIN_URL + query,
        },
        status=status,
    )


@router.get("/account/forgot-password")
async def forgot_password_page(request: Request) -> Response:
    return _forgot_page(request, "ask", _query(request, "authz", MAX_AUTHZ) or "")


@router.post("/account/forgot-password")
async def forgot_password(
    request: Request,
    sessions: SessionMakerDep,
    sec: SecurityDep,
    client: ClientDep,
    background: BackgroundTasks,
) -> Response:
    """The same page, at once, whether the account exists or not: the lookup and the mail
    happen after the answer, as for POST /api/v1/auth/password-reset/request."""
    fields = await _posted_form(request)
    authz = fields.text("authz", MAX_AUTHZ, "The sign-in request")
    email = fields.text("email", MAX_EMAIL, "Your email address", required=True)
    if fields.errors:
        error = " ".join(fields.errors.values())
        return _forgot_page(request, "ask", authz, email=email, error=error, status=422)
    try:
        address = EmailRequest(email=email).email
    except ValidationError:
        return _forgot_page(request, "ask", authz, email=email, error=_EMAIL_FORMAT, status=422)
    background.add_task(auth_service.request_password_reset, sessions, sec, address, client)
    return _forgot_page(request, "sent", authz)


# --- reset password -------------------------------------------------------------------------------


def _reset_page(
    request: Request,
    state: Literal["ask", "done", "invalid"],
    *,
    token: str = "",
    error: str | None = None,
    errors: dict[str, str] | None = None,
    status: int = 200,
) -> Response:
    return render(
        request,
        "reset_password.html",
        {"state": state, "token": token, "error": error, "errors": errors or {}},
        status=status,
    )


@router.get("/account/reset-password")
async def reset_password_page(request: Request) -> Response:
    """Only the form: the token is spent by the POST, not by opening the link."""
    token = _query(request, "token", MAX_TOKEN)
    if token is None:
        return _reset_page(request, "invalid", status=400)
    return _reset_page(request, "ask", token=token)


@router.post("/account/reset-password")
async def reset_password(request: Request, db: SessionDep, sec: SecurityDep) -> Response:
    fields = await _posted_form(request)
    token = fields.token()
    if token is None:
        return _reset_page(request, "invalid", status=400)
    password = fields.text("password", MAX_PASSWORD, "A new password", required=True)
    again = fields.text("password_confirm", MAX_PASSWORD, "The new password again")
    if not fields.errors and again != password:
        fields.errors["password_confirm"] = _PASSWORDS_DIFFER
    if fields.errors:
        errors = fields.errors
        return _reset_page(
            request, "ask", token=token, error=_summary(errors), errors=errors, status=422
        )
    try:
        await auth_service.confirm_password_reset(db, sec, token, password)
    except InvalidInput as exc:  # the password policy; the token was not spent (no commit)
        errors = _field_errors(exc) or {"password": exc.detail}
        return _reset_page(request, "ask", token=token, error=exc.detail, errors=errors, status=422)
    except DomainError:
        return _reset_page(request, "invalid", status=400)
    return _reset_page(request, "done")


# --- email verification ---------------------------------------------------------------------------


def _verify_page(
    request: Request,
    state: Literal["ask", "done", "invalid"],
    *,
    token: str = "",
    email: str | None = None,
    status: int = 200,
) -> Response:
    return render(
        request,
        "verify_email.html",
        {"state": state, "token": token, "email": email},
        status=status,
    )


@router.get("/account/verify-email")
async def verify_email_page(request: Request) -> Response:
    token = _query(request, "token", MAX_TOKEN)
    if token is None:
        return _verify_page(request, "invalid", status=400)
    return _verify_page(request, "ask", token=token)


@router.post("/account/verify-email")
async def verify_email(request: Request, db: SessionDep, sec: SecurityDep) -> Response:
    token = (await _posted_form(request)).token()
    if token is None:
        return _verify_page(request, "invalid", status=400)
    try:
        user = await auth_service.confirm_email_verification(db, sec, token)
    except DomainError:
        return _verify_page(request, "invalid", status=400)
    return _verify_page(request, "done", email=user.email)


# --- email change: confirm (new address) and undo (old address) ----------------------------------

EmailChangeMode = Literal["confirm", "undo"]


def _email_change_page(
    request: Request,
    mode: EmailChangeMode,
    state: Literal["ask", "done", "invalid"],
    *,
    token: str = "",
    email: str | None = None,
    error: str | None = None,
    status: int = 200,
) -> Response:
    return render(
        request,
        "email_change.html",
        {"mode": mode, "state": state, "token": token, "email": email, "error": error},
        status=status,
    )


def _email_change_link(request: Request, mode: EmailChangeMode) -> Response:
    token = _query(request, "token", MAX_TOKEN)
    if token is None:
        return _email_change_page(request, mode, "invalid", status=400)
    return _email_change_page(request, mode, "ask", token=token)


async def _email_change_post(
    request: Request, mode: EmailChangeMode, db: AsyncSession, sec: Security
) -> Response:
    token = (await _posted_form(request)).token()
    if token is None:
        return _email_change_page(request, mode, "invalid", status=400)
    try:
        if mode == "confirm":
            email: str | None = (await account.confirm_email_change(db, sec, token)).email
        else:
            await account.undo_email_change(db, sec, token)
            email = None
    except DomainError as exc:
        # 409: the address was taken meanwhile; anything else is a bad link.
        error = exc.detail if exc.status == 409 else _BAD_LINK
        return _email_change_page(request, mode, "invalid", error=error, status=exc.status)
    return _email_change_page(request, mode, "done", email=email)


@router.get("/account/confirm-email-change")
async def confirm_email_change_page(request: Request) -> Response:
    return _email_change_link(request, "confirm")


@router.post("/account/confirm-email-change")
async def confirm_email_change(request: Request, db: SessionDep, sec: SecurityDep) -> Response:
    return await _email_change_post(request, "confirm", db, sec)


@router.get("/account/undo-email-change")
async def undo_email_change_page(request: Request) -> Response:
    return _email_change_link(request, "undo")


@router.post("/account/undo-email-change")
async def undo_email_change(request: Request, db: SessionDep, sec: SecurityDep) -> Response:
    return await _email_change_post(request, "undo", db, sec)


# --- the account page -----------------------------------------------------------------------------


async def _signed_in(
    request: Request, db: AsyncSession, settings: Settings
) -> BrowserSignIn | None:
    """The live browser session the cookie names, or None."""
    return await current_browser_session(db, request.cookies.get(cookie_name(settings)))


@router.get("/account")
async def account_page(request: Request, db: SessionDep, settings: SettingsDep) -> Response:
    signin = await _signed_in(request, db, settings)
    if signin is None:
        return redirect(SIGNIN_URL)
    user = signin.user
    consents = [
        {
            "client_name": consent.client_name,
            "scopes": [SCOPES.get(scope, scope) for scope in consent.scopes],
            "revoke_url": f"/account/consents/{quote(consent.client_id, safe='')}/revoke",
        }
        for consent in await list_consents(db, user.id)
    ]
    return render(
        request,
        "account.html",
        {
            "email": user.email,
            "full_name": user.full_name,
            "email_verified": user.email_verified,
            "consents": consents,
        },
    )


@router.post("/account/consents/{client_id}/revoke")
async def revoke_application(
    client_id: str, request: Request, db: SessionDep, sec: SecurityDep, settings: SettingsDep
) -> Response:
    """Forget the consent; the application's sessions for this user end with it."""
    await _posted_form(request)
    signin = await _signed_in(request, db, settings)
    if signin is None:
        return redirect(SIGNIN_URL)
    if len(client_id) <= MAX_CLIENT_ID:
        await revoke_consent(db, sec, signin.user.id, client_id)
    return redirect(ACCOUNT_URL)


@router.post("/account/signout")
async def signout(
    request: Request, db: SessionDep, sec: SecurityDep, settings: SettingsDep
) -> Response:
    """End the browser session (and the application sessions it started), forget the cookie."""
    await _posted_form(request)
    signin = await _signed_in(request, db, settings)
    if signin is not None:
        await end_browser_session(db, sec, signin.session.id)
    response = render(
        request, "signout.html", {"state": "done", "logout_request": "", "client_name": None}
    )
    clear_session_cookie(response, settings)
    return response
