"""What a user allowed a third-party application to see, remembered per user and client.

First-party clients never ask. A user revokes a consent at any time: the application's sessions
for that user end with it, so its tokens stop working at once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from src.auth.context import Security
from src.db.models import AuthorizationCode, OAuthClient, OAuthConsent, UserSession
from src.db.types import utcnow
from src.users.service import commit_change


@dataclass(frozen=True)
class ConsentView:
    client_id: str
    client_name: str
    scopes: list[str]


async def granted_scopes(db: AsyncSession, user_id: uuid.UUID, client_id: str) -> set[str]:
    row = await db.get(OAuthConsent, (user_id, client_id))
    return set(row.scope.split()) if row is not None else set()


async def grant(db: AsyncSession, user_id: uuid.UUID, client_id: str, scopes: set[str]) -> None:
    """Remember the scopes (added to what was granted before). Flushed, not committed."""
    row = await db.get(OAuthConsent, (user_id, client_id), with_for_update=True)
    if row is None:
        db.add(
            OAuthConsent(
                user_id=user_id,
                client_id=client_id,
                scope=" ".join(sorted(scopes)),
                granted_at=utcnow(),
            )
        )
    else:
        row.scope = " ".join(sorted(set(row.scope.split()) | scopes))
        row.granted_at = utcnow()
    await db.flush()


async def list_consents(db: AsyncSession, user_id: uuid.UUID) -> list[ConsentView]:
    rows = await db.execute(
        select(OAuthConsent, OAuthClient.name)
        .join(OAuthClient, OAuthClient.client_id == OAuthConsent.client_id, isouter=True)
        .where(OAuthConsent.user_id == user_id)
        .order_by(OAuthConsent.granted_at.desc())
    )
    return [
        ConsentView(
            client_id=consent.client_id,
            client_name=name or consent.client_id,
            scopes=consent.scope.split(),
        )
        for consent, name in rows.all()
    ]


async def revoke_consent(
    db: AsyncSession, sec: Security, user_id: uuid.UUID, client_id: str
) -> bool:
    """Forget the consent and end the application's sessions for this user; False if none."""
    deleted = await db.execute(
        delete(OAuthConsent).where(
            OAuthConsent.user_id == user_id, OAuthConsent.client_id == client_id
        )
    )
    ended = await db.execute(
        update(UserSession)
        .where(
            UserSession.user_id == user_id,
            UserSession.client_id == client_id,
            UserSession.revoked_at.is_(None),
        )
        .values(revoked_at=utcnow(), revoked_reason="consent_revoked")
        .returning(UserSession.id),
        execution_options={"synchronize_session": False},
    )
    session_ids = list(ended.scalars().all())
    # Codes issued in the last seconds die too: none may turn into a session after this.
    await db.execute(
        delete(AuthorizationCode).where(
            AuthorizationCode.user_id == user_id, AuthorizationCode.client_id == client_id
        )
    )
    await commit_change(db, sec, session_ids=session_ids)
    return bool(getattr(deleted, "rowcount", 0))
