"""Password policy (NIST 800-63B style) and argon2id hashing off the event loop.

Pure logic: no servers. Hashes use the production parameters, so each one costs tens of
milliseconds; the tests keep their number small.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from src.auth.passwords import (
    PasswordHasher,
    PasswordPolicyError,
    check_password_policy,
    common_passwords,
    normalize_password,
)
from src.config.settings import Settings

OWASP_PREFIX = "$argon2id$v=19$m=19456,t=2,p=1$"


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(_env_file=None, ENVIRONMENT="test", DATA_DIR=tmp_path, **overrides)


@pytest_asyncio.fixture
async def hasher(tmp_path: Path) -> AsyncIterator[PasswordHasher]:
    h = PasswordHasher(make_settings(tmp_path, PASSWORD_HASH_WORKERS=2))
    yield h
    h.close()


# --- policy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("password", "fragment"),
    [
        ("", "at least 8"),
        ("Xk4$pQ7", "at least 8"),
        ("x" * 129, "at most 128"),
        (" " * 12, "only of spaces"),
        ("\t\n  \u3000\u2003   ", "only of spaces"),
        ("password1", "too common"),
        ("qwertyuiop", "too common"),
        ("PassWord1", "too common"),
        ("ILOVEYOU", "too common"),
        ("ok-length\ud800", "not valid Unicode"),
    ],
)
def test_weak_passwords_are_refused_with_a_clear_message(password: str, fragment: str) -> None:
    with pytest.raises(PasswordPolicyError) as excinfo:
        check_password_policy(password)
    message = str(excinfo.value)
    assert fragment in message
    if password.strip():
        assert password not in message


@pytest.mark.parametrize(
    "password",
    [
        "Xk4$pQ7z",  # exactly 8
        "y" * 128,  # exactly 128
        "correct horse battery staple",
        "alllowercasebutlong",  # no composition rules
        "Пароль-для-проверки",
        "密码是一句很长的话吧",
        "🔐🔑 emoji and words",
        "  padded but long enough  ",
    ],
)
def test_acceptable_passwords_pass(password: str) -> None:
    check_password_policy(password, "someone@example.com")


def test_length_is_counted_after_nfkc() -> None:
    # U+FB03 (LATIN SMALL LIGATURE FFI) becomes three letters under NFKC.
    check_password_policy("\ufb03" * 3)  # 3 characters typed, 9 after normalisation
    with pytest.raises(PasswordPolicyError, match="at most 128"):
        check_password_policy("\ufb03" * 43)  # 43 typed, 129 after normalisation


def test_full_width_characters_normalise() -> None:
    full_width = "\uff50\uff41\uff53\uff53\uff57\uff4f\uff52\uff44\uff11"  # "password1", full width
    assert normalize_password(full_width) == "password1"
    with pytest.raises(PasswordPolicyError, match="too common"):
        check_password_policy(full_width)


def test_normalisation_never_truncates() -> None:
    long_password = "a" * 1000 + "b"
    assert normalize_password(long_password) == long_password


@pytest.mark.parametrize(
    "password",
    ["alice.smith@example.com", "ALICE.SMITH@EXAMPLE.COM", "Alice.Smith", " alice.smith "],
)
def test_the_users_email_or_its_local_part_is_refused(password: str) -> None:
    with pytest.raises(PasswordPolicyError, match="email"):
        check_password_policy(password, "Alice.Smith@example.com")


def test_a_password_merely_containing_the_email_is_allowed() -> None:
    check_password_policy("alice.smith-likes-long-walks", "alice.smith@example.com")
    check_password_policy("alice.smith", None)


def test_the_common_password_list_is_shipped_and_large() -> None:
    passwords = common_passwords()
    assert len(passwords) >= 3000
    assert {"password", "123456", "qwerty", "password1"} <= passwords
    assert all(p == p.casefold() and p == p.strip() and p for p in passwords)
    assert common_passwords() is passwords  # loaded once


# --- hashing --------------------------------------------------------------------------------------


async def test_hash_uses_owasp_argon2id_parameters(hasher: PasswordHasher) -> None:
    stored = await hasher.hash("correct horse battery staple")
    assert stored.startswith(OWASP_PREFIX)
    assert "correct horse" not in stored
    assert stored != await hasher.hash("correct horse battery staple")  # salted


async def test_verify_accepts_the_password_and_refuses_others(hasher: PasswordHasher) -> None:
    stored = await hasher.hash("correct horse battery staple")
    assert await hasher.verify(stored, "correct horse battery staple") is True
    assert await hasher.verify(stored, "correct horse battery stapl") is False
    assert await hasher.verify(stored, "Correct horse battery staple") is False
    assert await hasher.verify(stored, "") is False
    assert await hasher.verify(stored, "bad\ud800unicode") is False


@pytest.mark.parametrize(
    "stored", ["", "not-a-hash", "$2b$12$abcdefghijklmnopqrstuv", "$argon2id$"]
)
async def test_verify_is_false_for_unusable_hashes(hasher: PasswordHasher, stored: str) -> None:
    assert await hasher.verify(stored, "correct horse battery staple") is False


async def test_hash_and_verify_normalise_unicode(hasher: PasswordHasher) -> None:
    stored = await hasher.hash("\uff43\uff41\uff46\uff45-cre\u0300me-br\u00fbl\u00e9e")
    # ASCII for the full-width letters, and precomposed vs combining accents, are the same password.
    assert await hasher.verify(stored, "cafe-cr\u00e8me-bru\u0302le\u0301e") is True
    assert await hasher.verify(stored, "Пароль-для-проверки") is False
    cyrillic = await hasher.hash("Пароль-для-проверки")
    assert await hasher.verify(cyrillic, "Пароль-для-проверки") is True


async def test_needs_rehash_when_parameters_change(tmp_path: Path, hasher: PasswordHasher) -> None:
    stronger = PasswordHasher(make_settings(tmp_path, ARGON2_TIME_COST=3, PASSWORD_HASH_WORKERS=1))
    try:
        old = await hasher.hash("correct horse battery staple")
        assert hasher.needs_rehash(old) is False
        assert stronger.needs_rehash(old) is True
        new = await stronger.hash("correct horse battery staple")
        assert new.startswith("$argon2id$v=19$m=19456,t=3,p=1$")
        assert stronger.needs_rehash(new) is False
        # Verification still works across parameter sets, which is what makes the rehash possible.
        assert await stronger.verify(old, "correct horse battery staple") is True
        assert hasher.needs_rehash("not-a-hash") is True
    finally:
        stronger.close()


async def test_verify_dummy_does_a_real_verification(
    hasher: PasswordHasher, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str, bool]] = []
    real_verify = hasher._verify_sync

    def spy(stored: str, password: str) -> bool:
        result = real_verify(stored, password)
        calls.append((stored, password, result))
        return result

    monkeypatch.setattr(hasher, "_verify_sync", spy)
    await hasher.verify_dummy("\uff53omebody's password")
    await hasher.verify_dummy("another guess entirely")
    assert len(calls) == 2
    (dummy, password, matched), (dummy_again, _, _) = calls
    # Same parameters as real hashes, so an unknown account costs the same as a known one.
    assert dummy.startswith(OWASP_PREFIX)
    assert dummy_again == dummy  # computed once
    assert password == "somebody's password"  # normalised like a real verification
    assert matched is False


async def test_hashing_does_not_block_the_event_loop(hasher: PasswordHasher) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        started = ticks
        hashes = await asyncio.gather(*(hasher.hash(f"concurrent password {i}") for i in range(6)))
        during = ticks - started
    finally:
        task.cancel()
    assert len(set(hashes)) == 6
    # Six hashes on two workers take several hash-times; a blocked loop would tick at most once
    # or twice between them, a free one ticks throughout.
    assert during >= 5


async def test_close_shuts_the_pool_down(tmp_path: Path) -> None:
    h = PasswordHasher(make_settings(tmp_path, PASSWORD_HASH_WORKERS=1))
    assert (await h.hash("correct horse battery staple")).startswith(OWASP_PREFIX)
    h.close()
    with pytest.raises(RuntimeError):
        await h.hash("correct horse battery staple")
