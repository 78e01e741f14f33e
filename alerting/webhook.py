"""The hotline's optional outbound webhook: every ticket event, POSTed in order as signed JSON to
a utility's call-centre software.

One sender works at a time among the hotline instances: it holds a session advisory lock on a
connection of its own and does all its reads and writes on it, so a sender that lost its
connection (and lock) cannot move the cursor any more. The others try for the lock every few
seconds and take over where the cursor stands. The first run starts after the highest event id
existing then (see 0007_webhooks.sql).

Delivery is at least once, in ``ticket_events`` id order: a 2xx moves the cursor past the event
and sets its ``delivered_at`` in one transaction; anything else is recorded in
``webhook_deliveries`` and the same event is sent again after the backoff, nothing after it
first. A 2xx that could not be recorded (the database went away) means the event is sent again:
receivers deduplicate by ``X-GasGuard-Event-Id``.

A 4xx about the request itself (400, 422, ...) is a permanent refusal: logged at ERROR once, and
after ``refusal_attempts`` attempts the event is skipped (kept in ``webhook_deliveries``), so one
malformed event cannot stop the feed. 401, 403, 404, 408, 425 and 429 refuse us or the moment
(wrong secret or URL, overload), not the event: retried like an outage, since skipping on them
would throw the whole feed away.

Ids are taken at insert, not at commit: a lower id can become visible after a higher one. So the
sender never passes a gap in the ids while a transaction that may fill it is still open (the
snapshot's xmin tells); a gap left by a rollback is passed about a second later.

The ``ticket`` summary is the ticket as it is when the event is sent, not as it was then.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import psycopg

from alerting.jsontext import dumps
from gasguard.backoff import Backoff

log = logging.getLogger(__name__)

Connect = Callable[[], Awaitable[psycopg.AsyncConnection[Any]]]
LOCK_KEY = 0x6767_7765_6268_6F6B  # pg_advisory_lock key of the webhook sender ("ggwebhok")
RETRIED_4XX = frozenset({401, 403, 404, 408, 425, 429})
GAP_GRACE_S = 0.2  # an id's transaction has its xid a moment after taking the id
GAP_WARN_S = 60.0
TICKET_FIELDS = ("id", "category", "priority", "status", "household_id", "device_id",
                 "district", "cause", "owner", "test_mode", "on_site_due", "resolve_due",
                 "updated_at")  # fmt: skip
EVENT_FIELDS = ("event_id", "ticket_id", "kind", "at", "actor", "detail")
_EVENTS = (
    "SELECT e.id, e.ticket_id, e.kind, e.at, e.actor, e.detail, "
    + ", ".join(f"t.{f}" for f in TICKET_FIELDS)
    + " FROM ticket_events e JOIN tickets t ON t.id = e.ticket_id"
    " WHERE e.id > %s ORDER BY e.id LIMIT %s"
)
# one attempt's outcome; a permanent refusal on the last allowed attempt marks the event skipped
_RECORD = """
INSERT INTO webhook_deliveries AS d (event_id, delivered_at, skipped_at, last_status, last_error)
VALUES (%(id)s, CASE WHEN %(ok)s THEN now() END,
        CASE WHEN %(refused)s AND %(limit)s <= 1 THEN now() END, %(status)s, %(error)s)
ON CONFLICT (event_id) DO UPDATE SET
    attempts = d.attempts + 1, last_attempt_at = now(), delivered_at = EXCLUDED.delivered_at,
    skipped_at = CASE WHEN %(refused)s AND d.attempts + 1 >= %(limit)s THEN now() END,
    last_status = EXCLUDED.last_status, last_error = EXCLUDED.last_error
RETURNING attempts, skipped_at IS NOT NULL
"""


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-GasGuard-Signature`` value: ``sha256=`` and the hex HMAC-SHA256 of
    ``{timestamp}.{body}`` with the shared secret."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def verify(secret: str, timestamp: str, body: bytes, signature: str, max_age_s: float = 300,
           *, now: float | None = None) -> bool:  # fmt: skip
    """A receiver's check: the signature matches (constant-time) and the timestamp is within
    ``max_age_s`` of ``now`` (either way), so a captured request cannot be replayed later."""
    try:
        age = abs((time.time() if now is None else now) - int(timestamp))
    except ValueError:
        return False
    expected = sign(secret, timestamp, body).encode()
    return age <= max_age_s and hmac.compare_digest(expected, signature.encode(errors="replace"))


def is_refusal(status: int) -> bool:
    """A permanent refusal of the event itself (see the module's notes)."""
    return 400 <= status < 500 and status not in RETRIED_4XX


@dataclass
class _Gap:
    start: int  # the first missing id
    seen_at: float
    xmax: int | None = None  # transactions below this may hold the missing ids
    warned: bool = False


class WebhookSender:
    def __init__(self, database: str | Connect, url: str, secret: str, timeout_s: float = 5.0, *,
                 poll_s: float = 0.5, lock_retry_s: float = 5.0, refusal_attempts: int = 5,
                 batch: int = 100, backoff: Backoff | None = None) -> None:  # fmt: skip
        """``database``: a DSN, or a function that opens a connection (one is held open)."""
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook URL must be http(s), got {url!r}")
        if not secret:
            raise ValueError("webhook requests are signed: the secret must not be empty")
        self.url, self.timeout_s, self.poll_s = url, timeout_s, poll_s
        self.lock_retry_s, self.refusal_attempts, self.batch = lock_retry_s, refusal_attempts, batch
        self._secret = secret
        self._connect: Connect = (
            database if callable(database)
            else partial(psycopg.AsyncConnection.connect, database, connect_timeout=5)
        )  # fmt: skip
        self.backoff = backoff or Backoff(base=1.0, cap=60.0)
        self._db_backoff = Backoff(base=0.5, cap=15.0)
        self._wake = asyncio.Event()
        self._gap: _Gap | None = None
        self._failing = False
        self._db_down = False
        self.active = False  # holds the lock: this instance is the one sending
        self.cursor: int | None = None
        self.delivered = self.failed_attempts = self.skipped = self.polls = 0
        self.last_error: str | None = None

    def wake(self) -> None:
        """A new ticket event exists: look now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Send until cancelled; reconnects with backoff when the database goes away."""
        async with httpx.AsyncClient(timeout=self.timeout_s) as http:
            while True:
                conn: psycopg.AsyncConnection[Any] | None = None
                try:
                    conn = await self._connect()
                    await conn.set_autocommit(True)
                    self._db_backoff.reset()
                    if self._db_down:
                        self._db_down = False
                        log.info("webhook: database reachable again")
                    await self._hold_lock(conn)
                    await self._send(conn, http)
                except psycopg.OperationalError as exc:
                    if not self._db_down:
                        self._db_down = True
                        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                        log.error("webhook: database unavailable (%s); retrying", reason)
                finally:
                    self.active = False
                    if conn is not None:
                        with contextlib.suppress(psycopg.Error):
                            await conn.close()  # releases the lock
                await asyncio.sleep(self._db_backoff.next())

    async def _hold_lock(self, conn: psycopg.AsyncConnection[Any]) -> None:
        standing_by = False
        while True:
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,))
            row = await cur.fetchone()
            if row and row[0]:
                break
            if not standing_by:
                log.info("webhook: another hotline instance is sending; standing by")
                standing_by = True
            await asyncio.sleep(self.lock_retry_s)
        await conn.execute(
            "INSERT INTO webhook_cursor (last_event_id) "
            "SELECT coalesce(max(id), 0) FROM ticket_events ON CONFLICT DO NOTHING"
        )
        cur = await conn.execute("SELECT last_event_id FROM webhook_cursor")
        row = await cur.fetchone()
        assert row is not None  # made just above
        self.cursor, self.active, self._gap = int(row[0]), True, None
        log.info("webhook: sending ticket events after id %d to %s", self.cursor, self.url)

    async def _send(self, conn: psycopg.AsyncConnection[Any], http: httpx.AsyncClient) -> None:
        while True:
            events = await self._next_events(conn)
            for event in events:
                try:
                    await self._deliver(conn, http, event)
                except (psycopg.OperationalError, psycopg.InterfaceError):
                    raise
                except Exception as exc:  # this event cannot be sent: skip it, send the next
                    await self._skip_broken(conn, event, exc)
            if len(events) < self.batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
                self._wake.clear()

    async def _next_events(self, conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
        """The events after the cursor, up to the first gap that may still be filled."""
        assert self.cursor is not None
        # the snapshot first: a gap's transactions that ended before it are seen by the read
        cur = await conn.execute(
            "SELECT pg_snapshot_xmin(s)::text::bigint, pg_snapshot_xmax(s)::text::bigint "
            "FROM pg_current_snapshot() s"
        )
        snapshot = await cur.fetchone()
        assert snapshot is not None
        xmin, xmax = int(snapshot[0]), int(snapshot[1])
        cur = await conn.execute(_EVENTS.encode(), (self.cursor, self.batch))
        self.polls += 1
        events, expected = [], self.cursor + 1
        for row in await cur.fetchall():
            if row[0] != expected and not self._gap_is_final(expected, row[0], xmin, xmax):
                break
            event = dict(zip(EVENT_FIELDS, row[:6], strict=True))
            event["ticket"] = dict(zip(TICKET_FIELDS, row[6:], strict=True))
            events.append(event)
            expected = int(row[0]) + 1
        return events

    def _gap_is_final(self, start: int, end: int, xmin: int, xmax: int) -> bool:
        now = time.monotonic()
        if self._gap is None or self._gap.start != start:
            self._gap = _Gap(start, now)
        gap = self._gap
        if gap.xmax is None and now - gap.seen_at >= GAP_GRACE_S:
            gap.xmax = xmax
        if gap.xmax is not None and xmin >= gap.xmax:  # every transaction then has ended
            self._gap = None
            return True
        if not gap.warned and now - gap.seen_at > GAP_WARN_S:
            gap.warned = True
            log.warning("webhook: waiting %.0f s for ticket events %d..%d of an open transaction",
                        now - gap.seen_at, start, end - 1)  # fmt: skip
        return False

    async def _skip_broken(
        self, conn: psycopg.AsyncConnection[Any], event: dict[str, Any], exc: Exception
    ) -> None:
        """An event that could not be sent at all (a bug, not the receiver): recorded as
        skipped with the error, and the cursor moves past it."""
        event_id = int(event["event_id"])
        error = f"not sent: {type(exc).__name__}: {exc}".replace("\x00", "")[:500]
        log.error("webhook: event %d %s; skipped", event_id, error, exc_info=exc)
        values = {"id": event_id, "ok": False, "refused": True, "status": None,
                  "error": error, "limit": 1}  # fmt: skip
        async with conn.transaction():
            await conn.execute(_RECORD, values)
            await conn.execute(
                "UPDATE webhook_cursor SET last_event_id = %s, updated_at = now()", (event_id,)
            )
        self.cursor, self.last_error = event_id, f"event {event_id}: {error}"
        self.skipped += 1

    async def _post(self, http: httpx.AsyncClient, event: dict[str, Any]) -> tuple[int | None, str]:
        body = dumps(event)
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-GasGuard-Event-Id": str(event["event_id"]),
            "X-GasGuard-Timestamp": timestamp,
            "X-GasGuard-Signature": sign(self._secret, timestamp, body),
        }
        try:
            response = await http.post(self.url, content=body, headers=headers)
        except httpx.TransportError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:500]
        return response.status_code, f"HTTP {response.status_code}: {response.text[:300]}"

    async def _deliver(
        self, conn: psycopg.AsyncConnection[Any], http: httpx.AsyncClient, event: dict[str, Any]
    ) -> None:
        """Send one event until it is delivered or skipped."""
        event_id = int(event["event_id"])
        refusal_logged = False
        while True:
            status, error = await self._post(http, event)
            ok = status is not None and 200 <= status < 300
            refused = status is not None and is_refusal(status)
            values = {"id": event_id, "ok": ok, "refused": refused, "status": status,
                      "error": None if ok else error, "limit": self.refusal_attempts}  # fmt: skip
            async with conn.transaction():
                cur = await conn.execute(_RECORD, values)
                attempts, skip = await cur.fetchone() or (0, False)
                if ok or skip:
                    await conn.execute(
                        "UPDATE webhook_cursor SET last_event_id = %s, updated_at = now()",
                        (event_id,),
                    )
            if ok:
                self.cursor = event_id
                self.delivered += 1
                self.backoff.reset()
                if self._failing:
                    self._failing = False
                    log.info("webhook: delivering again (event %d accepted)", event_id)
                return
            self.failed_attempts += 1
            self.last_error = f"event {event_id}: {error}"
            if refused and not refusal_logged:
                refusal_logged = True
                log.error("webhook: receiver refused event %d (%s); skipping it after %d attempts",
                          event_id, error, self.refusal_attempts)  # fmt: skip
            elif not self._failing and not refused:
                log.error("webhook: delivery to %s failing (%s); retrying", self.url, error)
            self._failing = True
            if skip:
                self.cursor = event_id
                self.skipped += 1
                log.warning("webhook: skipped event %d after %d attempts", event_id, attempts)
                return
            await asyncio.sleep(self.backoff.next())


async def webhook_status(conn: psycopg.AsyncConnection[Any], failures: int = 20) -> dict[str, Any]:
    """The feed's state for the API: the cursor (None before the first run), the events waiting
    after it, and the latest events not delivered (being retried, or skipped)."""
    cur = await conn.execute("SELECT last_event_id, enabled_at, updated_at FROM webhook_cursor")
    row = await cur.fetchone()
    cursor = None if row is None else int(row[0])
    pending = 0
    if cursor is not None:
        cur = await conn.execute("SELECT count(*) FROM ticket_events WHERE id > %s", (cursor,))
        pending = int((await cur.fetchone() or (0,))[0])
    cur = await conn.execute(
        "SELECT d.event_id, e.ticket_id, e.kind, d.attempts, d.first_attempt_at, "
        "d.last_attempt_at, d.skipped_at, d.last_status, d.last_error "
        "FROM webhook_deliveries d JOIN ticket_events e ON e.id = d.event_id "
        "WHERE d.delivered_at IS NULL ORDER BY d.last_attempt_at DESC LIMIT %s",
        (failures,),
    )
    names = ("event_id", "ticket_id", "kind", "attempts", "first_attempt_at", "last_attempt_at",
             "skipped_at", "last_status", "last_error")  # fmt: skip
    return {
        "cursor": cursor,
        "enabled_at": None if row is None else row[1],
        "cursor_moved_at": None if row is None else row[2],
        "pending": pending,
        "failures": [dict(zip(names, r, strict=True)) for r in await cur.fetchall()],
    }
