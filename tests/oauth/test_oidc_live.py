"""A stock relying party, unmodified, against the provider over real HTTP.

Authlib's Starlette client (discovery through ``server_metadata_url``, PKCE, nonce, ID token
validation) runs in its own web app; a scripted "browser" follows the redirects between the two
and fills in the hosted sign-in form. The ID token is then checked again the way any resource
server would, with PyJWT's ``PyJWKClient`` against the published JWKS.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
from authlib.integrations.httpx_client import AsyncOAuth2Client
from authlib.integrations.starlette_client import OAuth

from examples.oidc_client import build_app
from src.main import create_app
from tests.conftest import SettingsFactory
from tests.support.app import PASSWORD, bearer, register, unique_email
from tests.support.auth import password_grant
from tests.support.oidc import create_client, form_posting_to, live_server, relying_party
from tests.support.servers import free_port

ADMIN_PASSWORD = "admin password for tests"


async def test_a_stock_relying_party_runs_the_whole_flow(
    make_settings: SettingsFactory, clean_db: None
) -> None:
    port, rp_port = free_port(), free_port()
    issuer, rp_base = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{rp_port}"
    admin_email, email = unique_email("admin"), unique_email()
    settings = make_settings(
        PUBLIC_BASE_URL=issuer, FIRST_ADMIN_EMAIL=admin_email, FIRST_ADMIN_PASSWORD=ADMIN_PASSWORD
    )
    with live_server(create_app(settings), port):
        async with httpx.AsyncClient(base_url=issuer) as api:
            admin = bearer((await password_grant(api, admin_email, ADMIN_PASSWORD)).json())
            registered = await create_client(
                api, admin, redirect_uris=[f"{rp_base}/callback"], name="Relying party"
            )
            await register(api, email, full_name="Ada Lovelace")
        client_id, secret = registered["client_id"], registered["client_secret"]

        oauth = OAuth()
        oauth.register(
            "ums",
            client_id=client_id,
            client_secret=secret,
            server_metadata_url=f"{issuer}/.well-known/openid-configuration",
            client_kwargs={"scope": "openid profile email", "code_challenge_method": "S256"},
        )
        seen: dict[str, Any] = {}
        with live_server(relying_party(oauth, rp_base, seen), rp_port):
            async with httpx.AsyncClient(follow_redirects=True, timeout=30) as browser:
                page = await browser.get(f"{rp_base}/login")
                assert page.status_code == 200, page.text
                assert str(page.url).startswith(f"{issuer}/oauth2/authorize?")
                request = {k: v[0] for k, v in parse_qs(urlsplit(str(page.url)).query).items()}
                assert request["code_challenge_method"] == "S256" and request["nonce"]
                fields = form_posting_to(page.text, "/account/signin")
                fields.update(email=email, password=PASSWORD)
                done = await browser.post(f"{issuer}/account/signin", data=fields)
                assert done.status_code == 200, done.text
                assert done.json() == {"signed_in": email}
        token = seen["token"]
        assert seen["iss"] == issuer  # RFC 9207

        # Any resource server: the JWKS and PyJWT, nothing of ours.
        jwks = jwt.PyJWKClient(f"{issuer}/.well-known/jwks.json")
        key = await asyncio.to_thread(jwks.get_signing_key_from_jwt, token["id_token"])
        claims = jwt.decode(
            token["id_token"], key.key, algorithms=["RS256"], audience=client_id, issuer=issuer
        )
        assert claims["nonce"] == request["nonce"]
        assert claims["email"] == email and claims["name"] == "Ada Lovelace"

        userinfo = await oauth.create_client("ums").userinfo(token=token)
        assert userinfo["sub"] == claims["sub"] and userinfo["email"] == email

        meta = (await httpx.AsyncClient().get(f"{issuer}/.well-known/openid-configuration")).json()
        async with AsyncOAuth2Client(client_id, secret, token=token) as session:
            refreshed = await session.refresh_token(
                meta["token_endpoint"], refresh_token=token["refresh_token"]
            )
            assert refreshed["access_token"] != token["access_token"]
            revoked = await session.revoke_token(
                meta["revocation_endpoint"],
                token=refreshed["refresh_token"],
                token_type_hint="refresh_token",
            )
            assert revoked.status_code == 200
        async with httpx.AsyncClient() as resource_server:
            for candidate in (refreshed["access_token"], refreshed["refresh_token"]):
                answer = await resource_server.post(
                    meta["introspection_endpoint"],
                    data={"token": candidate},
                    auth=(client_id, secret),
                )
                assert answer.status_code == 200 and answer.json() == {"active": False}


async def test_the_example_application_signs_in_and_out_with_a_public_client(
    make_settings: SettingsFactory, clean_db: None
) -> None:
    """examples/oidc_client.py, as the README tells newcomers to run it (a public client)."""
    port, rp_port = free_port(), free_port()
    issuer, rp_base = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{rp_port}"
    email = unique_email()
    settings = make_settings(PUBLIC_BASE_URL=issuer)
    with live_server(create_app(settings), port):
        client_id = "demo-app"
        command = [
            sys.executable, "-m", "src", "clients", "create", "--name", "Demo app", "--public",
            "--first-party", "--client-id", client_id,
            "--redirect-uri", f"{rp_base}/callback", "--post-logout-redirect-uri", f"{rp_base}/",
        ]  # fmt: skip
        environment = {
            **os.environ,
            "DATABASE_URL": settings.DATABASE_URL,
            "REDIS_ENABLED": "false",
        }
        created = await asyncio.to_thread(
            subprocess.run, command, env=environment, capture_output=True, text=True, timeout=60
        )
        assert created.returncode == 0, created.stderr
        async with httpx.AsyncClient(base_url=issuer) as api:
            await register(api, email, full_name="Grace Hopper")
        with live_server(build_app(issuer, client_id, None, rp_base), rp_port):
            async with httpx.AsyncClient(follow_redirects=True, timeout=30) as browser:
                page = await browser.get(f"{rp_base}/login")
                fields = form_posting_to(page.text, "/account/signin")
                fields.update(email=email, password=PASSWORD)
                home = await browser.post(f"{issuer}/account/signin", data=fields)
                assert home.status_code == 200 and "Signed in as Grace Hopper" in home.text
                confirm = await browser.get(f"{rp_base}/logout")
                assert str(confirm.url).startswith(f"{issuer}/oauth2/logout?")
                fields = form_posting_to(confirm.text, "/oauth2/logout")
                done = await browser.post(f"{issuer}/oauth2/logout", data=fields)
                assert str(done.url).startswith(f"{rp_base}/?state=")
                assert "Not signed in" in done.text
