"""Interactive API docs at /docs, served entirely by the service under a strict CSP.

FastAPI's built-in /docs loads Swagger UI from a CDN and starts it with an inline <script>, so a
Content-Security-Policy that lets it work must trust another origin and inline scripts. Here
Swagger UI is vendored (``static/swagger-ui/``, see its README) and started by our own
``static/swagger-init.js``, which reads the schema URL from a ``data-`` attribute: the page then
works with scripts from this origin only. Create the app with ``docs_url=None, redoc_url=None``
and call :func:`install_docs`.
"""

from __future__ import annotations

import hashlib
import os
from html import escape
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

DOCS_PATH = "/docs"
STATIC_PATH = f"{DOCS_PATH}/static"
STATIC_DIR = Path(__file__).parent / "static"

# The smallest policy under which Swagger UI 5 renders, signs in and runs "Try it out";
# tests/test_docs.py proves it in a real browser. Directives that do not fall back to default-src
# (frame-ancestors, base-uri, form-action) are spelled out, or they would allow everything.
DOCS_CSP = "; ".join(
    (
        "default-src 'none'",  # anything not allowed below: fonts, frames, workers, objects...
        "script-src 'self'",  # the bundle and swagger-init.js: no inline script, no eval
        "style-src 'self'",  # swagger-ui.css; React sets inline styles through the CSSOM
        "img-src 'self' data:",  # the favicon, and the icons swagger-ui.css embeds as data: URLs
        "connect-src 'self'",  # the schema, the token request and "Try it out"
        "frame-ancestors 'none'",  # nobody may frame the page (clickjacking)
        "base-uri 'none'",  # an injected <base> cannot re-point the relative URLs
        "form-action 'none'",  # Swagger UI's forms are submitted by script, never natively
    )
)

# The page names each asset with a hash of its content (?v=...), so a changed file has a new URL
# and the old one may be cached for ever. The page itself is revalidated on every load.
ASSET_CACHE_CONTROL = "public, max-age=31536000, immutable"
PAGE_CACHE_CONTROL = "no-cache"

_ASSETS = {
    "css": "swagger-ui/swagger-ui.css",
    "icon": "swagger-ui/favicon-32x32.png",
    "bundle": "swagger-ui/swagger-ui-bundle.js",
    "init": "swagger-init.js",
}


class FingerprintedAssets(StaticFiles):
    """StaticFiles with the caching the fingerprinted URLs allow."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = ASSET_CACHE_CONTROL
        # The CSP trusts scripts by origin, so browsers must not guess a type we didn't send.
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def _fingerprint(relative: str) -> str:
    return hashlib.sha256((STATIC_DIR / relative).read_bytes()).hexdigest()[:16]


def _page(title: str, openapi_url: str, assets: dict[str, str]) -> str:
    # Every interpolated value is HTML-escaped, and none lands inside a <script>.
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)} - API docs</title>
<link rel="icon" type="image/png" href="{escape(assets["icon"])}">
<link rel="stylesheet" href="{escape(assets["css"])}">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{escape(openapi_url)}"></div>
<script src="{escape(assets["bundle"])}"></script>
<script src="{escape(assets["init"])}"></script>
</body>
</html>
"""


def install_docs(app: FastAPI) -> None:
    """Serve Swagger UI at /docs and its assets under /docs/static, from this service only.

    No /docs/oauth2-redirect: the API declares the OAuth2 password flow, whose token request
    Swagger UI sends itself; only the authorization-code and implicit flows redirect.
    """
    if app.docs_url is not None:
        # FastAPI registered its own /docs when the app was created, and it would win.
        raise ValueError("create the app with docs_url=None before calling install_docs()")
    if app.openapi_url is None:
        raise ValueError("install_docs() needs the app's OpenAPI schema (openapi_url)")
    openapi_url = app.openapi_url
    # Hashed once here, not per request: the files only change with a new deployment.
    versioned = {
        key: f"{STATIC_PATH}/{relative}?v={_fingerprint(relative)}"
        for key, relative in _ASSETS.items()
    }

    async def swagger_ui(request: Request) -> HTMLResponse:
        # Behind a proxy that strips a prefix (uvicorn --root-path), links must carry it back.
        root = str(request.scope.get("root_path", "")).rstrip("/")
        assets = {key: root + url for key, url in versioned.items()}
        return HTMLResponse(
            _page(app.title, root + openapi_url, assets),
            headers={
                "Content-Security-Policy": DOCS_CSP,
                "Cache-Control": PAGE_CACHE_CONTROL,
                "X-Content-Type-Options": "nosniff",
            },
        )

    app.add_api_route(DOCS_PATH, swagger_ui, methods=["GET"], include_in_schema=False)
    app.mount(STATIC_PATH, FingerprintedAssets(directory=STATIC_DIR), name="docs-static")
