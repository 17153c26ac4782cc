"""The OpenID Connect provider's machine endpoints: discovery, token, userinfo, revocation,
introspection. The browser endpoints (authorize, consent, logout) are hosted pages (src.web).

Answers follow the RFCs, not our problem format: RFC 6749 section 5.2 errors (``{"error": ...}``)
from the token, revocation and introspection endpoints, RFC 6750 ``WWW-Authenticate`` from
userinfo.
"""

from __future__ import annotations

import base64
import re
from typing import Annotated, Any
from urllib.parse import unquote_plus

from fastapi import APIRouter, BackgroundTasks, Depends, Form, Header, Response
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from src.api.dependencies import (
    ClientDep,
    SecurityDep,
    SessionDep,
    SessionMakerDep,
    SettingsDep,
    bearer_transport,
)
from src.api.errors import PROBLEM
from src.auth import service as auth_service
from src.auth import signin
from src.auth.context import Principal, Security
from src.auth.service import ClientInfo
from src.config.settings import Settings
from src.db.models import OAuthClient
from src.errors import NotAuthenticated, OAuthError, PermissionDenied
from src.oauth import grants
from src.oauth.clients import SCOPES, authenticate_client
from src.users.emails import MAX_LENGTH as MAX_EMAIL_LENGTH
from src.users.schemas import TokenResponse

router = APIRouter(prefix="/oauth2", tags=["openid connect"])
discovery = APIRouter(prefix="/.well-known", tags=["openid connect"])

# Bounds on what the token endpoint reads, so nothing longer reaches a hash or a query.
MAX_PASSWORD_INPUT = 1024
MAX_TOKEN_INPUT = 4096
MAX_SECRET_INPUT = 512
MAX_CLIENT_ID = 255
_VSCHARS = re.compile(r"[\x20-\x7e]+")  # RFC 6749 appendix A: client_id is VSCHAR

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
OAUTH_ERROR = {
    "description": 'RFC 6749 section 5.2 error, e.g. {"error": "invalid_grant"}',
    "content": {
        "application/json": {
            "example": {"error": "invalid_grant", "error_description": "Invalid email or password."}
        }
    },
}


# --- discovery ------------------------------------------------------------------------------------


@discovery.get("/openid-configuration")
async def openid_configuration(
    settings: SettingsDep, sec: SecurityDep, response: Response
) -> dict[str, Any]:
    """OpenID Connect Discovery 1.0 and RFC 8414: everything a stock client library needs."""
    response.headers["Cache-Control"] = f"public, max-age={settings.JWKS_MAX_AGE_SECONDS}"
    return provider_metadata(settings, sec)


def provider_metadata(settings: Settings, sec: Security) -> dict[str, Any]:
    issuer = settings.issuer
    grant_types = ["authorization_code", "refresh_token", "client_credentials"]
    if settings.PASSWORD_GRANT_ENABLED:
        grant_types += ["password", signin.MFA_GRANT]
    auth_methods = ["client_secret_basic", "client_secret_post", "none"]
    algorithms = sorted({key["alg"] for key in sec.tokens.jwks()["keys"]})
    return {
        "issuer": issuer,
        "authorization_endpoint": f"{issuer}/oauth2/authorize",
        "token_endpoint": f"{issuer}/oauth2/token",
        "userinfo_endpoint": f"{issuer}/oauth2/userinfo",
        "jwks_uri": f"{issuer}/.well-known/jwks.json",
        "revocation_endpoint": f"{issuer}/oauth2/revoke",
        "introspection_endpoint": f"{issuer}/oauth2/introspect",
        "end_session_endpoint": f"{issuer}/oauth2/logout",
        "scopes_supported": list(SCOPES),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": grant_types,
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": algorithms,
        "token_endpoint_auth_methods_supported": auth_methods,
        "revocation_endpoint_auth_methods_supported": auth_methods,
        "introspection_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
        ],
        "code_challenge_methods_supported": ["S256"],
        "prompt_values_supported": ["none", "login", "consent"],
        "claims_supported": [
            "sub",
            "iss",
            "aud",
            "exp",
            "iat",
            "auth_time",
            "nonce",
            "amr",
            "sid",
            "azp",
            "name",
            "updated_at",
            "email",
            "email_verified",
        ],
        "authorization_response_iss_parameter_supported": True,
        "claims_parameter_supported": False,
        "request_parameter_supported": False,
        "request_uri_parameter_supported": False,
        "require_request_uri_registration": False,
    }


# --- client authentication ------------------------------------------------------------------------


def client_credentials_of(
    form_id: str | None, form_secret: str | None, authorization: str | None
) -> tuple[str | None, str | None]:
    """The client's id and secret from HTTP Basic or the form (RFC 6749 section 2.3.1), never
    both at once."""
    basic_id = basic_secret = None
    if authorization and authorization[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
        except ValueError:  # bad base64 (binascii.Error), bad UTF-8, non-ASCII text
            raise OAuthError("invalid_client", "Malformed Basic credentials.", 401) from None
        raw_id, _, raw_secret = decoded.partition(":")
        basic_id, basic_secret = unquote_plus(raw_id), unquote_plus(raw_secret) or None
    if basic_id is not None and form_secret:
        raise OAuthError("invalid_request", "Use one client authentication method, not two.")
    if form_id and basic_id is not None and form_id != basic_id:
        raise OAuthError("invalid_request", "Two different client_id values were sent.")
    client_id = form_id or basic_id or None
    secret = basic_secret if basic_id is not None else form_secret or None
    if client_id is not None and (
        len(client_id) > MAX_CLIENT_ID or not _VSCHARS.fullmatch(client_id)
    ):
        raise OAuthError("invalid_client", "The client_id is not valid.", 401)
    if secret is not None and len(secret) > MAX_SECRET_INPUT:
        raise OAuthError("invalid_client", "Client authentication failed.", 401)
    return client_id, secret


def oauth_error_response(exc: OAuthError) -> JSONResponse:
    headers = dict(NO_STORE)
    if exc.status == 401:  # RFC 6749 section 5.2: say how the client should authenticate
        headers["WWW-Authenticate"] = 'Basic realm="token"'
    return JSONResponse(
        {"error": exc.error, "error_description": exc.description, **exc.extra},
        status_code=exc.status,
        headers=headers,
    )


def _bounded(name: str, value: str | None, limit: int) -> str | None:
    if value is not None and len(value) > limit:
        raise OAuthError("invalid_request", f"{name} is longer than {limit} characters.")
    return value


# --- token endpoint -------------------------------------------------------------------------------


async def token_request(
    *,
    db: Any,
    sessions: Any,
    sec: Security,
    who: ClientInfo,
    background: BackgroundTasks,
    form: dict[str, str | None],
    authorization: str | None,
) -> JSONResponse:
    """RFC 6749 section 3.2 for every grant; shared by /oauth2/token and /api/v1/auth/login."""
    try:
        client_id, secret = client_credentials_of(
            form.get("client_id"), form.get("client_secret"), authorization
        )
        client: OAuthClient | None = None
        if client_id is not None:
            client = await authenticate_client(db, client_id, secret)
        elif secret:
            raise OAuthError("invalid_client", "A client_secret needs its client_id.", 401)
        tokens = await _grant(db, sessions, sec, who, background, form, client)
    except OAuthError as exc:
        return oauth_error_response(exc)
    return JSONResponse(tokens.model_dump(exclude_none=True), headers=NO_STORE)


async def _grant(
    db: Any,
    sessions: Any,
    sec: Security,
    who: ClientInfo,
    background: BackgroundTasks,
    form: dict[str, str | None],
    client: OAuthClient | None,
) -> TokenResponse:
    grant_type = form.get("grant_type")
    scope = _bounded("scope", form.get("scope"), 1024)
    if grant_type == "password":
        username, password = form.get("username"), form.get("password")
        if not sec.settings.PASSWORD_GRANT_ENABLED:
            raise OAuthError("unsupported_grant_type", "The password grant is turned off.")
        if client is not None and ("password" not in client.grant_types or not client.first_party):
            raise OAuthError("unauthorized_client", "This client may not use the password grant.")
        if not username or not password:
            raise OAuthError("invalid_request", "username and password are required.")
        _bounded("username", username, MAX_EMAIL_LENGTH)
        _bounded("password", password, MAX_PASSWORD_INPUT)
        granted = None
        if client is not None and scope:
            granted = " ".join(grants.requested_scopes(client, scope, default=[]))
        return await signin.password_grant(
            db,
            sec,
            username,
            password,
            who,
            client.client_id if client else None,
            sessions=sessions,
            defer=background.add_task,
            scope=granted,
        )
    if grant_type == signin.MFA_GRANT:
        if not sec.settings.PASSWORD_GRANT_ENABLED:
            raise OAuthError("unsupported_grant_type", "The password grant is turned off.")
        # The second half of the password grant: allowed to exactly the clients the first is.
        if client is not None and ("password" not in client.grant_types or not client.first_party):
            raise OAuthError("unauthorized_client", "This client may not use the password grant.")
        mfa_token = form.get("mfa_token")
        code = form.get("otp") or form.get("recovery_code")
        if not mfa_token or not code:
            raise OAuthError(
                "invalid_request", "mfa_token and otp (or recovery_code) are required."
            )
        return await signin.second_factor_grant(
            db,
            sec,
            _bounded("mfa_token", mfa_token, MAX_TOKEN_INPUT) or "",
            _bounded("otp", code, 64) or "",
            who,
            client.client_id if client else None,
            sessions=sessions,
            defer=background.add_task,
        )
    if grant_type == "refresh_token":
        refresh_token = form.get("refresh_token")
        if not refresh_token:
            raise OAuthError("invalid_request", "refresh_token is required.")
        _bounded("refresh_token", refresh_token, MAX_TOKEN_INPUT)
        if client is not None and "refresh_token" not in client.grant_types:
            raise OAuthError("unauthorized_client", "This client may not use refresh tokens.")
        return await auth_service.refresh(
            db, sec, refresh_token, who, client.client_id if client else None
        )
    if grant_type == "authorization_code":
        if client is None:
            raise OAuthError("invalid_client", "client_id is required.", 401)
        code = form.get("code")
        if not code:
            raise OAuthError("invalid_request", "code is required.")
        return await grants.exchange_code(
            db,
            sec,
            client,
            _bounded("code", code, MAX_TOKEN_INPUT) or "",
            _bounded("redirect_uri", form.get("redirect_uri"), MAX_TOKEN_INPUT),
            _bounded("code_verifier", form.get("code_verifier"), 128),
            who,
        )
    if grant_type == "client_credentials":
        if client is None:
            raise OAuthError("invalid_client", "Client authentication is required.", 401)
        return grants.client_credentials(sec, client, scope)
    if not grant_type:
        raise OAuthError("invalid_request", "grant_type is required.")
    raise OAuthError("unsupported_grant_type", "This grant type is not supported.")


@router.post(
    "/token",
    response_model=TokenResponse,
    response_model_exclude_none=True,
    responses={400: OAUTH_ERROR, 401: OAUTH_ERROR, 422: PROBLEM, 429: PROBLEM},
    summary="OAuth 2.1 token endpoint",
)
async def token(
    db: SessionDep,
    sessions: SessionMakerDep,
    sec: SecurityDep,
    who: ClientDep,
    background: BackgroundTasks,
    grant_type: Annotated[str | None, Form()] = None,
    code: Annotated[str | None, Form()] = None,
    redirect_uri: Annotated[str | None, Form()] = None,
    code_verifier: Annotated[str | None, Form()] = None,
    refresh_token: Annotated[str | None, Form()] = None,
    username: Annotated[str | None, Form()] = None,
    password: Annotated[str | None, Form()] = None,
    mfa_token: Annotated[str | None, Form()] = None,
    otp: Annotated[str | None, Form()] = None,
    recovery_code: Annotated[str | None, Form()] = None,
    scope: Annotated[str | None, Form()] = None,
    client_id: Annotated[str | None, Form()] = None,
    client_secret: Annotated[str | None, Form()] = None,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Any:
    """Grants: ``authorization_code`` (PKCE S256 required), ``refresh_token`` (rotated, bound to
    the client), ``client_credentials`` (confidential clients), and ``password`` (first-party
    clients that enable it, unless turned off). Clients authenticate with
    ``client_secret_basic`` or ``client_secret_post``; public clients send only ``client_id``.
    An account with a second factor answers the password grant with ``mfa_required`` and an
    ``mfa_token``; the ``urn:user-management-service:grant-type:mfa`` grant completes it with
    ``mfa_token`` and ``otp`` (or ``recovery_code``) — not a standard grant (see README)."""
    form = {
        "grant_type": grant_type,
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": code_verifier,
        "refresh_token": refresh_token,
        "username": username,
        "password": password,
        "mfa_token": mfa_token,
        "otp": otp,
        "recovery_code": recovery_code,
        "scope": scope,
        "client_id": client_id,
        "client_secret": client_secret,
    }
    return await token_request(
        db=db,
        sessions=sessions,
        sec=sec,
        who=who,
        background=background,
        form=form,
        authorization=authorization,
    )


# --- userinfo -------------------------------------------------------------------------------------


async def _userinfo(
    sessions: async_sessionmaker[AsyncSession], sec: Security, token: str | None
) -> dict[str, Any]:
    if not token:
        raise NotAuthenticated()
    principal: Principal = await auth_service.authenticate(sessions, sec, token)
    # A token of the service's own API (no client) may read everything /users/me shows anyway.
    own_api = principal.client_id is None and principal.scope is None
    scopes = {"openid", "profile", "email"} if own_api else set((principal.scope or "").split())
    if "openid" not in scopes:
        raise PermissionDenied(
            "The access token was not granted the openid scope.",
            headers={"WWW-Authenticate": 'Bearer error="insufficient_scope", scope="openid"'},
        )
    return grants.userinfo_claims(principal.user, scopes)


@router.get("/userinfo", responses={401: PROBLEM, 403: PROBLEM})
async def userinfo(
    sessions: SessionMakerDep,
    sec: SecurityDep,
    response: Response,
    token: Annotated[str | None, Depends(bearer_transport)],
) -> dict[str, Any]:
    """OpenID Connect Core section 5.3: the signed-in user's claims, as the scopes allow."""
    response.headers.update(NO_STORE)
    return await _userinfo(sessions, sec, token)


@router.post("/userinfo", responses={401: PROBLEM, 403: PROBLEM})
async def userinfo_post(
    sessions: SessionMakerDep,
    sec: SecurityDep,
    response: Response,
    token: Annotated[str | None, Depends(bearer_transport)],
) -> dict[str, Any]:
    response.headers.update(NO_STORE)
    return await _userinfo(sessions, sec, token)


# --- revocation and introspection -----------------------------------------------------------------


@router.post("/revoke", responses={400: OAUTH_ERROR, 401: OAUTH_ERROR})
async def revoke(
    db: SessionDep,
    sec: SecurityDep,
    token: Annotated[str | None, Form()] = None,
    token_type_hint: Annotated[str | None, Form()] = None,
    client_id: Annotated[str | None, Form()] = None,
    client_secret: Annotated[str | None, Form()] = None,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    """RFC 7009: ends the session behind a refresh or access token of the calling client.
    200 whether or not the token was valid (the hint is not needed: both kinds are tried)."""
    try:
        found_id, secret = client_credentials_of(client_id, client_secret, authorization)
        client = await authenticate_client(db, found_id, secret)
        if not token:
            raise OAuthError("invalid_request", "token is required.")
        if len(token) <= MAX_TOKEN_INPUT:
            await grants.revoke(db, sec, client, token)
    except OAuthError as exc:
        return oauth_error_response(exc)
    return Response(status_code=200, headers=NO_STORE)


@router.post("/introspect", responses={400: OAUTH_ERROR, 401: OAUTH_ERROR})
async def introspect(
    db: SessionDep,
    sec: SecurityDep,
    token: Annotated[str | None, Form()] = None,
    token_type_hint: Annotated[str | None, Form()] = None,
    client_id: Annotated[str | None, Form()] = None,
    client_secret: Annotated[str | None, Form()] = None,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    """RFC 7662 for resource servers (confidential clients): whether a token is active *now*,
    read from the database, so logout, deactivation and password changes show at once. A client
    sees its own tokens; a first-party client (an API gateway, a resource server) every token."""
    try:
        found_id, secret = client_credentials_of(client_id, client_secret, authorization)
        client = await authenticate_client(db, found_id, secret)
        if client.client_type != "confidential":
            raise OAuthError("invalid_client", "Only confidential clients may introspect.", 401)
        if not token:
            raise OAuthError("invalid_request", "token is required.")
        answer = (
            await grants.introspect(db, sec, client, token) if len(token) <= MAX_TOKEN_INPUT else {}
        ) or {"active": False}
    except OAuthError as exc:
        return oauth_error_response(exc)
    return JSONResponse({k: v for k, v in answer.items() if v is not None}, headers=NO_STORE)
