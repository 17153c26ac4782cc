"""An SMTP server for the mail tests: aiosmtpd, in the tests' own event loop, on a free port.

It keeps what it accepted, can refuse recipients (for good with 5xx, or for now with 4xx, as a
greylisting server or one that cannot reach a domain yet does) or content the way real servers do,
and records what it refused. It speaks
STARTTLS or TLS with a self-signed certificate and checks AUTH. ``stop()`` then ``start()`` is an
outage: connections are refused in between, and the same port comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.servers import free_port


@dataclass(frozen=True)
class Received:
    """One mail the server accepted."""

    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    raw: bytes
    tls: bool
    login: str | None

    def part(self, subtype: str) -> str:
        """The decoded text of the ``text/<subtype>`` part."""
        for part in self.message.walk():
            if part.get_content_type() == f"text/{subtype}":
                content: str = part.get_content()
                return content
        raise AssertionError(f"no text/{subtype} part")


# Decides about a mail's content: an SMTP answer to refuse it with, or None to accept it.
ContentCheck = Callable[[list[str], EmailMessage], str | None]


@dataclass
class MailServer:
    """aiosmtpd on 127.0.0.1:``port``.

    ``tls`` with ``implicit_tls`` speaks TLS from the first byte (port 465 style); ``tls`` alone
    offers STARTTLS (required when ``require_starttls``). ``users`` turns AUTH on and requires it.
    ``refuse`` maps a recipient to the answer its RCPT gets (``TEMPORARILY`` is a 4xx one);
    it is read at every RCPT, so a test lifts a refusal by deleting the entry. ``refused`` lists
    every recipient refused so far. ``check_content`` may refuse DATA.
    """

    tls: ssl.SSLContext | None = None
    implicit_tls: bool = False
    require_starttls: bool = False
    users: dict[str, str] | None = None
    refuse: dict[str, str] = field(default_factory=dict)
    check_content: ContentCheck | None = None
    port: int = field(default_factory=free_port)
    received: list[Received] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    connections: int = 0
    _server: asyncio.Server | None = None
    _sessions: list[SMTP] = field(default_factory=list)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol,
            "127.0.0.1",
            self.port,
            ssl=self.tls if self.implicit_tls else None,
        )

    async def stop(self) -> None:
        """Stop listening and cut every open connection (a crashed server)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        for session in self._sessions:
            transport = session.transport
            if transport is not None:
                with contextlib.suppress(Exception):
                    transport.abort()  # type: ignore[attr-defined]
        self._sessions.clear()

    def _protocol(self) -> SMTP:
        self.connections += 1
        smtp = SMTP(
            self,
            hostname="localhost",
            tls_context=None if self.implicit_tls else self.tls,
            require_starttls=self.require_starttls,
            authenticator=self._authenticate if self.users is not None else None,
            auth_required=self.users is not None,
            auth_require_tls=True,
            loop=asyncio.get_running_loop(),
        )
        self._sessions.append(smtp)
        return smtp

    # --- aiosmtpd hooks -----------------------------------------------------------------------
    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        users = self.users or {}
        if isinstance(data, LoginPassword):
            login, password = data.login.decode(), data.password.decode()
            if users.get(login) == password:
                return AuthResult(success=True, auth_data=login)
        return AuthResult(success=False, handled=False)

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address in self.refuse:
            self.refused.append(address)
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        message = email.message_from_bytes(raw, policy=policy.default)
        assert isinstance(message, EmailMessage)
        if self.check_content is not None:
            answer = self.check_content(list(envelope.rcpt_tos), message)
            if answer is not None:
                return answer
        transport = server.transport
        self.received.append(
            Received(
                mail_from=str(envelope.mail_from),
                rcpt_tos=list(envelope.rcpt_tos),
                message=message,
                raw=raw,
                tls=transport is not None and transport.get_extra_info("sslcontext") is not None,
                login=session.auth_data if isinstance(session.auth_data, str) else None,
            )
        )
        return "250 Message accepted for delivery"

    def to(self, address: str) -> list[Received]:
        return [mail for mail in self.received if address in mail.rcpt_tos]

    def refusals(self, address: str) -> int:
        return self.refused.count(address)


# What a server answers when it cannot take a recipient yet (greylisting, a domain it cannot
# reach for now): a client should try again later.
TEMPORARILY = "450 4.7.1 Greylisted, please try again later"


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost that is its own CA: (certificate, key) paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mail test CA")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "smtp-cert.pem", directory / "smtp-key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def server_tls_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context
