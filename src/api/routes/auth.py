"""Authentication endpoints: register, the OAuth2 token endpoint, logout, reset, verification."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Response, status
from fastapi.responses import JSONResponse

from src.api.dependencies import API_V1, ClientDep, CurrentUser, SecurityDep, SessionDep
from src.api.errors import PROBLEM
from src.auth import service as auth_service
from src.errors import OAuthError
from src.users import service as user_service
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
    responses={409: PROBLEM, 422: PROBLEM},
)
async def register(
    body: UserRegister, db: SessionDep, sec: SecurityDep, response: Response
) -> UserPublic:
    user = await user_service.create_user(
        db, sec, email=body.email, password=body.password, full_name=body.full_name
    )
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
    sec: SecurityDep,
    client: ClientDep,
    grant_type: Annotated[str | None, Form()] = None,
    username: Annotated[str | None, Form(description="The account's email")] = None,
    password: Annotated[str | None, Form()] = None,
    refresh_token: Annotated[str | None, Form()] = None,
    scope: Annotated[str | None, Form()] = None,
    client_id: Annotated[str | None, Form()] = None,
    client_secret: Annotated[str | None, Form()] = None,
) -> Any:
    """RFC 6749 sections 4.3 and 6: form-encoded, answers per sections 5.1 and 5.2."""
    try:
        if grant_type == "password":
            if not username or not password:
                raise OAuthError("invalid_request", "username and password are required.")
            tokens = await auth_service.login(db, sec, username, password, client)
        elif grant_type == "refresh_token":
            if not refresh_token:
                raise OAuthError("invalid_request", "refresh_token is required.")
            tokens = await auth_service.refresh(db, sec, refresh_token, client)
        elif not grant_type:
            raise OAuthError("invalid_request", "grant_type is required.")
        else:
            raise OAuthError("unsupported_grant_type", "Use 'password' or 'refresh_token'.")
    except OAuthError as exc:
        return JSONResponse(
            {"error": exc.error, "error_description": exc.description},
            status_code=exc.status,
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
        )
    return JSONResponse(
        tokens.model_dump(), headers={"Cache-Control": "no-store", "Pragma": "no-cache"}
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
async def password_reset_request(body: EmailRequest, db: SessionDep, sec: SecurityDep) -> Accepted:
    """Always 202 with the same body: the answer never tells whether the account exists."""
    await auth_service.request_password_reset(db, sec, body.email)
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
async def verify_email_request(body: EmailRequest, db: SessionDep, sec: SecurityDep) -> Accepted:
    await auth_service.request_email_verification(db, sec, body.email)
    return _ACCEPTED


@router.post(
    "/verify-email/confirm", response_model=UserPublic, responses={400: PROBLEM, 422: PROBLEM}
)
async def verify_email_confirm(body: TokenConfirm, db: SessionDep, sec: SecurityDep) -> UserPublic:
    user = await auth_service.confirm_email_verification(db, sec, body.token)
    return UserPublic.model_validate(user)
