"""Valve commands: from a ticket to the device's gateway, and the gateway's result back.

:func:`request_valve` records a ``pending`` command in the caller's transaction (outbox
pattern); :class:`ValveBridge` sends it after the commit and records the gateway's answer
(contract: ``gateway/commands.py``). Every step is a ticket event.

- The MQTT 5 Message Expiry Interval counts from the request: no command runs more than
  ``expiry_s`` after it was asked for, whether it waited here (broker unreachable; it then
  times out unsent) or in the broker's queue (gateway offline).
- A row is ``sent`` once the broker sent its PUBACK; until then it stays ``pending`` and is sent
  again, harmlessly: the gateway keeps results by command id.
- Results come on a persistent session and are acknowledged after their commit: none is lost
  while the hotline or the database is away. Only the device's own gateway can answer for it
  (ACL). A late result, after a timeout, is still recorded: the ticket shows the real valve.
- Several instances: ``FOR UPDATE SKIP LOCKED`` gives each command one sender; each instance
  sees every result and the first one records it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from gasguard.backoff import Backoff
from gasguard.mqtt_link import MqttLink, MqttOptions
from gasguard.wire import topic

log = logging.getLogger(__name__)

ACTIONS = {"close_valve": "closed", "open_valve": "open"}  # action -> valve state when done
RESULT_TOPIC = "gasguard/v1/+/cmd/result"
BRIDGE_ACTOR = "system:valve"
MAX_REASON = 500
PUBACK_TIMEOUT_S = 5.0  # without a PUBACK by then, a command stays pending (and is sent again)

ConnectionFactory = Callable[[], Awaitable[psycopg.AsyncConnection[Any]]]


class ValveError(ValueError):
    """A valve command that cannot be requested (unknown device, ticket or action)."""


async def _event(
    cur: psycopg.AsyncCursor[Any], ticket_id: int, actor: str, kind: str, detail: dict[str, Any]
) -> None:
    await cur.execute(
        "INSERT INTO ticket_events (ticket_id, actor, kind, detail) VALUES (%s, %s, %s, %s)",
        (ticket_id, actor, kind, Jsonb(detail)),
    )


async def request_valve(
    cur: psycopg.AsyncCursor[Any], ticket_id: int, device_id: str, action: str, actor: str
) -> str:
    """Record a valve command for a ticket in the caller's transaction; its command id.

    The bridge sends it after the caller commits (call :meth:`ValveBridge.wake` then).
    """
    if action not in ACTIONS:
        raise ValveError(f"unknown valve action {action!r}; known: {', '.join(ACTIONS)}")
    async with cur.connection.cursor(row_factory=tuple_row) as c:  # whatever the caller's rows
        await c.execute("SELECT gateway_id FROM devices WHERE id = %s", (device_id,))
        device = await c.fetchone()
        if device is None:
            raise ValveError(f"device {device_id!r} is not registered: no gateway to command")
        # the ticket's lock also numbers its commands without a race
        await c.execute("SELECT id FROM tickets WHERE id = %s FOR UPDATE", (ticket_id,))
        if await c.fetchone() is None:
            raise ValveError(f"no ticket {ticket_id}")
        await c.execute("SELECT count(*) FROM valve_commands WHERE ticket_id = %s", (ticket_id,))
        row = await c.fetchone()
        command_id = f"T{ticket_id}-{int(row[0]) + 1 if row else 1}"
        await c.execute(
            "INSERT INTO valve_commands (id, ticket_id, device_id, gateway_id, action, "
            "requested_by) VALUES (%s, %s, %s, %s, %s, %s)",
            (command_id, ticket_id, device_id, device[0], action, actor),
        )
        detail = {"command": command_id, "device": device_id, "action": action}
        await _event(c, ticket_id, actor, "valve_requested", detail)
    return command_id


def _text(value: object) -> str:
    """A string from a gateway's JSON as PostgreSQL takes it (no NUL), at most MAX_REASON long."""
    return str(value).replace("\x00", "")[:MAX_REASON]


def parse_result(payload: bytes) -> tuple[str, str, str | None] | str:
    """A gateway's result as (command id, status, reason for a failure), or why it is malformed.

    Anything but ``done`` is a failure (failed, unknown_device, not_writable, invalid); its
    reason names the status.
    """
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        return f"not JSON: {exc}"
    if not isinstance(body, dict) or not all(
        isinstance(body.get(k), str) and body[k] for k in ("id", "status")
    ):
        return "a result is a JSON object with 'id' and 'status' strings"
    status, reason = _text(body["status"]), _text(body.get("reason") or "")
    why = None if status == "done" else _text(f"{status}: {reason}" if reason else status)
    return _text(body["id"]), status, why


@dataclass(frozen=True)
class _Result:
    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int  # the link's connection it came on: an ack goes to that one only


class ValveBridge:
    """Sends pending valve commands and records their results, until cancelled."""

    def __init__(
        self,
        database: str | ConnectionFactory,
        mqtt_options: MqttOptions,
        *,
        instance: str = "hotline-1",
        timeout_s: float = 30.0,
        expiry_s: int = 120,
        poll_s: float = 0.5,
    ) -> None:
        self._database = database
        self.timeout_s = timeout_s
        self.expiry_s = expiry_s
        self.poll_s = poll_s
        self._link_options = replace(
            mqtt_options,
            client_id=mqtt_options.client_id or f"gasguard-hotline-valve-{instance}",
            clean_start=False,  # results sent while we are away wait for us
            session_expiry_s=mqtt_options.session_expiry_s or 86400,
            manual_ack=True,  # acknowledged once recorded
            subscriptions=((RESULT_TOPIC, 1),),
        )
        self.link = self._new_link()
        self._runs = 0
        self.sent = 0
        self.done = 0
        self.failed = 0
        self.timeouts = 0
        self.malformed = 0  # results that are not JSON, not ours to take, or not storable
        self._results: deque[_Result] = deque()  # removed only once recorded
        self._pubacks: dict[int, asyncio.Future[bool]] = {}
        self._wake = asyncio.Event()
        self._db_backoff = Backoff(base=0.5, cap=15.0)
        self._db_down = False

    def _new_link(self) -> MqttLink:
        link = MqttLink(self._link_options)
        link.on_message = self._on_message
        link.on_published = self._on_published
        link.on_disconnected = self._on_disconnected
        return link

    def wake(self) -> None:
        """Send now: call after committing a :func:`request_valve` (from the loop's thread)."""
        self._wake.set()

    async def run(self) -> None:
        """Connect to the broker and the database and work until cancelled. Run again after it
        stopped, it starts on a new connection: results not yet recorded come again (they were
        never acknowledged)."""
        if self._runs:
            self.link = self._new_link()
            self._results.clear()
            self._pubacks.clear()
        self._runs += 1
        link_task = asyncio.create_task(self.link.run())
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            while True:
                try:
                    if conn is None or conn.closed:
                        conn = await self._connect()
                        if self._db_down:  # said as soon as it is so, before any work
                            self._db_down = False
                            log.info("valve bridge: database reachable again")
                    await self._take_results(conn)
                    if self.link.connected:
                        await self._send(conn)
                    await self._sweep(conn)
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    if conn is not None:
                        with contextlib.suppress(psycopg.Error):
                            await conn.close()
                    conn = None
                    await asyncio.sleep(self._db_failed(exc))
                    continue
                self._db_backoff.reset()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
                self._wake.clear()
        finally:
            await self.link.stop(send_offline=False)
            link_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await link_task
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    await conn.close()

    # ------------------------------------------------------------------ database

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        if isinstance(self._database, str):
            return await psycopg.AsyncConnection.connect(
                self._database, autocommit=True, connect_timeout=5
            )
        conn = await self._database()
        await conn.set_autocommit(True)  # each step is its own transaction
        return conn

    def _db_failed(self, exc: psycopg.Error) -> float:
        """Log the first failure at ERROR, the rest quietly; the delay before the next try."""
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if not self._db_down:
            self._db_down = True
            log.error("valve bridge: database unavailable (%s); retrying quietly", first_line)
        else:
            log.debug("valve bridge: database still unavailable (%s)", first_line)
        return self._db_backoff.next()

    # ------------------------------------------------------------------ sending

    async def _send(self, conn: psycopg.AsyncConnection[Any]) -> None:
        mids: list[int] = []
        try:
            async with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
                await cur.execute(
                    "SELECT id, ticket_id, device_id, gateway_id, action, "
                    "extract(epoch FROM now() - requested_at)::float8 FROM valve_commands "
                    "WHERE status = 'pending' AND requested_at > now() - make_interval(secs => %s) "
                    "ORDER BY requested_at LIMIT 100 FOR UPDATE SKIP LOCKED",
                    (self.expiry_s,),
                )
                rows = await cur.fetchall()
                published = []
                for row in rows:
                    mid, expiry = self._publish(row)
                    if mid is None:  # the link went down: the rest stay pending
                        break
                    mids.append(mid)
                    published.append((self._pubacks[mid], row, expiry))
                if published:
                    await asyncio.wait([f for f, _, _ in published], timeout=PUBACK_TIMEOUT_S)
                for future, row, expiry in published:
                    if future.done() and future.result():  # else still pending, sent again
                        await self._sent(cur, row, expiry)
        finally:
            for mid in mids:
                self._pubacks.pop(mid, None)

    def _publish(self, row: tuple[Any, ...]) -> tuple[int | None, int]:
        """Hand one command to the broker; its mid (a PUBACK future waits under it)."""
        command_id, _, device, gateway, action, age = row
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        expiry = max(1, int(self.expiry_s - age))  # the command's lifetime counts from the request
        props.MessageExpiryInterval = expiry
        body = orjson.dumps({"id": command_id, "device": device, "action": action})
        mid = self.link.publish(topic(gateway, "cmd"), body, qos=1, properties=props)
        if mid is not None:
            self._pubacks[mid] = asyncio.get_running_loop().create_future()
        return mid, expiry

    async def _sent(self, cur: psycopg.AsyncCursor[Any], row: tuple[Any, ...], expiry: int) -> None:
        command_id, ticket_id, device, gateway, action, _ = row
        await cur.execute(
            "UPDATE valve_commands SET status = 'sent', sent_at = now() WHERE id = %s",
            (command_id,),
        )
        detail = {"command": command_id, "device": device, "action": action, "expiry_s": expiry}
        await _event(cur, ticket_id, BRIDGE_ACTOR, "valve_sent", detail | {"gateway": gateway})
        self.sent += 1
        log.info("valve command %s (%s %s) sent to %s", command_id, action, device, gateway)

    def _on_published(self, mid: int, ok: bool) -> None:
        future = self._pubacks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(ok)

    def _on_disconnected(self, reason: str) -> None:
        for future in self._pubacks.values():  # no PUBACK will come on a new connection
            if not future.done():
                future.set_result(False)
        self._pubacks.clear()

    # ------------------------------------------------------------------ results

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        """In paho's read loop: hand over, no database work here."""
        self._results.append(
            _Result(msg.topic, bytes(msg.payload), msg.mid, msg.qos, self.link.connects)
        )
        self._wake.set()

    async def _take_results(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while self._results:
            result = self._results[0]
            try:
                await self._record(conn, result)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                raise  # the connection: the result stays first in line
            except Exception as exc:  # recordable by no retry: count, log once, go on
                self._reject(result, f"cannot be recorded: {type(exc).__name__}: {exc}")
            self._results.popleft()
            if result.qos and result.generation == self.link.connects and self.link.connected:
                self.link.ack(result.mid, result.qos)

    def _reject(self, result: _Result, why: str) -> None:
        self.malformed += 1
        if self.malformed == 1:
            log.error("valve result on %s ignored: %s (logged once)", result.topic, why)
        else:
            log.debug("valve result on %s ignored: %s", result.topic, why)

    async def _record(self, conn: psycopg.AsyncConnection[Any], result: _Result) -> None:
        parsed = parse_result(result.payload)
        if isinstance(parsed, str):
            self._reject(result, parsed)
            return
        command_id, status, why = parsed
        final = "done" if status == "done" else "failed"
        async with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
            await cur.execute(
                "SELECT ticket_id, device_id, gateway_id, action, status FROM valve_commands "
                "WHERE id = %s FOR UPDATE",
                (command_id,),
            )
            row = await cur.fetchone()
            if row is None:
                log.debug("result for command %s: not a hotline command", command_id)
                return
            ticket_id, device, gateway, action, current = row
            if result.topic != topic(gateway, "cmd/result"):
                self._reject(result, f"command {command_id} went to gateway {gateway}")
                return
            if current not in ("pending", "sent", "timeout"):
                return  # a repeat of a result already recorded
            await cur.execute(
                "UPDATE valve_commands SET status = %s, reason = %s, result_at = now() "
                "WHERE id = %s",
                (final, why, command_id),
            )
            if final == "done":
                await cur.execute(
                    "UPDATE tickets SET valve_state = %s, updated_at = now() WHERE id = %s",
                    (ACTIONS[action], ticket_id),
                )
            detail: dict[str, Any] = {"command": command_id, "device": device, "action": action}
            detail |= {"status": status, "reason": why} if why else {"status": status}
            detail |= {"late": True} if current == "timeout" else {}
            await _event(cur, ticket_id, BRIDGE_ACTOR, f"valve_{final}", detail)
        if final == "done":
            self.done += 1
            log.info("valve command %s (%s %s) done", command_id, action, device)
        else:
            self.failed += 1
            log.warning("valve command %s (%s %s) failed: %s", command_id, action, device, why)

    # ------------------------------------------------------------------ timeouts

    async def _sweep(self, conn: psycopg.AsyncConnection[Any]) -> None:
        async with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
            await cur.execute(
                "UPDATE valve_commands SET status = 'timeout', result_at = now(), "
                "reason = CASE status WHEN 'sent' THEN %(late)s ELSE %(unsent)s END "
                "WHERE (status = 'sent' AND sent_at < now() - make_interval(secs => %(t)s)) "
                "OR (status = 'pending' AND requested_at < now() - make_interval(secs => %(e)s)) "
                "RETURNING id, ticket_id, device_id, action, reason",
                {
                    "t": self.timeout_s,
                    "e": self.expiry_s,
                    "late": f"no result within {self.timeout_s:g} s",
                    "unsent": f"not sent within {self.expiry_s} s (no PUBACK from the broker)",
                },
            )
            for command_id, ticket_id, device, action, reason in await cur.fetchall():
                detail = {"command": command_id, "device": device, "action": action}
                await _event(
                    cur, ticket_id, BRIDGE_ACTOR, "valve_timeout", detail | {"reason": reason}
                )
                self.timeouts += 1
                log.warning("valve command %s (%s %s): %s", command_id, action, device, reason)
