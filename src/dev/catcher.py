"""The development mail catcher: an SMTP server that delivers nothing and shows everything.

``python -m src.dev.catcher --port P --directory D``: aiosmtpd on 127.0.0.1:P accepting any
mail, printing who sent it, to whom, its subject and the links in it to the console, and
keeping it as ``D/<time>-<n>.eml`` for the ``/dev/mail`` page. It runs as its own process so the
launcher has no thread of its own (its children are started with a ``preexec_fn``).
"""

from __future__ import annotations

import argparse
import asyncio
import email
import itertools
import os
import re
import signal
import sys
import time
from email import policy
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

LINK = re.compile(r"https?://[^\s<>\"')]+")
PREFIX = "[dev mail]"


def plain_text(message: EmailMessage) -> str:
    """The text/plain part (the service always sends one), else the first text part."""
    part = message.get_body(preferencelist=("plain", "html"))
    if part is None:
        return ""
    try:
        content: str = part.get_content()
    except (LookupError, ValueError):
        return ""
    return content


def links(text: str) -> list[str]:
    return list(dict.fromkeys(LINK.findall(text)))


class Catcher:
    """aiosmtpd's handler: every recipient accepted, every mail kept and shown."""

    def __init__(self, directory: Path, page_url: str | None) -> None:
        self.directory = directory
        self.page_url = page_url
        self._numbers = itertools.count(1)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        if not raw and isinstance(envelope.content, bytes):
            raw = envelope.content
        self.keep(raw)
        message = email.message_from_bytes(raw, policy=policy.default)
        assert isinstance(message, EmailMessage)
        self.show(str(envelope.mail_from), list(envelope.rcpt_tos), message)
        return "250 Message accepted (development catcher: not delivered)"

    def keep(self, raw: bytes) -> Path:
        """Written under a temporary name, then renamed: the page never reads half a mail."""
        name = f"{time.time_ns()}-{next(self._numbers)}.eml"
        partial = self.directory / f".{name}.partial"
        partial.write_bytes(raw)
        partial.chmod(0o600)  # it holds one-time links
        final = self.directory / name
        partial.replace(final)
        return final

    def show(self, sender: str, recipients: list[str], message: EmailMessage) -> None:
        lines = [
            f"{PREFIX} from {sender} to {', '.join(recipients)}",
            f"{PREFIX}   subject: {message.get('Subject', '')}",
            *(f"{PREFIX}   link: {link}" for link in links(plain_text(message))),
        ]
        if self.page_url:
            lines.append(f"{PREFIX}   read it at {self.page_url}")
        print("\n".join(lines), flush=True)


async def serve(port: int, directory: Path, page_url: str | None) -> None:
    loop = asyncio.get_running_loop()
    handler = Catcher(directory, page_url)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="localhost", loop=loop), "127.0.0.1", port
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.dev.catcher", description="The development mail catcher."
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--directory", type=Path, required=True)
    parser.add_argument("--page-url", help="where the service shows the caught mail")
    args = parser.parse_args(argv)
    os.umask(0o077)
    args.directory.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(args.port, args.directory, args.page_url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
