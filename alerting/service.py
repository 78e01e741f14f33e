"""The hotline's background work, beside the web API: taking the alarm outbox (woken by the
live feed's announcement, polling as a fallback) and the escalation scan. Each holds its own
database connection and reconnects with the one backoff helper."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from alerting.escalation import escalate
from alerting.outbox import Policy, take_outbox
from gasguard.backoff import Backoff

log = logging.getLogger(__name__)


async def _with_connection(
    name: str, dsn: str, body: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]
) -> None:
    """Run ``body`` on a connection, reconnecting (with backoff) whenever the database goes."""
    backoff = Backoff(base=0.2, cap=10.0)
    failing = False
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                if failing:
                    log.info("%s: database reachable again", name)
                    failing = False
                backoff.reset()
                await body(conn)
        except psycopg.OperationalError as exc:
            if not failing:
                log.error("%s: database unavailable: %s", name, exc)
                failing = True
            await asyncio.sleep(backoff.next())


class OutboxWorker:
    def __init__(
        self,
        dsn: str,
        policy: Policy,
        batch: int,
        poll_s: float,
        on_valve_requested: Callable[[], None],
    ) -> None:
        self._dsn = dsn
        self._policy = policy
        self._batch = batch
        self._poll_s = poll_s
        self._on_valve = on_valve_requested
        self.wake = asyncio.Event()
        self.rows = 0
        self.opened = 0
        self.incidents = 0

    async def run(self) -> None:
        await _with_connection("outbox", self._dsn, self._loop)

    async def _loop(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            while True:
                taken = await take_outbox(conn, self._batch, self._policy)
                self.rows += taken.rows
                self.opened += taken.opened
                self.incidents += taken.incidents
                if taken.valve_commands:
                    self._on_valve()
                if taken.rows < self._batch:
                    break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self._poll_s)
            self.wake.clear()


class Escalator:
    def __init__(self, dsn: str, ack_minutes: float, every_s: float) -> None:
        self._dsn = dsn
        self._ack_minutes = ack_minutes
        self._every_s = every_s
        self.escalated = 0

    async def run(self) -> None:
        await _with_connection("escalation", self._dsn, self._loop)

    async def _loop(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            out = await escalate(conn, self._ack_minutes)
            total = out.unacknowledged + out.on_site_breached + out.resolve_breached
            if total:
                log.info("escalated: %s", out)
                self.escalated += total
            await asyncio.sleep(self._every_s)
