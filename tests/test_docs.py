"""/docs: Swagger UI served by the service itself, working under the page's strict CSP.

The in-process tests check the page and its assets: no inline script, nothing from another
origin, every asset served with the right type and caching. A header proves nothing about whether
the page still works under it, so the browser test loads /docs from a real server in headless
Chromium and signs in through the Authorize button, with no CSP violation and no request leaving
the origin. The app here has the real API routes and OAuth2 scheme but not the service's lifespan:
neither the page nor the schema touches a database, and the browser test answers the two API
calls it makes itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import AsyncIterator, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import uvicorn
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from src.api.dependencies import API_V1
from src.api.docs import ASSET_CACHE_CONTROL, DOCS_CSP, STATIC_DIR, install_docs
from src.api.router import api_router
from tests.support.servers import free_port, wait_for_port

if TYPE_CHECKING:
    from playwright.async_api import ConsoleMessage, Route

REPO_ROOT = Path(__file__).resolve().parents[1]
OPENAPI_URL = f"{API_V1}/openapi.json"
TOKEN_URL = f"{API_V1}/auth/login"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
# Generous for a busy 2-core CI machine; every wait ends as soon as its condition holds.
WAIT_MS = 20_000
EXPECTED_TYPES = {
    ".js": ("text/javascript", "application/javascript"),
    ".css": ("text/css",),
    ".png": ("image/png",),
}


def docs_app() -> FastAPI:
    """The routes /docs documents, wired as the service wires them, without its lifespan."""
    app = FastAPI(
        title="User Management Service",
        openapi_url=OPENAPI_URL,
        docs_url=None,
        redoc_url=None,
    )
    app.include_router(api_router, prefix=API_V1)
    install_docs(app)
    return app


@contextlib.asynccontextmanager
async def docs_client(root_path: str = "") -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(docs_app()) as manager:
        transport = httpx.ASGITransport(app=manager.app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


class _PageScan(HTMLParser):
    """What a CSP cares about in a page: scripts, styles, handlers and every URL it names."""

    def __init__(self) -> None:
        super().__init__()
        self.script_srcs: list[str] = []
        self.inline_scripts: list[str] = []
        self.assets: list[str] = []
        self.inline_styles: list[str] = []
        self.handlers: list[str] = []
        self.attributes: list[tuple[str, str, str]] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        self.attributes += [(tag, name, value) for name, value in values.items()]
        self.handlers += [name for name in values if name.startswith("on")]
        if "style" in values or tag == "style":
            self.inline_styles.append(tag)
        if tag == "script":
            self._in_script = True
            if "src" in values:
                self.script_srcs.append(values["src"])
                self.assets.append(values["src"])
        if tag == "link" and "href" in values:
            self.assets.append(values["href"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts.append(data)


async def _scan_docs(client: httpx.AsyncClient) -> tuple[httpx.Response, _PageScan]:
    response = await client.get("/docs")
    assert response.status_code == 200, response.text
    scan = _PageScan()
    scan.feed(response.text)
    scan.close()
    return response, scan


# --- in-process -----------------------------------------------------------------------------------


async def test_docs_page_sends_its_policy_and_has_nothing_inline_or_foreign() -> None:
    async with docs_client() as client:
        response, scan = await _scan_docs(client)

    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"] == DOCS_CSP
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "'unsafe-inline'" not in DOCS_CSP
    assert "'unsafe-eval'" not in DOCS_CSP

    assert scan.inline_scripts == []
    assert scan.handlers == []
    assert scan.inline_styles == []
    assert len(scan.script_srcs) == 2, scan.script_srcs
    assert scan.script_srcs[-1].startswith("/docs/static/swagger-init.js?v=")
    # Nothing names another origin: no scheme, no protocol-relative //host/ anywhere.
    assert not re.search(r"https?:|//", response.text.replace("<!doctype html>", "")), response.text
    assert all(url.startswith("/docs/static/") for url in scan.assets), scan.assets
    data = {(tag, name): value for tag, name, value in scan.attributes if name.startswith("data-")}
    assert data == {("div", "data-openapi-url"): OPENAPI_URL}


async def test_every_asset_the_page_names_is_served_with_its_type_and_caching() -> None:
    async with docs_client() as client:
        _, scan = await _scan_docs(client)
        assert len(scan.assets) == 4, scan.assets
        for url in scan.assets:
            response = await client.get(url)
            assert response.status_code == 200, url
            suffix = Path(url.split("?", 1)[0]).suffix
            content_type = response.headers["content-type"].split(";", 1)[0]
            assert content_type in EXPECTED_TYPES[suffix], (url, content_type)
            assert response.headers["cache-control"] == ASSET_CACHE_CONTROL, url
            assert response.headers["x-content-type-options"] == "nosniff", url
            assert response.content, url


async def test_asset_urls_change_with_content_and_carry_the_root_path() -> None:
    async with docs_client() as client:
        _, plain = await _scan_docs(client)
    async with docs_client(root_path="/users-api") as client:
        response, prefixed = await _scan_docs(client)

    assert prefixed.assets == [f"/users-api{url}" for url in plain.assets]
    assert f'data-openapi-url="/users-api{OPENAPI_URL}"' in response.text
    # A content hash, not a constant: each file its own version.
    versions = {url.split("?v=", 1)[1] for url in plain.assets}
    assert len(versions) == len(plain.assets)
    assert all(re.fullmatch(r"[0-9a-f]{16}", version) for version in versions)


async def test_schema_offers_the_password_flow_the_authorize_button_uses() -> None:
    async with docs_client() as client:
        response = await client.get(OPENAPI_URL)
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.1")  # why Swagger UI 5, not 4
    schemes = schema["components"]["securitySchemes"]
    assert schemes == {
        "OAuth2PasswordBearer": {
            "type": "oauth2",
            "flows": {"password": {"scopes": {}, "tokenUrl": TOKEN_URL}},
        }
    }


def test_vendored_bundle_is_the_swagger_ui_5_the_script_and_readme_pin() -> None:
    # A half-done upgrade (files from one version, pin or README from another) fails here.
    vendored = STATIC_DIR / "swagger-ui"
    bundle = (vendored / "swagger-ui-bundle.js").read_text(encoding="utf-8")
    built = re.search(r'PACKAGE_VERSION:"([^"]+)"', bundle)
    script = (REPO_ROOT / "scripts" / "vendor-swagger-ui.sh").read_text(encoding="utf-8")
    pinned = re.search(r'^VERSION="([^"]+)"$', script, re.MULTILINE)
    assert built and pinned
    assert built[1] == pinned[1]
    assert built[1].startswith("5.")
    assert f"**{built[1]}**" in (vendored / "README.md").read_text(encoding="utf-8")
    assert "Apache License" in (vendored / "LICENSE").read_text(encoding="utf-8")


def test_install_docs_refuses_an_app_whose_own_docs_would_shadow_it() -> None:
    with pytest.raises(ValueError, match="docs_url=None"):
        install_docs(FastAPI())
    with pytest.raises(ValueError, match="openapi_url"):
        install_docs(FastAPI(docs_url=None, openapi_url=None))


# --- a real browser -------------------------------------------------------------------------------

# Runs before the page's own scripts: every violation, reported or not in the console, is kept.
RECORD_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolations.push(
    `${event.effectiveDirective} blocked ${event.blockedURI || "inline"}`
      + ` at ${event.sourceFile}:${event.lineNumber} (${event.disposition})`
  );
});
"""


def _foreign(url: str, origin: str) -> bool:
    # data: URLs are the icons swagger-ui.css embeds; they are not requests to anyone.
    return not url.startswith((f"{origin}/", "data:", "blob:"))


@pytest.fixture
def live_docs() -> Iterator[str]:
    """/docs on a real uvicorn socket (the browser needs one), in a thread of this process."""
    port = free_port()
    config = uvicorn.Config(docs_app(), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="docs-uvicorn", daemon=True)
    thread.start()
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def artifacts_dir(tmp_path: Path) -> Path:
    directory = Path(os.environ.get("ARTIFACTS_DIR") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"
)
async def test_swagger_ui_renders_and_signs_in_under_the_policy_in_chromium(
    live_docs: str, artifacts_dir: Path
) -> None:
    # Imported here so the in-process tests run even where the dev extras lack Playwright.
    from playwright.async_api import Error as PlaywrightError
    from playwright.async_api import async_playwright, expect

    requests: list[str] = []
    console_errors: list[str] = []
    token_requests: list[str] = []
    api_auth_headers: list[str | None] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            console_errors.append(f"{message.type}: {message.text}")

    async def refuse_foreign(route: Route) -> None:
        # Nothing may leave the origin; aborting (instead of waiting on a network that is not
        # there) keeps the test fast, and the request list still shows the attempt.
        await route.abort()

    async def token_endpoint(route: Route) -> None:
        # The real endpoint needs a database; what matters here is what the browser sends.
        token_requests.append(route.request.post_data or "")
        body = {"access_token": "token-from-test", "token_type": "bearer", "expires_in": 900}
        await route.fulfill(status=200, json=body)

    async def users_me(route: Route) -> None:
        api_auth_headers.append(await route.request.header_value("authorization"))
        body = {"id": "00000000-0000-0000-0000-000000000000", "email": "ada@example.com"}
        await route.fulfill(status=200, json=body)

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(WAIT_MS)
        await context.route(lambda url: _foreign(url, live_docs), refuse_foreign)
        await context.route(f"{live_docs}{TOKEN_URL}", token_endpoint)
        await context.route(f"{live_docs}{API_V1}/users/me", users_me)
        page = await context.new_page()
        await page.add_init_script(RECORD_VIOLATIONS)
        page.on("console", on_console)
        page.on("pageerror", lambda error: console_errors.append(f"pageerror: {error}"))
        page.on("request", lambda request: requests.append(request.url))
        try:
            response = await page.goto(f"{live_docs}/docs")
            assert response is not None and response.ok
            assert response.headers["content-security-policy"] == DOCS_CSP

            # Swagger UI fetched the 3.1 schema and rendered the operations from it.
            login_operation = page.locator(f'.opblock-summary-path[data-path="{TOKEN_URL}"]')
            await expect(login_operation).to_be_visible(timeout=WAIT_MS)
            # Checked now too, so a policy that breaks the page fails with the violation itself
            # rather than with a click that times out on a page without styles.
            assert await page.evaluate("window.__cspViolations") == []

            # Authorize with the password flow: the modal posts to the token URL by itself.
            await page.locator(".scheme-container button.authorize").click()
            dialog = page.locator(".modal-ux")
            await dialog.locator("#oauth_username").fill("ada@example.com")
            await dialog.locator("#oauth_password").fill("correct horse battery staple")
            await dialog.locator("button.authorize").click()
            await expect(dialog.locator("button", has_text="Logout")).to_be_visible(timeout=WAIT_MS)
            await dialog.locator("button.btn-done").click()
            await expect(dialog).to_have_count(0, timeout=WAIT_MS)

            # "Try it out" on a protected operation sends the token it got.
            me = page.locator(
                f'.opblock-get:has(.opblock-summary-path[data-path="{API_V1}/users/me"])'
            )
            await me.locator(".opblock-summary").click()
            await me.get_by_role("button", name="Try it out").click()
            await me.get_by_role("button", name="Execute").click()
            status = me.locator(".live-responses-table td.response-col_status:not(.col_header)")
            await expect(status).to_have_text("200", timeout=WAIT_MS)

            violations = await page.evaluate("window.__cspViolations")
            persisted = await page.evaluate("window.localStorage.getItem('authorized')")
        finally:
            # Taken whether or not the test got this far: a failed run's picture shows why.
            with contextlib.suppress(PlaywrightError):
                await page.screenshot(path=artifacts_dir / "docs.png", full_page=True)
            await browser.close()

    assert violations == []
    assert console_errors == []
    assert [url for url in requests if _foreign(url, live_docs)] == []
    assert len(token_requests) == 1
    form = dict(pair.split("=", 1) for pair in token_requests[0].split("&"))
    assert form["grant_type"] == "password"
    assert form["username"] == "ada%40example.com"
    assert api_auth_headers == ["Bearer token-from-test"]
    assert persisted is None  # persistAuthorization is off: the token stays in the tab's memory
