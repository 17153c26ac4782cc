"""What the API accepts and returns for users. Write models refuse unknown fields."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)
from pydantic.json_schema import SkipJsonSchema

from src.users.emails import MAX_LENGTH as MAX_EMAIL_LENGTH
from src.users.emails import canonical_email

Role = Literal["user", "admin"]


def _email(value: str) -> str:
    canonical = canonical_email(value)
    if canonical is None:
        raise ValueError("value is not a valid email address")
    return canonical


# One account per address whatever its capitalisation or Unicode form (see src.users.emails).
Email = Annotated[
    str,
    Field(max_length=MAX_EMAIL_LENGTH, json_schema_extra={"format": "email"}),
    AfterValidator(_email),
]
# Length limits here only stop abuse; the password policy (8-128 after NFKC) gives the clear 422.
Password = Annotated[str, Field(min_length=1, max_length=1024)]
FullName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class WriteModel(BaseModel):
    # No mass assignment: a field the endpoint does not take is an error, not silently dropped.
    model_config = ConfigDict(extra="forbid")


class UserPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    email: str
    full_name: str | None
    role: Role
    is_active: bool
    email_verified: bool
    created_at: datetime
    updated_at: datetime
    version: int


class UserRegister(WriteModel):
    email: Email
    password: Password
    full_name: FullName | None = None


class UserCreate(UserRegister):
    """Admin-created account: may set what self-registration may not."""

    role: Role = "user"
    is_active: bool = True
    email_verified: bool = False


def _not_null(value: Any) -> Any:
    # ``None`` here only means "not sent"; an explicit null would reach a NOT NULL column.
    if value is None:
        raise ValueError("may be left out, but not set to null")
    return value


class UserUpdateMe(WriteModel):
    """A partial update: only the fields sent change; ``full_name`` may be cleared with null."""

    full_name: FullName | None = None
    # Not documented here: accepted only to answer with a pointer to POST /users/me/email.
    email: SkipJsonSchema[Email | None] = None

    _email_not_null = field_validator("email")(_not_null)


class UserUpdate(WriteModel):
    """An administrator's partial update of any account."""

    email: Email | SkipJsonSchema[None] = None
    full_name: FullName | None = None
    role: Role | SkipJsonSchema[None] = None
    is_active: bool | SkipJsonSchema[None] = None
    email_verified: bool | SkipJsonSchema[None] = None

    _not_null = field_validator("email", "role", "is_active", "email_verified")(_not_null)


class PasswordChange(WriteModel):
    current_password: Password
    new_password: Password


class CurrentPassword(WriteModel):
    """The proof of identity a sensitive change needs on top of the access token."""

    current_password: Password


class EmailChange(WriteModel):
    new_email: Email
    current_password: Password


class EmailRequest(WriteModel):
    email: Email


class PasswordResetConfirm(WriteModel):
    token: Annotated[str, Field(min_length=1, max_length=512)]
    new_password: Password


class TokenConfirm(WriteModel):
    token: Annotated[str, Field(min_length=1, max_length=512)]


class UsersPage(BaseModel):
    items: list[UserPublic]
    next_cursor: str | None


class SessionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime
    ip_address: str | None
    user_agent: str | None
    # "token" (an API or application sign-in) or "browser" (signed in on the hosted pages).
    kind: str = "token"
    # The application the session belongs to, if any.
    client_id: str | None = None
    current: bool = False


class TokenResponse(BaseModel):
    """RFC 6749 section 5.1."""

    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int
    # None for grants that give no refresh token (client credentials, a code flow without it).
    refresh_token: str | None = None
    scope: str | None = None
    # OpenID Connect: the ID token of an authorization code grant with the openid scope.
    id_token: str | None = None


class Accepted(BaseModel):
    detail: str


class UserEvent(BaseModel):
    """One entry of a user's audit trail: an event as it was published."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID = Field(validation_alias="event_id")
    type: str
    time: datetime
    source: str
    data: dict[str, Any]


class UserEventsPage(BaseModel):
    items: list[UserEvent]
    next_cursor: str | None


class Reauthentication(WriteModel):
    """Step-up: the password, and a code (TOTP or recovery) when a second factor is enrolled."""

    current_password: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    code: Annotated[str | None, StringConstraints(min_length=1, max_length=64)] = None
