"""Secrets at rest: AES-256-GCM with a key from the environment.

One-time tokens must reach the mail sender, but a reader of the database (or of the Kafka topic)
must not be able to use them. They travel *sealed*: encrypted and authenticated with a key the
database never sees, and bound to the event that carries them (the associated data), so a sealed
value copied into another event does not open.

A sealed value reads ``v1.<key id>.<base64url(nonce + ciphertext)>``. ``ENCRYPTION_KEY`` may list
several keys: the first seals, every one of them opens, which is how a key is rotated.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from src.config.settings import Settings, SettingsError

logger = logging.getLogger(__name__)

KEY_BYTES = 32
_NONCE_BYTES = 12
_VERSION = "v1"


class UnsealError(ValueError):
    """A sealed value that does not open: wrong key, wrong associated data, or tampered with."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_key() -> str:
    """A fresh key in the form ``ENCRYPTION_KEY`` takes."""
    return _b64(secrets.token_bytes(KEY_BYTES))


def key_id(key: bytes) -> str:
    """A short public name for a key (never the key): lets a value say which key sealed it."""
    return hashlib.sha256(b"ums-key-id:" + key).hexdigest()[:8]


class Sealer:
    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        if any(len(key) != KEY_BYTES for key in keys):
            raise ValueError(f"keys must be {KEY_BYTES} bytes")
        self._seal_id = key_id(keys[0])
        self._seal_with = AESGCM(keys[0])
        self._open_with = {key_id(key): AESGCM(key) for key in keys}

    def seal(self, plaintext: bytes, associated_data: bytes) -> str:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        ciphertext = self._seal_with.encrypt(nonce, plaintext, associated_data)
        return f"{_VERSION}.{self._seal_id}.{_b64(nonce + ciphertext)}"

    def unseal(self, sealed: str, associated_data: bytes) -> bytes:
        version, _, rest = sealed.partition(".")
        kid, _, body = rest.partition(".")
        aead = self._open_with.get(kid)
        if version != _VERSION or aead is None:
            raise UnsealError("sealed with an unknown key or format")
        try:
            raw = _unb64(body)
            return aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], associated_data)
        except (InvalidTag, binascii.Error, ValueError):
            raise UnsealError("the sealed value does not open") from None


def _parse_keys(text: str, variable: str) -> list[bytes]:
    keys = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            key = _unb64(item)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != KEY_BYTES:
            # Never echo the value: it is (or was meant to be) a secret key.
            raise SettingsError(
                f"Invalid configuration: {variable}: expected base64url keys of {KEY_BYTES} bytes"
                " (make one with: python -c 'import secrets,base64;"
                " print(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())')"
            )
        keys.append(key)
    return keys


def _development_key(path: Path) -> bytes:
    """Read the generated development key, creating it (mode 0600, first writer wins) if absent."""
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "w") as file:
                    file.write(new_key() + "\n")
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        text = path.read_text()
    except OSError as exc:
        raise SettingsError(
            f"Invalid configuration: DATA_DIR: cannot keep the development encryption key at "
            f"{path}: {exc.strerror}"
        ) from None
    return _parse_keys(text, f"DATA_DIR (development key {path})")[0]


def load_sealer(settings: Settings) -> Sealer:
    """The sealer for ``ENCRYPTION_KEY``; in development, a generated key kept under DATA_DIR."""
    text = settings.ENCRYPTION_KEY.get_secret_value() if settings.ENCRYPTION_KEY else ""
    keys = _parse_keys(text, "ENCRYPTION_KEY")
    if keys:
        return Sealer(keys)
    if settings.is_production:
        raise SettingsError(
            "Invalid configuration: ENCRYPTION_KEY: required in production "
            "(base64url of 32 random bytes)"
        )
    path = settings.DATA_DIR / "encryption.key"
    key = _development_key(path)
    logger.warning(
        "Secrets at rest are sealed with a development key kept at %s; "
        "set ENCRYPTION_KEY for any shared or production deployment",
        path,
    )
    return Sealer([key])
