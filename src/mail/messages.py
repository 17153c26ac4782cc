"""Turning a notification event into a mail: subject, headers, a plain-text body and an HTML one.

Everything here is pure (no I/O), so every template can be checked without a mail server.

Anyone can register with somebody else's address, so a mail must not carry words its recipient
did not choose: the full name (or any other text a user typed) is never put into a mail, not even
as the display name of ``To``; every mail greets with a plain "Hello,". The one exception is the
user agent of a new sign-in, which the recipient needs to recognise the device: it is cut to
``USER_AGENT_LIMIT`` characters and shown in quotes, labelled as what the browser or app reported
about itself. Every value from an event is still treated as hostile: control and formatting
characters (CR/LF, bidirectional overrides) are flattened to spaces, HTML templates are
autoescaped, and headers are built with ``email.headerregistry.Address``, which refuses line
breaks, so no value can add a header or a recipient.
"""

from __future__ import annotations

import functools
import unicodedata
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Any
from urllib.parse import urlsplit

from email_validator import EmailNotValidError, validate_email
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from src.config.settings import Settings, SettingsError
from src.events.outbox import EventType

# Subject (and HTML heading) of each notification the courier mails.
SUBJECTS: dict[EventType, str] = {
    EventType.VERIFICATION_REQUESTED: "Confirm your email address",
    EventType.PASSWORD_RESET_REQUESTED: "Reset your password",
    EventType.EMAIL_CHANGE_REQUESTED: "Confirm your new email address",
    EventType.EMAIL_CHANGE_NOTICE: "Your email address was changed",
    EventType.NEW_SIGN_IN: "New sign-in to your account",
}
# The notifications whose mail is only a link: without the (sealed) link there is nothing to send.
LINK_EVENTS = frozenset(
    {
        EventType.VERIFICATION_REQUESTED,
        EventType.PASSWORD_RESET_REQUESTED,
        EventType.EMAIL_CHANGE_REQUESTED,
        EventType.EMAIL_CHANGE_NOTICE,
    }
)

# The keys of an event's ``data`` that ``build_message`` reads (all a later retry needs to keep).
MAIL_FIELDS = frozenset({"email", "expires_at", "new_email", "ip", "user_agent", "time"})

_TEXT_LIMIT = 200
USER_AGENT_LIMIT = 200


class Unmailable(ValueError):
    """A notification that cannot become a mail (no usable recipient, no link, unknown type).

    The message is a reason safe to log and store: it never holds the link or the token.
    """


def clean_text(value: Any, limit: int = _TEXT_LIMIT) -> str | None:
    """One line of untrusted text, safe for a header or a body; ``None`` when nothing is left.

    Control and formatting characters (categories C*: CR, LF, NUL, bidirectional overrides that
    make text read backwards) become spaces, runs of white space one space, and the result is cut
    to ``limit`` characters.
    """
    if value is None:
        return None
    text = "".join(" " if unicodedata.category(char)[0] == "C" else char for char in str(value))
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text or None


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 time from event data (UTC when it carries no offset); ``None`` if unreadable."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _format_time(value: Any) -> str | None:
    parsed = parse_time(value)
    return parsed.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if parsed else None


def sender_address(settings: Settings) -> Address:
    """``MAIL_FROM`` as an address; a bad value stops start-up, as any invalid setting does."""
    name, addr = parseaddr(settings.MAIL_FROM)
    try:
        if "@" not in addr:
            raise ValueError("no address")
        return Address(display_name=clean_text(name) or "", addr_spec=addr)
    except (ValueError, IndexError) as exc:
        raise SettingsError(
            "Invalid configuration: MAIL_FROM: expected an address such as "
            f"'Example <no-reply@example.com>' ({exc})"
        ) from None


def recipient_address(email: Any) -> Address:
    """The ``To`` of a mail: the address alone, in its ASCII form (IDNA domain). No display name:
    the name on an account is whatever its registrant typed, not necessarily the recipient's."""
    if not isinstance(email, str) or not email.strip():
        raise Unmailable("no recipient address")
    try:
        checked = validate_email(email.strip(), check_deliverability=False)
    except EmailNotValidError:
        raise Unmailable("the recipient address is not valid") from None
    if checked.ascii_email is None:
        # A non-ASCII local part needs SMTPUTF8 end to end; the standard library cannot even
        # build the header for it.
        raise Unmailable("the recipient address has a non-ASCII local part")
    try:
        return Address(addr_spec=checked.ascii_email)
    except (ValueError, IndexError):
        raise Unmailable("the recipient address is not valid") from None


def quoted_user_agent(value: Any) -> str | None:
    """The user agent of a sign-in as data to show between double quotes: one cleaned line of at
    most ``USER_AGENT_LIMIT`` characters, its own double quotes turned into single ones so that it
    cannot close the quotes and seem to continue as our text."""
    text = clean_text(value, USER_AGENT_LIMIT)
    if text is None:
        return None
    return text.replace('"', "'").replace("\u201c", "'").replace("\u201d", "'")


@functools.cache
def _templates() -> Environment:
    return Environment(
        loader=PackageLoader("src.mail", "templates"),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _template_name(event_type: EventType) -> str:
    return event_type.value.removeprefix("user.")


def build_message(
    settings: Settings,
    event_id: uuid.UUID,
    event_type: str,
    data: Mapping[str, Any],
    link: str | None,
) -> EmailMessage:
    """The mail for one notification: ``From`` = ``MAIL_FROM``, a text body and an HTML
    alternative, and a ``Message-ID`` made from the event id, so a duplicate is recognisable."""
    try:
        kind = EventType(event_type)
    except ValueError:
        kind = None
    if kind is None or kind not in SUBJECTS:
        raise Unmailable("not a notification the courier mails")
    if kind in LINK_EVENTS and not link:
        raise Unmailable("no link to send")
    if link and urlsplit(link).scheme not in ("https", "http"):
        raise Unmailable("the link is not an http(s) URL")
    sender = sender_address(settings)
    recipient = recipient_address(data.get("email"))
    project = clean_text(settings.PROJECT_NAME) or "User Management Service"
    heading = SUBJECTS[kind]
    context = {
        "heading": heading,
        "project_name": project,
        "email": clean_text(data.get("email")),
        "link": link or "",
        "expires_at": _format_time(data.get("expires_at")),
        "new_email": clean_text(data.get("new_email")),
        "ip": clean_text(data.get("ip")),
        "user_agent": quoted_user_agent(data.get("user_agent")),
        "time": _format_time(data.get("time")),
        "base_url": settings.PUBLIC_BASE_URL,
    }
    name = _template_name(kind)
    templates = _templates()
    text = templates.get_template(f"{name}.txt").render(context)
    html = templates.get_template(f"{name}.html").render(context)

    message = EmailMessage()
    message["Subject"] = f"{heading} - {project}"
    message["From"] = sender
    message["To"] = recipient
    message["Date"] = format_datetime(datetime.now(UTC), usegmt=True)
    message["Message-ID"] = f"<{event_id}@{sender.domain or 'localhost'}>"
    # RFC 3834: out-of-office replies and other robots should not answer this mail.
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    return message
