"""The live feed: PostgreSQL announces every ticket event (a trigger on ``ticket_events``) and
every new outbox row (a trigger on ``alarm_outbox``); one listening connection per hotline
instance hands them out: outbox wake-ups to the worker that takes the outbox, ticket events
(with the ticket's current summary, read once per event) to every open console.

Because the announcement comes from the database, a change made through any instance, or
by ingest, reaches the consoles of every instance. A console that cannot keep up loses its
place (its queue is bounded) and is told to reload, rather than slowing the others.

The listening loop never waits on the database: it hands ticket events to a publisher task,
which reads the summaries of everything that arrived meanwhile in one query and sends the
events in their order. A burst of events (an outbox batch commits hundreds at once) costs one
summary query, not one per event, and never delays the outbox wake-ups.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import psycopg

from gasguard.backoff import Backoff

log = logging.getLogger(__name__)

TICKET_CHANNEL = "gasguard_ticket_events"
OUTBOX_CHANNEL = "gasguard_outbox"
RESYNC: dict[str, Any] = {"resync": True}


class Subscription:
    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(size)
        self.overflowed = False

    def offer(self, message: dict[str, Any]) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.overflowed = True  # the client reloads the queue when it sees RESYNC
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
            self.queue.put_nowait(RESYNC)


class Feed:
    def __init__(
        self,
        dsn: str,
        describe: Callable[[list[int]], Awaitable[dict[int, dict[str, Any]]]],
        outbox_wake: asyncio.Event | None = None,
        queue_size: int = 1000,
    ) -> None:
        self._dsn = dsn
        self._describe = describe  # ticket ids -> their summaries
        self._pending: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()
        self._outbox_wake = outbox_wake
        self._queue_size = queue_size
        self._subscribers: set[Subscription] = set()
        self.listening = asyncio.Event()
        self.events = 0
        self.errors = 0  # announcements or summaries that could not be handled

    def subscribe(self) -> Subscription:
        sub = Subscription(self._queue_size)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def run(self) -> None:
        """Listen and publish until cancelled; should either stop, so does this (raising what
        stopped it), for the supervisor to start the feed again."""
        parts = {asyncio.create_task(self._listen(), name="live-feed-listener"),
                 asyncio.create_task(self._publish(), name="live-feed-publisher")}  # fmt: skip
        try:
            done, _ = await asyncio.wait(parts, return_when=asyncio.FIRST_COMPLETED)
            for part in done:
                part.result()
            raise RuntimeError("live feed stopped")
        finally:
            self.listening.clear()
            for part in parts:
                part.cancel()
            await asyncio.gather(*parts, return_exceptions=True)

    async def _listen(self) -> None:
        backoff = Backoff(base=0.2, cap=10.0)
        failing = False
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {TICKET_CHANNEL}")
                    await conn.execute(f"LISTEN {OUTBOX_CHANNEL}")
                    if failing:
                        log.info("live feed: listening again")
                        failing = False
                        self._broadcast(RESYNC)  # events may have been missed meanwhile
                    backoff.reset()
                    self.listening.set()
                    if self._outbox_wake is not None:
                        self._outbox_wake.set()
                    async for note in conn.notifies():
                        try:
                            self._handle(note.channel, note.payload)
                        except Exception as exc:  # one odd announcement: count it, go on
                            self._event_failed(f"announcement {note.payload[:200]!r}", exc)
            except psycopg.OperationalError as exc:
                self.listening.clear()
                if not failing:
                    log.error("live feed: database connection lost: %s", exc)
                    failing = True
                await asyncio.sleep(backoff.next())

    def _handle(self, channel: str, payload: str) -> None:
        if channel == OUTBOX_CHANNEL:
            if self._outbox_wake is not None:
                self._outbox_wake.set()
            return
        self.events += 1
        if self._subscribers:
            event = orjson.loads(payload)
            _ticket_id(event)  # a malformed announcement stops here, not in the publisher
            self._pending.append(event)
            self._arrived.set()

    async def _publish(self) -> None:
        backoff = Backoff(base=0.2, cap=10.0)
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            events, self._pending = self._pending, []
            try:
                tickets = await self._describe(sorted({_ticket_id(e) for e in events}))
            except psycopg.OperationalError as exc:
                log.error("live feed: cannot read ticket summaries: %s", exc)
                self._broadcast(RESYNC)  # the consoles reload once the database is back
                await asyncio.sleep(backoff.next())
                continue
            except Exception as exc:  # a bug on these events: the consoles reload, we go on
                self._event_failed(f"{len(events)} event(s) from id {events[0].get('id')}", exc)
                self._broadcast(RESYNC)
                continue
            backoff.reset()
            for event in events:
                self._broadcast({"event": event, "ticket": tickets.get(_ticket_id(event))})

    def _event_failed(self, what: str, exc: Exception) -> None:
        self.errors += 1
        log.error("live feed: %s could not be handled (%d so far): %s: %s", what, self.errors,
                  type(exc).__name__, exc, exc_info=self.errors == 1)  # fmt: skip

    def _broadcast(self, message: dict[str, Any]) -> None:
        for sub in list(self._subscribers):
            sub.offer(message)


def _ticket_id(event: Any) -> int:
    if not isinstance(event, dict):
        raise TypeError(f"a ticket event is a JSON object, got {type(event).__name__}")
    return int(event["ticket"])
