"""End-to-end smoke: register, sign in, read yourself, refresh, sign out."""

from __future__ import annotations

import httpx

from tests.helpers import bearer, login, register


async def test_register_login_me_refresh_logout(app_client: httpx.AsyncClient) -> None:
    user = await register(app_client, full_name="Ada")
    assert "password" not in user and "password_hash" not in user
    tokens = await login(app_client, user["email"])
    assert tokens["token_type"] == "bearer" and tokens["expires_in"] == 900
    me = await app_client.get("/api/v1/users/me", headers=bearer(tokens))
    assert me.status_code == 200, me.text
    assert me.json()["id"] == user["id"]
    assert me.headers["etag"] == '"1"'

    refreshed = await app_client.post(
        "/api/v1/auth/login",
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
    )
    assert refreshed.status_code == 200, refreshed.text
    new = refreshed.json()
    assert new["refresh_token"] != tokens["refresh_token"]

    out = await app_client.post("/api/v1/auth/logout", headers=bearer(new))
    assert out.status_code == 204
    after = await app_client.get("/api/v1/users/me", headers=bearer(new))
    assert after.status_code == 401
    assert after.headers["content-type"] == "application/problem+json"
