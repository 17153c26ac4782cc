"""The admin API for the token signing keys (docs/signing-keys.md): list them, rotate them.

The same operations as ``python -m src keys list|rotate``, for the admin console and for
operators without a shell on the service's machines. Administrators only; a rotation is a
sensitive change (step-up), and the key material never leaves the database.
"""

from __future__ import annotations

import logging
from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from src.api.dependencies import AdminUser, RecentAdmin, SecurityDep, SessionDep
from src.api.errors import PROBLEM, Responses
from src.auth import keys
from src.config.logging import audit_line
from src.errors import Conflict, DomainError

router = APIRouter(prefix="/keys", tags=["keys"])
audit = logging.getLogger("src.auth.audit")


def _errors(*statuses: int) -> Responses:
    return dict.fromkeys(statuses, PROBLEM)


class KeyUnavailable(DomainError):
    status, title = 503, "Service Unavailable"


class SigningKeyPublic(BaseModel):
    """A key as the admin API shows it: its id, algorithm, state and dates; never the key."""

    model_config = ConfigDict(from_attributes=True)

    kid: str
    algorithm: str
    state: str = Field(description="active (signs), next (published ahead of use) or retired")
    created_at: datetime
    activated_at: datetime | None
    retired_at: datetime | None
    expires_at: datetime | None = Field(description="A retired key is published until then.")


class KeyRotation(BaseModel):
    active: SigningKeyPublic
    next: SigningKeyPublic
    retired: SigningKeyPublic


class RotationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    force: bool = Field(
        default=False,
        description="Rotate even if the next key is too young (a compromised key): tokens it "
        "signs may be refused until verifiers fetch the JWKS again.",
    )


@router.get("", response_model=list[SigningKeyPublic], responses=_errors(401, 403))
async def list_keys(_admin: AdminUser, db: SessionDep) -> list[SigningKeyPublic]:
    """Every key in the ring: active first, then next, then retired ones."""
    return [SigningKeyPublic.model_validate(key) for key in await keys.list_keys(db)]


@router.post("/rotate", response_model=KeyRotation, responses=_errors(401, 403, 409, 422, 503))
async def rotate_keys(
    admin: RecentAdmin,
    db: SessionDep,
    sec: SecurityDep,
    body: RotationRequest | None = None,
) -> KeyRotation:
    """Sign with the next key from now on (this instance at once, the others within
    SIGNING_KEY_REFRESH_SECONDS); 409 while the next key is too young, unless ``force``."""
    force = body.force if body is not None else False
    try:
        rotation = await keys.rotate(db, sec.sealer, sec.settings, force=force)
        active, published = await keys.load_keys(db, sec.sealer, known=sec.tokens.published_keys)
    except keys.RotationRefused as exc:
        raise Conflict(f"Rotation refused: {exc}.") from None
    except keys.KeyRingError as exc:
        raise KeyUnavailable(f"The key ring cannot be used: {exc}.") from None
    sec.tokens.set_keys(active, published)
    audit_line(
        audit,
        "signing keys rotated",
        active=rotation.active.kid,
        retired=rotation.retired.kid,
        force=force,
        actor=admin.id,
    )
    return KeyRotation(
        active=SigningKeyPublic.model_validate(rotation.active),
        next=SigningKeyPublic.model_validate(rotation.next),
        retired=SigningKeyPublic.model_validate(rotation.retired),
    )
