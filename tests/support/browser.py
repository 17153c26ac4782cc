"""Headless Chromium for the browser tests: Debian's binary, the launch flags, and a watcher that
records what a page does that a test must check (CSP violations, script errors, requests to a
third origin), with ``step`` to fail with all of it when a step does not complete."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext, ConsoleMessage, Page, Request, Response, Route

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
# Generous for a busy 2-core machine; every wait ends as soon as its condition holds.
WAIT_MS = 15_000

# Runs in every page before anything else. Violations are passed to the test at once through a
# binding (a page may navigate away before anyone could read a variable it kept them in).
# Bindings and init scripts come through the DevTools protocol: the pages' CSP does not stop them.
REPORT_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", (event) => {
  window.__reportCspViolation(
    `${document.location.href}: ${event.effectiveDirective} blocked`
      + ` ${event.blockedURI || "inline"} (${event.disposition})`
  );
});
"""


@dataclass
class Watch:
    """Everything the browser does that the test checks at the end."""

    provider: str
    rp: str
    violations: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    # (url, status, Content-Security-Policy or None) of every provider document.
    documents: list[tuple[str, int, str | None]] = field(default_factory=list)
    # Page problems that do not stop the flow: all reported at the end.
    problems: list[str] = field(default_factory=list)
    violation_seen: asyncio.Event = field(default_factory=asyncio.Event)

    def foreign(self, url: str) -> bool:
        return not url.startswith((f"{self.provider}/", f"{self.rp}/", "data:", "blob:", "about:"))

    def on_violation(self, report: str) -> None:
        self.violations.append(report)
        self.violation_seen.set()

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.console.append(f"{message.type}: {message.text}")

    def on_response(self, response: Response) -> None:
        request = response.request
        if request.resource_type == "document" and request.url.startswith(f"{self.provider}/"):
            policy = response.headers.get("content-security-policy")
            self.documents.append((request.url, response.status, policy))

    def csp_console(self) -> list[str]:
        """Console lines about the policy ("Refused to ... Content Security Policy ...")."""
        return [
            line
            for line in self.console
            if "Content Security Policy" in line or "Refused to" in line
        ]

    def check(self, condition: bool, problem: str) -> None:
        if not condition:
            self.problems.append(problem)


async def watch_context(context: BrowserContext, watch: Watch) -> None:
    async def refuse(route: Route) -> None:
        # Nothing may leave the two origins; aborting (instead of waiting on a network that is
        # not there) keeps the test fast, and the request list still shows the attempt.
        await route.abort()

    def on_request(request: Request) -> None:
        watch.requests.append(request.url)

    context.set_default_timeout(WAIT_MS)
    context.set_default_navigation_timeout(WAIT_MS)
    await context.route(watch.foreign, refuse)
    await context.expose_function("__reportCspViolation", watch.on_violation)
    await context.add_init_script(REPORT_VIOLATIONS)
    context.on("request", on_request)
    context.on("response", watch.on_response)


def watch_page(page: Page, watch: Watch) -> None:
    page.on("console", watch.on_console)
    page.on("pageerror", lambda error: watch.page_errors.append(f"{page.url}: {error}"))


@contextlib.asynccontextmanager
async def step(name: str, page: Page, watch: Watch) -> AsyncIterator[None]:
    """Fail with what the browser saw (URL, policy violations) when a step does not complete."""
    from playwright.async_api import Error as PlaywrightError

    try:
        yield
    except (AssertionError, PlaywrightError) as exc:
        pytest.fail(
            f"step {name!r} failed at {page.url}: {exc}\n"
            f"CSP violations: {watch.violations + watch.csp_console()}\n"
            f"page errors: {watch.page_errors}",
            pytrace=False,
        )
