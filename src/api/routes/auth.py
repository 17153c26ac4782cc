"""Authentication endpoints: register, the OAuth2 token endpoint, logout, reset, verification."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Form, Header, Response, status

from src.api.dependencies import (
    API_V1,
    ClientDep,
    CurrentUser,
    SecurityDep,
    SessionDep,
    SessionMakerDep,
)
from src.api.errors import PROBLEM
from src.api.routes import oauth
from src.api.routes.oauth import OAUTH_ERROR
from src.auth import account, step_up
from src.auth import service as auth_service
from src.users.schemas import (
    Accepted,
    EmailRequest,
    PasswordResetConfirm,
    Reauthentication,
    TokenConfirm,
    TokenResponse,
    UserPublic,
    UserRegister,
)

router = APIRouter(prefix="/auth", tags=["auth"])


_ACCEPTED = Accepted(detail="If the account exists, a message is on its way.")


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
    response_model_exclude_none=True,
    # FastAPI lists a 422 for every operation with a body; document its real (problem) shape.
    responses={400: OAUTH_ERROR, 401: OAUTH_ERROR, 422: PROBLEM, 429: PROBLEM},
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
    mfa_token: Annotated[str | None, Form()] = None,
    otp: Annotated[str | None, Form()] = None,
    recovery_code: Annotated[str | None, Form()] = None,
    scope: Annotated[str | None, Form()] = None,
    client_id: Annotated[str | None, Form()] = None,
    client_secret: Annotated[str | None, Form()] = None,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Any:
    """RFC 6749 sections 4.3 and 6 for the service's own API (and Swagger UI's Authorize): the
    same endpoint as ``/oauth2/token``, which applications should use.

    Without a ``client_id`` the session belongs to the service's own API. With one, the client
    must be registered and authenticate (``client_secret_basic`` or ``client_secret_post``);
    its refresh tokens then work for that client only, and the password grant needs a
    first-party client that enables it.
    """
    form = {
        "grant_type": grant_type,
        "username": username,
        "password": password,
        "refresh_token": refresh_token,
        "mfa_token": mfa_token,
        "otp": otp,
        "recovery_code": recovery_code,
        "scope": scope,
        "client_id": client_id,
        "client_secret": client_secret,
    }
    return await oauth.token_request(
        db=db,
        sessions=sessions,
        sec=sec,
        who=client,
        background=background,
        form=form,
        authorization=authorization,
    )


@router.post(
    "/reauthenticate",
    response_model=TokenResponse,
    response_model_exclude_none=True,
    responses={400: PROBLEM, 401: PROBLEM, 422: PROBLEM, 429: PROBLEM},
)
async def reauthenticate(
    body: Reauthentication,
    principal: CurrentUser,
    db: SessionDep,
    sessions: SessionMakerDep,
    sec: SecurityDep,
    client: ClientDep,
    response: Response,
    background: BackgroundTasks,
) -> TokenResponse:
    """Step-up (RFC 9470): answer a 401 ``insufficient_user_authentication`` by proving it is
    still you — the password, and a code when a second factor is enrolled. The session's
    authentication becomes recent; use the new access token (the refresh token is unchanged)."""
    response.headers["Cache-Control"] = "no-store"
    return await step_up.reauthenticate(
        db,
        sec,
        principal,
        body.current_password,
        body.code,
        client,
        sessions=sessions,
        defer=background.add_task,
    )


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
