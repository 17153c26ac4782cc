"""The caller's second factors: TOTP authenticators and recovery codes (src.auth.mfa).

Answers that carry a secret or recovery codes are never stored by a cache (``no-store``): the
authenticator's secret is shown once, when its enrolment starts; recovery codes when the first
authenticator is confirmed and when they are regenerated.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Request, Response, status
from pydantic import AfterValidator, BaseModel, Field

from src.api.dependencies import (
    AdminUser,
    ClientDep,
    CurrentUser,
    RecentAdmin,
    RecentUser,
    SecurityDep,
    SessionDep,
    SessionMakerDep,
)
from src.api.errors import PROBLEM, Responses, problem_response
from src.auth import mfa
from src.db.models import MfaFactor, User
from src.errors import DomainError, NotFound
from src.users import service as user_service
from src.users.schemas import Password, WriteModel

router = APIRouter(prefix="/users/me/mfa", tags=["users"])

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _errors(*statuses: int) -> Responses:
    return dict.fromkeys(statuses, PROBLEM)


def _name(value: str) -> str:
    try:
        return mfa.factor_name(value)
    except DomainError as exc:
        raise ValueError(exc.detail) from None


FactorName = Annotated[
    str,
    Field(min_length=1, max_length=mfa.MAX_NAME_LENGTH, description="How the factor is listed."),
    AfterValidator(_name),
]
Code = Annotated[
    str,
    Field(
        min_length=1,
        max_length=mfa.MAX_CODE_LENGTH,
        description="A 6-digit code from the authenticator app, or a recovery code.",
    ),
]


class TotpStart(WriteModel):
    name: FactorName | None = None


class TotpStarted(BaseModel):
    factor_id: uuid.UUID
    # Shown only here: the base32 secret, the otpauth:// URI and its QR code (an SVG document).
    secret: str
    otpauth_uri: str
    qr_svg: str


class CodeBody(WriteModel):
    code: Code


class FactorRemoval(WriteModel):
    """Proof of identity for removing a factor: the current password, or a code."""

    current_password: Password | None = None
    code: Code | None = None


class PasswordBody(WriteModel):
    current_password: Password


class FactorPublic(BaseModel):
    id: uuid.UUID
    kind: str
    name: str
    created_at: datetime
    # False while the enrolment waits for its first code (it then expires after 10 minutes).
    confirmed: bool
    last_used_at: datetime | None


class SecondFactors(BaseModel):
    factors: list[FactorPublic]
    recovery_codes_left: int


class FactorConfirmed(BaseModel):
    factor: FactorPublic
    # The recovery codes, shown once, when this is the account's first authenticator.
    recovery_codes: list[str] | None


class RecoveryCodes(BaseModel):
    recovery_codes: list[str]


def _public(factor: MfaFactor) -> FactorPublic:
    return FactorPublic(
        id=factor.id,
        kind=factor.kind,
        name=factor.name,
        created_at=factor.created_at,
        confirmed=factor.confirmed_at is not None,
        last_used_at=factor.last_used_at,
    )


@router.get("", response_model=SecondFactors, responses=_errors(401))
async def list_my_factors(principal: CurrentUser, db: SessionDep) -> SecondFactors:
    """The caller's authenticators (confirmed ones and enrolments still open) and how many unused
    recovery codes it has."""
    factors = await mfa.list_factors(db, principal.id)
    left = await mfa.recovery_codes_left(db, principal.id)
    return SecondFactors(factors=[_public(f) for f in factors], recovery_codes_left=left)


@router.post(
    "/totp",
    status_code=status.HTTP_201_CREATED,
    response_model=TotpStarted,
    responses=_errors(401, 409, 422),
)
async def start_totp(
    principal: RecentUser,
    db: SessionDep,
    sec: SecurityDep,
    response: Response,
    body: TotpStart | None = None,
) -> TotpStarted:
    """Start enrolling an authenticator app: scan ``qr_svg`` (or enter ``secret``), then confirm
    with a first code within 10 minutes. The secret is shown only in this answer."""
    user = await user_service.get_user(db, principal.id)
    factor, secret, uri, svg = await mfa.start_totp_enrolment(
        db, sec, user, body.name if body else None
    )
    response.headers.update(NO_STORE)
    return TotpStarted(factor_id=factor.id, secret=secret, otpauth_uri=uri, qr_svg=svg)


@router.post(
    "/totp/{factor_id}/confirm",
    response_model=FactorConfirmed,
    responses=_errors(400, 401, 404, 409, 422, 429),
)
async def confirm_totp(
    factor_id: uuid.UUID,
    body: CodeBody,
    principal: RecentUser,
    db: SessionDep,
    sec: SecurityDep,
    client: ClientDep,
    response: Response,
) -> FactorConfirmed:
    """A first code from the app confirms the enrolment. The account's first authenticator
    brings ten recovery codes, shown only in this answer."""
    user = await user_service.get_user(db, principal.id)
    factor, codes = await mfa.confirm_totp(db, sec, user, factor_id, body.code, client)
    response.headers.update(NO_STORE)
    return FactorConfirmed(factor=_public(factor), recovery_codes=codes)


@router.delete(
    "/{factor_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_errors(400, 401, 404, 422, 429),
)
async def remove_factor(
    factor_id: uuid.UUID,
    body: FactorRemoval,
    principal: RecentUser,
    db: SessionDep,
    sessions: SessionMakerDep,
    sec: SecurityDep,
    client: ClientDep,
    request: Request,
    background: BackgroundTasks,
) -> Response:
    """Needs ``current_password`` or a ``code`` (TOTP or recovery code), one of them. Removing
    the last authenticator deletes the recovery codes too."""
    user = await user_service.get_user(db, principal.id)
    try:
        await mfa.remove_factor(
            db,
            sec,
            user,
            factor_id,
            password=body.current_password,
            code=body.code,
            client=client,
            sessions=sessions,
            defer=background.add_task,
        )
    except mfa.SecondFactorRefused as exc:
        # Answered here rather than by the error handler, so the failure's event, deferred by
        # the check, is recorded after the answer; the row locks go first.
        await db.rollback()
        refused = problem_response(
            exc.status, exc.detail, title=exc.title, instance=request.url.path
        )
        refused.background = background
        return refused
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/recovery-codes",
    response_model=RecoveryCodes,
    responses=_errors(400, 401, 409, 422, 429),
)
async def regenerate_recovery_codes(
    body: PasswordBody,
    principal: RecentUser,
    db: SessionDep,
    sec: SecurityDep,
    client: ClientDep,
    response: Response,
) -> RecoveryCodes:
    """Ten new recovery codes (needs the current password); the old ones stop working."""
    user = await user_service.get_user(db, principal.id)
    codes = await mfa.regenerate_recovery_codes(
        db, sec, user, password=body.current_password, client=client
    )
    response.headers.update(NO_STORE)
    return RecoveryCodes(recovery_codes=codes)


# An administrator's reset, under /users/{id} like the other admin operations on a user.
admin_router = APIRouter(prefix="/users", tags=["users"])


@admin_router.get(
    "/{user_id}/mfa", response_model=SecondFactors, responses=_errors(401, 403, 404, 422)
)
async def list_user_factors(user_id: uuid.UUID, _admin: AdminUser, db: SessionDep) -> SecondFactors:
    """A user's second factors and how many recovery codes are left (admins only): what an
    administrator checks before a reset. Names and dates only, never a secret."""
    if await db.get(User, user_id) is None:
        raise NotFound("No such user.")
    factors = await mfa.list_factors(db, user_id)
    left = await mfa.recovery_codes_left(db, user_id)
    return SecondFactors(factors=[_public(f) for f in factors], recovery_codes_left=left)


@admin_router.delete(
    "/{user_id}/mfa", status_code=status.HTTP_204_NO_CONTENT, responses=_errors(401, 403, 404, 422)
)
async def reset_user_factors(
    user_id: uuid.UUID, admin: RecentAdmin, db: SessionDep, sec: SecurityDep
) -> None:
    """Remove every second factor and recovery code of a user who lost them; every session of
    the user ends, and ``user.mfa_reset`` tells who did it."""
    await mfa.reset_factors(db, sec, user_id, actor_id=admin.id)
