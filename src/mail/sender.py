"""Sending mail over SMTP, and telling a failure worth retrying from one that is not.

One connection per mail: notifications are few and far between, and a fresh connection cannot be
a stale one. Every wait is bounded: aiosmtplib bounds each command by ``SMTP_TIMEOUT``, and the
whole conversation is bounded too, so a server that answers one byte at a time cannot hold the
courier either.

A failure is *temporary* when trying again later may work: the server is down, slow, busy (4xx),
refuses our TLS or credentials (an operator can fix that without touching the mail). It is
*permanent* when this mail will never be accepted: a 5xx answer to its sender, its recipient or its
content. ``SMTP_SECURITY=starttls`` requires the upgrade: a server (or someone in the middle) that
does not offer STARTTLS gets no credentials and no mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import time
from email.message import EmailMessage

import aiosmtplib

from src.config.settings import Settings

# The whole conversation (connect, TLS, EHLO, AUTH, MAIL, RCPT, DATA) may take this many
# SMTP_TIMEOUTs; each single step is bounded by one.
CONVERSATION_TIMEOUTS = 3
_REASON_LIMIT = 500


class MailDeliveryError(Exception):
    """Sending failed; ``reason`` says why (without the password), ``permanent`` whether a retry
    could ever help."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


def _response_text(code: int, message: str) -> str:
    return f"{code} {' '.join(message.split())}"


def classify(exc: BaseException) -> MailDeliveryError:
    """What a failure of aiosmtplib (or of the network under it) means for the mail."""
    if isinstance(exc, MailDeliveryError):
        return exc
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        answers = [_response_text(r.code, r.message) for r in exc.recipients]
        permanent = all(r.code >= 500 for r in exc.recipients)
        return MailDeliveryError(f"recipient refused: {'; '.join(answers)}", permanent=permanent)
    refusals: tuple[tuple[type[aiosmtplib.SMTPResponseException], str], ...] = (
        (aiosmtplib.SMTPRecipientRefused, "recipient refused"),
        (aiosmtplib.SMTPSenderRefused, "sender refused"),
        (aiosmtplib.SMTPDataError, "message refused"),
    )
    for kind, what in refusals:
        if isinstance(exc, kind):
            answer = _response_text(exc.code, exc.message)
            return MailDeliveryError(f"{what}: {answer}", permanent=exc.code >= 500)
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        # Wrong credentials are the configuration's fault, not the mail's: retried (and logged
        # once) until the operator fixes them or the attempts run out.
        answer = _response_text(exc.code, exc.message)
        return MailDeliveryError(f"authentication failed: {answer}", permanent=False)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        answer = _response_text(exc.code, exc.message)
        return MailDeliveryError(f"server answered {answer}", permanent=False)
    if isinstance(exc, TimeoutError):
        return MailDeliveryError("timed out", permanent=False)
    if isinstance(exc, ssl.SSLError):
        return MailDeliveryError(f"TLS failed: {exc}", permanent=False)
    if isinstance(exc, OSError):  # aiosmtplib's connection errors are ConnectionErrors too
        detail = exc.message if isinstance(exc, aiosmtplib.SMTPException) else str(exc)
        return MailDeliveryError(f"connection failed: {detail}", permanent=False)
    if isinstance(exc, aiosmtplib.SMTPException):
        return MailDeliveryError(f"{type(exc).__name__}: {exc.message}", permanent=False)
    if isinstance(exc, ValueError):
        # aiosmtplib checks addresses before sending anything: this mail cannot be sent.
        return MailDeliveryError(f"not sendable: {exc}", permanent=True)
    return MailDeliveryError(f"{type(exc).__name__}: {exc}", permanent=False)


@functools.lru_cache(maxsize=4)
def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Verify the server (certificate and host name) against ``SMTP_CA_FILE`` or the system's CAs.

    Cached per file: loading the system store takes milliseconds. A changed CA file is read again
    after a restart.
    """
    return ssl.create_default_context(cafile=ca_file)


@functools.cache
def _local_hostname() -> str:
    # aiosmtplib would look the name up on every connection; it does not change.
    return socket.getfqdn()


async def _client(settings: Settings, timeout: float) -> aiosmtplib.SMTP:
    """An SMTP client for the configured server (not yet connected); it logs in on connecting
    when ``SMTP_USERNAME`` is set."""
    if not settings.SMTP_HOST:
        raise MailDeliveryError("SMTP_HOST is not set", permanent=False)
    security = settings.SMTP_SECURITY
    tls: ssl.SSLContext | None = None
    if security != "none":
        ca_file = str(settings.SMTP_CA_FILE) if settings.SMTP_CA_FILE else None
        tls = await asyncio.to_thread(_tls_context, ca_file)
    password = settings.SMTP_PASSWORD.get_secret_value() if settings.SMTP_PASSWORD else None
    return aiosmtplib.SMTP(
        hostname=settings.SMTP_HOST,
        port=settings.SMTP_PORT,
        timeout=timeout,
        use_tls=security == "tls",
        # True: upgrade or give up (never fall back to plain text); False: never upgrade.
        start_tls=security == "starttls",
        tls_context=tls,
        local_hostname=await asyncio.to_thread(_local_hostname),
        username=settings.SMTP_USERNAME,
        password=password if settings.SMTP_USERNAME else None,
    )


def _failure(exc: BaseException, settings: Settings) -> MailDeliveryError:
    """``exc`` classified, its reason (and text) without the SMTP password, cut short."""
    error = classify(exc)
    reason = error.reason
    password = settings.SMTP_PASSWORD.get_secret_value() if settings.SMTP_PASSWORD else ""
    if password:
        reason = reason.replace(password, "[redacted]")
    return MailDeliveryError(reason[:_REASON_LIMIT], permanent=error.permanent)


class SmtpSender:
    """Sends one mail per connection to the configured SMTP server."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def send(self, message: EmailMessage) -> None:
        """Send ``message`` to its ``To``; raise ``MailDeliveryError`` if it was not accepted."""
        timeout = self.settings.SMTP_TIMEOUT
        client: aiosmtplib.SMTP | None = None
        try:
            async with asyncio.timeout(timeout * CONVERSATION_TIMEOUTS):
                client = await _client(self.settings, timeout)
                await client.connect()
                await client.send_message(message)
        except asyncio.CancelledError:
            if client is not None:
                client.close()
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is classified, none escapes raw
            if client is not None:
                client.close()
            raise _failure(exc, self.settings) from None
        # Accepted. From here on nothing may fail the mail (a retry would send it twice): QUIT
        # is a courtesy, bounded, and its failures are ignored.
        try:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(timeout):
                    await client.quit()
        finally:
            client.close()


async def check_smtp(settings: Settings, timeout: float) -> float:
    """Connect (with TLS as configured), log in when ``SMTP_USERNAME`` is set, EHLO and QUIT under
    ``timeout``; send no mail. Return the latency in milliseconds.

    Logging in is part of the check: wrong credentials fail every mail, so a check without AUTH
    would call a courier healthy that cannot send anything. (The health endpoint reuses one probe
    for ``SMTP_PROBE_REUSE_SECONDS``, so it cannot be made to hammer the provider with logins.)
    A failure raises ``TimeoutError``, or ``MailDeliveryError`` whose reason never holds the
    password.
    """
    started = time.perf_counter()
    client: aiosmtplib.SMTP | None = None
    try:
        async with asyncio.timeout(timeout):
            client = await _client(settings, timeout)
            await client.connect()  # TLS as configured, then AUTH if there are credentials
            await client.ehlo()
            await client.quit()
    except TimeoutError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified, so nothing raw (or secret) escapes
        raise _failure(exc, settings) from None
    finally:
        if client is not None:
            client.close()
    return (time.perf_counter() - started) * 1000
