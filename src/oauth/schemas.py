"""What the client admin API accepts and returns. Write models refuse unknown fields.

Each field is checked on its own here (so a 422 names the field, and the item, at fault); rules
that span fields or depend on the settings are ``src.oauth.clients.check_registration``.
"""

from __future__ import annotations

import unicodedata
import uuid
from collections.abc import Hashable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from pydantic.json_schema import SkipJsonSchema

from src.oauth.clients import (
    CLIENT_ID_PATTERN,
    DOT_SEGMENTS,
    MAX_URI_LENGTH,
    MAX_URIS,
    NAME_MAX_LENGTH,
    redirect_uri_problem,
)

ClientType = Literal["confidential", "public"]
# Literals rather than the tuples in src.oauth.clients so that OpenAPI lists the values; the
# domain's test holds the two to each other.
GrantType = Literal["authorization_code", "refresh_token", "client_credentials", "password"]
Scope = Literal["openid", "profile", "email", "offline_access"]

T = TypeVar("T", bound=Hashable)


def _default_grant_types() -> list[GrantType]:
    return ["authorization_code", "refresh_token"]


def _default_scopes() -> list[Scope]:
    return ["openid", "profile", "email"]


def _name(value: str) -> str:
    # Shown to users on the consent page: a control or format character (a newline, a
    # right-to-left override) could make it read as something else.
    if any(unicodedata.category(char).startswith("C") for char in value):
        raise ValueError("must not contain control or formatting characters")
    return value


def _redirect_uri(value: str) -> str:
    problem = redirect_uri_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _unique(values: list[T]) -> list[T]:
    if len(set(values)) != len(values):
        raise ValueError("must not list a value twice")
    return values


def _addressable(client_id: str) -> str:
    if client_id in DOT_SEGMENTS:
        raise ValueError("must not be '.' or '..' (they cannot be addressed in a URL path)")
    return client_id


ClientId = Annotated[
    str, StringConstraints(pattern=CLIENT_ID_PATTERN), AfterValidator(_addressable)
]
Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=NAME_MAX_LENGTH),
    AfterValidator(_name),
]
# The length limit runs first, so an enormous value is refused before anything parses it.
RedirectUri = Annotated[str, Field(max_length=MAX_URI_LENGTH), AfterValidator(_redirect_uri)]
RedirectUris = Annotated[list[RedirectUri], Field(max_length=MAX_URIS), AfterValidator(_unique)]
GrantTypes = Annotated[list[GrantType], Field(min_length=1), AfterValidator(_unique)]
Scopes = Annotated[list[Scope], Field(min_length=1), AfterValidator(_unique)]


class WriteModel(BaseModel):
    # No mass assignment: a field the endpoint does not take is an error, not silently dropped.
    model_config = ConfigDict(extra="forbid")


class ClientCreate(WriteModel):
    """A new client. Every client uses PKCE (S256) with authorization_code: nothing to set."""

    client_id: ClientId | None = Field(
        default=None, description="Chosen by the service (random) when left out."
    )
    name: Name
    client_type: ClientType = "confidential"
    redirect_uris: RedirectUris = Field(default_factory=list)
    post_logout_redirect_uris: RedirectUris = Field(default_factory=list)
    grant_types: GrantTypes = Field(default_factory=_default_grant_types)
    scopes: Scopes = Field(default_factory=_default_scopes)
    first_party: bool = False


def _not_null(value: Any) -> Any:
    # ``None`` here only means "not sent"; an explicit null would reach a NOT NULL column.
    if value is None:
        raise ValueError("may be left out, but not set to null")
    return value


NotNull = AfterValidator(_not_null)


class ClientUpdate(WriteModel):
    """A partial update: only the fields sent change. The client type cannot change (a public
    client's users never agreed to a secret-holding one, and the reverse would orphan a secret);
    register a new client instead."""

    name: Annotated[Name | SkipJsonSchema[None], NotNull] = None
    redirect_uris: Annotated[RedirectUris | SkipJsonSchema[None], NotNull] = None
    post_logout_redirect_uris: Annotated[RedirectUris | SkipJsonSchema[None], NotNull] = None
    grant_types: Annotated[GrantTypes | SkipJsonSchema[None], NotNull] = None
    scopes: Annotated[Scopes | SkipJsonSchema[None], NotNull] = None
    first_party: Annotated[bool | SkipJsonSchema[None], NotNull] = None


class ClientPublic(BaseModel):
    """A client as the admin API shows it: never its secret, nor the secret's hash."""

    model_config = ConfigDict(from_attributes=True)

    client_id: str
    name: str
    client_type: ClientType
    redirect_uris: list[str]
    post_logout_redirect_uris: list[str]
    grant_types: list[str]
    scopes: list[str]
    first_party: bool
    id: uuid.UUID
    created_at: datetime
    updated_at: datetime
    version: int


class ClientWithSecret(ClientPublic):
    """The answer to a registration or a rotation: the only times the secret is shown."""

    client_secret: str | None = Field(
        description="Store it now: only its hash is kept. Null for a public client."
    )


class ClientsPage(BaseModel):
    items: list[ClientPublic]
    next_cursor: str | None
