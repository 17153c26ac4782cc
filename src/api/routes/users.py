"""User endpoints: the caller's own account, its sessions, and the admin API.

A user may read and change only itself (through ``/users/me`` or its own id); admins may do
anything, except remove the last active admin.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status

from src.api.dependencies import (
    API_V1,
    AdminUser,
    ClientDep,
    CurrentUser,
    RecentAdmin,
    RecentUser,
    SecurityDep,
    SessionDep,
    require_step_up,
)
from src.api.errors import PROBLEM, Responses
from src.auth import account
from src.auth import service as auth_service
from src.auth.context import Principal
from src.db.models import User
from src.errors import InvalidInput, PermissionDenied, PreconditionFailed
from src.events.audit import list_user_events as list_user_events_page
from src.users import service as user_service
from src.users.schemas import (
    Accepted,
    CurrentPassword,
    EmailChange,
    PasswordChange,
    Role,
    SessionPublic,
    UserCreate,
    UserEvent,
    UserEventsPage,
    UserPublic,
    UsersPage,
    UserUpdate,
    UserUpdateMe,
)

router = APIRouter(prefix="/users", tags=["users"])


def _errors(*statuses: int) -> Responses:
    """The problem responses an operation can give, for its OpenAPI entry (keep them exact)."""
    return dict.fromkeys(statuses, PROBLEM)


IfMatch = Annotated[
    str | None, Header(description="The ETag from a GET; the update fails with 412 if stale.")
]


def _etag(user: User | UserPublic) -> str:
    return f'"{user.version}"'


def _expected_version(if_match: str | None) -> int | None:
    """Parse ``If-Match: "3"`` (or ``W/"3"``, or ``*``); anything else can never match."""
    if if_match is None or if_match.strip() == "*":
        return None
    tag = if_match.strip().removeprefix("W/").strip('"')
    # ASCII digits only ("²".isdigit() is true), and no more than a version column can hold.
    if not (tag.isascii() and tag.isdigit() and len(tag) <= 10):
        raise PreconditionFailed("If-Match does not name a version of this user.")
    return int(tag)


def _reply(user: User, response: Response) -> UserPublic:
    response.headers["ETag"] = _etag(user)
    return UserPublic.model_validate(user)


def _only_self_or_admin(principal: Principal, user_id: uuid.UUID) -> None:
    if principal.id != user_id and not principal.is_admin:
        raise PermissionDenied("You may only access your own account.")


# --- the caller's own account ---------------------------------------------------------------------


@router.get("/me", response_model=UserPublic, responses=_errors(401))
async def read_me(principal: CurrentUser, response: Response) -> UserPublic:
    # Authentication already loaded the user (from the cache when it can); changes invalidate it.
    response.headers["ETag"] = _etag(principal.user)
    return principal.user


@router.patch("/me", response_model=UserPublic, responses=_errors(401, 409, 412, 422))
async def update_me(
    body: UserUpdateMe,
    principal: CurrentUser,
    db: SessionDep,
    sec: SecurityDep,
    response: Response,
    if_match: IfMatch = None,
) -> UserPublic:
    user = await user_service.update_user(
        db,
        sec,
        principal.id,
        body,
        actor_id=principal.id,
        expected_version=_expected_version(if_match),
    )
    return _reply(user, response)


@router.delete(
    "/me", status_code=status.HTTP_204_NO_CONTENT, responses=_errors(400, 401, 409, 422, 429)
)
async def delete_me(
    body: CurrentPassword,
    principal: RecentUser,
    db: SessionDep,
    sec: SecurityDep,
    client: ClientDep,
) -> None:
    """Needs the current password in the body (rate-limited like login)."""
    await account.delete_own_account(db, sec, principal, body.current_password, client)


@router.post(
    "/me/password",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_errors(400, 401, 422, 429),
)
async def change_password(
    body: PasswordChange,
    principal: RecentUser,
    db: SessionDep,
    sec: SecurityDep,
    client: ClientDep,
) -> None:
    """Needs the current password (rate-limited like login); every other session ends."""
    await account.change_password(
        db, sec, principal, body.current_password, body.new_password, client
    )


@router.post(
    "/me/email",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Accepted,
    responses=_errors(400, 401, 409, 422, 429),
)
async def change_email(
    body: EmailChange,
    principal: RecentUser,
    db: SessionDep,
    sec: SecurityDep,
    client: ClientDep,
) -> Accepted:
    """Needs the current password. Mails a link to the new address; the change takes effect when
    it is followed, and the old address is then told, with a link that undoes it."""
    await account.request_email_change(
        db, sec, principal, body.new_email, body.current_password, client
    )
    return Accepted(detail="A confirmation link was sent to the new address.")


@router.get("/me/sessions", response_model=list[SessionPublic], responses=_errors(401))
async def list_my_sessions(principal: CurrentUser, db: SessionDep) -> list[SessionPublic]:
    return await auth_service.list_sessions(db, principal)


@router.delete(
    "/me/sessions/{session_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_errors(401, 404, 422),
)
async def revoke_my_session(
    session_id: uuid.UUID, principal: CurrentUser, db: SessionDep, sec: SecurityDep
) -> None:
    await auth_service.revoke_session(db, sec, principal, session_id)


# --- admin (and self by id) -----------------------------------------------------------------------


@router.get("", response_model=UsersPage, responses=_errors(401, 403, 422))
async def list_users(
    _admin: AdminUser,
    db: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    is_active: bool | None = None,
    role: Role | None = None,
    q: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
) -> UsersPage:
    """Keyset-paginated: pass ``next_cursor`` back as ``cursor``; filters combine with AND."""
    users, next_cursor = await user_service.list_users(
        db, limit=limit, cursor=cursor, is_active=is_active, role=role, q=q
    )
    return UsersPage(items=[UserPublic.model_validate(u) for u in users], next_cursor=next_cursor)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=UserPublic,
    responses=_errors(401, 403, 409, 422),
)
async def create_user(
    body: UserCreate, admin: RecentAdmin, db: SessionDep, sec: SecurityDep, response: Response
) -> UserPublic:
    user = await auth_service.create_account(db, sec, body, actor_id=admin.id)
    response.headers["Location"] = f"{API_V1}/users/{user.id}"
    return _reply(user, response)


@router.get("/{user_id}", response_model=UserPublic, responses=_errors(401, 403, 404, 422))
async def read_user(
    user_id: uuid.UUID, principal: CurrentUser, db: SessionDep, response: Response
) -> UserPublic:
    _only_self_or_admin(principal, user_id)
    return _reply(await user_service.get_user(db, user_id), response)


@router.patch(
    "/{user_id}", response_model=UserPublic, responses=_errors(401, 403, 404, 409, 412, 422)
)
async def update_user(
    user_id: uuid.UUID,
    body: UserUpdate,
    request: Request,
    principal: CurrentUser,
    db: SessionDep,
    sec: SecurityDep,
    response: Response,
    if_match: IfMatch = None,
) -> UserPublic:
    _only_self_or_admin(principal, user_id)
    if principal.is_admin:
        await require_step_up(principal, db, sec, request)
    else:
        # Through its own id a user may change exactly what /users/me allows.
        privileged = sorted(body.model_fields_set - UserUpdateMe.model_fields.keys())
        if privileged:
            raise PermissionDenied(f"Only an administrator may change: {', '.join(privileged)}.")
    user = await user_service.update_user(
        db,
        sec,
        user_id,
        body,
        actor_id=principal.id,
        expected_version=_expected_version(if_match),
    )
    return _reply(user, response)


@router.delete(
    "/{user_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_errors(400, 401, 403, 404, 409, 422, 429),
)
async def delete_user(
    user_id: uuid.UUID,
    request: Request,
    principal: CurrentUser,
    db: SessionDep,
    sec: SecurityDep,
    client: ClientDep,
    body: CurrentPassword | None = None,
) -> None:
    """Admins delete others with no body; deleting yourself needs ``current_password``."""
    _only_self_or_admin(principal, user_id)
    await require_step_up(principal, db, sec, request)
    if principal.id == user_id:
        if body is None:
            raise InvalidInput(
                "Deleting your own account needs your current password.",
                errors=[{"loc": ["body", "current_password"], "msg": "Field required"}],
            )
        await account.delete_own_account(db, sec, principal, body.current_password, client)
        return
    await user_service.delete_user(db, sec, user_id, principal.id)


@router.get("/{user_id}/events", response_model=UserEventsPage, responses=_errors(401, 403, 422))
async def list_user_events(
    user_id: uuid.UUID,
    principal: CurrentUser,
    db: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: Annotated[str | None, Query(max_length=32)] = None,
) -> UserEventsPage:
    """The user's audit trail (events read back from Kafka), oldest first."""
    _only_self_or_admin(principal, user_id)
    # ASCII digits that fit a BIGINT: "²" is a digit to str.isdigit, and int() reads it.
    if cursor is not None and not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 18):
        raise InvalidInput("The cursor is not valid; start again without one.")
    events, last = await list_user_events_page(
        db, user_id, limit=limit, after=int(cursor) if cursor else None
    )
    return UserEventsPage(
        items=[UserEvent.model_validate(e) for e in events],
        next_cursor=str(last) if last is not None else None,
    )


@router.get(
    "/{user_id}/sessions",
    response_model=list[SessionPublic],
    responses=_errors(401, 403, 404, 422),
)
async def list_user_sessions(
    user_id: uuid.UUID, _admin: AdminUser, db: SessionDep
) -> list[SessionPublic]:
    """A user's live sessions, newest first (admins only; your own: ``/users/me/sessions``)."""
    return await auth_service.list_user_sessions(db, user_id)


@router.delete(
    "/{user_id}/sessions/{session_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_errors(401, 403, 404, 422),
)
async def revoke_user_session(
    user_id: uuid.UUID, session_id: uuid.UUID, admin: RecentAdmin, db: SessionDep, sec: SecurityDep
) -> None:
    """End one of a user's sessions (admins only), with the applications' sessions opened
    through it; recorded as ``user.session_revoked`` naming the administrator."""
    await auth_service.revoke_user_session(db, sec, user_id, session_id, actor_id=admin.id)


@router.post(
    "/{user_id}/password-reset",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Accepted,
    responses=_errors(401, 403, 404, 409, 422),
)
async def send_password_reset(
    user_id: uuid.UUID, admin: RecentAdmin, db: SessionDep, sec: SecurityDep
) -> Accepted:
    """Mail the user a password-reset link (admins only; 409 for a deactivated account). The
    notification ``user.password_reset_requested`` names the administrator (``actor_id``)."""
    await auth_service.send_password_reset(db, sec, user_id, actor_id=admin.id)
    return Accepted(detail="A password reset link was sent to the account's address.")
