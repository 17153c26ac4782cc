"""Authentication endpoints: register, the OAuth2 token endpoint, logout, reset, verification."""

from __future__ import annotations

import base64
import re
from typing import Annotated, Any
from urllib.parse import unquote_plus

from fastapi import APIRouter, BackgroundTasks, Form, Header, Response, status
from fastapi.responses import JSONResponse

from src.api.dependencies import (
    API_V1,
    ClientDep,
    CurrentUser,
    SecurityDep,
    SessionDep,
    SessionMakerDep,
)
from src.api.errors import PROBLEM
from src.auth import account
from src.auth import service as auth_service
from src.errors import OAuthError
from src.users.emails import MAX_LENGTH as MAX_EMAIL_LENGTH
from src.users.schemas import (
    Accepted,
    EmailRequest,
    PasswordResetConfirm,
    TokenConfirm,
    TokenResponse,
    UserPublic,
    UserRegister,
)

router = APIRouter(prefix="/auth", tags=["auth"])

# Bounds on what the token endpoint reads, so nothing longer reaches a hash or a query.
MAX_PASSWORD_INPUT = 1024
MAX_TOKEN_INPUT = 512
MAX_CLIENT_ID = 255
_VSCHARS = re.compile(r"[\x20-\x7e]+")  # RFC 6749 appendix A: client_id is VSCHAR

_ACCEPTED = Accepted(detail="If the account exists, a message is on its way.")
_OAUTH_ERROR = {
    "description": 'RFC 6749 section 5.2 error, e.g. {"error": "invalid_grant"}',
    "content": {
        "application/json": {
            "example": {"error": "invalid_grant", "error_description": "Invalid email or password."}
        }
    },
}


@router.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    response_model=UserPublic,
    responses={409: PROBLEM, 422: PROBLEM, 429: PROBLEM},
)
async def register(
    body: UserRegister, db: SessionDep, sec: SecurityDep, client: ClientDep, response: Response
) -> UserPublic:
    """Throttled per client address and per address registered (429 with Retry-After)."""
    user = await auth_service.register(db, sec, body, client)
    response.headers["Location"] = f"{API_V1}/users/{user.id}"
    return UserPublic.model_validate(user)


@router.post(
    "/login",
    response_model=TokenResponse,
    # FastAPI lists a 422 for every operation with a body; document its real (problem) shape.
    responses={400: _OAUTH_ERROR, 422: PROBLEM, 429: PROBLEM},
    summary="OAuth2 token endpoint (password and refresh_token grants)",
)
async def token(
    db: SessionDep,
    sessions: SessionMakerDep,
    sec: SecurityDep,
    client: ClientDep,
    background: BackgroundTasks,
    grant_type: Annotated[str | None, Form()] = None,
    username: Annotated[str | None, Form(description="The account's email")] = None,
    password: Annotated[str | None, Form()] = None,
    refresh_token: Annotated[str | None, Form()] = None,
    scope: Annotated[str | None, Form()] = None,
    client_id: Annotated[str | None, Form()] = None,
    client_secret: Annotated[str | None, Form()] = None,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Any:
    """RFC 6749 sections 4.3 and 6: form-encoded, answers per sections 5.1 and 5.2.

    ``client_id`` (in the form, or as the user name of HTTP Basic authentication) is remembered
    with the session: its refresh tokens then work for that client only.
    """
    try:
        client_id = _client_id(client_id, authorization)
        if grant_type == "password":
            if not username or not password:
                raise OAuthError("invalid_request", "username and password are required.")
            _bounded("username", username, MAX_EMAIL_LENGTH)
            _bounded("password", password, MAX_PASSWORD_INPUT)
            tokens = await auth_service.login(
                db,
                sec,
                username,
                password,
                client,
                client_id,
                sessions=sessions,
                defer=background.add_task,
            )
        elif grant_type == "refresh_token":
            if not refresh_token:
                raise OAuthError("invalid_request", "refresh_token is required.")
            _bounded("refresh_token", refresh_token, MAX_TOKEN_INPUT)
            tokens = await auth_service.refresh(db, sec, refresh_token, client, client_id)
        elif not grant_type:
            raise OAuthError("invalid_request", "grant_type is required.")
        else:
            raise OAuthError("unsupported_grant_type", "Use 'password' or 'refresh_token'.")
    except OAuthError as exc:
        headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        if exc.status == 401:  # RFC 6749 section 5.2: say how the client should authenticate
            headers["WWW-Authenticate"] = 'Basic realm="token"'
        return JSONResponse(
            {"error": exc.error, "error_description": exc.description},
            status_code=exc.status,
            headers=headers,
        )
    return JSONResponse(
        tokens.model_dump(), headers={"Cache-Control": "no-store", "Pragma": "no-cache"}
    )


def _bounded(name: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise OAuthError("invalid_request", f"{name} is longer than {limit} characters.")


def _client_id(form_value: str | None, authorization: str | None) -> str | None:
    """The client's identifier from the form or from HTTP Basic (RFC 6749 section 2.3.1)."""
    from_basic = None
    if authorization and authorization[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
        except ValueError:  # bad base64 (binascii.Error), bad UTF-8, non-ASCII text
            raise OAuthError("invalid_client", "Malformed Basic credentials.", 401) from None
        from_basic = unquote_plus(decoded.partition(":")[0])
    if form_value and from_basic and form_value != from_basic:
        raise OAuthError("invalid_request", "Two different client_id values were sent.")
    value = form_value or from_basic or None
    if value is not None and (len(value) > MAX_CLIENT_ID or not _VSCHARS.fullmatch(value)):
        raise OAuthError("invalid_client", "The client_id is not valid.", 401)
    return value


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT, responses={401: PROBLEM})
async def logout(principal: CurrentUser, db: SessionDep, sec: SecurityDep) -> None:
    """End this session: its access and refresh tokens stop working at once."""
    await auth_service.logout(db, sec, principal)


@router.post("/logout-all", status_code=status.HTTP_204_NO_CONTENT, responses={401: PROBLEM})
async def logout_all(principal: CurrentUser, db: SessionDep, sec: SecurityDep) -> None:
    """End every session of the caller, this one included."""
    await auth_service.logout_all(db, sec, principal)


@router.post(
    "/password-reset/request",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Accepted,
    responses={422: PROBLEM},
)
async def password_reset_request(
    body: EmailRequest,
    sessions: SessionMakerDep,
    sec: SecurityDep,
    client: ClientDep,
    background: BackgroundTasks,
) -> Accepted:
    """Always 202 with the same body, at once: the work happens after the response, so neither
    the answer nor its timing tells whether the account exists (or the request was throttled)."""
    background.add_task(auth_service.request_password_reset, sessions, sec, body.email, client)
    return _ACCEPTED


@router.post(
    "/password-reset/confirm",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={400: PROBLEM, 422: PROBLEM},
)
async def password_reset_confirm(
    body: PasswordResetConfirm, db: SessionDep, sec: SecurityDep
) -> None:
    """Set a new password with a reset token; every session ends; sign in afterwards."""
    await auth_service.confirm_password_reset(db, sec, body.token, body.new_password)


@router.post(
    "/verify-email/request",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Accepted,
    responses={422: PROBLEM},
)
async def verify_email_request(
    body: EmailRequest,
    sessions: SessionMakerDep,
    sec: SecurityDep,
    client: ClientDep,
    background: BackgroundTasks,
) -> Accepted:
    """Always 202 with the same body, at once (see the password reset request)."""
    background.add_task(auth_service.request_email_verification, sessions, sec, body.email, client)
    return _ACCEPTED


@router.post(
    "/verify-email/confirm", response_model=UserPublic, responses={400: PROBLEM, 422: PROBLEM}
)
async def verify_email_confirm(body: TokenConfirm, db: SessionDep, sec: SecurityDep) -> UserPublic:
    user = await auth_service.confirm_email_verification(db, sec, body.token)
    return UserPublic.model_validate(user)


@router.post(
    "/email-change/confirm",
    response_model=UserPublic,
    responses={400: PROBLEM, 409: PROBLEM, 422: PROBLEM},
)
async def email_change_confirm(body: TokenConfirm, db: SessionDep, sec: SecurityDep) -> UserPublic:
    """The link mailed to the new address: the change takes effect now, and the old address
    gets a notice with a link that undoes it."""
    user = await account.confirm_email_change(db, sec, body.token)
    return UserPublic.model_validate(user)


@router.post(
    "/email-change/undo",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={400: PROBLEM, 409: PROBLEM, 422: PROBLEM},
)
async def email_change_undo(body: TokenConfirm, db: SessionDep, sec: SecurityDep) -> None:
    """The link mailed to the old address: takes the address back, ends every session and mails
    a password reset link there."""
    await account.undo_email_change(db, sec, body.token)
