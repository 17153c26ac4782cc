"""The mail courier: notifications become mail, once per event, through outages and bad input.

A real SMTP server (aiosmtpd, ``tests.support.mail``) runs in the tests' event loop; the courier
talks to it over TCP, with STARTTLS, TLS and AUTH where a test says so. Notifications are recorded
with ``record_notification`` exactly as the service records them, and reach the courier straight
from the outbox (``KAFKA_ENABLED=false``) or through the relay and a Kafka topic of their own.

A mail the server refuses for now (4xx) must not hold up the mail behind it: the tests check the
order of events (the second mail arrives while the first is still pending), never the clock, and
keep every backoff tiny through the settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from src.app.container import app_services
from src.config.settings import Settings
from src.db.models import MailDelivery, OutboxEvent
from src.db.session import create_engine, create_sessionmaker, upgrade_database
from src.db.types import utcnow
from src.events.envelope import CloudEvent
from src.events.outbox import EventType, record_notification
from src.events.relay import OutboxRelay, prune_outbox
from src.mail.courier import Courier, Notification, Status, next_attempt_at
from src.mail.messages import USER_AGENT_LIMIT, Unmailable, build_message, recipient_address
from src.mail.sender import MailDeliveryError, check_smtp
from src.security.sealing import Sealer, load_sealer, new_key
from src.services.kafka.manager import KafkaManager
from src.services.kafka.serializers import KafkaSerializer
from tests.conftest import SettingsFactory
from tests.support.app import OPERATOR, assert_no_leftover_tasks, eventually, running_app
from tests.support.events import FAST_GROUP_JOIN, read_topic
from tests.support.mail import (
    TEMPORARILY,
    MailServer,
    self_signed_certificate,
    server_tls_context,
)

ROOT = Path(__file__).resolve().parent.parent
SENDER_DOMAIN = "mail.example.com"
HOSTILE_NAME = "<b>x</b>\r\nBcc: victim@example.com\r\nX-Injected: yes"
# What anyone can register with a victim's address as: no word of it may reach the victim's mail.
PHISHING_NAME = "URGENT: account suspended, verify at https://evil.example/login now"
LINK_TYPES = (
    EventType.VERIFICATION_REQUESTED,
    EventType.PASSWORD_RESET_REQUESTED,
    EventType.EMAIL_CHANGE_REQUESTED,
    EventType.EMAIL_CHANGE_NOTICE,
)


# --- helpers --------------------------------------------------------------------------------------


def mail_settings(make_settings: SettingsFactory, server: MailServer, **overrides: Any) -> Settings:
    """Outbox mode against ``server``, on a notifications topic no other test uses, with backoff
    short enough that retries happen within a test."""
    values: dict[str, Any] = {
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": server.port,
        "SMTP_SECURITY": "none",
        "SMTP_TIMEOUT": 5.0,
        "MAIL_FROM": f"Account Service <no-reply@{SENDER_DOMAIN}>",
        "PUBLIC_BASE_URL": "https://app.example.com",
        "KAFKA_ENABLED": False,
        "KAFKA_NOTIFICATIONS_TOPIC": f"mail-{uuid.uuid4().hex[:12]}",
        "ENCRYPTION_KEY": new_key(),
        "OUTBOX_POLL_INTERVAL": 0.05,
        "MAIL_RETRY_BACKOFF_INITIAL": 0.05,
        "MAIL_RETRY_BACKOFF_MAX": 0.2,
        "MAIL_MAX_ATTEMPTS": 50,
    }
    values.update(overrides)
    return make_settings(**values)


@dataclass(frozen=True)
class Recorded:
    event_id: uuid.UUID
    user_id: uuid.UUID
    email: str | None
    token: str
    url: str


def event_data(
    event_type: EventType,
    email: str | None,
    *,
    full_name: str | None = None,
    expires_at: datetime | None = None,
) -> dict[str, Any]:
    """The ``data`` the service records for each notification type."""
    data: dict[str, Any] = {"email": email, "full_name": full_name}
    if event_type in LINK_TYPES:
        data["expires_at"] = (expires_at or utcnow() + timedelta(hours=1)).isoformat()
    if event_type is EventType.EMAIL_CHANGE_NOTICE:
        data["new_email"] = "new-address@example.com"
    if event_type is EventType.NEW_SIGN_IN:
        data.update(ip="203.0.113.7", user_agent="Firefox/140 on Linux", time=utcnow().isoformat())
    return data


async def record(
    sessionmaker: async_sessionmaker[AsyncSession],
    settings: Settings,
    sealer: Sealer,
    event_type: EventType,
    email: str | None,
    *,
    full_name: str | None = None,
    expires_at: datetime | None = None,
    with_secret: bool = True,
) -> Recorded:
    """Record a notification (its link sealed) as the service does, and commit it."""
    user_id = uuid.uuid4()
    token = secrets.token_urlsafe(32)
    url = f"https://app.example.com/confirm?token={token}&lang=en"
    data = event_data(event_type, email, full_name=full_name, expires_at=expires_at)
    data["user_id"] = str(user_id)
    has_link = with_secret and event_type in LINK_TYPES
    async with sessionmaker() as db:
        row = record_notification(
            db,
            settings,
            sealer,
            event_type,
            user_id,
            data,
            secret={"token": token, "url": url} if has_link else None,
            secret_expires_at=(expires_at or utcnow() + timedelta(hours=1)) if has_link else None,
        )
        await db.commit()
    return Recorded(row.id, user_id, email, token, url)


async def delivery(
    sessionmaker: async_sessionmaker[AsyncSession], event_id: uuid.UUID
) -> MailDelivery | None:
    async with sessionmaker() as db:
        found: MailDelivery | None = await db.get(MailDelivery, event_id)
        return found


async def finished(
    sessionmaker: async_sessionmaker[AsyncSession], event_id: uuid.UUID
) -> MailDelivery | None:
    row = await delivery(sessionmaker, event_id)
    return row if row is not None and row.status != "pending" else None


async def wait_finished(
    sessionmaker: async_sessionmaker[AsyncSession], event_id: uuid.UUID, timeout: float = 10.0
) -> MailDelivery:
    """The event's delivery row once it is final (sent, failed or skipped)."""
    row: MailDelivery = await eventually(lambda: finished(sessionmaker, event_id), timeout)
    return row


async def outbox_row(
    sessionmaker: async_sessionmaker[AsyncSession], event_id: uuid.UUID
) -> OutboxEvent:
    async with sessionmaker() as db:
        row = (await db.execute(select(OutboxEvent).where(OutboxEvent.id == event_id))).scalar_one()
        return row


@contextlib.asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(settings)
    try:
        yield create_sessionmaker(engine)
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def running(courier: Courier) -> AsyncIterator[asyncio.Task[None]]:
    """The courier's loop as a task; a courier that died with an error fails the test."""
    task = asyncio.create_task(courier.run())
    try:
        yield task
    finally:
        task.cancel()
        (result,) = await asyncio.gather(task, return_exceptions=True)
        if isinstance(result, Exception):
            raise result


def our_log(caplog: pytest.LogCaptureFixture) -> str:
    """Everything the service's own loggers wrote, tracebacks included."""
    return "\n".join(
        f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records if r.name.startswith("src")
    )


def assert_no_secrets(text: str, *recorded: Recorded, sealed: Iterable[str] = ()) -> None:
    for item in recorded:
        assert item.token not in text
        assert item.url not in text
    for value in sealed:
        assert value not in text


@pytest_asyncio.fixture
async def smtp() -> AsyncIterator[MailServer]:
    server = MailServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# --- rendering ------------------------------------------------------------------------------------


def _render_settings() -> Settings:
    return Settings(
        _env_file=None,
        MAIL_FROM=f"Account Service <no-reply@{SENDER_DOMAIN}>",
        PUBLIC_BASE_URL="https://app.example.com",
        PROJECT_NAME="Account Service",
    )


EXPECTED_WORDS = {
    EventType.VERIFICATION_REQUESTED: ("Confirm your email address", "confirm that"),
    EventType.PASSWORD_RESET_REQUESTED: ("Reset your password", "did not ask for this"),
    EventType.EMAIL_CHANGE_REQUESTED: ("Confirm your new email address", "new email address"),
    EventType.EMAIL_CHANGE_NOTICE: ("Your email address was changed", "new-address@example.com"),
    EventType.NEW_SIGN_IN: ("New sign-in to your account", "change your password"),
}


@pytest.mark.parametrize("event_type", list(EXPECTED_WORDS), ids=lambda t: t.value)
def test_every_notification_renders_as_text_and_html(event_type: EventType) -> None:
    event_id = uuid.uuid4()
    link = "https://app.example.com/confirm?token=abc123&lang=en"
    data = event_data(event_type, "bob@example.com", full_name=PHISHING_NAME)
    message = build_message(
        _render_settings(),
        event_id,
        event_type.value,
        data,
        link if event_type in LINK_TYPES else None,
    )
    subject, phrase = EXPECTED_WORDS[event_type]
    assert message["Subject"] == f"{subject} - Account Service"
    assert message["From"] == f"Account Service <no-reply@{SENDER_DOMAIN}>"
    assert message["To"] == "bob@example.com"  # the address alone: no name anybody typed
    assert message["Message-ID"] == f"<{event_id}@{SENDER_DOMAIN}>"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message.get_content_type() == "multipart/alternative"

    text_part = message.get_body(("plain",))
    html_part = message.get_body(("html",))
    assert text_part is not None and html_part is not None
    text, html = text_part.get_content(), html_part.get_content()
    assert phrase in text and phrase in html
    assert text.startswith("Hello,\n") and '<p style="margin:0 0 16px;">Hello,</p>' in html
    for word in ("URGENT", "evil.example", "suspended"):
        assert word not in message.as_string() and word not in text and word not in html
    if event_type in LINK_TYPES:
        assert link in text
        assert 'href="https://app.example.com/confirm?token=abc123&amp;lang=en"' in html
    else:
        assert "203.0.113.7" in text
        assert 'The browser or app reported itself as: "Firefox/140 on Linux"' in text
        assert "reported itself as: &ldquo;" in html and "Firefox/140 on Linux" in html
        assert "token" not in text
    # Accessible and self-contained: a language, a title, no images, scripts or remote styles.
    assert '<html lang="en">' in html and f"<title>{subject}</title>" in html
    for external in ("<img", "<script", "<link", "src=", "url("):
        assert external not in html


def test_a_name_never_reaches_the_mail() -> None:
    """Not as a header (it cannot add one either), not in the greeting, not anywhere."""
    data = event_data(EventType.PASSWORD_RESET_REQUESTED, "bob@example.com", full_name=HOSTILE_NAME)
    data["full_name"] += "\u202e"  # a right-to-left override, to make text read backwards
    message = build_message(
        _render_settings(), uuid.uuid4(), data=data, event_type="user.password_reset_requested",
        link="https://app.example.com/reset?token=abc",
    )  # fmt: skip
    parsed = BytesParser(policy=policy.default).parsebytes(message.as_bytes())
    assert parsed["Bcc"] is None and parsed["X-Injected"] is None
    (to,) = parsed["To"].addresses
    assert (to.addr_spec, to.display_name) == ("bob@example.com", "")
    for part in ("<b>x</b>", "&lt;b&gt;", "victim@example.com", "X-Injected", "\u202e"):
        assert part not in message.as_string()


def test_a_long_user_agent_is_cut_and_shown_as_quoted_data() -> None:
    # The signer-in chooses it: it may be long, quote itself, and pose as our own words.
    user_agent = 'Mozilla/5.0" Your account is suspended, verify at https://evil.example "' * 20
    data = event_data(EventType.NEW_SIGN_IN, "bob@example.com")
    data["user_agent"] = user_agent
    message = build_message(_render_settings(), uuid.uuid4(), EventType.NEW_SIGN_IN, data, None)
    text_part, html_part = message.get_body(("plain",)), message.get_body(("html",))
    assert text_part is not None and html_part is not None
    text, html = text_part.get_content(), html_part.get_content()
    (line,) = [line for line in text.splitlines() if "reported itself as" in line]
    label = 'The browser or app reported itself as: "'
    assert line.strip().startswith(label) and line.endswith('"')
    shown = line.strip().removeprefix(label).removesuffix('"')
    assert len(shown) <= USER_AGENT_LIMIT and shown.endswith("…")
    assert '"' not in shown  # its own quotes cannot end the quotation early
    assert shown.startswith("Mozilla/5.0' Your account is suspended")
    assert user_agent not in text and user_agent[: USER_AGENT_LIMIT + 1] not in html
    assert "reported itself as: &ldquo;" in html and "&#34;" not in html


@pytest.mark.parametrize(
    "address",
    [None, "", "not an address", "bob@example.com\r\nBcc: victim@example.com", "bøb@example.com"],
)
def test_an_unusable_recipient_is_unmailable(address: str | None) -> None:
    with pytest.raises(Unmailable):
        recipient_address(address)


def test_an_internationalised_domain_is_sent_in_its_ascii_form() -> None:
    assert recipient_address("bob@exämple.com").addr_spec == "bob@xn--exmple-cua.com"


# --- outbox mode ----------------------------------------------------------------------------------


@pytest_asyncio.fixture(params=["postgresql", "sqlite"])
async def database_kind(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """``None`` for the shared PostgreSQL database, or the URL of a fresh, migrated SQLite one."""
    if request.param == "postgresql":
        return None
    url = f"sqlite+aiosqlite:///{tmp_path / 'mail.db'}"
    await asyncio.to_thread(upgrade_database, url)
    return url


async def test_outbox_mode_mails_every_type_once_and_forgets_the_links(
    make_settings: SettingsFactory,
    smtp: MailServer,
    database_kind: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="src")
    overrides = {"DATABASE_URL": database_kind} if database_kind else {}
    settings = mail_settings(make_settings, smtp, **overrides)
    sealer = load_sealer(settings)
    async with database(settings) as sessionmaker:
        recorded = [
            await record(
                sessionmaker, settings, sealer, event_type, f"user{n}@example.com",
                full_name=PHISHING_NAME,
            )
            for n, event_type in enumerate(EXPECTED_WORDS)
        ]  # fmt: skip
        sealed = [(await outbox_row(sessionmaker, r.event_id)).sealed or "" for r in recorded[:4]]
        assert all(sealed)
        courier = Courier(settings, sessionmaker, sealer)
        async with running(courier):
            for item in recorded:
                await wait_finished(sessionmaker, item.event_id)

        assert courier.sent_total == len(recorded) and courier.failed_total == 0
        for item, event_type in zip(recorded, EXPECTED_WORDS, strict=True):
            assert item.email is not None
            (mail,) = smtp.to(item.email)
            assert mail.mail_from == f"no-reply@{SENDER_DOMAIN}"
            assert mail.rcpt_tos == [item.email]
            assert mail.message["Message-ID"] == f"<{item.event_id}@{SENDER_DOMAIN}>"
            if event_type in LINK_TYPES:
                assert item.url in mail.part("plain")
            # The name the account was registered with is in no header and no part.
            shown = [mail.part("plain"), mail.part("html"), *map(str, mail.message.values())]
            assert not [text for text in shown if "URGENT" in text or "evil.example" in text]
            row = await outbox_row(sessionmaker, item.event_id)
            assert row.published_at is not None
            assert (row.sealed, row.sealed_until) == (None, None)
            done = await delivery(sessionmaker, item.event_id)
            assert done is not None
            assert (done.status, done.attempts, done.type) == ("sent", 1, event_type.value)
            assert done.finished_at is not None
    assert len(smtp.received) == len(recorded)

    log = our_log(caplog)
    assert_no_secrets(log, *recorded, sealed=sealed)
    for item in recorded:
        assert f"mail sent: event={item.event_id}" in log
        assert f"user={item.user_id}" in log


async def test_the_same_event_is_mailed_once(
    make_settings: SettingsFactory, smtp: MailServer
) -> None:
    settings = mail_settings(make_settings, smtp)
    sealer = load_sealer(settings)
    async with database(settings) as sessionmaker:
        courier = Courier(settings, sessionmaker, sealer)
        item = await record(
            sessionmaker, settings, sealer, EventType.VERIFICATION_REQUESTED, "twice@example.com"
        )
        row = await outbox_row(sessionmaker, item.event_id)
        notification = Notification.from_outbox(row)
        # Delivered twice (Kafka redelivers after a crash, a rebalance, a second courier).
        assert await courier.deliver(notification) is Status.SENT
        assert await courier.deliver(notification) is Status.SENT
        assert len(smtp.to("twice@example.com")) == 1
        assert (courier.sent_total, courier.duplicates_total) == (1, 1)

        # The outbox row of a notification already mailed (by the Kafka-mode courier, say) is
        # closed without mailing it again.
        assert await courier.deliver_next() is True
        assert len(smtp.to("twice@example.com")) == 1
        closed = await outbox_row(sessionmaker, item.event_id)
        assert closed.published_at is not None and closed.sealed is None
        assert courier.duplicates_total == 2
        assert await courier.deliver_next() is False


async def test_an_outage_is_retried_then_mailed_once_and_logged_once(
    make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="src")
    server = MailServer()  # not started yet: connections are refused
    settings = mail_settings(make_settings, server)
    sealer = load_sealer(settings)
    async with database(settings) as sessionmaker:
        item = await record(
            sessionmaker, settings, sealer, EventType.PASSWORD_RESET_REQUESTED, "late@example.com"
        )
        courier = Courier(settings, sessionmaker, sealer)

        async def retried_a_few_times() -> bool:
            row = await delivery(sessionmaker, item.event_id)
            return row is not None and row.status == "pending" and row.attempts >= 3

        try:
            async with running(courier):
                await eventually(retried_a_few_times)
                assert courier.pending_retry == str(item.event_id)
                pending = await delivery(sessionmaker, item.event_id)
                assert pending is not None and pending.last_error
                assert "connection failed" in pending.last_error
                assert courier.last_error is not None and courier.last_error_at is not None
                await server.start()
                done = await wait_finished(sessionmaker, item.event_id)
        finally:
            await server.stop()

    assert done.status == "sent" and done.attempts >= 4
    assert len(server.received) == 1
    assert courier.pending_retry is None and courier.sent_total == 1
    assert courier.last_sent_at is not None
    outage = [r for r in caplog.records if "sending failed" in r.getMessage()]
    assert len(outage) == 1, [r.getMessage() for r in outage]
    assert "sending works again" in our_log(caplog)
    assert_no_secrets(our_log(caplog), item)


async def test_a_mail_is_given_up_after_the_last_attempt_and_the_next_one_sent(
    make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = MailServer()
    settings = mail_settings(make_settings, server, MAIL_MAX_ATTEMPTS=2)
    sealer = load_sealer(settings)
    async with database(settings) as sessionmaker:
        first = await record(
            sessionmaker, settings, sealer, EventType.PASSWORD_RESET_REQUESTED, "first@example.com"
        )
        courier = Courier(settings, sessionmaker, sealer)
        try:
            async with running(courier):
                failed = await wait_finished(sessionmaker, first.event_id)
                await server.start()
                second = await record(
                    sessionmaker, settings, sealer, EventType.NEW_SIGN_IN, "second@example.com"
                )
                sent = await wait_finished(sessionmaker, second.event_id)
        finally:
            await server.stop()

    assert (failed.status, failed.attempts) == ("failed", 2)
    assert failed.last_error is not None and failed.last_error.startswith("gave up after 2")
    # Finished: what the retries needed (the sealed link above all) is gone.
    assert (failed.sealed, failed.data, failed.next_attempt_at) == (None, None, None)
    assert sent.status == "sent"
    assert [mail.rcpt_tos for mail in server.received] == [["second@example.com"]]
    assert (courier.failed_total, courier.sent_total) == (1, 1)
    assert f"mail failed: event={first.event_id}" in our_log(caplog)


async def test_a_refused_mail_fails_at_once_and_the_next_one_is_sent(
    make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="src")

    def echo_the_link(recipients: list[str], message: Any) -> str | None:
        # A content filter that quotes what it refused: the link must not reach our logs.
        if "echo@example.com" not in recipients:
            return None
        body = message.get_body(("plain",)).get_content()
        found = re.search(r"https://\S+", body)
        return f"554 5.7.1 Refused: {found.group(0) if found else '?'} looks like spam"

    server = MailServer(
        refuse={"gone@example.com": "550 5.1.1 No such user"}, check_content=echo_the_link
    )
    await server.start()
    settings = mail_settings(make_settings, server)
    sealer = load_sealer(settings)
    try:
        async with database(settings) as sessionmaker:
            gone, echo, fine = [
                await record(sessionmaker, settings, sealer, EventType.VERIFICATION_REQUESTED, to)
                for to in ("gone@example.com", "echo@example.com", "fine@example.com")
            ]
            courier = Courier(settings, sessionmaker, sealer)
            async with running(courier):
                results = [
                    await wait_finished(sessionmaker, item.event_id) for item in (gone, echo, fine)
                ]
    finally:
        await server.stop()

    refused, filtered, sent = results
    assert (refused.status, refused.attempts) == ("failed", 1)
    assert refused.last_error is not None and "550 5.1.1 No such user" in refused.last_error
    assert (filtered.status, filtered.attempts) == ("failed", 1)
    assert filtered.last_error is not None and "554" in filtered.last_error
    assert "[redacted]" in filtered.last_error
    assert echo.token not in filtered.last_error
    assert sent.status == "sent"
    assert [mail.rcpt_tos for mail in server.received] == [["fine@example.com"]]
    assert_no_secrets(our_log(caplog), gone, echo, fine)
    assert courier.last_error is not None and echo.token not in courier.last_error


async def test_expired_missing_and_foreign_links_are_skipped(
    make_settings: SettingsFactory, smtp: MailServer
) -> None:
    settings = mail_settings(make_settings, smtp)
    sealer = load_sealer(settings)
    other_sealer = Sealer([os.urandom(32)])
    async with database(settings) as sessionmaker:
        expired = await record(
            sessionmaker, settings, sealer, EventType.PASSWORD_RESET_REQUESTED,
            "expired@example.com", expires_at=utcnow() - timedelta(minutes=1),
        )  # fmt: skip
        missing = await record(
            sessionmaker, settings, sealer, EventType.VERIFICATION_REQUESTED,
            "missing@example.com", with_secret=False,
        )  # fmt: skip
        foreign = await record(
            sessionmaker, settings, other_sealer, EventType.EMAIL_CHANGE_REQUESTED,
            "foreign@example.com",
        )  # fmt: skip
        nobody = await record(sessionmaker, settings, sealer, EventType.NEW_SIGN_IN, None)
        fine = await record(
            sessionmaker, settings, sealer, EventType.EMAIL_CHANGE_NOTICE, "fine@example.com"
        )
        courier = Courier(settings, sessionmaker, sealer)
        async with running(courier):
            reasons = {
                name: await wait_finished(sessionmaker, item.event_id)
                for name, item in {
                    "expired": expired, "missing": missing, "foreign": foreign,
                    "nobody": nobody, "fine": fine,
                }.items()
            }  # fmt: skip
        for item in (expired, missing, foreign, nobody):
            row = await outbox_row(sessionmaker, item.event_id)
            assert row.published_at is not None and row.sealed is None

        # A type the courier does not mail (someone else's event on the topic) is skipped too.
        stranger = Notification(
            uuid.uuid4(), "user.registered", None, {"email": "x@example.com"}, None
        )
        assert await courier.deliver(stranger) is Status.SKIPPED

    assert {name: row.status for name, row in reasons.items()} == {
        "expired": "skipped", "missing": "skipped", "foreign": "skipped",
        "nobody": "skipped", "fine": "sent",
    }  # fmt: skip
    assert "expired" in (reasons["expired"].last_error or "")
    assert "no sealed link" in (reasons["missing"].last_error or "")
    assert "does not open" in (reasons["foreign"].last_error or "")
    assert "no recipient" in (reasons["nobody"].last_error or "")
    assert all(row.attempts == 0 for name, row in reasons.items() if name != "fine")
    assert [mail.rcpt_tos for mail in smtp.received] == [["fine@example.com"]]
    assert courier.skipped_total == 5 and courier.sent_total == 1


# --- temporary failures, retried out of line ------------------------------------------------------


async def pending_row(
    sessionmaker: async_sessionmaker[AsyncSession], event_id: uuid.UUID
) -> MailDelivery | None:
    row = await delivery(sessionmaker, event_id)
    return row if row is not None and row.status == "pending" else None


async def test_a_temporary_refusal_does_not_hold_up_the_next_mail(
    make_settings: SettingsFactory,
    smtp: MailServer,
    database_kind: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="src")
    smtp.refuse["slow@example.com"] = TEMPORARILY  # greylisted, or a domain out of reach
    overrides = {"DATABASE_URL": database_kind} if database_kind else {}
    settings = mail_settings(make_settings, smtp, **overrides)
    sealer = load_sealer(settings)
    async with database(settings) as sessionmaker:
        slow = await record(
            sessionmaker, settings, sealer, EventType.PASSWORD_RESET_REQUESTED,
            "slow@example.com", full_name=PHISHING_NAME,
        )  # fmt: skip
        sealed = (await outbox_row(sessionmaker, slow.event_id)).sealed
        assert sealed
        fast = await record(
            sessionmaker, settings, sealer, EventType.VERIFICATION_REQUESTED, "fast@example.com"
        )
        courier = Courier(settings, sessionmaker, sealer)
        async with running(courier):
            await eventually(lambda: smtp.to("fast@example.com"))
            # The second mail went out while the first still waits for a retry.
            waiting = await pending_row(sessionmaker, slow.event_id)
            assert waiting is not None and smtp.to("slow@example.com") == []
            assert waiting.attempts >= 1 and "450" in (waiting.last_error or "")
            assert waiting.next_attempt_at is not None
            assert waiting.topic == settings.KAFKA_NOTIFICATIONS_TOPIC
            assert waiting.type == "user.password_reset_requested"
            assert waiting.user_id == slow.user_id
            # What a retry needs, the link still sealed (the same value, never opened), and
            # nothing the mail does not use (the name).
            assert waiting.sealed == sealed
            assert waiting.data is not None and waiting.data["email"] == "slow@example.com"
            assert "full_name" not in waiting.data
            assert_no_secrets(repr(waiting.data), slow)
            # Both outbox rows are closed and forget their link: the retry does not need them.
            for item in (slow, fast):
                row = await outbox_row(sessionmaker, item.event_id)
                assert row.published_at is not None and row.sealed is None

            await eventually(lambda: smtp.refusals("slow@example.com") >= 3)  # retried
            del smtp.refuse["slow@example.com"]
            done = await wait_finished(sessionmaker, slow.event_id)
            # Once the retry loop has looked again after that, nothing is pending any more.
            await eventually(lambda: courier.pending_total == 0 and courier.pending_retry is None)

    assert done.status == "sent" and done.attempts == smtp.refusals("slow@example.com") + 1
    assert (done.sealed, done.data, done.next_attempt_at) == (None, None, None)
    (mail,) = smtp.to("slow@example.com")
    assert slow.url in mail.part("plain")
    assert [mail.rcpt_tos for mail in smtp.received] == [
        ["fast@example.com"], ["slow@example.com"],
    ]  # fmt: skip
    assert (courier.sent_total, courier.failed_total, courier.duplicates_total) == (2, 0, 0)
    assert courier.stats()["pending_retries"] == 0
    assert f"mail sent: event={slow.event_id}" in our_log(caplog)
    assert_no_secrets(our_log(caplog), slow, fast, sealed=[sealed])


async def test_a_pending_mail_survives_a_restart(
    make_settings: SettingsFactory, smtp: MailServer
) -> None:
    smtp.refuse["later@example.com"] = TEMPORARILY
    settings = mail_settings(make_settings, smtp)
    sealer = load_sealer(settings)
    async with database(settings) as sessionmaker:
        item = await record(
            sessionmaker, settings, sealer, EventType.EMAIL_CHANGE_NOTICE, "later@example.com"
        )
        first = Courier(settings, sessionmaker, sealer)
        async with running(first):
            await eventually(lambda: smtp.refusals("later@example.com") >= 2)
        assert await pending_row(sessionmaker, item.event_id) is not None

        # A new courier (a restart, or another process) finds the row and carries on with it.
        del smtp.refuse["later@example.com"]
        second = Courier(settings, sessionmaker, sealer)
        async with running(second):
            done = await wait_finished(sessionmaker, item.event_id)
            await eventually(lambda: second.pending_total == 0)

    assert done.status == "sent" and done.sealed is None
    (mail,) = smtp.to("later@example.com")
    assert item.url in mail.part("plain")
    assert (first.sent_total, second.sent_total, second.duplicates_total) == (0, 1, 0)


async def test_two_couriers_never_send_one_pending_row_twice(
    make_settings: SettingsFactory, smtp: MailServer
) -> None:
    """PostgreSQL: a courier locks the pending row it tries (``FOR UPDATE SKIP LOCKED``)."""
    addresses = [f"busy{n}@example.com" for n in range(12)]
    smtp.refuse.update(dict.fromkeys(addresses, TEMPORARILY))
    settings = mail_settings(make_settings, smtp)
    sealer = load_sealer(settings)
    async with database(settings) as sessionmaker:
        items = [
            await record(sessionmaker, settings, sealer, EventType.VERIFICATION_REQUESTED, address)
            for address in addresses
        ]
        first, second = (
            Courier(settings, sessionmaker, sealer),
            Courier(settings, sessionmaker, sealer),
        )
        while await first.deliver_next():  # one first attempt each: all of them pending
            pass
        for item in items:
            assert await pending_row(sessionmaker, item.event_id) is not None

        smtp.refuse.clear()
        async with running(first), running(second):
            for item in items:
                await wait_finished(sessionmaker, item.event_id)
            await eventually(lambda: first.pending_total == 0 and second.pending_total == 0)

    assert sorted(rcpt for mail in smtp.received for rcpt in mail.rcpt_tos) == sorted(addresses)
    assert first.sent_total + second.sent_total == len(addresses)


async def test_a_link_that_expires_while_its_mail_waits_is_skipped_and_forgotten(
    make_settings: SettingsFactory, smtp: MailServer
) -> None:
    smtp.refuse["expiring@example.com"] = TEMPORARILY
    settings = mail_settings(make_settings, smtp)
    sealer = load_sealer(settings)
    async with database(settings) as sessionmaker:
        item = await record(
            sessionmaker, settings, sealer, EventType.VERIFICATION_REQUESTED,
            "expiring@example.com",
        )  # fmt: skip
        courier = Courier(settings, sessionmaker, sealer)
        assert await courier.deliver_next() is True
        waiting = await pending_row(sessionmaker, item.event_id)
        assert waiting is not None and waiting.sealed

        # Time passes: the link expires before the next attempt (the row is edited rather than
        # waited for).
        async with sessionmaker() as db:
            row = await db.get(MailDelivery, item.event_id)
            assert row is not None and row.data is not None
            past = (utcnow() - timedelta(seconds=1)).isoformat()
            row.data = {**row.data, "expires_at": past}
            row.next_attempt_at = utcnow() - timedelta(seconds=1)
            await db.commit()
        assert await courier.retry_next() is True
        assert await courier.retry_next() is False  # nothing else is due

    done = await delivery(sessionmaker, item.event_id)
    assert done is not None and done.status == "skipped"
    assert "expired" in (done.last_error or "") and done.attempts == 1
    assert (done.sealed, done.data, done.next_attempt_at) == (None, None, None)
    assert smtp.received == [] and courier.skipped_total == 1


def test_a_retry_is_due_after_the_backoff_or_when_the_link_expires(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(MAIL_RETRY_BACKOFF_INITIAL=60, MAIL_RETRY_BACKOFF_MAX=600)
    soon = utcnow() + timedelta(seconds=5)
    later = utcnow() + timedelta(hours=1)

    def notification(event_type: EventType, expires_at: datetime) -> Notification:
        data = {"email": "a@example.com", "expires_at": expires_at.isoformat()}
        return Notification(uuid.uuid4(), event_type.value, None, data, None)

    reset = EventType.PASSWORD_RESET_REQUESTED
    assert next_attempt_at(settings, notification(reset, soon), 1) == soon
    due = next_attempt_at(settings, notification(reset, later), 3)  # 60 s doubled twice
    assert timedelta(seconds=230) < due - utcnow() <= timedelta(seconds=240)
    # A notification without a link has nothing to expire.
    sign_in = next_attempt_at(settings, notification(EventType.NEW_SIGN_IN, soon), 1)
    assert sign_in > soon


async def test_permanent_failures_and_broken_templates_fail_at_once(
    make_settings: SettingsFactory, smtp: MailServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    smtp.refuse["gone@example.com"] = "550 5.1.1 No such user"
    settings = mail_settings(make_settings, smtp)
    sealer = load_sealer(settings)
    async with database(settings) as sessionmaker:
        gone, broken = [
            await record(sessionmaker, settings, sealer, EventType.VERIFICATION_REQUESTED, to)
            for to in ("gone@example.com", "broken@example.com")
        ]
        courier = Courier(settings, sessionmaker, sealer)
        refused = Notification.from_outbox(await outbox_row(sessionmaker, gone.event_id))
        assert await courier.deliver(refused) is Status.FAILED

        def unrenderable(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"template bug near {kwargs or args}")

        monkeypatch.setattr("src.mail.courier.build_message", unrenderable)
        failing = Notification.from_outbox(await outbox_row(sessionmaker, broken.event_id))
        assert await courier.deliver(failing) is Status.FAILED
        found = [await delivery(sessionmaker, item.event_id) for item in (gone, broken)]

    rows = [row for row in found if row is not None]
    assert [(row.status, row.attempts) for row in rows] == [("failed", 1), ("failed", 0)]
    assert all(row.sealed is None and row.next_attempt_at is None for row in rows)
    assert "could not render: RuntimeError" in (rows[1].last_error or "")
    assert smtp.received == [] and smtp.refusals("gone@example.com") == 1


# --- Kafka mode -----------------------------------------------------------------------------------


async def _create_topic(bootstrap: str, topic: str) -> None:
    # tansu acknowledges writes to a topic it does not know, and drops them: create it first.
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()


async def _committed(bootstrap: str, group: str, topic: str) -> int | None:
    """The offset ``group`` committed on partition 0 of ``topic`` (asked as a group member would:
    tansu does not answer the admin client's OffsetFetch)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await asyncio.wait_for(consumer.start(), 10)
    try:
        offset: int | None = await asyncio.wait_for(
            consumer.committed(TopicPartition(topic, 0)), 10
        )
        return offset
    finally:
        await asyncio.wait_for(consumer.stop(), 10)


async def test_kafka_mode_mails_what_the_relay_publishes_once_per_event(
    make_settings: SettingsFactory,
    kafka_bootstrap: str,
    smtp: MailServer,
    clean_db: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="src")
    group = f"courier-{uuid.uuid4().hex[:8]}"
    settings = mail_settings(
        make_settings, smtp, KAFKA_ENABLED=True, MAIL_COURIER_GROUP_ID=group, **FAST_GROUP_JOIN
    )
    topic = settings.KAFKA_NOTIFICATIONS_TOPIC
    await _create_topic(kafka_bootstrap, topic)
    sealer = load_sealer(settings)
    manager = KafkaManager(settings)
    await manager.start()
    try:
        async with database(settings) as sessionmaker:
            relay = OutboxRelay(settings, sessionmaker, lambda: manager)
            courier = Courier(settings, sessionmaker, sealer, kafka=lambda: manager)
            first = await record(
                sessionmaker, settings, sealer, EventType.VERIFICATION_REQUESTED,
                "first@example.com", full_name=HOSTILE_NAME,
            )  # fmt: skip
            notice = await record(
                sessionmaker, settings, sealer, EventType.NEW_SIGN_IN, "notice@example.com"
            )
            assert await relay.publish_once() == 2
            async with running(courier):
                await eventually(lambda: len(smtp.received) == 2, timeout=30)

                # The same record again, a record nobody can read, and a sealed link copied
                # into another event: none of them is mailed, and none blocks what follows.
                (record_bytes, *_) = [r.value for r in await read_topic(kafka_bootstrap, topic)]
                copied = KafkaSerializer().deserialize(record_bytes, CloudEvent)
                copied.id = uuid.uuid4()
                copied.data = {**copied.data, "email": "thief@example.com"}
                await manager.send(topic, record_bytes, key=str(first.user_id))
                await manager.send(topic, b"\xffnot json", key="x")
                await manager.send(topic, KafkaSerializer().serialize(copied), key="y")
                last = await record(
                    sessionmaker, settings, sealer, EventType.PASSWORD_RESET_REQUESTED,
                    "last@example.com",
                )  # fmt: skip
                assert await relay.publish_once() == 1
                await eventually(lambda: smtp.to("last@example.com"), timeout=30)
                copied_row = await wait_finished(sessionmaker, copied.id)
                records = await read_topic(kafka_bootstrap, topic)
                end = max(r.offset for r in records) + 1

                async def all_committed() -> bool:
                    return await _committed(kafka_bootstrap, group, topic) == end

                # Each record's offset is committed once it is handled: nothing is read again.
                await eventually(all_committed, interval=0.3)
    finally:
        await manager.stop()

    assert sorted(rcpt for mail in smtp.received for rcpt in mail.rcpt_tos) == [
        "first@example.com", "last@example.com", "notice@example.com",
    ]  # fmt: skip
    (mail,) = smtp.to("first@example.com")
    assert first.url in mail.part("plain")
    assert mail.message["Bcc"] is None and mail.message["X-Injected"] is None
    assert courier.duplicates_total == 1
    assert courier.skipped_total == 2  # the unreadable record and the copied link
    assert copied_row.status == "skipped" and "does not open" in (copied_row.last_error or "")
    sealed = [str(CloudEvent.model_validate_json(r.value).data.get("sealed")) for r in records[:1]]
    assert_no_secrets(our_log(caplog), first, notice, last, sealed=sealed)


async def test_kafka_mode_a_temporary_refusal_does_not_hold_up_the_next_mail(
    make_settings: SettingsFactory, kafka_bootstrap: str, smtp: MailServer, clean_db: None
) -> None:
    group = f"courier-{uuid.uuid4().hex[:8]}"
    settings = mail_settings(
        make_settings, smtp, KAFKA_ENABLED=True, MAIL_COURIER_GROUP_ID=group,
        MAIL_MAX_ATTEMPTS=100, MAIL_RETRY_BACKOFF_MAX=0.5, **FAST_GROUP_JOIN,
    )  # fmt: skip
    topic = settings.KAFKA_NOTIFICATIONS_TOPIC
    await _create_topic(kafka_bootstrap, topic)
    smtp.refuse["slow@example.com"] = TEMPORARILY
    sealer = load_sealer(settings)
    manager = KafkaManager(settings)
    await manager.start()
    try:
        async with database(settings) as sessionmaker:
            relay = OutboxRelay(settings, sessionmaker, lambda: manager)
            courier = Courier(settings, sessionmaker, sealer, kafka=lambda: manager)
            slow = await record(
                sessionmaker, settings, sealer, EventType.PASSWORD_RESET_REQUESTED,
                "slow@example.com",
            )  # fmt: skip
            sealed = (await outbox_row(sessionmaker, slow.event_id)).sealed
            fast = await record(
                sessionmaker, settings, sealer, EventType.NEW_SIGN_IN, "fast@example.com"
            )
            assert await relay.publish_once() == 2
            async with running(courier):
                await eventually(lambda: smtp.to("fast@example.com"), timeout=30)
                waiting = await pending_row(sessionmaker, slow.event_id)
                assert waiting is not None and smtp.to("slow@example.com") == []
                assert waiting.sealed == sealed  # taken over from the record, still sealed

                records = await read_topic(kafka_bootstrap, topic)
                end = max(r.offset for r in records) + 1

                async def both_committed() -> bool:
                    return await _committed(kafka_bootstrap, group, topic) == end

                # Both records are done with while the first mail still waits for its retry.
                await eventually(both_committed, timeout=30, interval=0.3)
                assert await pending_row(sessionmaker, slow.event_id) is not None

                # Its record again (a redelivery): the retry loop owns it, nobody else tries it.
                await manager.send(topic, records[0].value, key=str(slow.user_id))
                await eventually(lambda: courier.duplicates_total == 1, timeout=30)

                del smtp.refuse["slow@example.com"]
                done = await wait_finished(sessionmaker, slow.event_id, timeout=30)
                await eventually(lambda: courier.pending_total == 0)
    finally:
        await manager.stop()

    assert done.status == "sent" and done.sealed is None and done.data is None
    (mail,) = smtp.to("slow@example.com")
    assert slow.url in mail.part("plain")
    assert [mail.rcpt_tos for mail in smtp.received] == [
        ["fast@example.com"], ["slow@example.com"],
    ]  # fmt: skip
    assert (courier.sent_total, courier.duplicates_total) == (2, 1)
    assert_no_secrets(repr(courier.stats()), slow, fast, sealed=[sealed or ""])


async def test_cancelling_the_courier_ends_it_in_bounded_time(
    make_settings: SettingsFactory, kafka_bootstrap: str, smtp: MailServer
) -> None:
    # Kafka mode, cancelled while it joins its group (the broker answers after seconds).
    settings = mail_settings(
        make_settings, smtp, KAFKA_ENABLED=True, MAIL_COURIER_GROUP_ID=f"c-{uuid.uuid4().hex}"
    )
    await _create_topic(kafka_bootstrap, settings.KAFKA_NOTIFICATIONS_TOPIC)
    before = asyncio.all_tasks()
    manager = KafkaManager(settings)
    async with database(settings) as sessionmaker:
        courier = Courier(settings, sessionmaker, load_sealer(settings), kafka=lambda: manager)
        task = asyncio.create_task(courier.run())
        await asyncio.sleep(0.5)  # under way (the join takes half the 30 s session timeout)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=15)
        assert done, "the courier did not stop"
        assert task.cancelled()
    await manager.stop()
    await assert_no_leftover_tasks(before)


async def test_cancelling_the_courier_while_a_mail_waits_for_its_retry_ends_it(
    make_settings: SettingsFactory,
) -> None:
    server = MailServer()  # down: a mail waits for its retry when the courier is cancelled
    settings = mail_settings(make_settings, server, MAIL_RETRY_BACKOFF_INITIAL=30)
    sealer = load_sealer(settings)
    before = asyncio.all_tasks()
    async with database(settings) as sessionmaker:
        item = await record(sessionmaker, settings, sealer, EventType.NEW_SIGN_IN, "a@example.com")
        courier = Courier(settings, sessionmaker, sealer)
        task = asyncio.create_task(courier.run())
        await eventually(lambda: courier.pending_retry == str(item.event_id))
        await eventually(lambda: courier.pending_total == 1)  # the retry loop waits for it
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=15)
        assert done and task.cancelled()
        pending = await delivery(sessionmaker, item.event_id)
        assert pending is not None and (pending.status, pending.attempts) == ("pending", 1)
    await assert_no_leftover_tasks(before)  # the retry loop went with the courier


# --- TLS and authentication -----------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    yield self_signed_certificate(tmp_path)


async def test_starttls_with_a_private_ca_and_auth(
    make_settings: SettingsFactory,
    certificate: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="src")
    cert, key = certificate
    password = "correct smtp password"
    server = MailServer(
        tls=server_tls_context(cert, key), require_starttls=True, users={"courier": password}
    )
    await server.start()
    try:
        settings = mail_settings(
            make_settings, server, SMTP_SECURITY="starttls", SMTP_CA_FILE=cert,
            SMTP_USERNAME="courier", SMTP_PASSWORD=password,
        )  # fmt: skip
        sealer = load_sealer(settings)
        async with database(settings) as sessionmaker:
            item = await record(
                sessionmaker, settings, sealer, EventType.VERIFICATION_REQUESTED, "tls@example.com"
            )
            notification = Notification.from_outbox(await outbox_row(sessionmaker, item.event_id))
            assert (
                await Courier(settings, sessionmaker, sealer).deliver(notification) is Status.SENT
            )
            assert await check_smtp(settings, 5.0) > 0

            # A wrong password, or a server nobody vouches for: temporary (the operator can fix
            # either), never the password in what is stored or logged.
            wrong = mail_settings(
                make_settings, server, SMTP_SECURITY="starttls", SMTP_CA_FILE=cert,
                SMTP_USERNAME="courier", SMTP_PASSWORD="wrong smtp password",
                ENCRYPTION_KEY=settings.ENCRYPTION_KEY,
            )  # fmt: skip
            unknown_ca = mail_settings(
                make_settings, server, SMTP_SECURITY="starttls", SMTP_USERNAME="courier",
                SMTP_PASSWORD=password, ENCRYPTION_KEY=settings.ENCRYPTION_KEY,
            )  # fmt: skip
            denied = await Courier(wrong, sessionmaker, sealer).attempt(notification, 0)
            untrusted = await Courier(unknown_ca, sessionmaker, sealer).attempt(notification, 0)

            # The health check logs in too: wrong credentials are unhealthy, not "answered".
            with pytest.raises(MailDeliveryError) as check_failed:
                await check_smtp(wrong, 5.0)
            async with running_app(wrong) as (_, client):
                health = await client.get("/api/v1/health/mail", headers=OPERATOR)
    finally:
        await server.stop()

    (mail,) = server.received
    assert mail.tls and mail.login == "courier"
    assert item.url in mail.part("plain")
    assert denied.status is Status.PENDING and "authentication failed" in (denied.error or "")
    assert "authentication failed: 535" in str(check_failed.value)
    assert health.status_code == 503, health.text
    assert "authentication failed" in health.json()["error"]
    for shown in (str(check_failed.value), check_failed.value.reason, health.text):
        assert "wrong smtp password" not in shown and password not in shown
    assert untrusted.status is Status.PENDING and "certificate" in (untrusted.error or "").lower()
    assert len(server.received) == 1
    log = our_log(caplog)
    assert password not in log and "wrong smtp password" not in log
    assert_no_secrets(log, item)


async def test_implicit_tls(make_settings: SettingsFactory, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server = MailServer(tls=server_tls_context(cert, key), implicit_tls=True)
    await server.start()
    try:
        settings = mail_settings(make_settings, server, SMTP_SECURITY="tls", SMTP_CA_FILE=cert)
        sealer = load_sealer(settings)
        async with database(settings) as sessionmaker:
            item = await record(
                sessionmaker, settings, sealer, EventType.NEW_SIGN_IN, "implicit@example.com"
            )
            notification = Notification.from_outbox(await outbox_row(sessionmaker, item.event_id))
            assert (
                await Courier(settings, sessionmaker, sealer).deliver(notification) is Status.SENT
            )
    finally:
        await server.stop()
    (mail,) = server.received
    assert mail.tls


async def test_starttls_is_required_when_configured(
    make_settings: SettingsFactory, smtp: MailServer
) -> None:
    # A server (or someone in between) that offers no STARTTLS gets no mail in plain text.
    settings = mail_settings(make_settings, smtp, SMTP_SECURITY="starttls")
    sealer = load_sealer(settings)
    async with database(settings) as sessionmaker:
        item = await record(sessionmaker, settings, sealer, EventType.NEW_SIGN_IN, "a@example.com")
        notification = Notification.from_outbox(await outbox_row(sessionmaker, item.event_id))
        outcome = await Courier(settings, sessionmaker, sealer).attempt(notification, 0)
    assert outcome.status is Status.PENDING and "STARTTLS" in (outcome.error or "")
    assert smtp.received == []


# --- health ---------------------------------------------------------------------------------------


async def test_health_talks_to_the_server_and_shows_the_courier_to_operators(
    make_settings: SettingsFactory, smtp: MailServer
) -> None:
    settings = mail_settings(make_settings, smtp)
    async with running_app(settings) as (_, client):
        detailed = (await client.get("/api/v1/health/mail", headers=OPERATOR)).json()
        anonymous = (await client.get("/api/v1/health/mail")).json()
        report = (await client.get("/api/v1/health", headers=OPERATOR)).json()
    assert detailed["status"] == "healthy" and detailed["latency_ms"] >= 0
    assert set(detailed["details"]["courier"]) >= {
        "sent_total", "failed_total", "skipped_total", "pending_retry", "pending_retries",
        "last_error", "last_error_at", "last_sent_at",
    }  # fmt: skip
    assert anonymous == {"status": "healthy"}
    assert report["checks"]["mail"]["status"] == "healthy" and report["status"] == "healthy"
    # One conversation answered all three requests (health is public: no SMTP amplification).
    assert smtp.connections == 1 and smtp.received == []

    await smtp.stop()
    async with running_app(settings) as (_, client):
        down = await client.get("/api/v1/health/mail", headers=OPERATOR)
        report = (await client.get("/api/v1/health")).json()
    assert down.status_code == 503 and down.json()["error"]
    assert report["status"] == "degraded" and report["checks"]["mail"] == {"status": "unhealthy"}

    async with running_app(mail_settings(make_settings, smtp, SMTP_HOST=None)) as (_, client):
        disabled = await client.get("/api/v1/health/mail", headers=OPERATOR)
    assert disabled.status_code == 200 and disabled.json() == {"status": "disabled"}


# --- the standalone process -----------------------------------------------------------------------


def _process_env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "SMTP_", "MAIL_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        ENVIRONMENT="test",
        DATA_DIR=str(tmp_path / "data"),
        DATABASE_URL=settings.DATABASE_URL,
        KAFKA_ENABLED="false",
        KAFKA_NOTIFICATIONS_TOPIC=settings.KAFKA_NOTIFICATIONS_TOPIC,
        ENCRYPTION_KEY=settings.ENCRYPTION_KEY.get_secret_value()
        if settings.ENCRYPTION_KEY
        else "",
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=str(settings.SMTP_PORT),
        SMTP_SECURITY="none",
        MAIL_FROM=settings.MAIL_FROM,
        OUTBOX_POLL_INTERVAL="0.1",
        LOG_LEVEL="INFO",
    )
    return env


async def _python(
    *args: str, env: dict[str, str] | None = None, cwd: Path
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "src.mail", *args,
        env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


async def test_the_command_explains_itself(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = await _python("--help", env=env, cwd=tmp_path)
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, output
    assert b"SMTP_HOST" in output and b"--check" in output


async def test_the_command_checks_the_server(
    make_settings: SettingsFactory, smtp: MailServer, tmp_path: Path
) -> None:
    env = _process_env(mail_settings(make_settings, smtp), tmp_path)
    process = await _python("--check", env=env, cwd=tmp_path)
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, output
    assert b"answered" in output
    await smtp.stop()
    process = await _python("--check", env=env, cwd=tmp_path)
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1, output


async def test_the_command_mails_from_the_outbox_and_stops_on_sigterm(
    make_settings: SettingsFactory, smtp: MailServer, tmp_path: Path
) -> None:
    settings = mail_settings(make_settings, smtp)
    sealer = load_sealer(settings)
    async with database(settings) as sessionmaker:
        item = await record(
            sessionmaker, settings, sealer, EventType.VERIFICATION_REQUESTED, "cli@example.com"
        )
        process = await _python(env=_process_env(settings, tmp_path), cwd=tmp_path)
        try:
            await eventually(lambda: smtp.to("cli@example.com"), timeout=60)
            await wait_finished(sessionmaker, item.event_id)
            process.send_signal(signal.SIGTERM)
            output, _ = await asyncio.wait_for(process.communicate(), 30)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert process.returncode == 0, output
    assert b"mail sent: event=" in output and b"mail courier stopped" in output
    assert item.token.encode() not in output


# --- through the service --------------------------------------------------------------------------


async def test_a_newcomer_gets_the_verification_mail_and_its_link_works(
    make_settings: SettingsFactory, smtp: MailServer
) -> None:
    """Registration to a working link, with the courier inside the API process (as ``make run``
    runs it) reading the outbox."""
    settings = mail_settings(make_settings, smtp, LOGIN_RATE_LIMIT_PER_IP=1000)
    async with running_app(settings) as (app, client):
        email = f"newcomer-{uuid.uuid4().hex[:8]}@example.com"
        # Anyone may register with somebody else's address, under any name: the mail to that
        # address must not carry the name.
        registered = await client.post(
            "/api/v1/auth/register",
            json={"email": email, "password": "a long enough secret", "full_name": PHISHING_NAME},
        )
        assert registered.status_code == 201, registered.text
        [mail] = await eventually(lambda: smtp.to(email), timeout=20)
        text = mail.part("plain")
        for shown in (text, mail.part("html"), *map(str, mail.message.values())):
            assert "URGENT" not in shown and "evil.example" not in shown
        match = re.search(r"https://app\.example\.com/account/verify-email\?token=([\w-]+)", text)
        assert match, text
        confirmed = await client.post(
            "/api/v1/auth/verify-email/confirm", json={"token": match.group(1)}
        )
        assert confirmed.status_code == 200 and confirmed.json()["email_verified"] is True
        # Delivered: the outbox no longer holds the sealed link.
        async with app_services(app).sessionmaker() as db:
            query = select(OutboxEvent).where(OutboxEvent.type == "user.verification_requested")
            rows = (await db.execute(query)).scalars().all()
        mine = [row for row in rows if row.payload.get("email") == email]
        assert mine and all(row.sealed is None and row.published_at for row in mine)


async def test_expired_links_are_purged_from_the_outbox(
    make_settings: SettingsFactory,
) -> None:
    """With nobody to deliver them (no Kafka, no mail), sealed links still do not outlive their
    expiry: the outbox's housekeeping forgets them."""
    settings = make_settings(KAFKA_ENABLED=False, ENCRYPTION_KEY=new_key())
    sealer = load_sealer(settings)
    async with database(settings) as sessionmaker:
        expired = await record(
            sessionmaker, settings, sealer, EventType.PASSWORD_RESET_REQUESTED, "a@example.com",
            expires_at=utcnow() - timedelta(seconds=1),
        )  # fmt: skip
        alive = await record(
            sessionmaker, settings, sealer, EventType.PASSWORD_RESET_REQUESTED, "b@example.com",
        )  # fmt: skip
        await prune_outbox(sessionmaker, settings)
        assert (await outbox_row(sessionmaker, expired.event_id)).sealed is None
        assert (await outbox_row(sessionmaker, alive.event_id)).sealed is not None
