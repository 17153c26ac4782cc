"""Passkeys (WebAuthn): registering one, signing in with it alone, using it as the second step
after the password, removing it, and refusing a cloned authenticator.

The ceremonies run for real in headless Chromium against the app on a socket, with a virtual
authenticator attached through the DevTools protocol (CTAP2, internal, resident keys, user
verification that always succeeds, presence simulated): the browser makes and signs with real
keys, py_webauthn verifies them. The provider lives at ``http://localhost:<port>``: WebAuthn needs
a secure context, and the relying party id must be a domain (``localhost``), not an address.
Every CSP violation and page error fails the test.

Without a browser: challenge tokens (expired, forged, for another purpose or user), the CSRF
header, unknown credentials, bad input, the options each ceremony gets, the policy of the pages
that load the script, the removal form and the login guard.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy import select

from src.app.container import app_services
from src.auth import passkeys
from src.auth.challenge import BROWSER, issue_ticket
from src.auth.context import Security
from src.db.models import MfaFactor, User
from src.db.types import utcnow
from src.main import create_app
from src.web.csrf import CSRF_FIELD
from src.web.render import STATIC_DIR
from tests.conftest import SettingsFactory
from tests.support.app import PASSWORD, bearer, register, running_app, unique_email
from tests.support.auth import outbox, password_grant, unverified_claims
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.oidc import (
    REDIRECT_URI,
    authorize_query,
    create_client,
    exchange,
    form_posting_to,
    live_server,
    pkce_pair,
    query_of,
)
from tests.support.servers import free_port
from tests.test_event_schemas import data_schemas, validator
from tests.web.helpers import PAGE_CSP, browser_session

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext, CDPSession, ConsoleMessage, Page, Route

App = tuple[FastAPI, httpx.AsyncClient]

# Generous for a busy 2-core machine; every wait ends as soon as its condition holds.
WAIT_MS = 20_000
ADMIN_PASSWORD = "admin password for tests"
TEMPLATES = STATIC_DIR.parent / "templates"
SCRIPTED_CSP = (
    "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; "
    "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
CSRF_COOKIE, SESSION_COOKIE = "ums_csrf", "ums_session"  # plain http: no __Host- prefix
AUTHENTICATOR = {
    "protocol": "ctap2",
    "transport": "internal",
    "hasResidentKey": True,
    "hasUserVerification": True,
    "isUserVerified": True,
    "automaticPresenceSimulation": True,
}

# Runs in every page before its own scripts; violations reach the test through a binding at once
# (a page may navigate away before anyone could read a variable it kept them in).
REPORT_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", (event) => {
  window.__reportCspViolation(
    `${document.location.href}: ${event.effectiveDirective} blocked`
      + ` ${event.blockedURI || "inline"} (${event.disposition})`
  );
});
"""


@pytest.fixture
def artifacts_dir(tmp_path: Path) -> Path:
    directory = Path(os.environ.get("ARTIFACTS_DIR") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _dsn(database_url: str) -> str:
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


# --- in the browser -------------------------------------------------------------------------------


@dataclass
class Watch:
    provider: str
    violations: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    # (url, status, Content-Security-Policy) of every provider document.
    documents: list[tuple[str, int, str | None]] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.console.append(f"{message.type}: {message.text}")

    def csp_console(self) -> list[str]:
        return [
            line
            for line in self.console
            if "Content Security Policy" in line or "Refused to" in line
        ]


@dataclass
class Db:
    """Reads of the provider's database, from the test's own connection."""

    conn: asyncpg.Connection

    async def browser_sessions(self, user_id: uuid.UUID) -> list[asyncpg.Record]:
        return list(
            await self.conn.fetch(
                "SELECT id, amr, revoked_at FROM sessions WHERE user_id = $1 AND kind = 'browser'"
                " ORDER BY created_at",
                user_id,
            )
        )

    async def passkeys(self, user_id: uuid.UUID) -> list[asyncpg.Record]:
        return list(
            await self.conn.fetch(
                "SELECT id, name, credential_id, sign_count, transports, last_used_at"
                " FROM mfa_factors WHERE user_id = $1 AND kind = 'webauthn'",
                user_id,
            )
        )

    async def events(self, user_id: uuid.UUID, type_: str) -> list[dict[str, Any]]:
        rows = await self.conn.fetch(
            "SELECT payload FROM outbox WHERE aggregate_id = $1 AND type = $2 ORDER BY position",
            user_id,
            type_,
        )
        return [json.loads(row["payload"]) for row in rows]


async def _id_token_claims(
    api: httpx.AsyncClient, client_id: str, cookies: dict[str, str]
) -> dict[str, Any]:
    """An authorization code flow with the browser's session cookie: the ID token's claims."""
    verifier, challenge = pkce_pair()
    query = authorize_query(client_id, challenge)
    async with httpx.AsyncClient(base_url=api.base_url, cookies=cookies, timeout=30) as browser:
        answer = await browser.get(f"/oauth2/authorize?{query}")
    assert answer.status_code == 302, answer.text
    code = query_of(answer.headers["location"])["code"]
    tokens = await exchange(api, code, verifier, client_id)
    assert tokens.status_code == 200, tokens.text
    return unverified_claims(tokens.json()["id_token"])


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"
)
async def test_passkeys_register_sign_in_second_factor_clone_and_removal_in_chromium(
    make_settings: SettingsFactory,
    clean_db: None,
    database_url: str,
    artifacts_dir: Path,
    record_property: Callable[[str, object], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from playwright.async_api import Error as PlaywrightError
    from playwright.async_api import async_playwright

    port = free_port()
    provider = f"http://localhost:{port}"
    admin_email, email = unique_email("admin"), unique_email("passkey")
    settings = make_settings(
        PUBLIC_BASE_URL=provider,
        FIRST_ADMIN_EMAIL=admin_email,
        FIRST_ADMIN_PASSWORD=ADMIN_PASSWORD,
        NOTIFY_NEW_SIGN_IN=False,
    )
    watch = Watch(provider=provider)
    shots: dict[str, Path] = {}

    async def shoot(page: Page, name: str) -> None:
        path = artifacts_dir / f"passkeys-{name}.png"
        await page.screenshot(path=path, full_page=True)
        shots[name] = path
        record_property(f"screenshot-passkeys-{name}", str(path))

    conn = await asyncpg.connect(_dsn(database_url))
    try:
        with live_server(create_app(settings), port):
            # The server listens on 127.0.0.1; its origin (and relying party) is localhost.
            base = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=base, timeout=30) as api:
                user_id = uuid.UUID((await register(api, email))["id"])
                admin = bearer((await password_grant(api, admin_email, ADMIN_PASSWORD)).json())
                client_id = (
                    await create_client(
                        api, admin, client_type="public", name="Passkey app", first_party=True
                    )
                )["client_id"]
                # A third party's: the user is asked to allow it after signing in.
                third_party = (
                    await create_client(
                        api, admin, client_type="public", name="Third app", first_party=False
                    )
                )["client_id"]
                async with async_playwright() as playwright:
                    browser = await playwright.chromium.launch(
                        executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
                    )
                    try:
                        context = await browser.new_context(viewport={"width": 1024, "height": 768})
                        page = await _watched_page(context, watch)
                        cdp = await context.new_cdp_session(page)
                        await cdp.send("WebAuthn.enable", {"enableUI": False})
                        try:
                            await _journey(
                                page, context, cdp, watch, Db(conn), api, user_id, email,
                                (client_id, third_party), shoot,
                            )  # fmt: skip
                        finally:
                            with contextlib.suppress(PlaywrightError):
                                await shoot(page, "last")
                    finally:
                        await browser.close()
    finally:
        await conn.close()

    # The clone was refused for its counter (the audit log says why; the answer does not).
    refusals = [
        r for r in caplog.records if r.name == "src.auth.audit" and r.msg == "passkey refused"
    ]
    assert [getattr(r, "reason", None) for r in refusals] == ["sign_count"], refusals
    assert watch.violations == [], watch.violations
    assert watch.csp_console() == [], watch.csp_console()
    assert watch.page_errors == [], watch.page_errors
    assert watch.documents
    for url, status, policy in watch.documents:
        path = urlsplit(url).path
        assert policy, url
        assert "'unsafe-inline'" not in policy and "'unsafe-eval'" not in policy, (url, policy)
        if 300 <= status < 400:  # a redirect has no content to run
            assert "script-src" not in policy, (url, policy)
        # The Passkeys page (also as the answer to its remove form) and the passkey sign-in.
        elif path.startswith("/account/passkeys") or path in (
            "/account/signin/passkey",
            "/account/signin/second-factor/use-passkey",
        ):
            assert "script-src 'self'; connect-src 'self'" in policy, (url, policy)
        else:
            assert "script-src" not in policy and "connect-src" not in policy, (url, policy)
    assert {"passkeys", "signin", "passkey-signin", "recovery-codes"} <= set(shots)


async def _watched_page(context: BrowserContext, watch: Watch) -> Page:
    async def refuse(route: Route) -> None:
        await route.abort()

    async def application(route: Route) -> None:
        # The application's redirect URI: the browser arrives with the code; nothing more.
        await route.fulfill(status=200, content_type="text/plain", body="back at the application")

    def on_response(response: Any) -> None:
        request = response.request
        if request.resource_type == "document" and request.url.startswith(f"{watch.provider}/"):
            policy = response.headers.get("content-security-policy")
            watch.documents.append((request.url, response.status, policy))

    context.set_default_timeout(WAIT_MS)
    context.set_default_navigation_timeout(WAIT_MS)
    # Later routes win: the application's callback is answered, anything else foreign refused.
    await context.route(lambda url: not url.startswith(f"{watch.provider}/"), refuse)
    await context.route(f"{REDIRECT_URI}**", application)

    def on_violation(report: str) -> None:
        watch.violations.append(report)

    await context.expose_function("__reportCspViolation", on_violation)
    await context.add_init_script(REPORT_VIOLATIONS)
    context.on("response", on_response)
    page = await context.new_page()
    page.on("console", watch.on_console)
    page.on("pageerror", lambda error: watch.page_errors.append(f"{page.url}: {error}"))
    return page


async def _journey(
    page: Page,
    context: BrowserContext,
    cdp: CDPSession,
    watch: Watch,
    db: Db,
    api: httpx.AsyncClient,
    user_id: uuid.UUID,
    email: str,
    clients: tuple[str, str],
    shoot: Callable[[Page, str], Any],
) -> None:
    from playwright.async_api import expect

    client_id, third_party = clients
    provider = watch.provider
    heading = page.get_by_role("heading", level=1)
    main = page.locator("main")
    authenticator = (
        await cdp.send("WebAuthn.addVirtualAuthenticator", {"options": AUTHENTICATOR})
    )["authenticatorId"]

    async def sign_in_with_password() -> None:
        await page.goto(f"{provider}/account/signin")
        await page.get_by_label("Email address").fill(email)
        await page.get_by_label("Password", exact=True).fill(PASSWORD)
        await page.get_by_role("button", name="Sign in", exact=True).click()

    async def sign_out() -> None:
        await page.goto(f"{provider}/account")
        await page.get_by_role("button", name="Sign out").click()
        await expect(main).to_contain_text("You are signed out.")

    async def session_cookie() -> dict[str, str]:
        cookies = {c["name"]: c["value"] for c in await context.cookies(provider)}
        return {SESSION_COOKIE: cookies[SESSION_COOKIE]}

    # 1. Signed in with the password (no second factor yet), the user adds a passkey.
    await sign_in_with_password()
    await page.wait_for_url(f"{provider}/account")
    await page.goto(f"{provider}/account/passkeys")
    await expect(heading).to_have_text("Passkeys")
    await expect(main).to_contain_text("You have no passkey yet.")
    await page.get_by_label("Name of the passkey").fill("Laptop <b>key</b>")
    await page.get_by_label("Your current password").fill(PASSWORD)
    await page.get_by_role("button", name="Add a passkey").click()
    # The account's first second factor: recovery codes, shown once.
    codes_panel = page.locator("[data-passkey-codes]")
    await expect(codes_panel).to_be_visible()
    await expect(codes_panel.locator("li")).to_have_count(10)
    recovery_codes = await codes_panel.locator("li").all_inner_texts()
    await shoot(page, "recovery-codes")
    await page.get_by_role("link", name="I have saved them").click()
    await page.wait_for_url(f"{provider}/account/passkeys?notice=added")
    await expect(page.get_by_role("status")).to_contain_text("Your passkey is added")
    await expect(page.get_by_role("heading", level=3)).to_have_text("Laptop <b>key</b>")
    await shoot(page, "passkeys")
    [row] = await db.passkeys(user_id)
    assert row["name"] == "Laptop <b>key</b>" and row["transports"] is not None
    [enrolled] = await db.events(user_id, "user.mfa_enrolled")
    assert enrolled["kind"] == "webauthn" and enrolled["recovery_codes_issued"] == 10
    assert enrolled["factor_id"] == str(row["id"])
    validator(data_schemas()["user.mfa_enrolled"]).validate(enrolled)
    [exported] = (await cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator}))[
        "credentials"
    ]
    assert exported["isResidentCredential"] is True
    assert base64.b64decode(exported["userHandle"]) == user_id.bytes

    # 2. Signed out, then in again with the passkey alone: no password typed.
    await sign_out()
    await page.goto(f"{provider}/account/signin")
    await shoot(page, "signin")
    await page.get_by_role("link", name="Sign in with a passkey").click()
    await page.wait_for_url(f"{provider}/account/signin/passkey")
    await expect(heading).to_have_text("Sign in with a passkey")
    await shoot(page, "passkey-signin")
    await page.get_by_role("button", name="Sign in with a passkey").click()
    await page.wait_for_url(f"{provider}/account")
    await expect(main).to_contain_text(email)
    assert (await db.browser_sessions(user_id))[-1]["amr"] == "hwk mfa"
    claims = await _id_token_claims(api, client_id, await session_cookie())
    assert claims["amr"] == ["hwk", "mfa"] and claims["sub"] == str(user_id)
    [after_one] = await db.passkeys(user_id)
    assert after_one["sign_count"] > exported["signCount"]
    assert after_one["last_used_at"] is not None

    # 3. Signed out; an application's sign-in with the password, then the passkey as the
    # second step: back at the application with a code whose ID token says how.
    await sign_out()
    verifier, challenge = pkce_pair()
    await page.goto(f"{provider}/oauth2/authorize?{authorize_query(client_id, challenge)}")
    await page.get_by_label("Email address").fill(email)
    await page.get_by_label("Password", exact=True).fill(PASSWORD)
    await page.get_by_role("button", name="Sign in", exact=True).click()
    await expect(heading).to_have_text("Second step")
    await page.get_by_role("button", name="Use a passkey").click()
    await page.wait_for_url(f"{provider}/account/signin/second-factor/use-passkey")
    await expect(heading).to_have_text("Second step")
    await expect(main).to_contain_text("to continue to Passkey app")
    await shoot(page, "second-factor")
    await page.get_by_role("button", name="Use a passkey").click()
    await page.wait_for_url(f"{REDIRECT_URI}?**")
    params = {k: v[0] for k, v in parse_qs(urlsplit(page.url).query).items()}
    tokens = await exchange(api, params["code"], verifier, client_id)
    assert tokens.status_code == 200, tokens.text
    assert unverified_claims(tokens.json()["id_token"])["amr"] == ["pwd", "hwk", "mfa"]
    assert (await db.browser_sessions(user_id))[-1]["amr"] == "pwd hwk mfa"

    # 4. Signed out; an application's sign-in, with the passkey alone: back at the application
    # with a code whose ID token says how. The passkey's counter moves on each time.
    await sign_out()
    verifier, challenge = pkce_pair()
    await page.goto(f"{provider}/oauth2/authorize?{authorize_query(client_id, challenge)}")
    await page.get_by_role("link", name="Sign in with a passkey").click()
    await page.wait_for_url(f"{provider}/account/signin/passkey?authz=**")
    await expect(main).to_contain_text("to continue to Passkey app")
    await page.get_by_role("button", name="Sign in with a passkey").click()
    await page.wait_for_url(f"{REDIRECT_URI}?**")
    params = {k: v[0] for k, v in parse_qs(urlsplit(page.url).query).items()}
    tokens = await exchange(api, params["code"], verifier, client_id)
    assert tokens.status_code == 200, tokens.text
    assert unverified_claims(tokens.json()["id_token"])["amr"] == ["hwk", "mfa"]

    # A third party's sign-in: after the passkey, the consent page (the answer sends the
    # browser back to the authorization endpoint), then the application.
    await sign_out()
    verifier, challenge = pkce_pair()
    await page.goto(f"{provider}/oauth2/authorize?{authorize_query(third_party, challenge)}")
    await page.get_by_role("link", name="Sign in with a passkey").click()
    await page.get_by_role("button", name="Sign in with a passkey").click()
    await expect(heading).to_have_text("Allow Third app to use your account?")
    await page.get_by_role("button", name="Allow").click()
    await page.wait_for_url(f"{REDIRECT_URI}?**")
    params = {k: v[0] for k, v in parse_qs(urlsplit(page.url).query).items()}
    tokens = await exchange(api, params["code"], verifier, third_party)
    assert tokens.status_code == 200, tokens.text
    assert unverified_claims(tokens.json()["id_token"])["amr"] == ["hwk", "mfa"]

    # 5. A cloned authenticator: the credential (private key and all) copied out after its
    # registration, with the counter it had then, now behind the stored one.
    await sign_out()
    [before_clone] = await db.passkeys(user_id)
    assert before_clone["sign_count"] > after_one["sign_count"] > exported["signCount"]
    sessions_before = len(await db.browser_sessions(user_id))
    await cdp.send("WebAuthn.removeVirtualAuthenticator", {"authenticatorId": authenticator})
    clone = (await cdp.send("WebAuthn.addVirtualAuthenticator", {"options": AUTHENTICATOR}))[
        "authenticatorId"
    ]
    await cdp.send("WebAuthn.addCredential", {"authenticatorId": clone, "credential": exported})
    await page.goto(f"{provider}/account/signin/passkey")
    async with page.expect_response(
        lambda r: r.url == f"{provider}/account/signin/passkey" and r.request.method == "POST"
    ) as refused_info:
        await page.get_by_role("button", name="Sign in with a passkey").click()
    refused = await refused_info.value
    assert refused.status == 400
    assert (await refused.json()) == {"error": "The passkey could not be verified."}
    await expect(page.get_by_role("alert")).to_contain_text("could not be verified")
    assert page.url == f"{provider}/account/signin/passkey"
    assert len(await db.browser_sessions(user_id)) == sessions_before
    [after_clone] = await db.passkeys(user_id)
    assert after_clone["sign_count"] == before_clone["sign_count"]
    await cdp.send("WebAuthn.removeVirtualAuthenticator", {"authenticatorId": clone})

    # 6. The passkey is gone from this browser: a recovery code signs in, and the passkey is
    # removed with the password.
    await sign_in_with_password()
    await expect(heading).to_have_text("Second step")
    await page.get_by_label("Code from your authenticator app, or a recovery code").fill(
        recovery_codes[0]
    )
    await page.get_by_role("button", name="Continue").click()
    await page.wait_for_url(f"{provider}/account")
    await page.goto(f"{provider}/account/passkeys")
    remove_password = page.locator(f"#password-{row['id']}")
    await page.locator("summary").click()
    await remove_password.fill("not the password")
    await page.get_by_role("button", name=re.compile("Remove this passkey")).click()
    await expect(page.get_by_role("alert")).to_contain_text("not correct")
    assert len(await db.passkeys(user_id)) == 1
    await page.locator("summary").click()
    await remove_password.fill(PASSWORD)
    await page.get_by_role("button", name=re.compile("Remove this passkey")).click()
    await page.wait_for_url(f"{provider}/account/passkeys?notice=removed")
    await expect(main).to_contain_text("You have no passkey yet.")
    assert await db.passkeys(user_id) == []
    [removed] = await db.events(user_id, "user.mfa_removed")
    assert removed["kind"] == "webauthn" and removed["via"] == "password"
    validator(data_schemas()["user.mfa_removed"]).validate(removed)


# --- without a browser ----------------------------------------------------------------------------

LOCAL = "http://localhost:8000"


@pytest_asyncio.fixture
async def local(make_settings: SettingsFactory) -> AsyncIterator[App]:
    """The app in-process, its client on the origin the relying party is for."""
    async with running_app(make_settings(PUBLIC_BASE_URL=LOCAL)) as (app, _):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=LOCAL) as client:
            yield app, client


def _security(app: FastAPI) -> Security:
    return app_services(app).security


async def _csrf(client: httpx.AsyncClient) -> dict[str, str]:
    """A page's CSRF token (the cookie is set on the client), as the script's header."""
    page = await client.get("/account/signin/passkey")
    assert page.status_code == 200, page.text
    token = client.cookies[CSRF_COOKIE]
    assert re.search(rf'name="{CSRF_FIELD}" value="{token}"', page.text)
    return {"X-CSRF-Token": token}


async def _user(app: FastAPI, client: httpx.AsyncClient) -> User:
    email = unique_email("pk")
    await register(client, email)
    async with app_services(app).sessionmaker() as db:
        return (await db.execute(select(User).where(User.email == email))).scalar_one()


async def _add_factor(
    app: FastAPI, user_id: uuid.UUID, *, kind: str = "webauthn", name: str = "Key"
) -> MfaFactor:
    """A confirmed factor written straight to the database (a stand-in credential: only the
    browser test makes real ones)."""
    async with app_services(app).sessionmaker() as db:
        factor = MfaFactor(
            id=uuid.uuid4(),
            user_id=user_id,
            kind=kind,
            name=name,
            confirmed_at=utcnow(),
            credential_id=(
                base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
                if kind == "webauthn"
                else None
            ),
            public_key=b"not a key" if kind == "webauthn" else None,
            sign_count=0 if kind == "webauthn" else None,
            transports=["internal"] if kind == "webauthn" else None,
        )
        db.add(factor)
        await db.commit()
        return factor


def _fake_assertion(credential_id: str, user_handle: bytes | None = None) -> dict[str, Any]:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return {
        "id": credential_id,
        "rawId": credential_id,
        "type": "public-key",
        "response": {
            "clientDataJSON": b64(b'{"type":"webauthn.get"}'),
            "authenticatorData": b64(bytes(37)),
            "signature": b64(b"signature"),
            "userHandle": b64(user_handle) if user_handle is not None else None,
        },
    }


async def test_challenge_tokens_are_sealed_single_purpose_and_expire(local: App) -> None:
    app, _ = local
    sec = _security(app)
    someone, other = uuid.uuid4(), uuid.uuid4()
    challenge, token = passkeys.issue_challenge(sec, passkeys.REGISTER, someone)
    assert passkeys.open_challenge(sec, token, passkeys.REGISTER, someone) == challenge
    assert len(challenge) == passkeys.CHALLENGE_BYTES

    refusals: list[tuple[object, str, uuid.UUID | None]] = [
        (token, passkeys.AUTHENTICATE, someone),  # another purpose
        (token, passkeys.REGISTER, other),  # another user
        (token, passkeys.REGISTER, None),  # not for "anyone"
        (
            token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"),
            passkeys.REGISTER,
            someone,
        ),
        ("v1.deadbeef." + "A" * 80, passkeys.REGISTER, someone),
        ("", passkeys.REGISTER, someone),
        (None, passkeys.REGISTER, someone),
        (["not", "text"], passkeys.REGISTER, someone),
        ("x" * (passkeys.MAX_CHALLENGE_TOKEN + 1), passkeys.REGISTER, someone),
        # A ticket of the second step is sealed too, but for another purpose.
        (issue_ticket(sec, someone, BROWSER), passkeys.REGISTER, someone),
    ]
    for candidate, purpose, user_id in refusals:
        with pytest.raises(passkeys.PasskeyError):
            passkeys.open_challenge(sec, candidate, purpose, user_id)

    # Expired: past its lifetime, and a moment before that it still opens.
    issued = utcnow()
    _, fresh = passkeys.issue_challenge(sec, passkeys.AUTHENTICATE, None, now=issued)
    almost = issued + timedelta(seconds=passkeys.CHALLENGE_SECONDS - 1)
    passkeys.open_challenge(sec, fresh, passkeys.AUTHENTICATE, None, now=almost)
    with pytest.raises(passkeys.PasskeyError):
        late = issued + timedelta(seconds=passkeys.CHALLENGE_SECONDS)
        passkeys.open_challenge(sec, fresh, passkeys.AUTHENTICATE, None, now=late)


async def test_the_ceremony_endpoints_need_the_csrf_header(local: App) -> None:
    app, client = local
    headers = await _csrf(client)
    user = await _user(app, client)
    client.cookies.set(SESSION_COOKIE, await browser_session(app, user.email))
    ticket = issue_ticket(_security(app), user.id, BROWSER)
    endpoints = [
        ("/account/signin/passkey/options", {}),
        ("/account/signin/passkey", {"credential": {}, "challenge_token": "x"}),
        ("/account/signin/second-factor/passkey/options", {"ticket": ticket}),
        ("/account/signin/second-factor/passkey", {"ticket": ticket, "credential": {}}),
        ("/account/passkeys/options", {"password": PASSWORD}),
        ("/account/passkeys", {"credential": {}, "challenge_token": "x"}),
    ]
    for url, body in endpoints:
        for bad in ({}, {"X-CSRF-Token": "A" * 43}, {"X-CSRF-Token": headers["X-CSRF-Token"][:-1]}):
            refused = await client.post(url, json=body, headers=bad)
            assert refused.status_code == 403, (url, bad, refused.text)
            assert refused.headers["content-type"] == "application/json"
            assert refused.json() == {"error": "The page has expired. Reload it and try again."}
        # The form field is no substitute for the header.
        refused = await client.post(url, data={CSRF_FIELD: headers["X-CSRF-Token"]})
        assert refused.status_code == 403, url
    # Without the cookie, the header alone proves nothing.
    cookie = client.cookies[CSRF_COOKIE]
    client.cookies.delete(CSRF_COOKIE)
    refused = await client.post(endpoints[0][0], json={}, headers=headers)
    assert refused.status_code == 403
    client.cookies.set(CSRF_COOKIE, cookie)
    assert (await client.post(endpoints[0][0], json={}, headers=headers)).status_code == 200


async def test_the_options_of_each_ceremony(local: App) -> None:
    app, client = local
    headers = await _csrf(client)
    user = await _user(app, client)

    # Passwordless: any discoverable credential, user verification required.
    answer = await client.post("/account/signin/passkey/options", json={}, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    options = answer.json()["options"]
    assert options["rpId"] == "localhost"
    assert options["userVerification"] == "required"
    assert options["allowCredentials"] == []
    sec = _security(app)
    challenge = passkeys.open_challenge(
        sec, answer.json()["challenge_token"], passkeys.AUTHENTICATE, None
    )
    assert options["challenge"] == base64.urlsafe_b64encode(challenge).rstrip(b"=").decode()

    # Registration: for the signed-in user, with the password; its passkeys excluded.
    existing = await _add_factor(app, user.id, name="Old key")
    await _add_factor(app, user.id, kind="totp", name="Phone")
    client.cookies.set(SESSION_COOKIE, await browser_session(app, user.email))
    wrong = await client.post(
        "/account/passkeys/options", json={"password": "not it", "name": "K"}, headers=headers
    )
    assert wrong.status_code == 400 and wrong.json() == {
        "error": "The current password is not correct."
    }
    answer = await client.post(
        "/account/passkeys/options", json={"password": PASSWORD, "name": "K"}, headers=headers
    )
    assert answer.status_code == 200, answer.text
    options = answer.json()["options"]
    assert options["rp"] == {"id": "localhost", "name": app_services(app).settings.PROJECT_NAME}
    user_handle = base64.urlsafe_b64encode(user.id.bytes).rstrip(b"=").decode()
    assert options["user"]["id"] == user_handle and options["user"]["name"] == user.email
    assert options["authenticatorSelection"]["residentKey"] == "required"
    assert options["authenticatorSelection"]["userVerification"] == "required"
    assert [p["alg"] for p in options["pubKeyCredParams"]] == [-7, -257, -8]
    assert options["attestation"] == "none"
    assert [c["id"] for c in options["excludeCredentials"]] == [existing.credential_id]
    token = answer.json()["challenge_token"]
    passkeys.open_challenge(sec, token, passkeys.REGISTER, user.id)
    with pytest.raises(passkeys.PasskeyError):  # not a token to sign in with
        passkeys.open_challenge(sec, token, passkeys.AUTHENTICATE, None)

    # Second factor: the ticket's user's passkeys only, user verification preferred.
    ticket = issue_ticket(sec, user.id, BROWSER)
    answer = await client.post(
        "/account/signin/second-factor/passkey/options", json={"ticket": ticket}, headers=headers
    )
    assert answer.status_code == 200, answer.text
    options = answer.json()["options"]
    assert [c["id"] for c in options["allowCredentials"]] == [existing.credential_id]
    assert options["allowCredentials"][0]["transports"] == ["internal"]
    assert options["userVerification"] == "preferred"
    passkeys.open_challenge(sec, answer.json()["challenge_token"], passkeys.AUTHENTICATE, user.id)
    for bad in (ticket[:-4] + "AAAA", issue_ticket(sec, user.id, "some-client"), ""):
        refused = await client.post(
            "/account/signin/second-factor/passkey/options", json={"ticket": bad}, headers=headers
        )
        assert refused.status_code == 400, refused.text
    # An account without a passkey has nothing to offer.
    other = await _user(app, client)
    refused = await client.post(
        "/account/signin/second-factor/passkey/options",
        json={"ticket": issue_ticket(sec, other.id, BROWSER)},
        headers=headers,
    )
    assert refused.status_code == 400 and refused.json() == {
        "error": "This account has no passkey."
    }


async def test_unknown_foreign_and_forged_credentials_are_refused(local: App) -> None:
    app, client = local
    headers = await _csrf(client)
    sec = _security(app)
    user, other = await _user(app, client), await _user(app, client)
    factor = await _add_factor(app, user.id)
    assert factor.credential_id is not None

    def start() -> str:
        return passkeys.issue_challenge(sec, passkeys.AUTHENTICATE, None)[1]

    async def passwordless(credential: dict[str, Any], token: str | None = None) -> httpx.Response:
        body = {"credential": credential, "challenge_token": token or start(), "authz": ""}
        return await client.post("/account/signin/passkey", json=body, headers=headers)

    unknown = await passwordless(_fake_assertion("AAAAAAAAAAAAAAAAAAAAAA", user.id.bytes))
    assert unknown.status_code == 400 and unknown.json() == {"error": passkeys.UNKNOWN}
    # A registered credential: without a user handle, with another user's, or not signed.
    for handle in (None, other.id.bytes, user.id.bytes):
        refused = await passwordless(_fake_assertion(factor.credential_id, handle))
        assert refused.status_code == 400 and refused.json() == {"error": passkeys.NOT_VERIFIED}
    # A token for another ceremony or user; garbage for a credential.
    registering = passkeys.issue_challenge(sec, passkeys.REGISTER, user.id)[1]
    for token in (registering, passkeys.issue_challenge(sec, passkeys.AUTHENTICATE, user.id)[1]):
        refused = await passwordless(_fake_assertion(factor.credential_id, user.id.bytes), token)
        assert refused.status_code == 400 and refused.json() == {"error": passkeys.EXPIRED}
    for credential in ({}, {"id": 5}, {"id": "a" * 2000}, {"id": "not base64url!"}):
        assert (await passwordless(credential)).status_code == 400
    odd_handles: list[object] = ["A", "!!", 5, "A" * 200]  # impossible length, not base64url...
    for odd in odd_handles:
        forged = _fake_assertion(factor.credential_id)
        forged["response"]["userHandle"] = odd
        refused = await passwordless(forged)
        assert refused.status_code == 400 and refused.json() == {"error": passkeys.NOT_VERIFIED}

    # The second step: another user's passkey is unknown there.
    ticket = issue_ticket(sec, other.id, BROWSER)
    token = passkeys.issue_challenge(sec, passkeys.AUTHENTICATE, other.id)[1]
    refused = await client.post(
        "/account/signin/second-factor/passkey",
        json={
            "ticket": ticket,
            "credential": _fake_assertion(factor.credential_id, user.id.bytes),
            "challenge_token": token,
            "authz": "",
        },
        headers=headers,
    )
    assert refused.status_code == 400 and refused.json() == {"error": passkeys.UNKNOWN}
    # Nobody was signed in, no counter moved.
    assert SESSION_COOKIE not in client.cookies
    async with app_services(app).sessionmaker() as db:
        stored = await db.get(MfaFactor, factor.id)
        assert stored is not None and stored.sign_count == 0 and stored.last_used_at is None


async def test_bad_input_gets_a_4xx_never_a_500(local: App) -> None:
    app, client = local
    headers = await _csrf(client)
    user = await _user(app, client)
    client.cookies.set(SESSION_COOKIE, await browser_session(app, user.email))
    long_authz = "client_id=" + "a" * 5000
    cases: list[tuple[str, Any]] = [
        ("/account/signin/passkey", {"credential": {}, "challenge_token": "t", "authz": "a\x00b"}),
        (
            "/account/signin/passkey",
            {"credential": {}, "challenge_token": "t", "authz": long_authz},
        ),
        ("/account/signin/passkey", {"credential": {}, "challenge_token": "x" * 5000}),
        ("/account/signin/passkey", {"credential": "not an object", "challenge_token": "t"}),
        ("/account/signin/passkey", {"credential": {}, "challenge_token": 7}),
        ("/account/signin/passkey", ["a", "list"]),
        ("/account/signin/second-factor/passkey/options", {"ticket": "t" * 5000}),
        ("/account/signin/second-factor/passkey/options", {"ticket": None}),
        ("/account/passkeys/options", {"password": "p" * 2000}),
        ("/account/passkeys/options", {"password": PASSWORD, "name": "n" * 101}),
        ("/account/passkeys/options", {"password": PASSWORD, "name": "bad\u202ename"}),
        ("/account/passkeys", {"name": "a\x00", "credential": {}, "challenge_token": "t"}),
        ("/account/passkeys", {"name": "k", "credential": {"id": "x"}, "challenge_token": "t"}),
    ]
    for url, body in cases:
        answer = await client.post(url, json=body, headers=headers)
        assert 400 <= answer.status_code < 500, (url, body, answer.status_code, answer.text)
        assert "Traceback" not in answer.text
    for content, content_type in (("{", "application/json"), ("a=b", "text/plain")):
        answer = await client.post(
            "/account/signin/passkey/options",
            content=content,
            headers={**headers, "Content-Type": content_type},
        )
        assert answer.status_code in (400, 415), answer.text
        assert "error" in answer.json()
    # A registration that does not verify stores nothing.
    token = passkeys.issue_challenge(_security(app), passkeys.REGISTER, user.id)[1]
    answer = await client.post(
        "/account/passkeys",
        json={"name": "k", "credential": _fake_assertion("AAAA"), "challenge_token": token},
        headers=headers,
    )
    assert answer.status_code == 400 and answer.json() == {"error": passkeys.NOT_VERIFIED}
    async with app_services(app).sessionmaker() as db:
        assert await passkeys.list_passkeys(db, user.id) == []
    # Signed out: registration is refused.
    client.cookies.delete(SESSION_COOKIE)
    answer = await client.post(
        "/account/passkeys/options", json={"password": PASSWORD}, headers=headers
    )
    assert answer.status_code == 401


async def test_second_factor_failures_count_like_codes(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(PUBLIC_BASE_URL=LOCAL, LOCKOUT_FAILURE_THRESHOLD=3)
    async with running_app(settings) as (app, _):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=LOCAL) as client:
            headers = await _csrf(client)
            sec = _security(app)
            user = await _user(app, client)
            factor = await _add_factor(app, user.id)
            assert factor.credential_id is not None
            ticket = issue_ticket(sec, user.id, BROWSER)
            statuses = []
            for _ in range(5):
                token = passkeys.issue_challenge(sec, passkeys.AUTHENTICATE, user.id)[1]
                answer = await client.post(
                    "/account/signin/second-factor/passkey",
                    json={
                        "ticket": ticket,
                        "credential": _fake_assertion(factor.credential_id, user.id.bytes),
                        "challenge_token": token,
                        "authz": "",
                    },
                    headers=headers,
                )
                statuses.append(answer.status_code)
            assert statuses[:3] == [400, 400, 400], statuses
            assert statuses[3:] == [429, 429], statuses
            # Each refused assertion is in the user's trail, like a wrong code.
            failures = await outbox(app, user.id, "user.mfa_failed")
            assert [f.payload["method"] for f in failures] == ["webauthn"] * 3
            assert int(answer.headers["retry-after"]) > 0
            assert answer.json() == {"error": "Too many attempts. Wait a little and try again."}


class _Scripts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "script":
            self._in_script = True
            self.sources.append(values.get("src") or "")
        self.inline += [name for name in values if name.startswith("on")]

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append(data)


def _scripts(html: str) -> _Scripts:
    scan = _Scripts()
    scan.feed(html)
    scan.close()
    return scan


def test_no_template_has_inline_script_and_only_passkey_pages_load_one() -> None:
    for path in TEMPLATES.glob("*.html"):
        text = path.read_text()
        tags = re.findall(r"<script\b[^>]*>(.*?)</script>", text, re.IGNORECASE | re.DOTALL)
        assert all(body == "" for body in tags), path.name
        assert text.lower().count("<script") == len(tags), path.name
        if tags:
            # Only the URLs render passes in (``scripts``): files of this service's /assets.
            assert re.findall(r"<script\b[^>]*>", text) == ['<script src="{{ src }}" defer>']
            assert "{% for src in scripts %}" in text, path.name
            assert path.name in ("passkeys.html", "passkey_signin.html"), path.name
    script = (STATIC_DIR / "passkeys.js").read_text()
    assert "eval(" not in script and "innerHTML" not in script and "new Function" not in script


async def test_the_policy_allows_this_origins_script_only_where_it_is_loaded(local: App) -> None:
    app, client = local
    user = await _user(app, client)
    ticket = issue_ticket(_security(app), user.id, BROWSER)
    await _add_factor(app, user.id)
    plain = await client.get("/account/signin")
    assert plain.headers["content-security-policy"] == PAGE_CSP
    assert _scripts(plain.text).sources == []
    assert 'href="/account/signin/passkey"' in plain.text

    scripted = [await client.get("/account/signin/passkey")]
    fields = form_posting_to(plain.text, "/account/signin")
    scripted.append(
        await client.post(
            "/account/signin/second-factor/use-passkey",
            data={CSRF_FIELD: fields[CSRF_FIELD], "ticket": ticket, "authz": ""},
        )
    )
    client.cookies.set(SESSION_COOKIE, await browser_session(app, user.email))
    scripted.append(await client.get("/account/passkeys"))
    for page in scripted:
        assert page.status_code == 200, page.text
        assert page.headers["content-security-policy"] == SCRIPTED_CSP
        scan = _scripts(page.text)
        assert scan.inline == []
        [source] = scan.sources
        assert source.startswith("/assets/passkeys.js?v=")
        asset = await client.get(source)
        assert asset.status_code == 200
        assert asset.headers["content-type"].startswith(
            ("text/javascript", "application/javascript")
        )
        assert asset.headers["x-content-type-options"] == "nosniff"
    # The account page itself is unchanged.
    account = await client.get("/account")
    assert account.headers["content-security-policy"] == PAGE_CSP


async def test_a_passkey_makes_the_password_sign_in_ask_for_a_second_step(local: App) -> None:
    app, client = local
    user = await _user(app, client)
    async with app_services(app).sessionmaker() as db:
        from src.auth import mfa

        assert not await mfa.has_second_factor(db, user.id)
    await _add_factor(app, user.id)
    async with app_services(app).sessionmaker() as db:
        assert await mfa.has_second_factor(db, user.id)
    page = await client.get("/account/signin")
    fields = form_posting_to(page.text, "/account/signin")
    second = await client.post(
        "/account/signin", data={**fields, "email": user.email, "password": PASSWORD}
    )
    assert second.status_code == 200, second.text
    step = form_posting_to(second.text, "/account/signin/second-factor/use-passkey")
    assert step["ticket"] and step[CSRF_FIELD]
    chosen = await client.post("/account/signin/second-factor/use-passkey", data=step)
    assert chosen.status_code == 200, chosen.text
    form = form_posting_to(chosen.text, "/account/signin/second-factor/passkey")
    assert form["ticket"] == step["ticket"]
    assert 'data-options-url="/account/signin/second-factor/passkey/options"' in chosen.text
    # A stale or forged ticket starts over; without the CSRF field, the 403 page.
    stale = await client.post(
        "/account/signin/second-factor/use-passkey", data={**step, "ticket": "x"}
    )
    assert stale.status_code == 400 and "took too long" in stale.text
    assert 'data-passkey="signin"' not in stale.text
    no_csrf = await client.post(
        "/account/signin/second-factor/use-passkey", data={**step, CSRF_FIELD: ""}
    )
    assert no_csrf.status_code == 403


async def test_removing_a_passkey_needs_the_password_and_only_removes_passkeys(local: App) -> None:
    app, client = local
    user = await _user(app, client)
    other = await _user(app, client)
    mine = await _add_factor(app, user.id, name="Mine")
    totp = await _add_factor(app, user.id, kind="totp", name="Phone")
    theirs = await _add_factor(app, other.id, name="Theirs")
    client.cookies.set(SESSION_COOKIE, await browser_session(app, user.email))
    page = await client.get("/account/passkeys")
    assert page.status_code == 200 and "Mine" in page.text and "Theirs" not in page.text
    assert "Phone" not in page.text
    action = f"/account/passkeys/{mine.id}/remove"
    token = form_posting_to(page.text, action)[CSRF_FIELD]

    async def remove(url: str, **data: str) -> httpx.Response:
        return await client.post(url, data={CSRF_FIELD: token, **data})

    assert (await client.post(action, data={"password": PASSWORD})).status_code == 403
    wrong = await remove(action, password="not the password")
    assert wrong.status_code == 400 and "not correct" in wrong.text
    assert (await remove(action)).status_code == 422
    for url in (
        f"/account/passkeys/{theirs.id}/remove",
        f"/account/passkeys/{totp.id}/remove",
        "/account/passkeys/not-a-uuid/remove",
        f"/account/passkeys/{uuid.uuid4()}/remove",
    ):
        answer = await remove(url, password=PASSWORD)
        assert answer.status_code == 404 and "No such passkey" in answer.text, url
    async with app_services(app).sessionmaker() as db:
        assert {f.id for f in await passkeys.list_passkeys(db, user.id)} == {mine.id}
        assert await db.get(MfaFactor, totp.id) is not None
        assert await db.get(MfaFactor, theirs.id) is not None
    done = await remove(action, password=PASSWORD)
    assert (
        done.status_code == 303 and done.headers["location"] == "/account/passkeys?notice=removed"
    )
    listed = await client.get(done.headers["location"])
    assert "The passkey is removed." in listed.text and "You have no passkey yet." in listed.text
    # Signed out: the page sends to the sign-in.
    client.cookies.delete(SESSION_COOKIE)
    assert (await client.get("/account/passkeys")).headers["location"] == "/account/signin"
