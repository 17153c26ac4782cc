"""Password policy and argon2id hashing.

The policy follows NIST SP 800-63B: a length range, a blocklist of common passwords and the
user's own email, and no composition rules (they push people to ``Password1!``).

Hashing is deliberately slow (~50 ms of CPU), so it runs in a thread pool: argon2-cffi releases
the GIL, so one login never stalls the event loop and the pool can use every core.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import os
import secrets
import unicodedata
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import resources
from typing import TypeVar

import argon2
from argon2.exceptions import InvalidHashError, VerificationError

from src.config.settings import Settings
from src.errors import InvalidInput
from src.services.metrics import PASSWORD_HASH_QUEUE

MIN_LENGTH = 8
MAX_LENGTH = 128

# common-passwords.txt.gz is Django's list (django/contrib/auth/common-passwords.txt.gz, ~20,000
# lower-case entries), copyright the Django Software Foundation, BSD-3-Clause licence.
_COMMON_PASSWORDS_FILE = "common-passwords.txt.gz"

_T = TypeVar("_T")


class PasswordPolicyError(ValueError):
    """A password the policy refuses; the message is safe to show the user (it never echoes it)."""


def normalize_password(password: str) -> str:
    """NFKC, so the same password typed on different keyboards or input methods hashes the same.

    Never truncates: a long password keeps all of its entropy.
    """
    return unicodedata.normalize("NFKC", password)


@functools.cache
def common_passwords() -> frozenset[str]:
    """The blocklist, case-folded; read once, on first use, so start-up does not pay for it."""
    data = resources.files("src.auth").joinpath(_COMMON_PASSWORDS_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").splitlines()
    return frozenset(line.strip().casefold() for line in lines if line.strip())


def _is_encodable(text: str) -> bool:
    # JSON allows lone surrogates ("\ud800"), which cannot be encoded to UTF-8 and so not hashed.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def enforce_password_policy(password: str, email: str) -> None:
    """``check_password_policy`` as the API's 422, naming the field."""
    try:
        check_password_policy(password, email)
    except PasswordPolicyError as exc:
        raise InvalidInput(
            str(exc), errors=[{"loc": ["body", "password"], "msg": str(exc)}]
        ) from None


def unusable_password() -> str:
    """A stored "hash" no password matches: the account signs in again only through a reset."""
    return "!" + secrets.token_hex(16)


def check_password_policy(password: str, email: str | None = None) -> None:
    """Raise PasswordPolicyError when the password is too weak; return None when acceptable."""
    normalized = normalize_password(password)
    if not _is_encodable(normalized):
        raise PasswordPolicyError("The password contains characters that are not valid Unicode.")
    if len(normalized) < MIN_LENGTH:
        raise PasswordPolicyError(f"The password must be at least {MIN_LENGTH} characters long.")
    if len(normalized) > MAX_LENGTH:
        raise PasswordPolicyError(f"The password must be at most {MAX_LENGTH} characters long.")
    if not normalized.strip():
        raise PasswordPolicyError("The password must not consist only of spaces.")
    candidate = normalized.strip().casefold()
    if candidate in common_passwords():
        raise PasswordPolicyError("This password is too common; choose a less predictable one.")
    if email:
        address = unicodedata.normalize("NFKC", email).strip().casefold()
        local_part = address.rpartition("@")[0]
        if candidate in {address, local_part}:
            raise PasswordPolicyError("The password must not be your email address.")


def hash_workers(cores: int, processes: int) -> int:
    """Hashing threads for one server process: the cores shared out among the processes. More
    threads than cores only make every hash slower (argon2 is all CPU), and the event loop
    needs its share to answer everyone else meanwhile."""
    return max(1, cores // processes)


def _unqueue(claim: list[bool]) -> None:
    try:
        claim.pop()
    except IndexError:
        return
    PASSWORD_HASH_QUEUE.dec()


class PasswordHasher:
    """argon2id with the configured parameters, run off the event loop.

    Built once at start-up (it owns a thread pool); ``close()`` at shut-down.
    """

    def __init__(self, settings: Settings) -> None:
        self._hasher = argon2.PasswordHasher(
            time_cost=settings.ARGON2_TIME_COST,
            memory_cost=settings.ARGON2_MEMORY_COST,
            parallelism=settings.ARGON2_PARALLELISM,
            type=argon2.Type.ID,
        )
        workers = settings.PASSWORD_HASH_WORKERS or hash_workers(
            os.cpu_count() or 1, settings.WEB_CONCURRENCY
        )
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="argon2")
        # Computed in the pool right away (nothing blocks here) and awaited by verify_dummy, so an
        # unknown email costs one full verification, the same as a known one.
        self._dummy_hash: Future[str] = self._executor.submit(
            self._hasher.hash, secrets.token_urlsafe(32)
        )

    async def _run(self, func: Callable[..., _T], *args: object) -> _T:
        loop = asyncio.get_running_loop()
        # Queued until a thread takes it (the queue depth metric). Whoever pops the claim first
        # takes it off the gauge: the thread when it starts, or this coroutine when the job
        # never ran (cancelled, or the pool shut down); list.pop is atomic.
        claim = [True]

        def job() -> _T:
            _unqueue(claim)
            return func(*args)

        PASSWORD_HASH_QUEUE.inc()
        try:
            return await loop.run_in_executor(self._executor, job)
        finally:
            _unqueue(claim)

    async def hash(self, password: str) -> str:
        return await self._run(self._hasher.hash, normalize_password(password))

    def _verify_sync(self, stored_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored_hash, password)
        except (VerificationError, InvalidHashError, UnicodeError):
            # Mismatch, a corrupt or non-argon2 hash, or a password that is not valid Unicode.
            return False

    async def verify(self, stored_hash: str, password: str) -> bool:
        """True on a match; False for a mismatch or an unusable hash (never raises for those).

        An unusable hash (``unusable_password()``, or a corrupt one) costs the time of a real
        verification too, so the answer's timing does not single such accounts out.
        """
        if not stored_hash.startswith("$argon2"):
            await self.verify_dummy(password)
            return False
        return await self._run(self._verify_sync, stored_hash, normalize_password(password))

    async def verify_dummy(self, password: str) -> None:
        """Spend the time of a real verification, for a login whose account does not exist."""
        dummy = await asyncio.wrap_future(self._dummy_hash)
        await self._run(self._verify_sync, dummy, normalize_password(password))

    def needs_rehash(self, stored_hash: str) -> bool:
        """True when the hash was made with other parameters (or is not a usable argon2 hash)."""
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except (InvalidHashError, UnicodeError):
            return True

    def close(self) -> None:
        # Do not wait: a hash still running finishes in its thread; queued ones are dropped.
        self._executor.shutdown(wait=False, cancel_futures=True)
