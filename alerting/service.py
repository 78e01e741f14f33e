"""The hotline's background work, beside the web API: taking the alarm outbox (woken by the
live feed's announcement, polling as a fallback) and the escalation scan. Each holds its own
database connection and reconnects with the one backoff helper.

Every background task runs under a :class:`Supervisor`: a task that stops (a bug, not a row:
rows have their own error boundaries) is logged, counted and started again with backoff, and
``/health`` names it while it is down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import psycopg

from alerting.escalation import escalate
from alerting.outbox import Policy, take_outbox
from gasguard.backoff import Backoff

log = logging.getLogger(__name__)
HEALTHY_AFTER_S = 30.0  # a task that ran this long before it stopped starts again at once


@dataclass
class Supervisor:
    """Keeps the hotline's background tasks running: each is started from its factory, and
    started again (after a backoff that doubles up to ``cap``) whenever it stops."""

    base: float = 0.5
    cap: float = 30.0
    down: dict[str, str] = field(default_factory=dict)  # task -> why, while it is down
    restarts: dict[str, int] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic

    async def keep(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``factory()`` until cancelled, starting it again whenever it stops."""
        backoff = Backoff(base=self.base, cap=self.cap)
        self.restarts.setdefault(name, 0)
        while True:
            started = self.clock()
            try:
                await factory()
                why = "returned"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in the task: it must not stop the hotline's work
                why = f"{type(exc).__name__}: {exc}"[:500]
                log.critical("hotline task %s stopped: %s; starting it again", name, why,
                             exc_info=exc)  # fmt: skip
            if self.clock() - started >= HEALTHY_AFTER_S:
                backoff.reset()
            self.down[name] = why
            self.restarts[name] += 1
            try:
                await asyncio.sleep(backoff.next())
            finally:
                self.down.pop(name, None)


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
        self.cooled = 0  # alarms recorded on a just-resolved ticket (its cool-down)
        self.incidents = 0
        self.failed = 0  # rows that could not be applied (ticketed as unreadable)

    async def run(self) -> None:
        await _with_connection("outbox", self._dsn, self._loop)

    async def _loop(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            while True:
                taken = await take_outbox(conn, self._batch, self._policy)
                self.rows += taken.rows
                self.opened += taken.opened
                self.cooled += taken.cooled
                self.incidents += taken.incidents
                self.failed += len(taken.failed)
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
        self.failed_scans = 0

    async def run(self) -> None:
        await _with_connection("escalation", self._dsn, self._loop)

    async def _loop(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            try:
                out = await escalate(conn, self._ack_minutes)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                raise
            except psycopg.Error as exc:  # what a ticket holds failed the scan: the next one runs
                self.failed_scans += 1
                log.error("escalation scan failed (%d so far): %s", self.failed_scans, exc)
                await asyncio.sleep(self._every_s)
                continue
            total = out.unacknowledged + out.on_site_breached + out.resolve_breached
            if total:
                log.info("escalated: %s", out)
                self.escalated += total
            await asyncio.sleep(self._every_s)
