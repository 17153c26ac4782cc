"""The hosted pages in a real browser: an application's sign-in, end to end, in headless Chromium.

A stock relying party (Authlib's Starlette client, ``tests.support.oidc.relying_party``) and the
provider each run on a real socket; Chromium goes through the whole flow on the real pages:
sign-up, sign-in (partly with the keyboard), consent, the way back to the application, a second
visit that is remembered, RP-initiated sign-out, and on the side the forgotten-password and error
pages. The pages carry no script, so the browser is what proves they work under their policy:
every CSP violation (reported as an event or in the console), every uncaught page error and
every request to a third origin fails the test. The relying party is on ``localhost`` and the
provider on ``127.0.0.1``: two sites, as in production, so SameSite and form-action are tested
for real and the two never share cookies.

Problems with a page that do not stop the flow are collected and reported together at the end,
so one run shows all of them, and every screenshot is still taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import httpx
import pytest
from authlib.integrations.starlette_client import OAuth

from src.main import create_app
from tests.conftest import SettingsFactory
from tests.support.app import PASSWORD, bearer, unique_email
from tests.support.auth import QUICK_SETTINGS, password_grant
from tests.support.browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    WAIT_MS,
    Watch,
    step,
    watch_context,
    watch_page,
)
from tests.support.oidc import create_client, live_server, relying_party
from tests.support.servers import free_port

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext, Page

ADMIN_PASSWORD = "admin password for tests"
CLIENT_NAME = "Photo Printer"
SCOPES_IN_PLAIN_WORDS = [
    "Sign you in",
    "Your name",
    "Your email address and whether it is verified",
]
SESSION_COOKIE, CSRF_COOKIE = "ums_session", "ums_csrf"  # plain http: no __Host- prefix

# What the detector must catch when a page breaks its policy: an inline <style> element.
CANARY = """
const style = document.createElement("style");
style.textContent = "body { outline: 1px solid red; }";
document.head.appendChild(style);
"""


@pytest.fixture
def artifacts_dir(tmp_path: Path) -> Path:
    directory = Path(os.environ.get("ARTIFACTS_DIR") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


Shoot = Callable[["Page", str], Awaitable[None]]


async def browse(
    page: Page,
    context: BrowserContext,
    watch: Watch,
    seen: dict[str, Any],
    email: str,
    shoot: Shoot,
) -> None:
    """The whole flow, step by step, as a person would go through it."""
    from playwright.async_api import expect

    provider, rp = watch.provider, watch.rp
    heading = page.get_by_role("heading", level=1)
    main = page.locator("main")

    # The application sends the browser to the sign-in page.
    async with step("sign-in page", page, watch):
        await page.goto(f"{rp}/login")
        await page.wait_for_url(f"{provider}/oauth2/authorize?**")
        await expect(heading).to_have_text("Sign in")
        await expect(main).to_contain_text(f"to continue to {CLIENT_NAME}")
        await shoot(page, "signin")

    async with step("sign-up", page, watch):
        await page.get_by_role("link", name="Create an account").click()
        await page.wait_for_url(f"{provider}/account/signup?**")
        await expect(heading).to_have_text("Create an account")
        signin_link = await page.get_by_role("link", name="Sign in").get_attribute("href")
        watch.check(
            "authz=" in (signin_link or ""),
            f"sign-up: 'Sign in' links to {signin_link!r}, without the sign-in request",
        )
        # By their labels: a field without one is not found.
        await page.get_by_label("Email address").fill(email)
        await page.get_by_label("Full name").fill("Ada Lovelace")
        await page.get_by_label("Password", exact=True).fill(PASSWORD)
        await shoot(page, "signup")
        await page.get_by_role("button", name="Create account").click()
        await page.wait_for_url(f"{provider}/account/signin?**notice=registered**")
        await expect(page.get_by_role("status")).to_contain_text("account is ready")
        await expect(heading).to_have_text("Sign in")
        await expect(main).to_contain_text(f"to continue to {CLIENT_NAME}")

    # Keyboard only: the skip link comes first, Tab goes from the address to the password,
    # Enter sends the form.
    async with step("sign-in with the keyboard", page, watch):
        await page.keyboard.press("Tab")
        await expect(page.get_by_role("link", name="Skip to main content")).to_be_focused()
        await page.get_by_label("Email address").focus()
        await page.keyboard.type(email)
        await page.keyboard.press("Tab")
        await expect(page.get_by_label("Password", exact=True)).to_be_focused()
        await page.keyboard.type(PASSWORD)
        await page.keyboard.press("Enter")
        await expect(heading).to_have_text(f"Allow {CLIENT_NAME} to use your account?")

    async with step("consent", page, watch):
        await expect(main).to_contain_text(f"You are signed in as {email}")
        await expect(page.locator("ul.scopes > li")).to_have_text(SCOPES_IN_PLAIN_WORDS)
        await shoot(page, "consent")
        await page.get_by_role("button", name="Allow").click()
        await page.wait_for_url(f"{rp}/callback?**")
        await expect(page.locator("body")).to_contain_text(email)
    assert seen["token"]["userinfo"]["email"] == email
    assert seen["iss"] == provider

    cookies = {cookie["name"]: cookie for cookie in await context.cookies(provider)}
    for name in (SESSION_COOKIE, CSRF_COOKIE):
        assert name in cookies, (name, sorted(cookies))
        assert cookies[name]["httpOnly"] is True, cookies[name]
        assert cookies[name]["sameSite"] == "Lax", cookies[name]
    # Two sites: the application never sees the provider's cookies.
    rp_cookies = {cookie["name"] for cookie in await context.cookies(rp)}
    assert not {SESSION_COOKIE, CSRF_COOKIE} & rp_cookies, rp_cookies

    # A second visit: signed in and allowed already, so straight back, no page in between.
    async with step("second visit", page, watch):
        first_id_token = seen["token"]["id_token"]
        mark = len(watch.documents)
        await page.goto(f"{rp}/login")
        await page.wait_for_url(f"{rp}/callback?**")
        await expect(page.locator("body")).to_contain_text(email)
        visited = [url for url, _, _ in watch.documents[mark:]]
        assert len(visited) == 1, visited
        assert visited[0].startswith(f"{provider}/oauth2/authorize?"), visited
        assert seen["token"]["id_token"] != first_id_token

    # RP-initiated sign-out, confirmed on the provider's page, back to the application.
    async with step("sign-out", page, watch):
        await page.goto(f"{rp}/logout")
        await page.wait_for_url(f"{provider}/oauth2/logout?**")
        await expect(heading).to_have_text("Sign out?")
        await expect(main).to_contain_text(f"{CLIENT_NAME} asks to sign you out")
        await shoot(page, "signout")
        await page.get_by_role("button", name="Sign out").click()
        await page.wait_for_url(f"{rp}/bye?**")
        await expect(page.locator("body")).to_have_text("signed out")
    assert seen["logout_state"]["post_logout_redirect_uri"] == f"{rp}/bye"
    remaining = {cookie["name"] for cookie in await context.cookies(provider)}
    assert SESSION_COOKIE not in remaining, remaining

    # Signed out for real: the application's next sign-in asks again.
    async with step("sign-in after sign-out", page, watch):
        await page.goto(f"{rp}/login")
        await page.wait_for_url(f"{provider}/oauth2/authorize?**")
        await expect(heading).to_have_text("Sign in")

    # A forgotten password, from the application's sign-in page: the same answer for any
    # address, and the way back leads to the same sign-in.
    async with step("forgot password", page, watch):
        authz = await page.locator('input[name="authz"]').input_value()
        back_to_signin = f"/account/signin?{urlencode({'authz': authz})}"
        await page.get_by_role("link", name="Forgot your password?").click()
        await page.wait_for_url(f"{provider}/account/forgot-password**")
        await expect(heading).to_have_text("Reset your password")
        back = await page.get_by_role("link", name="Back to sign in").get_attribute("href")
        watch.check(
            back == back_to_signin,
            "forgot-password: the sign-in page's 'Forgot your password?' link goes to"
            f" {page.url!r}, without the sign-in request (?authz=), so 'Back to sign in' goes"
            f" to {back!r} and the application's sign-in is lost",
        )
        answers = []
        for address in (email, unique_email("nobody")):
            await page.goto(f"{provider}/account/forgot-password")
            await page.get_by_label("Email address").fill(address)
            await page.get_by_role("button", name="Send the link").click()
            await expect(heading).to_have_text("Check your email")
            answers.append(await main.inner_text())
            if address == email:
                await shoot(page, "forgot-password")
        assert answers[0] == answers[1], answers

    # An unknown application: an error page, never a redirect.
    async with step("error page", page, watch):
        query = urlencode(
            {
                "response_type": "code",
                "client_id": "no-such-client",
                "redirect_uri": f"{rp}/callback",
                "scope": "openid",
                "state": "s",
            }
        )
        response = await page.goto(f"{provider}/oauth2/authorize?{query}")
        assert response is not None
        assert response.status == 400, response.status
        assert response.request.redirected_from is None
        assert page.url == f"{provider}/oauth2/authorize?{query}", page.url
        await expect(heading).to_have_text("Sign-in request refused")
        await expect(main).to_contain_text("not registered")
        await shoot(page, "error")

    # The detectors themselves: a page that breaks its policy is caught, by both.
    async with step("violation detectors", page, watch):
        before = len(watch.violations)
        watch.violation_seen.clear()
        async with page.expect_console_message(
            lambda message: "Content Security Policy" in message.text
        ) as console:
            await page.evaluate(CANARY)
        await asyncio.wait_for(watch.violation_seen.wait(), WAIT_MS / 1000)
        canary = watch.violations[before:]
        assert any("style-src" in line for line in canary), canary
        del watch.violations[before:]
        message = await console.value
        watch.console.remove(f"{message.type}: {message.text}")
        await expect(page.locator("body")).not_to_have_css("outline-style", "solid")


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"
)
async def test_sign_up_sign_in_consent_and_sign_out_in_chromium(
    make_settings: SettingsFactory,
    clean_db: None,
    artifacts_dir: Path,
    record_property: Callable[[str, object], None],
) -> None:
    # Imported here, like in tests/test_docs.py, so that collecting needs no Playwright.
    from playwright.async_api import Error as PlaywrightError
    from playwright.async_api import async_playwright

    port, rp_port = free_port(), free_port()
    provider, rp = f"http://127.0.0.1:{port}", f"http://localhost:{rp_port}"
    admin_email, email = unique_email("admin"), unique_email("ada")
    settings = make_settings(
        **QUICK_SETTINGS,
        PUBLIC_BASE_URL=provider,
        FIRST_ADMIN_EMAIL=admin_email,
        FIRST_ADMIN_PASSWORD=ADMIN_PASSWORD,
    )
    watch = Watch(provider=provider, rp=rp)
    shots: dict[str, Path] = {}

    async def shoot(page: Page, name: str) -> None:
        path = artifacts_dir / f"{name}.png"
        await page.screenshot(path=path, full_page=True)
        shots[name] = path
        record_property(f"screenshot-{name}", str(path))

    with live_server(create_app(settings), port):
        # A third-party application (first_party false): it gets the consent page.
        async with httpx.AsyncClient(base_url=provider, timeout=30) as api:
            admin = bearer((await password_grant(api, admin_email, ADMIN_PASSWORD)).json())
            registered = await create_client(
                api,
                admin,
                name=CLIENT_NAME,
                first_party=False,
                redirect_uris=[f"{rp}/callback"],
                post_logout_redirect_uris=[f"{rp}/bye"],
            )
        oauth = OAuth()
        oauth.register(
            "ums",
            client_id=registered["client_id"],
            client_secret=registered["client_secret"],
            server_metadata_url=f"{provider}/.well-known/openid-configuration",
            client_kwargs={"scope": "openid profile email", "code_challenge_method": "S256"},
        )
        seen: dict[str, Any] = {}
        with live_server(relying_party(oauth, rp, seen), rp_port):
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(
                    executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
                )
                try:
                    context = await browser.new_context(viewport={"width": 1024, "height": 768})
                    await watch_context(context, watch)
                    page = await context.new_page()
                    watch_page(page, watch)
                    try:
                        await browse(page, context, watch, seen, email, shoot)
                    finally:
                        # Whether or not the flow got this far: a failed run's picture shows why.
                        with contextlib.suppress(PlaywrightError):
                            await shoot(page, "last")
                finally:
                    await browser.close()

    # The whole time: nothing broke the policy, no script error, nothing left the two origins.
    assert watch.violations == []
    assert watch.csp_console() == []
    assert watch.page_errors == []
    assert [url for url in watch.requests if watch.foreign(url)] == []
    assert watch.documents, "no page of the provider was seen"
    for url, status, policy in watch.documents:
        assert policy, f"{url} ({status}) has no Content-Security-Policy"
        assert "default-src 'none'" in policy, (url, policy)
        assert "'unsafe-inline'" not in policy and "'unsafe-eval'" not in policy, (url, policy)
    assert set(shots) >= {"signin", "signup", "consent", "signout", "forgot-password", "error"}
    assert watch.problems == [], "problems with the pages:\n" + "\n".join(watch.problems)
