"""What the API accepts and returns for users. Write models refuse unknown fields."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, EmailStr, Field, StringConstraints

Role = Literal["user", "admin"]


def normalize_email(email: str) -> str:
    """Case-insensitive identity: one account per address whatever its capitalisation."""
    return email.strip().lower()


Email = Annotated[EmailStr, Field(max_length=320), AfterValidator(normalize_email)]
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


class UserUpdateMe(WriteModel):
    email: Email | None = None
    full_name: FullName | None = None


class UserUpdate(UserUpdateMe):
    role: Role | None = None
    is_active: bool | None = None
    email_verified: bool | None = None


class PasswordChange(WriteModel):
    current_password: Password
    new_password: Password


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
    current: bool = False


class TokenResponse(BaseModel):
    """RFC 6749 section 5.1."""

    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int
    refresh_token: str


class Accepted(BaseModel):
    detail: str
