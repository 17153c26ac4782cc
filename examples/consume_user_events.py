"""How another service reads the User Management Service's events: a small, complete consumer.

    python examples/consume_user_events.py --bootstrap-servers localhost:9092 --group-id billing

What a consumer of ``user-events`` needs to know:

- Every message is a CloudEvents 1.0 JSON document: ``specversion``, ``id``, ``source``, ``type``
  (``user.registered``, ``user.updated``, ...), ``subject`` (the user id), ``time`` and ``data``
  (the user's public fields; never a password, hash or token). The message key is the user id,
  so one user's events arrive in the order they happened.
- Messages follow the CloudEvents Kafka binding in structured mode: the value is the whole event,
  the ``content-type`` header is ``application/cloudevents+json``, and there are no ``ce_*``
  headers. Plain ``json`` reads them, as here; so does a CloudEvents SDK (in Python,
  ``cloudevents.core.bindings.kafka.from_kafka``).
- Use a consumer group of your own (``--group-id``): each group gets every event once more.
- Delivery is at least once: after a broker failover or a retry the same event can arrive twice.
  Deduplicate by the CloudEvents ``id``. This example remembers the last ``--remember`` ids in
  memory, which absorbs redeliveries that come close together but forgets them on restart. A
  real service should store the id together with the change the event causes, in one database
  transaction, under a unique key (``INSERT ... ON CONFLICT (event_id) DO NOTHING``): then a
  duplicate is harmless however late it comes.
- Offsets are committed only after the events are handled, so a crash means handling some events
  again (see above), never skipping one.
- ``user-notifications`` (verification and password-reset requests) carries one-time tokens and
  is meant for the mail sender only; it is not read here.

Ctrl-C or SIGTERM stops the consumer cleanly: the current batch is finished and committed and
the consumer leaves its group. ``--max-messages`` and ``--max-seconds`` bound a demonstration run.
Only ``aiokafka`` is needed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
from collections import OrderedDict
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord

logger = logging.getLogger("consume_user_events")


class RecentIds:
    """The ``capacity`` most recently seen event ids; the oldest is forgotten first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def first_time(self, event_id: str) -> bool:
        """Remember ``event_id``; True unless it was already among the recent ones."""
        if event_id in self._ids:
            self._ids.move_to_end(event_id)
            return False
        self._ids[event_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True


def handle(record: ConsumerRecord[bytes, bytes], seen: RecentIds) -> bool:
    """Handle one message; return whether it was a new event."""
    try:
        event: dict[str, Any] = json.loads(record.value or b"")
        event_id = str(event["id"])
    except (ValueError, KeyError, TypeError):
        # One unreadable message must not stop the stream: note where it is and move on.
        logger.warning("skipping an unreadable message at offset %s", record.offset)
        return False
    if not seen.first_time(event_id):
        logger.info("duplicate of event %s ignored", event_id)
        return False
    # Your service's work goes here. This example only shows what arrived.
    print(f"{event.get('type')} subject={event.get('subject')} id={event_id}", flush=True)
    return True


async def consume(args: argparse.Namespace, stop: asyncio.Event) -> int:
    """Consume until ``stop`` is set or a bound is reached; return how many new events arrived."""
    consumer = AIOKafkaConsumer(
        args.topic,
        bootstrap_servers=args.bootstrap_servers,
        group_id=args.group_id,
        enable_auto_commit=False,  # commit after handling, not before
        auto_offset_reset=args.offset_reset,
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.max_seconds if args.max_seconds else None
    seen = RecentIds(args.remember)
    handled = 0
    try:
        if not await _started(consumer, stop):
            return handled
        while not stop.is_set():
            if deadline is not None and loop.time() >= deadline:
                break
            if args.max_messages and handled >= args.max_messages:
                break
            batches = await consumer.getmany(timeout_ms=500, max_records=100)
            for partition, records in batches.items():
                handled += sum(handle(record, seen) for record in records)
                await consumer.commit({partition: records[-1].offset + 1})
    finally:
        # Also after a failed start: it still holds connections. Bounded, because stopping in the
        # middle of joining the group waits for the join to finish.
        try:
            await asyncio.wait_for(consumer.stop(), args.stop_timeout)
        except TimeoutError:
            logger.warning("the consumer did not stop within %gs", args.stop_timeout)
    return handled


async def _started(consumer: AIOKafkaConsumer, stop: asyncio.Event) -> bool:
    """Start the consumer, unless asked to stop first: joining a group can take seconds, and a
    Ctrl-C meanwhile should not have to wait for it."""
    starting = asyncio.ensure_future(consumer.start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if starting.done():
        starting.result()  # raises if the broker could not be reached
        return True
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await starting
    return False


async def run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
            loop.add_signal_handler(signum, stop.set)
    handled = await consume(args, stop)
    logger.info("stopped after %d new events", handled)
    return handled


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092"),
        help="comma-separated host:port list (default: $KAFKA_BOOTSTRAP_SERVERS or %(default)s)",
    )
    parser.add_argument("--topic", default="user-events")
    parser.add_argument("--group-id", default="example-user-events-reader")
    parser.add_argument(
        "--offset-reset",
        choices=["earliest", "latest"],
        default="earliest",
        help="where a new group starts (default: %(default)s, i.e. all retained events)",
    )
    parser.add_argument("--remember", type=int, default=10_000, help="event ids kept for dedupe")
    parser.add_argument("--max-messages", type=int, default=0, help="stop after N new events")
    parser.add_argument("--max-seconds", type=float, default=0, help="stop after this long")
    parser.add_argument("--stop-timeout", type=float, default=10, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    main()
