"""The mail courier: turns notification events into mail, once per event as far as the database
can tell.

Where notifications come from:

- ``KAFKA_ENABLED``: the notifications topic, in its own consumer group
  (``MAIL_COURIER_GROUP_ID``), from the earliest offset when the group has none (a courier that
  starts at "latest" silently drops every mail asked for before its first start). The offset of a
  record is committed only after the record is handled: sent, failed for good, or skipped.
- otherwise: the outbox table itself, oldest first. A handled row is marked published and its
  sealed link is cleared (nothing keeps a usable link once it has been mailed).

Every event id gets one row in ``mail_deliveries``. A finished row (sent, failed, skipped) means
"never again": a redelivered record, a second courier or a restart find it and send nothing. The
row is written after the SMTP server accepted the mail, so a crash between the two sends it once
more on restart (at least once, never silently lost).

A temporary failure (server down, 4xx) retries the same mail with exponential backoff
(``MAIL_RETRY_BACKOFF_INITIAL`` doubling up to ``MAIL_RETRY_BACKOFF_MAX``; status ``pending``
meanwhile) and gives up after ``MAIL_MAX_ATTEMPTS``; a permanent one (5xx) fails at once. Either
way the courier moves on: one bad mail never blocks the others for longer than its retries.

Secrets: the one-time link travels sealed and is opened here, just before rendering. Logs, stored
errors and health details never hold the link, its token, the sealed value or the SMTP password;
an error text that quotes them (a server echoing the mail) is redacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from src.config.settings import Settings
from src.db.models import MailDelivery, OutboxEvent
from src.db.types import utcnow
from src.events.audit import close_consumer
from src.events.envelope import CloudEvent
from src.events.outbox import open_secret
from src.mail.messages import LINK_EVENTS, Unmailable, build_message, parse_time, sender_address
from src.mail.sender import CONVERSATION_TIMEOUTS, MailDeliveryError, SmtpSender
from src.security.sealing import Sealer
from src.services.kafka.manager import KafkaManager
from src.services.kafka.serializers import KafkaSerializationError, KafkaSerializer

logger = logging.getLogger(__name__)

T = TypeVar("T")

_ERROR_LIMIT = 1000
_TYPE_LIMIT = 64  # mail_deliveries.type
_REDACTED = "[redacted]"


class Status(StrEnum):
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"
    # Being retried after a temporary failure: the only status that is not final.
    PENDING = "pending"


FINISHED = frozenset({Status.SENT, Status.FAILED, Status.SKIPPED})


class MailSender(Protocol):
    """What the courier needs from a sender (``SmtpSender``; tests may pass their own)."""

    async def send(self, message: EmailMessage) -> None: ...


def _uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value)) if value else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Notification:
    """A notification event as the courier sees it, whichever way it came."""

    event_id: uuid.UUID
    type: str
    user_id: uuid.UUID | None
    data: dict[str, Any]
    sealed: str | None

    @classmethod
    def from_event(cls, event: CloudEvent) -> Notification:
        """From a CloudEvent read off Kafka; the relay put the sealed link in ``data.sealed``."""
        data = dict(event.data)
        sealed = data.pop("sealed", None)
        return cls(
            event_id=event.id,
            type=event.type,
            user_id=_uuid(event.subject) or _uuid(data.get("user_id")),
            data=data,
            sealed=sealed if isinstance(sealed, str) else None,
        )

    @classmethod
    def from_outbox(cls, row: OutboxEvent) -> Notification:
        return cls(row.id, row.type, row.aggregate_id, dict(row.payload), row.sealed)


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt: a final status, or ``pending`` with the attempts so far."""

    status: Status
    attempts: int
    error: str | None = None


@dataclass(frozen=True)
class _Previous:
    status: Status
    attempts: int


def backoff(settings: Settings, attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt."""
    exponent = min(max(attempts - 1, 0), 64)  # 2**64 seconds is past any maximum
    return float(
        min(settings.MAIL_RETRY_BACKOFF_INITIAL * 2**exponent, settings.MAIL_RETRY_BACKOFF_MAX)
    )


def max_poll_interval_ms(settings: Settings) -> int:
    """How long one record may take, every retry included, before Kafka gives its partition to
    another consumer (aiokafka's 5 minutes are shorter than a default run of retries)."""
    per_attempt = settings.SMTP_TIMEOUT * CONVERSATION_TIMEOUTS + settings.MAIL_RETRY_BACKOFF_MAX
    seconds = settings.MAIL_MAX_ATTEMPTS * per_attempt + 60  # and some time for the database
    return min(int(seconds * 1000), 2**31 - 1)


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` without any of ``secrets`` (longest first: a URL holds its token), cut short."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, _REDACTED)
    return text[:_ERROR_LIMIT]


def _iso(timestamp: float | None) -> str | None:
    return datetime.fromtimestamp(timestamp, UTC).isoformat() if timestamp is not None else None


# --- mail_deliveries ------------------------------------------------------------------------------


async def _load(db: AsyncSession, event_id: uuid.UUID) -> _Previous | None:
    row = (
        await db.execute(
            select(MailDelivery.status, MailDelivery.attempts).where(
                MailDelivery.event_id == event_id
            )
        )
    ).first()
    if row is None:
        return None
    try:
        status = Status(row.status)
    except ValueError:
        status = Status.FAILED  # written by something else: do not mail it again
    return _Previous(status, row.attempts)


async def _save(db: AsyncSession, notification: Notification, outcome: Outcome) -> None:
    """Insert or update the event's row; a finished row is never changed again."""
    now = utcnow()
    insert = pg_insert if db.get_bind().dialect.name == "postgresql" else sqlite_insert
    statement = insert(MailDelivery).values(
        event_id=notification.event_id,
        type=notification.type[:_TYPE_LIMIT],
        status=outcome.status.value,
        attempts=outcome.attempts,
        last_error=outcome.error,
        created_at=now,
        finished_at=None if outcome.status is Status.PENDING else now,
    )
    statement = statement.on_conflict_do_update(
        index_elements=[MailDelivery.event_id],
        set_={
            "status": statement.excluded.status,
            "attempts": statement.excluded.attempts,
            "last_error": statement.excluded.last_error,
            "finished_at": statement.excluded.finished_at,
        },
        where=MailDelivery.status == Status.PENDING.value,
    )
    await db.execute(statement)


async def _mark_delivered(db: AsyncSession, position: int) -> None:
    """Outbox mode: the row is done, and its link is forgotten."""
    await db.execute(
        update(OutboxEvent)
        .where(OutboxEvent.position == position)
        .values(published_at=utcnow(), sealed=None, sealed_until=None),
        execution_options={"synchronize_session": False},
    )


# --- the courier ----------------------------------------------------------------------------------


class Courier:
    """Mails notifications; ``run()`` until cancelled.

    ``kafka`` returns the running ``KafkaManager`` or ``None`` while Kafka is unavailable (only
    used when ``KAFKA_ENABLED``); ``signal`` wakes the outbox mode at once after a commit that
    recorded events (only used when Kafka is off); ``sender`` defaults to SMTP as configured.
    """

    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        sealer: Sealer,
        kafka: Callable[[], KafkaManager | None] | None = None,
        signal: asyncio.Event | None = None,
        sender: MailSender | None = None,
    ) -> None:
        sender_address(settings)  # a bad MAIL_FROM stops start-up instead of failing every mail
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.sealer = sealer
        self.kafka = kafka
        self.signal = signal or asyncio.Event()
        self.sender: MailSender = sender or SmtpSender(settings)
        self.serializer = KafkaSerializer()
        # For the health report.
        self.sent_total = 0
        self.failed_total = 0
        self.skipped_total = 0
        self.duplicates_total = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_sent_at: float | None = None
        self.last_skip_reason: str | None = None
        # The event id being retried after a temporary failure, if any.
        self.pending_retry: str | None = None
        # What is wrong right now, so an outage is logged once rather than at every retry.
        self._smtp_outage: str | None = None
        self._database_outage: str | None = None
        self._kafka_outage: str | None = None
        if settings.SMTP_USERNAME and settings.SMTP_SECURITY == "none":
            logger.warning(
                "mail courier: SMTP_SECURITY=none sends the SMTP password unencrypted; "
                "use starttls or tls"
            )

    def stats(self) -> dict[str, Any]:
        """Counters and the latest trouble, as plain JSON-ready data (no secrets)."""
        return {
            "source": "kafka" if self.settings.KAFKA_ENABLED else "outbox",
            "sent_total": self.sent_total,
            "failed_total": self.failed_total,
            "skipped_total": self.skipped_total,
            "duplicates_total": self.duplicates_total,
            "pending_retry": self.pending_retry,
            "last_error": self.last_error,
            "last_error_at": _iso(self.last_error_at),
            "last_sent_at": _iso(self.last_sent_at),
            "last_skip_reason": self.last_skip_reason,
        }

    # --- the loop -----------------------------------------------------------------------------
    async def run(self) -> None:
        """Mail notifications until cancelled (cancellation finishes in bounded time)."""
        if not self.settings.mail_enabled:
            logger.info("mail courier: SMTP_HOST is not set; no mail is sent, notifications wait")
            return
        if self.settings.KAFKA_ENABLED:
            await self._run_kafka()
        else:
            await self._run_outbox()

    # --- one notification, whichever way it came ---------------------------------------------
    async def deliver(self, notification: Notification) -> Status:
        """Handle one notification to the end: sent, failed or skipped (or, if an earlier run or
        another courier finished it, nothing). Temporary failures are retried here, in place."""
        previous = await self._persist(_load, notification.event_id)
        if previous is not None and previous.status in FINISHED:
            self._duplicate(notification, previous.status)
            return previous.status
        attempts = previous.attempts if previous else 0
        while True:
            outcome = await self.attempt(notification, attempts)
            await self._persist(_save, notification, outcome)
            self._account(notification, outcome)
            if outcome.status is not Status.PENDING:
                return outcome.status
            attempts = outcome.attempts
            await asyncio.sleep(backoff(self.settings, attempts))

    async def attempt(self, notification: Notification, attempts: int) -> Outcome:
        """Try once to mail ``notification`` (``attempts`` were made before); write nothing."""
        opened = self._open_link(notification)
        if isinstance(opened, str):
            return Outcome(Status.SKIPPED, attempts, opened)
        link, secrets = opened
        try:
            message = build_message(
                self.settings, notification.event_id, notification.type, notification.data, link
            )
        except Unmailable as exc:
            return Outcome(Status.SKIPPED, attempts, str(exc))
        except Exception as exc:  # noqa: BLE001 - a template that fails once fails every time
            logger.debug(
                "mail courier: rendering failed\n%s",
                redact("".join(traceback.format_exception(exc)), secrets),
            )
            return Outcome(Status.FAILED, attempts, f"could not render: {type(exc).__name__}")
        attempts += 1
        try:
            await self.sender.send(message)
        except MailDeliveryError as exc:
            error = redact(exc.reason, secrets)
            if exc.permanent:
                self._smtp_recovered()  # the server answered: it is there
                return Outcome(Status.FAILED, attempts, error)
        except Exception as exc:  # noqa: BLE001 - unexpected: logged, retried like a temporary one
            error = redact(f"{type(exc).__name__}: {exc}", secrets)
            logger.debug(
                "mail courier: unexpected failure\n%s",
                redact("".join(traceback.format_exception(exc)), secrets),
            )
        else:
            self._smtp_recovered()
            return Outcome(Status.SENT, attempts)
        self._smtp_failed(error)
        if attempts >= self.settings.MAIL_MAX_ATTEMPTS:
            return Outcome(Status.FAILED, attempts, f"gave up after {attempts} attempts: {error}")
        return Outcome(Status.PENDING, attempts, error)

    def _open_link(self, notification: Notification) -> str | tuple[str | None, list[str]]:
        """A reason to skip, or (the link to mail, the values that must never be logged)."""
        if notification.type not in LINK_EVENTS:
            return None, []
        deadline = parse_time(notification.data.get("expires_at"))
        if deadline is not None and deadline <= utcnow():
            return "the link expired before it could be mailed"
        if not notification.sealed:
            return "no sealed link (never recorded, or already purged)"
        try:
            secret = open_secret(self.sealer, notification.event_id, notification.sealed)
        except ValueError:  # UnsealError, or not JSON inside
            return "the sealed link does not open (another ENCRYPTION_KEY, or another event's)"
        return secret.get("url"), [notification.sealed, *secret.values()]

    # --- bookkeeping --------------------------------------------------------------------------
    def _account(self, notification: Notification, outcome: Outcome) -> None:
        if outcome.status is Status.PENDING:
            self.pending_retry = str(notification.event_id)
            return
        self.pending_retry = None
        if outcome.status is Status.SENT:
            self.sent_total += 1
            self.last_sent_at = time.time()
        elif outcome.status is Status.FAILED:
            self.failed_total += 1
            self.last_error, self.last_error_at = outcome.error, time.time()
        else:
            self.skipped_total += 1
            self.last_skip_reason = outcome.error
        level = logging.INFO if outcome.status is Status.SENT else logging.WARNING
        logger.log(
            level,
            "mail %s: event=%s type=%s user=%s attempts=%d%s",
            outcome.status.value,
            notification.event_id,
            notification.type,
            notification.user_id,
            outcome.attempts,
            f" reason={outcome.error}" if outcome.error else "",
        )

    def _duplicate(self, notification: Notification, status: Status) -> None:
        self.duplicates_total += 1
        logger.info(
            "mail duplicate: event=%s type=%s user=%s already %s; not sent again",
            notification.event_id,
            notification.type,
            notification.user_id,
            status.value,
        )

    def _smtp_failed(self, error: str) -> None:
        self.last_error, self.last_error_at = error, time.time()
        if self._smtp_outage is None:
            logger.warning("mail courier: sending failed (%s); retrying with backoff", error)
        self._smtp_outage = error

    def _smtp_recovered(self) -> None:
        if self._smtp_outage is not None:
            logger.info("mail courier: sending works again")
            self._smtp_outage = None

    def _database_failed(self, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        error = error[:_ERROR_LIMIT]
        self.last_error, self.last_error_at = f"database: {error}", time.time()
        if self._database_outage is None:
            logger.warning("mail courier: database unavailable (%s); retrying", error)
        self._database_outage = error

    def _database_recovered(self) -> None:
        if self._database_outage is not None:
            logger.info("mail courier: database available again")
            self._database_outage = None

    async def _persist(self, operation: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``operation(db, *args)`` and commit, retrying with backoff while the database is
        down: once a mail is out, forgetting that it was sent would send it again."""
        delay = self.settings.RECONNECT_BACKOFF_INITIAL
        while True:
            try:
                async with self.sessionmaker() as db:
                    result = await operation(db, *args)
                    await db.commit()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried until the database is back
                self._database_failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.RECONNECT_BACKOFF_MAX)
                continue
            self._database_recovered()
            return result

    # --- Kafka mode ---------------------------------------------------------------------------
    async def _run_kafka(self) -> None:
        settings = self.settings
        delay = settings.RECONNECT_BACKOFF_INITIAL
        while True:
            manager = self.kafka() if self.kafka is not None else None
            if manager is None:
                await asyncio.sleep(settings.SUPERVISOR_INTERVAL)
                continue
            consumer = manager.create_consumer(
                settings.KAFKA_NOTIFICATIONS_TOPIC,
                group_id=settings.MAIL_COURIER_GROUP_ID,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_poll_interval_ms=max_poll_interval_ms(settings),
            )
            joined = False
            try:
                # Joining a group takes seconds (rebalance delay): the request timeout bounds it.
                await asyncio.wait_for(consumer.start(), settings.KAFKA_REQUEST_TIMEOUT_MS / 1000)
                joined = True
                delay = settings.RECONNECT_BACKOFF_INITIAL
                self._kafka_recovered()
                await self._consume(consumer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect and carry on
                self._kafka_failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, settings.RECONNECT_BACKOFF_MAX)
            finally:
                await close_consumer(consumer, joined, settings.KAFKA_CONNECT_TIMEOUT * 2)

    async def _consume(self, consumer: Any) -> None:
        while True:
            # One record at a time: its retries may take long, and everything fetched but not
            # handled would only wait (and count against the poll interval).
            batches = await consumer.getmany(timeout_ms=1000, max_records=1)
            for partition, records in batches.items():
                for record in records:
                    await self.handle_record(record)
                    await consumer.commit({partition: record.offset + 1})

    async def handle_record(self, record: Any) -> Status | None:
        """Handle one Kafka record; ``None`` when it is not a readable CloudEvent (skipped, since
        a record nobody can read would otherwise block its partition forever)."""
        try:
            event = self.serializer.deserialize(record.value, CloudEvent)
        except KafkaSerializationError as exc:
            self.skipped_total += 1
            self.last_skip_reason = "unreadable record"
            logger.warning(
                "mail skipped an unreadable record at %s[%s]@%s: %s",
                record.topic,
                record.partition,
                record.offset,
                exc,
            )
            return None
        return await self.deliver(Notification.from_event(event))

    def _kafka_failed(self, exc: BaseException) -> None:
        error = type(exc).__name__
        if self._kafka_outage is None:
            logger.warning("mail courier: Kafka consumer stopped (%s); restarting", error)
        self._kafka_outage = error

    def _kafka_recovered(self) -> None:
        if self._kafka_outage is not None:
            logger.info("mail courier: reading notifications from Kafka again")
            self._kafka_outage = None

    # --- outbox mode --------------------------------------------------------------------------
    async def _run_outbox(self) -> None:
        delay = self.settings.RECONNECT_BACKOFF_INITIAL
        while True:
            try:
                handled = await self.deliver_next()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the courier must outlive any one failure
                self._database_failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.RECONNECT_BACKOFF_MAX)
                continue
            self._database_recovered()
            delay = self.settings.RECONNECT_BACKOFF_INITIAL
            if not handled:
                await self._wait_for_work()

    async def _wait_for_work(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.signal.wait(), self.settings.OUTBOX_POLL_INTERVAL)
        self.signal.clear()

    async def deliver_next(self) -> bool:
        """Make one attempt at the oldest waiting notification in the outbox; ``False`` when none
        waits. After a temporary failure, wait out the backoff before returning.

        On PostgreSQL the row stays locked (``FOR UPDATE SKIP LOCKED``) during the attempt, as the
        relay does while Kafka acknowledges: two couriers never mail the same row at once. SQLite
        has a single writer, so no transaction is held while the SMTP server is talked to.
        """
        async with self.sessionmaker() as db:
            row = await self._claim(db)
            if row is None:
                await db.rollback()
                return False
            notification = Notification.from_outbox(row)
            previous = await _load(db, row.id)
            if previous is not None and previous.status in FINISHED:
                await _mark_delivered(db, row.position)
                await db.commit()
                self._duplicate(notification, previous.status)
                return True
            if db.get_bind().dialect.name != "postgresql":
                await db.commit()
            outcome = await self.attempt(notification, previous.attempts if previous else 0)
            await _save(db, notification, outcome)
            if outcome.status is not Status.PENDING:
                await _mark_delivered(db, row.position)
            await db.commit()
        self._account(notification, outcome)
        if outcome.status is Status.PENDING:
            await asyncio.sleep(backoff(self.settings, outcome.attempts))
        return True

    async def _claim(self, db: AsyncSession) -> OutboxEvent | None:
        query = (
            select(OutboxEvent)
            .where(
                OutboxEvent.topic == self.settings.KAFKA_NOTIFICATIONS_TOPIC,
                OutboxEvent.published_at.is_(None),
            )
            .order_by(OutboxEvent.position)
            .limit(1)
        )
        if db.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        return (await db.execute(query)).scalars().first()
