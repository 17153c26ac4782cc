"""``python -m src.mail``: the mail courier as a process of its own.

For deployments that keep SMTP credentials and the sealing key away from the API
(``MAIL_COURIER_IN_PROCESS=false`` there). It has its own database engine and Kafka client, reads
the same settings as the service, and stops cleanly on SIGTERM or Ctrl-C: a mail interrupted
half-way is not recorded, so it is sent again by the next courier (at least once, never lost).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

logger = logging.getLogger("src.mail")

_DESCRIPTION = """\
Mail notifications (email verification, password reset, email change, new sign-in) over SMTP.

With KAFKA_ENABLED (the default) it reads KAFKA_NOTIFICATIONS_TOPIC in the consumer group
MAIL_COURIER_GROUP_ID; with KAFKA_ENABLED=false it reads the outbox table of DATABASE_URL.
Each notification is mailed once (recorded in the mail_deliveries table). A temporary SMTP failure
(server down, a 4xx answer) does not hold up the others: the mail waits in mail_deliveries and is
retried alongside with backoff (MAIL_RETRY_BACKOFF_INITIAL .. MAIL_RETRY_BACKOFF_MAX), at most
MAIL_MAX_ATTEMPTS times; a restarted courier carries on with it.

Settings come from the environment or .env, as for the service: SMTP_HOST (required), SMTP_PORT,
SMTP_SECURITY (starttls, tls, none), SMTP_USERNAME, SMTP_PASSWORD, SMTP_TIMEOUT, SMTP_CA_FILE,
MAIL_FROM, ENCRYPTION_KEY (the key the service seals links with), DATABASE_URL and the KAFKA_*
variables. SIGTERM or Ctrl-C stops it.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.mail",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="connect to the SMTP server (TLS as configured, EHLO, AUTH when SMTP_USERNAME is "
        "set, QUIT; no mail is sent), report, and exit: 0 when all of it worked, 1 otherwise",
    )
    return parser


async def _check() -> int:
    from src.config.settings import load_settings
    from src.mail.sender import check_smtp

    settings = load_settings()
    if not settings.mail_enabled:
        print("SMTP_HOST is not set: mail is disabled", file=sys.stderr)
        return 1
    where = f"{settings.SMTP_HOST}:{settings.SMTP_PORT} ({settings.SMTP_SECURITY})"
    try:
        latency = await check_smtp(settings, settings.SMTP_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - reported, that is the point
        reason = (
            f"timed out after {settings.SMTP_TIMEOUT:g}s" if isinstance(exc, TimeoutError) else exc
        )
        print(f"SMTP server {where} failed the check: {reason}", file=sys.stderr)
        return 1
    login = f", accepted the login of {settings.SMTP_USERNAME}" if settings.SMTP_USERNAME else ""
    print(f"SMTP server {where} answered{login} in {latency:.0f} ms")
    return 0


async def _run() -> int:
    from src.config.logging import configure_logging
    from src.config.settings import load_settings
    from src.db.session import create_engine, create_sessionmaker, migration_status
    from src.mail.courier import Courier
    from src.mail.messages import sender_address
    from src.security.sealing import load_sealer
    from src.services.kafka.manager import KafkaManager

    settings = load_settings()
    configure_logging(
        settings.LOG_LEVEL,
        settings.LOG_REPEAT_INTERVAL_SECONDS,
        settings.LOG_FORMAT,
        production=settings.is_production,
    )
    if not settings.mail_enabled:
        logger.error("SMTP_HOST is not set: there is nothing to send mail with")
        return 2
    # Configuration errors first (they exit with one line each), before anything connects.
    sender_address(settings)
    sealer = load_sealer(settings)
    engine = create_engine(settings)
    # The consumer is built from the manager's settings; no producer is needed.
    manager = KafkaManager(settings) if settings.KAFKA_ENABLED else None
    try:
        try:
            async with asyncio.timeout(settings.DATABASE_CONNECT_TIMEOUT + 1):
                current, head = await migration_status(engine)
        except Exception as exc:  # noqa: BLE001 - reported and exited on, like the service
            logger.error("database unreachable (%s)", str(exc) or type(exc).__name__)
            return 1
        if current != head:
            logger.error("database not migrated; run `alembic upgrade head`")
            return 1
        courier = Courier(settings, create_sessionmaker(engine), sealer, kafka=lambda: manager)
        runner = asyncio.create_task(courier.run(), name="mail-courier")
        # SIGTERM (how process managers stop a service) ends the courier cleanly, like Ctrl-C.
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, runner.cancel)
        logger.info(
            "mail courier started (%s, SMTP %s:%s)",
            "Kafka" if settings.KAFKA_ENABLED else "outbox",
            settings.SMTP_HOST,
            settings.SMTP_PORT,
        )
        try:
            await runner
        except asyncio.CancelledError:
            current_task = asyncio.current_task()
            if current_task is not None and current_task.cancelling():
                raise  # we were cancelled ourselves (Ctrl-C), not just the courier by SIGTERM
        logger.info("mail courier stopped")
        return 0
    finally:
        if manager is not None:
            await manager.stop()
        await engine.dispose()


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    try:
        return asyncio.run(_check() if arguments.check else _run())
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
