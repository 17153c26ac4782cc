"""The authorization endpoint's rules (OAuth 2.1, OpenID Connect Core 3.1.2, RFC 7636, RFC 9207).

``parse_request`` validates a request in the order RFC 6749 section 4.1.2.1 requires: until the
client and its redirect URI are known to be good, an error is shown on a page (``PageError``) and
never sent anywhere, so the endpoint cannot be used as an open redirector. After that, errors go
back to the client (``RedirectError``). ``decide`` then says what the user sees next: the sign-in
page, the consent page, or the redirect with a code.

The request travels through the hosted pages as its original query string (the ``authz`` field)
and is validated again on every step, so nothing a page posts back is trusted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy.ext.asyncio import AsyncSession

from src.auth import mfa
from src.auth.browser import BrowserSignIn
from src.config.settings import Settings
from src.db.models import AuthorizationCode, OAuthClient
from src.db.types import utcnow
from src.oauth import consents
from src.oauth.clients import SCOPES, get_client, redirect_uri_allowed
from src.security.tokens import hash_token, new_token

MAX_QUERY = 4096
MAX_STATE = 1024
MAX_NONCE = 512
MAX_LOGIN_HINT = 320
MAX_AGE_LIMIT = 10 * 365 * 86400
# RFC 7636 section 4.1/4.2: 43-128 unreserved characters (an S256 challenge is exactly 43).
_PKCE = re.compile(r"[A-Za-z0-9._~-]{43,128}")
_PROMPTS = frozenset({"none", "login", "consent", "select_account"})
_SINGLE = (
    "client_id",
    "redirect_uri",
    "response_type",
    "scope",
    "state",
    "nonce",
    "code_challenge",
    "code_challenge_method",
    "prompt",
    "max_age",
    "login_hint",
    "response_mode",
)


class PageError(Exception):
    """An error to show the user: the client or its redirect URI cannot be trusted."""


class RedirectError(Exception):
    """An RFC 6749 section 4.1.2.1 error, sent back to the (verified) redirect URI."""

    def __init__(self, request: AuthorizationRequest, error: str, description: str) -> None:
        super().__init__(description)
        self.request = request
        self.error = error
        self.description = description


@dataclass(frozen=True)
class AuthorizationRequest:
    client: OAuthClient
    redirect_uri: str
    # The original query string: what the pages carry from step to step.
    raw: str
    state: str | None = None
    scopes: tuple[str, ...] = ()
    nonce: str | None = None
    code_challenge: str = ""
    prompt: frozenset[str] = field(default_factory=frozenset)
    max_age: int | None = None
    login_hint: str | None = None

    @property
    def scope(self) -> str:
        return " ".join(self.scopes)


def parse_query(raw: str) -> list[tuple[str, str]]:
    if len(raw) > MAX_QUERY:
        raise PageError("The sign-in request is too long.")
    try:
        return parse_qsl(raw, keep_blank_values=True, strict_parsing=False, max_num_fields=50)
    except ValueError:
        raise PageError("The sign-in request is malformed.") from None


async def parse_request(db: AsyncSession, settings: Settings, raw: str) -> AuthorizationRequest:
    """Validate an authorization request given as its query string."""
    pairs = parse_query(raw)
    params: dict[str, str] = {}
    repeated: set[str] = set()
    for name, value in pairs:
        if name in params and name in _SINGLE:
            repeated.add(name)
        params.setdefault(name, value)

    client_id = params.get("client_id", "")
    if not client_id or "client_id" in repeated or len(client_id) > 255:
        raise PageError("The application did not identify itself (client_id).")
    client = await get_client(db, client_id)
    if client is None:
        raise PageError("The application is not registered here.")
    redirect_uri = params.get("redirect_uri", "")
    if "redirect_uri" in repeated:
        raise PageError("The request names more than one redirect URI.")
    if not redirect_uri:
        # OAuth 2.1 allows omitting it with a single registered URI; OpenID Connect does not,
        # and requiring it keeps the code bound to one exact URI.
        raise PageError("The request has no redirect URI (redirect_uri).")
    if not redirect_uri_allowed(client, redirect_uri):
        raise PageError("The redirect URI is not registered for this application.")

    request = AuthorizationRequest(
        client=client,
        redirect_uri=redirect_uri,
        raw=raw,
        state=params.get("state") or None,
    )
    if request.state is not None and len(request.state) > MAX_STATE:
        request = replace(request, state=None)
        raise RedirectError(request, "invalid_request", "state is too long.")

    def fail(error: str, description: str) -> RedirectError:
        return RedirectError(request, error, description)

    if repeated:
        raise fail("invalid_request", f"Parameter repeated: {sorted(repeated)[0]}.")
    if "request" in params:
        raise fail("request_not_supported", "Request objects are not supported.")
    if "request_uri" in params:
        raise fail("request_uri_not_supported", "request_uri is not supported.")
    if params.get("response_type") != "code":
        raise fail("unsupported_response_type", "Only response_type=code is supported.")
    if params.get("response_mode", "query") != "query":
        raise fail("invalid_request", "Only response_mode=query is supported.")
    if "authorization_code" not in client.grant_types:
        raise fail("unauthorized_client", "This application may not use the code flow.")

    challenge = params.get("code_challenge", "")
    if not challenge:
        raise fail("invalid_request", "PKCE is required: send code_challenge (S256).")
    if params.get("code_challenge_method") != "S256":
        raise fail("invalid_request", "code_challenge_method must be S256.")
    if not _PKCE.fullmatch(challenge):
        raise fail("invalid_request", "code_challenge is malformed.")

    scopes = tuple(dict.fromkeys(params.get("scope", "").split()))
    unknown = [s for s in scopes if s not in SCOPES or s not in client.scopes]
    if unknown:
        raise fail("invalid_scope", f"Scope not allowed for this application: {unknown[0]}.")
    if not scopes:
        raise fail("invalid_scope", "Ask for at least one scope (openid for OpenID Connect).")

    nonce = params.get("nonce") or None
    if nonce is not None and len(nonce) > MAX_NONCE:
        raise fail("invalid_request", "nonce is too long.")
    prompt = frozenset(params.get("prompt", "").split())
    if not prompt <= _PROMPTS:
        raise fail("invalid_request", "prompt has an unknown value.")
    if "none" in prompt and len(prompt) > 1:
        raise fail("invalid_request", "prompt=none cannot be combined with other values.")
    max_age = None
    if "max_age" in params:
        text = params["max_age"]
        # isascii: "²".isdigit() is true, yet int("²") raises.
        if not (text.isascii() and text.isdigit()) or len(text) > 12 or int(text) > MAX_AGE_LIMIT:
            raise fail("invalid_request", "max_age must be a number of seconds.")
        max_age = int(text)
    login_hint = params.get("login_hint") or None
    if login_hint is not None and len(login_hint) > MAX_LOGIN_HINT:
        login_hint = None

    return replace(
        request,
        scopes=scopes,
        nonce=nonce,
        code_challenge=challenge,
        prompt=prompt,
        max_age=max_age,
        login_hint=login_hint,
    )


def without_prompt(request: AuthorizationRequest, value: str) -> AuthorizationRequest:
    """The request once a prompt has been honoured: after the user has just consented
    (``consent``), the steps that follow must not ask again."""
    if value not in request.prompt:
        return request
    return _rewritten(request, drop_prompt=value)


def after_sign_in(request: AuthorizationRequest) -> AuthorizationRequest:
    """The request once the user has just entered the password: ``prompt=login`` and ``max_age``
    are satisfied, and the steps that follow (consent) must not send the user back to the form."""
    if "login" not in request.prompt and request.max_age is None:
        return request
    return replace(_rewritten(request, drop_prompt="login", drop_max_age=True), max_age=None)


def _rewritten(
    request: AuthorizationRequest, *, drop_prompt: str, drop_max_age: bool = False
) -> AuthorizationRequest:
    pairs = []
    for name, text in parse_query(request.raw):
        if name == "max_age" and drop_max_age:
            continue
        if name == "prompt":
            text = " ".join(p for p in text.split() if p != drop_prompt)
            if not text:
                continue
        pairs.append((name, text))
    return replace(request, raw=urlencode(pairs), prompt=request.prompt - {drop_prompt})


# --- what happens next ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ShowSignIn:
    request: AuthorizationRequest


@dataclass(frozen=True)
class ShowConsent:
    request: AuthorizationRequest
    signin: BrowserSignIn
    missing: tuple[str, ...]


@dataclass(frozen=True)
class Redirect:
    url: str


@dataclass(frozen=True)
class ShowEnrolment:
    """The policy (MFA_REQUIRED) asks this user for a second factor, and there is none yet."""

    request: AuthorizationRequest


Decision = ShowSignIn | ShowConsent | Redirect | ShowEnrolment


def needs_sign_in(
    request: AuthorizationRequest, signin: BrowserSignIn | None, now: datetime
) -> bool:
    if signin is None or "login" in request.prompt:
        return True
    auth_time = signin.session.auth_time or signin.session.created_at
    return request.max_age is not None and now - auth_time > timedelta(seconds=request.max_age)


async def decide(
    db: AsyncSession,
    settings: Settings,
    request: AuthorizationRequest,
    signin: BrowserSignIn | None,
) -> Decision:
    """Sign in, consent, or a code: what the user needs next for this request."""
    now = utcnow()
    if needs_sign_in(request, signin, now):
        if "none" in request.prompt:
            raise RedirectError(request, "login_required", "The user is not signed in.")
        return ShowSignIn(request)
    assert signin is not None
    if await mfa.missing_required_factor(db, settings, signin.user):
        if "none" in request.prompt:
            raise RedirectError(
                request, "interaction_required", "The user must set up a second factor."
            )
        return ShowEnrolment(request)
    missing: tuple[str, ...] = ()
    if not request.client.first_party:
        granted = await consents.granted_scopes(db, signin.user.id, request.client.client_id)
        missing = tuple(s for s in request.scopes if s not in granted)
        if "consent" in request.prompt:
            missing = request.scopes
    if missing:
        if "none" in request.prompt:
            raise RedirectError(request, "consent_required", "The user has not consented.")
        return ShowConsent(request, signin, missing)
    code = await issue_code(db, settings, request, signin)
    return Redirect(success_url(settings, request, code))


async def issue_code(
    db: AsyncSession, settings: Settings, request: AuthorizationRequest, signin: BrowserSignIn
) -> str:
    """A fresh single-use code; only its hash is stored. Committed here: the redirect carrying
    it must never go out for a code the token endpoint cannot find."""
    code = new_token()
    now = utcnow()
    db.add(
        AuthorizationCode(
            code_hash=hash_token(code),
            client_id=request.client.client_id,
            user_id=signin.user.id,
            browser_session_id=signin.session.id,
            redirect_uri=request.redirect_uri,
            scope=request.scope,
            nonce=request.nonce,
            code_challenge=request.code_challenge,
            auth_time=signin.session.auth_time or signin.session.created_at,
            amr=signin.session.amr or "pwd",
            created_at=now,
            expires_at=now + timedelta(seconds=settings.AUTHORIZATION_CODE_LIFETIME_SECONDS),
        )
    )
    await db.commit()
    return code


def _with_query(uri: str, params: Sequence[tuple[str, str]]) -> str:
    """Add parameters to a redirect URI, keeping a query it already has (RFC 6749 3.1.2)."""
    parts = urlsplit(uri)
    extra = urlencode(params)
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def success_url(settings: Settings, request: AuthorizationRequest, code: str) -> str:
    params = [("code", code)]
    if request.state is not None:
        params.append(("state", request.state))
    params.append(("iss", settings.issuer))  # RFC 9207: the client checks who answered
    return _with_query(request.redirect_uri, params)


def error_url(settings: Settings, error: RedirectError) -> str:
    params = [("error", error.error), ("error_description", error.description)]
    if error.request.state is not None:
        params.append(("state", error.request.state))
    params.append(("iss", settings.issuer))
    return _with_query(error.request.redirect_uri, params)


def origin_of(uri: str) -> str | None:
    """The origin a form's redirect goes to, for the page's CSP form-action (http(s) only)."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https") and parts.netloc:
        return f"{parts.scheme}://{parts.netloc}"
    if parts.scheme:
        return f"{parts.scheme}:"
    return None


# --- the code at the token endpoint ---------------------------------------------------------------


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def verifier_matches(verifier: str | None, challenge: str) -> bool:
    """RFC 7636 section 4.6, S256 only; a malformed verifier never matches."""
    if not verifier or not _PKCE.fullmatch(verifier):
        return False
    return hmac.compare_digest(s256(verifier), challenge)


def describe_scopes(scopes: Sequence[str]) -> list[tuple[str, str]]:
    return [(scope, SCOPES[scope]) for scope in scopes if scope in SCOPES]


def client_origin_targets(request: AuthorizationRequest) -> list[str]:
    origin = origin_of(request.redirect_uri)
    return [origin] if origin else []
