"""The mail courier: turns notification events into mail, once per event as far as the database
can tell, without letting one mail that keeps failing hold up the others.

Where notifications come from:

- ``KAFKA_ENABLED``: the notifications topic, in its own consumer group
  (``MAIL_COURIER_GROUP_ID``), from the earliest offset when the group has none (a courier that
  starts at "latest" silently drops every mail asked for before its first start). The offset of a
  record is committed only after the record is handled: sent, failed for good, skipped, or handed
  over to the retry loop.
- otherwise: the outbox table itself, oldest first. A handled row is marked published and its
  sealed link is cleared (nothing keeps a usable link in the outbox once it has been handled).

Every notification gets **one attempt** when it arrives. If that fails for now (the server is
down, or answers 4xx: greylisting, a full mailbox, a recipient domain it cannot reach yet), the
mail is not retried in place, where every later mail would wait behind it: it becomes a
``pending`` row in ``mail_deliveries`` holding all a retry needs without the source record (type,
user id, the ``data`` the templates read, and the one-time link *still sealed*, bound to the event
id, never opened) and when to try again (``next_attempt_at``, backoff
``MAIL_RETRY_BACKOFF_INITIAL`` doubling up to ``MAIL_RETRY_BACKOFF_MAX``, never later than the
link expires). The source record is then done with (offset committed, outbox row closed) and the
next notification gets its turn.

A **retry loop** in the same courier (a second task of ``run()``, cancelled with it) takes the due
pending rows of this courier's notifications topic, the one due longest first, and makes one
attempt at each: sent, failed, skipped, or pending again with a later ``next_attempt_at``, until
``MAIL_MAX_ATTEMPTS``. On PostgreSQL the row stays locked (``FOR UPDATE SKIP LOCKED``) while its
attempt runs, so two couriers never mail the same row; SQLite has a single writer, and a row is
claimed there by moving its ``next_attempt_at`` past the attempt instead of holding a
transaction. A permanent failure (5xx, a template that cannot render) fails at once, first attempt
or retry alike; a link that expired is skipped.

Every event id gets one row in ``mail_deliveries``. A finished row (sent, failed, skipped) means
"never again": a redelivered record, a second courier or a restart find it and send nothing, and
its sealed link and data are cleared. A pending row is mailed by the retry loop only: a source
record for an event that already has a row (any row) is not attempted again. The row is written
after the SMTP server accepted the mail, so a crash between the two sends it once more on restart
(at least once, never silently lost).

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
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from src.config.settings import Settings
from src.db.models import MailDelivery, OutboxEvent
from src.db.types import utcnow
from src.events.audit import close_consumer
from src.events.envelope import CloudEvent
from src.events.outbox import open_secret
from src.mail.messages import (
    LINK_EVENTS,
    MAIL_FIELDS,
    Unmailable,
    build_message,
    parse_time,
    sender_address,
)
from src.mail.sender import CONVERSATION_TIMEOUTS, MailDeliveryError, SmtpSender
from src.security.sealing import Sealer
from src.services.kafka.manager import KafkaManager
from src.services.kafka.serializers import KafkaSerializationError, KafkaSerializer

logger = logging.getLogger(__name__)

T = TypeVar("T")

_ERROR_LIMIT = 1000
_TYPE_LIMIT = 64  # mail_deliveries.type
_REDACTED = "[redacted]"
# aiokafka's own max_poll_interval_ms: never ask for less.
_KAFKA_MAX_POLL_INTERVAL_MS = 300_000


class Status(StrEnum):
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"
    # Failed for now, waiting in mail_deliveries for the retry loop: the only status that is not
    # final.
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

    @classmethod
    def from_delivery(cls, row: MailDelivery) -> Notification:
        """From a pending row of ``mail_deliveries``: what its first attempt kept for retries."""
        data = row.data if isinstance(row.data, dict) else {}
        return cls(row.event_id, row.type, row.user_id, dict(data), row.sealed)


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt: a final status, or ``pending`` with the attempts so far."""

    status: Status
    attempts: int
    error: str | None = None


def backoff(settings: Settings, attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt."""
    exponent = min(max(attempts - 1, 0), 64)  # 2**64 seconds is past any maximum
    return float(
        min(settings.MAIL_RETRY_BACKOFF_INITIAL * 2**exponent, settings.MAIL_RETRY_BACKOFF_MAX)
    )


def next_attempt_at(settings: Settings, notification: Notification, attempts: int) -> datetime:
    """When to try a mail again after its ``attempts``-th failure: after the backoff, or when its
    link expires if that comes first (the retry then skips it and forgets the sealed link)."""
    due = utcnow() + timedelta(seconds=backoff(settings, attempts))
    if notification.type in LINK_EVENTS:
        deadline = parse_time(notification.data.get("expires_at"))
        if deadline is not None and deadline < due:
            return deadline
    return due


def max_poll_interval_ms(settings: Settings) -> int:
    """How long one record may take before Kafka gives its partition to another consumer: one
    attempt (retries happen out of line) and some time for the database, and never less than
    aiokafka's own default."""
    seconds = settings.SMTP_TIMEOUT * CONVERSATION_TIMEOUTS + 60
    return min(max(int(seconds * 1000), _KAFKA_MAX_POLL_INTERVAL_MS), 2**31 - 1)


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` without any of ``secrets`` (longest first: a URL holds its token), cut short."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, _REDACTED)
    return text[:_ERROR_LIMIT]


def _iso(timestamp: float | None) -> str | None:
    return datetime.fromtimestamp(timestamp, UTC).isoformat() if timestamp is not None else None


def _is_postgresql(db: AsyncSession) -> bool:
    return db.get_bind().dialect.name == "postgresql"


# --- mail_deliveries ------------------------------------------------------------------------------


async def _load(db: AsyncSession, event_id: uuid.UUID) -> Status | None:
    """The status of the event's row, ``None`` when it has none."""
    status = (
        await db.execute(select(MailDelivery.status).where(MailDelivery.event_id == event_id))
    ).scalar()
    if status is None:
        return None
    try:
        return Status(status)
    except ValueError:
        return Status.FAILED  # written by something else: do not mail it again


async def _save(
    db: AsyncSession, settings: Settings, notification: Notification, outcome: Outcome
) -> None:
    """Insert or update the event's row; a finished row is never changed again.

    A pending row keeps what a retry needs (the data the templates read, the link still sealed)
    and when to try again; a finished one keeps only the outcome.
    """
    now = utcnow()
    pending = outcome.status is Status.PENDING
    insert = pg_insert if _is_postgresql(db) else sqlite_insert
    statement = insert(MailDelivery).values(
        event_id=notification.event_id,
        topic=settings.KAFKA_NOTIFICATIONS_TOPIC,
        type=notification.type[:_TYPE_LIMIT],
        user_id=notification.user_id,
        status=outcome.status.value,
        attempts=outcome.attempts,
        last_error=outcome.error,
        created_at=now,
        finished_at=None if pending else now,
        next_attempt_at=next_attempt_at(settings, notification, outcome.attempts)
        if pending
        else None,
        data={k: v for k, v in notification.data.items() if k in MAIL_FIELDS} if pending else None,
        sealed=notification.sealed if pending else None,
    )
    statement = statement.on_conflict_do_update(
        index_elements=[MailDelivery.event_id],
        set_={
            name: getattr(statement.excluded, name)
            for name in (
                "status",
                "attempts",
                "last_error",
                "finished_at",
                "next_attempt_at",
                "data",
                "sealed",
            )
        },
        where=MailDelivery.status == Status.PENDING.value,
    )
    await db.execute(statement)


def _due(settings: Settings) -> ColumnElement[bool]:
    """The pending rows of this courier's topic."""
    return (MailDelivery.status == Status.PENDING.value) & (
        MailDelivery.topic == settings.KAFKA_NOTIFICATIONS_TOPIC
    )


async def _pending_summary(db: AsyncSession, settings: Settings) -> tuple[int, datetime | None]:
    """(number of pending rows of this courier's topic, when the first of them is due)."""
    count, first = (
        await db.execute(
            select(func.count(), func.min(MailDelivery.next_attempt_at)).where(_due(settings))
        )
    ).one()
    if isinstance(first, str):  # SQLite aggregates lose the column type
        first = datetime.fromisoformat(first)
    if first is not None and first.tzinfo is None:
        first = first.replace(tzinfo=UTC)
    return int(count), first


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
        # The event id of the latest mail that failed for now, until it is finished.
        self.pending_retry: str | None = None
        # How many mails of this topic wait for a retry (as of the retry loop's latest look).
        self.pending_total = 0
        # Set when a first attempt leaves a pending row: the retry loop looks again at once.
        self._retry_signal = asyncio.Event()
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
            "pending_retries": self.pending_total,
            "pending_retry": self.pending_retry,
            "last_error": self.last_error,
            "last_error_at": _iso(self.last_error_at),
            "last_sent_at": _iso(self.last_sent_at),
            "last_skip_reason": self.last_skip_reason,
        }

    # --- the loops ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Mail notifications until cancelled (cancellation finishes in bounded time): the first
        attempts, from Kafka or the outbox, and the retries, from ``mail_deliveries``, side by
        side."""
        if not self.settings.mail_enabled:
            logger.info("mail courier: SMTP_HOST is not set; no mail is sent, notifications wait")
            return
        arrivals = self._run_kafka() if self.settings.KAFKA_ENABLED else self._run_outbox()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(arrivals, name="mail-courier-arrivals")
            tasks.create_task(self._run_retries(), name="mail-courier-retries")

    # --- one notification, whichever way it came ---------------------------------------------
    async def deliver(self, notification: Notification) -> Status:
        """The first attempt at a notification that just arrived: sent, failed, skipped, or
        pending (left to the retry loop). One that already has a row (finished, or pending
        already) is not attempted again; its status is returned."""
        previous = await self._persist(_load, notification.event_id)
        if previous is not None:
            self._duplicate(notification, previous)
            return previous
        outcome = await self.attempt(notification, 0)
        await self._persist(_save, self.settings, notification, outcome)
        self._account(notification, outcome)
        return outcome.status

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
            self._retry_signal.set()
            logger.debug(
                "mail pending: event=%s type=%s user=%s attempts=%d reason=%s; retried later",
                notification.event_id,
                notification.type,
                notification.user_id,
                outcome.attempts,
                outcome.error,
            )
            return
        if self.pending_retry == str(notification.event_id):
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
            "mail duplicate: event=%s type=%s user=%s already %s; not attempted again here",
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

    async def _until(self, deadline: float) -> None:
        """Sleep until the loop's clock reads ``deadline``, or a new pending row wakes us."""
        timeout = deadline - asyncio.get_running_loop().time()
        if timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retry_signal.wait(), timeout)
        self._retry_signal.clear()

    # --- retries ------------------------------------------------------------------------------
    async def _run_retries(self) -> None:
        """Retry due pending mail, one at a time; between them, sleep until the next one is due
        (looking again at least every ``OUTBOX_POLL_INTERVAL``, for rows of other couriers)."""
        settings = self.settings
        delay = settings.RECONNECT_BACKOFF_INITIAL
        while True:
            try:
                handled = await self.retry_next()
                wait = 0.0 if handled else await self._seconds_until_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the courier must outlive any one failure
                self._database_failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, settings.RECONNECT_BACKOFF_MAX)
                continue
            self._database_recovered()
            delay = settings.RECONNECT_BACKOFF_INITIAL
            if wait > 0:
                await self._until(asyncio.get_running_loop().time() + wait)

    async def _seconds_until_due(self) -> float:
        """How long the retry loop may sleep: until the first pending row is due, at most the
        poll interval. A row due already was taken by another courier (it is locked, or its
        claim moved): look again after the poll interval."""
        poll = self.settings.OUTBOX_POLL_INTERVAL
        async with self.sessionmaker() as db:
            self.pending_total, first = await _pending_summary(db, self.settings)
        if first is None:
            return poll
        seconds = (first - utcnow()).total_seconds()
        return poll if seconds <= 0 else min(seconds, poll)

    async def retry_next(self) -> bool:
        """One attempt at the pending mail of this topic that is due longest; ``False`` when none
        is due (or every due one is being tried by another courier)."""
        async with self.sessionmaker() as db:
            row = await self._claim_due(db)
            if row is None:
                await db.rollback()
                return False
            notification = Notification.from_delivery(row)
            outcome = await self.attempt(notification, row.attempts)
            await _save(db, self.settings, notification, outcome)
            await db.commit()
        self._account(notification, outcome)
        return True

    async def _claim_due(self, db: AsyncSession) -> MailDelivery | None:
        """The due pending row to try now, made this courier's alone.

        PostgreSQL: locked (``FOR UPDATE SKIP LOCKED``) until the caller commits, so another
        courier skips it while its attempt runs. SQLite (a single writer; no transaction is held
        while the SMTP server is talked to): claimed by moving its ``next_attempt_at`` past the
        longest an attempt may take, only if nobody moved it first; a courier that dies during
        the attempt leaves it due again after that.
        """
        now = utcnow()
        query = (
            select(MailDelivery)
            .where(_due(self.settings), MailDelivery.next_attempt_at <= now)
            .order_by(MailDelivery.next_attempt_at, MailDelivery.created_at)
            .limit(1)
        )
        if _is_postgresql(db):
            row: MailDelivery | None = (
                (await db.execute(query.with_for_update(skip_locked=True))).scalars().first()
            )
            return row
        row = (await db.execute(query)).scalars().first()
        if row is None:
            return None
        attempt_time = self.settings.SMTP_TIMEOUT * CONVERSATION_TIMEOUTS + 60
        claimed = await db.execute(
            update(MailDelivery)
            .where(
                MailDelivery.event_id == row.event_id,
                MailDelivery.status == Status.PENDING.value,
                MailDelivery.next_attempt_at <= now,
            )
            .values(next_attempt_at=now + timedelta(seconds=attempt_time)),
            execution_options={"synchronize_session": False},
        )
        if getattr(claimed, "rowcount", 0) != 1:
            return None
        await db.commit()
        return row

    # --- Kafka mode ---------------------------------------------------------------------------
    async def _run_kafka(self) -> None:
        """Read the notifications topic, reconnecting with backoff.

        The consumer overrides two of the specification's consumer settings (the defaults of
        ``KafkaManager.create_consumer``): ``auto_offset_reset="earliest"`` whatever
        ``KAFKA_AUTO_OFFSET_RESET`` says, because a new group starting at "latest" drops every
        mail asked for before the courier's first start; and ``enable_auto_commit=False``
        whatever ``KAFKA_ENABLE_AUTO_COMMIT`` says, because auto-commit commits fetched records
        on a timer, and a crash before one is handled would lose that mail. Each record's offset
        is committed once it is handled.
        """
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
            # One record at a time, each committed once handled: a record takes one attempt at
            # most, and everything fetched but not handled would only wait.
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
        """Make the first attempt at the oldest waiting notification in the outbox and close its
        row (a temporary failure leaves a pending row for the retry loop); ``False`` when none
        waits. A notification that already has a delivery row is closed without an attempt.

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
            if previous is not None:
                await _mark_delivered(db, row.position)
                await db.commit()
                self._duplicate(notification, previous)
                return True
            if not _is_postgresql(db):
                await db.commit()
            outcome = await self.attempt(notification, 0)
            await _save(db, self.settings, notification, outcome)
            await _mark_delivered(db, row.position)
            await db.commit()
        self._account(notification, outcome)
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
        if _is_postgresql(db):
            query = query.with_for_update(skip_locked=True)
        return (await db.execute(query)).scalars().first()
