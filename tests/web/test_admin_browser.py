"""The admin console in headless Chromium, against the running service on a real socket, with
real PostgreSQL and a Redis this test owns (it stops it to watch the health panel turn red).

An admin signs in through the authorization code flow, searches with the keyboard alone, opens a
user, revokes a session, deactivates and reactivates the account, registers a client (its secret
shown once), rotates the signing keys (refused while the next key is young, then forced), watches
the health panel follow Redis going away and coming back, and signs out; a signed-in account that
is not an administrator is refused. The whole time, as in tests/oauth/test_browser.py: no
Content-Security-Policy violation, no script error, no request to another origin. Every screen is
saved as a screenshot (UMS_ARTIFACTS or ARTIFACTS_DIR, else the test's tmp directory). With
UMS_UPDATE_README_IMAGE=1 the user page also replaces docs/images/admin-user-page.png, the
README's picture; otherwise the run leaves the repository untouched.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from src.main import create_app
from tests.conftest import SettingsFactory
from tests.support.app import PASSWORD, login, register, unique_email
from tests.support.browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    Watch,
    step,
    watch_context,
    watch_page,
)
from tests.support.events import FAST_GROUP_JOIN
from tests.support.oidc import live_server
from tests.support.servers import KafkaBroker, RedisServer, free_port

if TYPE_CHECKING:
    from playwright.async_api import Page

ADMIN_PASSWORD = "admin password for the console"
README_IMAGE = Path(__file__).resolve().parents[2] / "docs" / "images" / "admin-user-page.png"
# The health panel refreshes every 5 s and Redis reconnects with a back-off: generous.
HEALTH_WAIT_MS = 60_000


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    given = os.environ.get("UMS_ARTIFACTS") or os.environ.get("ARTIFACTS_DIR")
    directory = Path(given) / "admin-console" if given else tmp_path / "admin-console"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


async def sign_in(page: Page, base: str, email: str, password: str) -> None:
    from playwright.async_api import expect

    await page.goto(f"{base}/admin")
    await page.wait_for_url(f"{base}/oauth2/authorize?**")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Sign in")
    await page.get_by_label("Email address").fill(email)
    await page.get_by_label("Password", exact=True).fill(password)
    await page.get_by_role("button", name="Sign in").click()


async def tab_to(page: Page, selector: str, limit: int = 40) -> None:
    """Press Tab until ``selector`` has the focus (a keyboard user's way there)."""
    for _ in range(limit):
        await page.keyboard.press("Tab")
        if await page.evaluate(
            "(selector) => document.activeElement === document.querySelector(selector)", selector
        ):
            return
    raise AssertionError(f"{selector} never got the focus with Tab")


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"
)
async def test_the_admin_console_in_chromium(
    make_settings: SettingsFactory,
    clean_db: None,
    redis_process: RedisServer,
    kafka_process: KafkaBroker,
    artifacts: Path,
    record_property: Callable[[str, object], None],
) -> None:
    from playwright.async_api import Error as PlaywrightError
    from playwright.async_api import async_playwright, expect

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    admin_email, target_email, plain_email = (
        unique_email("admin"),
        unique_email("target"),
        unique_email("plain"),
    )
    settings = make_settings(
        PUBLIC_BASE_URL=base,
        FIRST_ADMIN_EMAIL=admin_email,
        FIRST_ADMIN_PASSWORD=ADMIN_PASSWORD,
        # Never the shared Redis: this one is stopped and started again below.
        REDIS_HOST="127.0.0.1",
        REDIS_PORT=redis_process.port,
        REDIS_DB=0,
        # Kafka on, with the audit consumer: the user's page shows the trail read back from it.
        KAFKA_ENABLED=True,
        KAFKA_BOOTSTRAP_SERVERS=kafka_process.bootstrap,
        **FAST_GROUP_JOIN,
    )
    for topic in (settings.KAFKA_USER_EVENTS_TOPIC, settings.KAFKA_NOTIFICATIONS_TOPIC):
        kafka_process.create_topic(topic, 1)
    watch = Watch(provider=base, rp=base)
    shots: dict[str, Path] = {}

    async def shoot(page: Page, name: str) -> None:
        path = artifacts / f"admin-{name}.png"
        await page.screenshot(path=path, full_page=True)
        shots[name] = path
        record_property(f"screenshot-admin-{name}", str(path))

    with live_server(create_app(settings), port):
        async with httpx.AsyncClient(base_url=base, timeout=30) as api:
            await register(api, target_email, full_name="Grace Hopper")
            await register(api, plain_email)
            await login(api, target_email)  # a session for the admin to revoke
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
            )
            try:
                context = await browser.new_context(viewport={"width": 1280, "height": 900})
                await watch_context(context, watch)
                page = await context.new_page()
                watch_page(page, watch)
                heading = page.get_by_role("heading", level=1)
                main = page.locator("main")
                menu = page.get_by_role("navigation", name="Console")
                try:
                    async with step("sign in", page, watch):
                        await sign_in(page, base, admin_email, ADMIN_PASSWORD)
                        await page.wait_for_url(f"{base}/admin/users")
                        await expect(heading).to_have_text("Users")
                        cookies = {c["name"]: c for c in await context.cookies(base)}
                        assert cookies["ums_admin"]["httpOnly"] is True
                        assert cookies["ums_admin"]["sameSite"] == "Strict"
                        # Nothing of the tokens where a script could read them.
                        stored = await page.evaluate(
                            "() => JSON.stringify({...localStorage}) + JSON.stringify("
                            "{...sessionStorage}) + document.cookie"
                        )
                        assert "eyJ" not in stored and "ums_admin" not in stored, stored
                        await shoot(page, "users")

                    async with step("search with the keyboard", page, watch):
                        await page.goto(f"{base}/admin/users")
                        await page.keyboard.press("Tab")
                        await expect(
                            page.get_by_role("link", name="Skip to main content")
                        ).to_be_focused()
                        await tab_to(page, "#q")
                        await page.keyboard.type(target_email)
                        await page.keyboard.press("Enter")
                        await page.wait_for_url(f"{base}/admin/users?**")
                        rows = page.locator("table.admin-table tbody tr")
                        await expect(rows).to_have_count(1)
                        await expect(rows).to_contain_text(target_email)
                        await tab_to(page, "table.admin-table tbody a")
                        await page.keyboard.press("Enter")
                        await page.wait_for_url(f"{base}/admin/users/*")
                        await expect(heading).to_have_text(target_email)

                    async with step("user page and a revoked session", page, watch):
                        sessions = page.locator("table.admin-table tbody tr")
                        await expect(sessions).to_have_count(1)
                        await expect(main).to_contain_text("Grace Hopper")
                        await page.get_by_role("button", name="Revoke").click()
                        await expect(page.get_by_role("status")).to_have_text(
                            "The session was revoked."
                        )
                        await expect(sessions).to_have_count(0)
                        await expect(main).to_contain_text("No live session.")

                    async with step("deactivate and reactivate", page, watch):
                        await page.get_by_role("button", name="Deactivate").click()
                        await expect(page.get_by_role("status")).to_contain_text("was deactivated")
                        await expect(page.locator(".details")).to_contain_text("Deactivated")
                        await page.get_by_role("button", name="Activate").click()
                        await expect(page.get_by_role("status")).to_have_text(
                            "The account was activated."
                        )
                        await expect(page.locator(".details")).to_contain_text("Active")

                    async with step("the history names the admin", page, watch):
                        # Read back from Kafka by the audit consumer: reload until it is there.
                        history = page.locator("ol.history")
                        for event in ("session_revoked", "deactivated", "activated"):
                            entry = history.locator("li", has_text=f"user.{event}")
                            for _ in range(60):
                                if await entry.count():
                                    break
                                await page.wait_for_timeout(500)
                                await page.reload()
                            await expect(entry).to_contain_text(f"by {admin_email}")
                        await shoot(page, "user")
                        if os.environ.get("UMS_UPDATE_README_IMAGE") == "1":
                            await page.screenshot(path=README_IMAGE, full_page=True)

                    async with step("register a client", page, watch):
                        await menu.get_by_role("link", name="Clients").click()
                        await expect(heading).to_have_text("OAuth clients")
                        await page.get_by_role("link", name="Register a client").click()
                        await expect(heading).to_have_text("Register a client")
                        await page.get_by_label("Name").fill("Report Builder")
                        await page.get_by_label("Client id").fill("report-builder")
                        await page.get_by_label("Redirect URIs").fill("https://reports.example/cb")
                        await shoot(page, "client-new")
                        await page.get_by_role("button", name="Register").click()
                        await expect(heading).to_have_text("Report Builder is registered")
                        secret = await page.locator("#client-secret").inner_text()
                        assert len(secret.strip()) >= 40, secret
                        await shoot(page, "client-created")
                        await page.get_by_role("link", name="Done").click()
                        await expect(heading).to_have_text("Report Builder")
                        # Shown once: the client's page does not have it.
                        assert secret.strip() not in await page.content()
                        await shoot(page, "client")
                        await menu.get_by_role("link", name="Clients").click()
                        await expect(main).to_contain_text("report-builder")
                        await shoot(page, "clients")

                    async with step("rotate the signing keys", page, watch):
                        await menu.get_by_role("link", name="Signing keys").click()
                        await expect(heading).to_have_text("Signing keys")
                        active = page.locator("tr", has_text="active").locator("code")
                        before = await active.inner_text()
                        # The next key was published moments ago: verifiers may not know it.
                        await page.get_by_role("button", name="Rotate signing keys").click()
                        await expect(page.get_by_role("alert")).to_contain_text("Rotation refused")
                        await page.get_by_label("Rotate anyway").check()
                        await page.get_by_role("button", name="Rotate signing keys").click()
                        await expect(page.get_by_role("status")).to_contain_text(
                            "A new signing key is now in use"
                        )
                        assert await active.inner_text() != before
                        await shoot(page, "keys")

                    async with step("events across users", page, watch):
                        await menu.get_by_role("link", name="Events").click()
                        await expect(heading).to_have_text("Events")
                        await page.get_by_label("Type").select_option("user.session_revoked")
                        await page.get_by_label("User (email or id)").fill(target_email)
                        await page.get_by_role("button", name="Show events").click()
                        rows = page.locator("table.admin-table tbody tr")
                        await expect(rows).to_have_count(1)
                        await expect(rows).to_contain_text("user.session_revoked")
                        await expect(rows).to_contain_text(admin_email)
                        await shoot(page, "events")

                    async with step(
                        "create a user, delete it with a typed confirmation", page, watch
                    ):
                        made_email = unique_email("made")
                        await menu.get_by_role("link", name="Users").click()
                        await page.get_by_role("link", name="Create user").click()
                        await expect(heading).to_have_text("Create user")
                        await page.get_by_label("Email address").fill(made_email)
                        await page.get_by_label("Full name").fill("Made In Console")
                        await page.get_by_label("Initial password").fill(PASSWORD)
                        await shoot(page, "user-new")
                        await page.get_by_role("button", name="Create user").click()
                        await expect(page.get_by_role("status")).to_have_text(
                            "The account was created."
                        )
                        await expect(heading).to_have_text(made_email)
                        await page.get_by_role("link", name="Delete…").click()
                        await expect(heading).to_have_text("Delete this account?")
                        delete = page.get_by_role("button", name="Delete account")
                        # admin.js keeps the button disabled until the address is typed.
                        await expect(delete).to_be_disabled()
                        await page.get_by_label("Type the account's email address").fill(
                            made_email[:-1]
                        )
                        await expect(delete).to_be_disabled()
                        await page.get_by_label("Type the account's email address").fill(made_email)
                        await expect(delete).to_be_enabled()
                        await shoot(page, "user-delete")
                        await delete.click()
                        await expect(page.get_by_role("status")).to_have_text(
                            "The account was deleted."
                        )

                    async with step("narrow screens and 200 % zoom reflow", page, watch):
                        # 200 % zoom of a 1280 px window is a 640 px wide layout; then a phone.
                        for width, height, name in (
                            (640, 450, "users-zoom-200"),
                            (390, 844, "users-phone"),
                        ):
                            await page.set_viewport_size({"width": width, "height": height})
                            await page.goto(f"{base}/admin/users")
                            await expect(heading).to_have_text("Users")
                            overflow = await page.evaluate(
                                "() => document.documentElement.scrollWidth - window.innerWidth"
                            )
                            assert overflow <= 0, f"{width} px: {overflow} px scroll sideways"
                            await shoot(page, name)
                        await page.set_viewport_size({"width": 1280, "height": 900})

                    async with step("health turns red and green with Redis", page, watch):
                        await menu.get_by_role("link", name="Health").click()
                        await expect(heading).to_have_text("Health")
                        redis_status = page.locator('[data-check="redis"] [data-status]')
                        await expect(redis_status).to_have_attribute("data-status", "healthy")
                        database = page.locator('[data-check="database"] [data-status]')
                        await expect(database).to_have_attribute("data-status", "healthy")
                        await shoot(page, "health")
                        redis_process.stop()
                        # No reload: the panel refreshes itself.
                        await expect(redis_status).to_have_attribute(
                            "data-status", "unhealthy", timeout=HEALTH_WAIT_MS
                        )
                        await expect(page.locator('[data-check="redis"]')).to_have_class(
                            "health-card health-unhealthy"
                        )
                        await shoot(page, "health-red")
                        redis_process.start()
                        await expect(redis_status).to_have_attribute(
                            "data-status", "healthy", timeout=HEALTH_WAIT_MS
                        )

                    async with step("sign out", page, watch):
                        await page.get_by_role("button", name="Sign out").click()
                        await expect(heading).to_have_text("Signed out of the console")
                        names = {c["name"] for c in await context.cookies(base)}
                        assert "ums_admin" not in names, names
                        await shoot(page, "signed-out")

                    async with step("a non-admin is refused", page, watch):
                        other = await browser.new_context(viewport={"width": 390, "height": 844})
                        await watch_context(other, watch)
                        phone = await other.new_page()
                        watch_page(phone, watch)
                        response_statuses: list[int] = []
                        phone.on(
                            "response",
                            lambda r: (
                                response_statuses.append(r.status)
                                if "/admin/callback" in r.url
                                else None
                            ),
                        )
                        await sign_in(phone, base, plain_email, PASSWORD)
                        await expect(phone.get_by_role("heading", level=1)).to_have_text(
                            "Administrators only"
                        )
                        assert response_statuses == [403], response_statuses
                        await shoot(phone, "refused")
                        await phone.goto(f"{base}/admin/users")
                        await expect(phone.get_by_role("heading", level=1)).to_have_text(
                            "Administrators only"
                        )
                        await other.close()
                finally:
                    with contextlib.suppress(PlaywrightError):
                        await shoot(page, "last")
            finally:
                await browser.close()

    assert watch.violations == []
    assert watch.csp_console() == []
    assert watch.page_errors == []
    assert [url for url in watch.requests if watch.foreign(url)] == []
    admin_documents = [d for d in watch.documents if "/admin" in d[0]]
    assert admin_documents, "no console page was seen"
    for url, status, policy in watch.documents:
        assert policy, f"{url} ({status}) has no Content-Security-Policy"
        assert "default-src 'none'" in policy, (url, policy)
        assert "'unsafe-inline'" not in policy and "'unsafe-eval'" not in policy, (url, policy)
    assert set(shots) >= {
        "users",
        "user",
        "client-new",
        "client-created",
        "client",
        "clients",
        "keys",
        "health",
        "health-red",
        "signed-out",
        "refused",
        "events",
        "user-new",
        "user-delete",
        "users-zoom-200",
        "users-phone",
    }
    assert README_IMAGE.exists()
