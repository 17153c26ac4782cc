"""A web application that signs its users in with the User Management Service.

A stock OpenID Connect client (Authlib's Starlette integration) configured with nothing but the
provider's discovery URL and a client id: it sends the user to the hosted sign-in page, exchanges
the code (with PKCE), checks the ID token and shows who signed in.

    # with `make run` serving http://127.0.0.1:8000 in another terminal:
    .venv/bin/python -m src clients create --name "Demo app" --public --first-party \\
        --redirect-uri http://127.0.0.1:8001/callback \\
        --post-logout-redirect-uri http://127.0.0.1:8001/
    .venv/bin/python examples/oidc_client.py --client-id <the printed client_id>

Then open http://127.0.0.1:8001/ and sign in.
"""

from __future__ import annotations

import argparse
import html
import secrets
from typing import Any

import uvicorn
from authlib.integrations.starlette_client import OAuth
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route


def build_app(issuer: str, client_id: str, client_secret: str | None, base: str) -> Starlette:
    oauth = OAuth()
    oauth.register(
        "ums",
        client_id=client_id,
        client_secret=client_secret,
        server_metadata_url=f"{issuer}/.well-known/openid-configuration",
        client_kwargs={
            "scope": "openid profile email",
            "code_challenge_method": "S256",
            # A public client (no secret) sends only its client_id to the token endpoint.
            "token_endpoint_auth_method": "client_secret_basic" if client_secret else "none",
        },
    )

    def provider() -> Any:
        client = oauth.create_client("ums")
        assert client is not None
        return client

    async def home(request: Request) -> Response:
        user = request.session.get("user")
        if not user:
            return HTMLResponse('<p>Not signed in. <a href="/login">Sign in</a></p>')
        name = html.escape(user.get("name") or user["email"])
        return HTMLResponse(f'<p>Signed in as {name}. <a href="/logout">Sign out</a></p>')

    async def login(request: Request) -> Response:
        response: Response = await provider().authorize_redirect(request, f"{base}/callback")
        return response

    async def callback(request: Request) -> Response:
        token = await provider().authorize_access_token(request)  # checks state, nonce, ID token
        request.session["user"] = dict(token["userinfo"])
        request.session["id_token"] = token["id_token"]
        return RedirectResponse("/")

    async def logout(request: Request) -> Response:
        id_token = request.session.pop("id_token", None)
        request.session.pop("user", None)
        response: Response = await provider().logout_redirect(
            request, post_logout_redirect_uri=f"{base}/", id_token_hint=id_token
        )
        return response

    return Starlette(
        routes=[
            Route("/", home),
            Route("/login", login),
            Route("/callback", callback),
            Route("/logout", logout),
        ],
        middleware=[Middleware(SessionMiddleware, secret_key=secrets.token_urlsafe(32))],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--issuer", default="http://localhost:8000")
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--client-secret", default=None)
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    app = build_app(args.issuer.rstrip("/"), args.client_id, args.client_secret, base)
    uvicorn.run(app, host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
