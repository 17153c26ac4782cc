"""What holds for the pages whatever their content: no script, no inline style or handler in any
template (the policy would refuse them), the policy's form targets, and the CSRF check alone."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.requests import Request

from src.config.settings import Settings
from src.web import csrf
from src.web.render import STATIC_DIR, asset_url, content_security_policy
from tests.web.helpers import PAGE_CSP

TEMPLATES = Path(csrf.__file__).parent / "templates"
# Shared with the OAuth routes: these names are a contract.
REQUIRED = {
    "base.html",
    "signin.html",
    "consent.html",
    "signout.html",
    "error.html",
    "signup.html",
    "forgot_password.html",
    "reset_password.html",
    "verify_email.html",
    "email_change.html",
    "account.html",
}


def test_every_template_is_there() -> None:
    assert {path.name for path in TEMPLATES.glob("*.html")} >= REQUIRED


@pytest.mark.parametrize("path", sorted(TEMPLATES.glob("*.html")), ids=lambda p: p.name)
def test_no_template_holds_script_inline_style_or_handlers(path: Path) -> None:
    text = path.read_text()
    # No inline script anywhere; the passkey pages load this service's own file, nothing else
    # (their policy allows 'self' scripts; every other page's allows none).
    external = '<script src="{{ src }}" defer></script>'
    assert "<script" not in text.lower().replace(external.lower(), "")
    assert "<style" not in text.lower()
    assert re.search(r"\sstyle\s*=", text, re.IGNORECASE) is None
    assert re.search(r"\son[a-z]+\s*=", text, re.IGNORECASE) is None
    assert "javascript:" not in text.lower()
    # Nothing from elsewhere: every URL a template names is a path on this service.
    for url in re.findall(r'(?:href|src|action)="([^"{]+)"', text):
        assert url.startswith("/") or url.startswith("#"), url


def test_every_form_posts_with_a_csrf_token() -> None:
    for path in TEMPLATES.glob("*.html"):
        text = path.read_text()
        forms = text.count("<form")
        assert text.count('method="post"') == forms, path.name
        assert text.count("ui.csrf(csrf_token)") == forms, path.name


def test_the_stylesheet_needs_nothing_from_elsewhere() -> None:
    css = (STATIC_DIR / "style.css").read_text()
    assert "@import" not in css and "url(" not in css and "@font-face" not in css
    assert asset_url("style.css").startswith("/assets/style.css?v=")


def test_the_policy_adds_form_targets_as_origins() -> None:
    assert content_security_policy() == PAGE_CSP
    policy = content_security_policy(
        [
            "https://app.example/callback?x=1",
            "https://App.Example:8443/",
            "http://[::1]:8080/cb",
            "com.example.app:/oauth",
            "https://app.example/other",
        ]
    )
    assert (
        "form-action 'self' https://app.example https://app.example:8443 http://[::1]:8080 "
        "com.example.app:;" in policy
    )
    for bad in ("https://", "https://a.example;script-src *", "no scheme", "a b:c", "ht tp://x"):
        with pytest.raises(ValueError):
            content_security_policy([bad])


def _request(settings: Settings, cookies: dict[str, str]) -> Request:
    header = "; ".join(f"{name}={value}" for name, value in cookies.items())
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"cookie", header.encode())] if header else [],
        "app": SimpleNamespace(state=SimpleNamespace(settings=settings)),
    }
    return Request(scope)


def test_the_csrf_check() -> None:
    settings = Settings(_env_file=None, PUBLIC_BASE_URL="http://localhost:8000")
    token = "a" * 43
    good = _request(settings, {"ums_csrf": token})
    csrf.check_csrf(good, token)
    assert csrf.csrf_token(good) == token and csrf.new_csrf_token(good) is None
    for request, submitted in (
        (good, None),
        (good, "b" * 43),
        (good, token + "x"),
        (good, object()),
        (_request(settings, {}), token),
        (_request(settings, {"ums_csrf": "short"}), "short"),
        (_request(settings, {"__Host-ums_csrf": token}), token),  # not the name on http
    ):
        with pytest.raises(csrf.CsrfError):
            csrf.check_csrf(request, submitted)

    fresh = _request(settings, {})
    made = csrf.csrf_token(fresh)
    assert len(made) == 43 and csrf.csrf_token(fresh) == made == csrf.new_csrf_token(fresh)
