"""``/dev/mail``: the mail the development catcher received, readable with clickable links.

A newcomer on ``make run`` has no mailbox for ``newcomer@example.com``; the catcher
(``src.dev.catcher``) keeps every mail as a file in DEV_MAIL_DIR and this page lists and shows
them. It exists only with ``ENVIRONMENT=development`` and DEV_MAIL_DIR set, and never in
production: the routes are not even registered otherwise (a 404 like any unknown path). Only the
plain-text part is shown, its http(s) URLs as links, under the pages' strict CSP: a mail's HTML
is not ours to trust.
"""

from __future__ import annotations

import email
import re
from email import policy
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from src.config.settings import Environment, Settings
from src.web.render import PageRoute, render, render_error

PATH = "/dev/mail"
# The catcher's file names: <nanoseconds>-<n>.eml. Nothing else is ever opened.
_NAME = re.compile(r"[0-9]{1,25}-[0-9]{1,10}\.eml")
_LINK = re.compile(r"(https?://[^\s<>\"')]+)")
MAX_LISTED = 200

router = APIRouter(route_class=PageRoute, include_in_schema=False)


def enabled(settings: Settings) -> bool:
    return settings.ENVIRONMENT is Environment.DEVELOPMENT and settings.DEV_MAIL_DIR is not None


def install_dev_mail(app: FastAPI, settings: Settings) -> None:
    """Mount the page when, and only when, it may exist."""
    if enabled(settings):
        app.include_router(router)


def _directory(request: Request) -> Path:
    settings: Settings = request.app.state.settings
    assert settings.DEV_MAIL_DIR is not None  # the router is mounted only then
    return settings.DEV_MAIL_DIR


def _read(path: Path) -> EmailMessage:
    message = email.message_from_bytes(path.read_bytes(), policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def _date(message: EmailMessage) -> str:
    try:
        return parsedate_to_datetime(str(message["Date"])).strftime("%Y-%m-%d %H:%M:%S %Z")
    except (TypeError, ValueError):
        return ""


def _text(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    if part is None:
        return "(no plain-text part)"
    try:
        content: str = part.get_content()
    except (LookupError, ValueError):
        return "(the plain-text part could not be decoded)"
    return content


def paragraphs(text: str) -> list[list[list[dict[str, Any]]]]:
    """Paragraphs of lines of pieces, each piece text or an http(s) link (escaped when
    rendered: nothing of the mail becomes markup but the links' own <a>)."""
    result = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = []
        for line in block.splitlines():
            pieces = [
                {"text": piece, "link": index % 2 == 1}
                for index, piece in enumerate(_LINK.split(line))
                if piece
            ]
            lines.append(pieces)
        result.append(lines)
    return result


@router.get(PATH)
async def mail_list(request: Request) -> Response:
    directory = _directory(request)
    names = sorted(
        (path for path in directory.glob("*.eml") if _NAME.fullmatch(path.name)),
        key=lambda path: tuple(int(part) for part in path.stem.split("-")),
        reverse=True,
    )[:MAX_LISTED]
    mails = []
    for path in names:
        message = _read(path)
        mails.append(
            {
                "url": f"{PATH}/{path.name}",
                "subject": str(message.get("Subject", "(no subject)")),
                "to": str(message.get("To", "")),
                "date": _date(message),
            }
        )
    return render(request, "dev_mail.html", {"mails": mails, "mail": None})


@router.get(PATH + "/{name}")
async def mail_page(request: Request, name: str) -> Response:
    path = _directory(request) / name
    if not _NAME.fullmatch(name) or not path.is_file():
        return render_error(request, 404, "No such mail", "Go back to the list of caught mail.")
    message = _read(path)
    mail = {
        "subject": str(message.get("Subject", "(no subject)")),
        "sender": str(message.get("From", "")),
        "to": str(message.get("To", "")),
        "date": _date(message),
        "paragraphs": paragraphs(_text(message)),
    }
    return render(request, "dev_mail.html", {"mails": [], "mail": mail})
