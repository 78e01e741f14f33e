"""Alarm outbox rows the hotline could not apply as designed: each still ends with a person
looking at it. The row is done and marked failed with its error; its alarm's open ticket (or,
for a known rule, the household's open ticket of that cause) gets an ``alarm_unreadable`` event
holding the raw payload; with none open, a new ticket is opened: an emergency repair for a gas
or flow rule and for a rule nobody knows, the rule's own category otherwise. Such a ticket is
never held, never a test ticket (a payload that cannot be read cannot vouch for test mode) and
never closes a valve by itself (its device cannot be trusted): a dispatcher decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from alerting.tickets import OPEN, insert_ticket

UNREADABLE_CAUSE = "unreadable_alarm"
EMERGENCY_CAUSES = frozenset({"gas_leak", "burst", "leak_behind_meter", "valve_passing"})
RAW_LIMIT = 8000  # characters of the raw payload kept on the ticket
NOTE = "this alarm could not be read fully: check the raw payload and the household"
PRIORITY_ORDER = ("low", "normal", "high", "critical")
Route = tuple[str, str, str, str]  # cause, category, priority if critical, priority otherwise


@dataclass(frozen=True)
class OutboxRow:
    id: int
    alarm_id: int
    event: str
    payload: Any  # as stored: usually an object, but nothing guarantees it
    raw: str  # the payload as PostgreSQL prints it (numbers exactly as stored)


def _text(value: Any, limit: int = 200) -> str | None:
    """A short, storable string from a payload field, or None when it is not one."""
    if not isinstance(value, str) or not value:
        return None
    return value.replace("\x00", "")[:limit]


def ticket_route(payload: Any, route: Route | None) -> tuple[str, str, str]:
    """(cause, category, priority) of the ticket for an unreadable row."""
    severity = payload.get("severity") if isinstance(payload, dict) else None
    if route is None:
        urgent = severity == "critical"
        return UNREADABLE_CAUSE, "emergency_repair", "critical" if urgent else "high"
    cause, category, if_critical, otherwise = route
    if cause in EMERGENCY_CAUSES or category == "emergency_repair":
        urgent = severity == "critical" or cause in ("gas_leak", "burst")
        return cause, "emergency_repair", "critical" if urgent else "high"
    priority = if_critical if severity == "critical" else otherwise
    return cause, category, max(priority, "normal", key=PRIORITY_ORDER.index)


async def ticket_unreadable(
    cur: psycopg.AsyncCursor[Any], row: OutboxRow, error: BaseException, owner: str,
    route: Route | None,
) -> int:  # fmt: skip
    """Mark the row failed and put it on a ticket (in the caller's transaction); the ticket id."""
    outbox_id, alarm_id, payload, raw = row.id, row.alarm_id, row.payload, row.raw
    reason = f"{type(error).__name__}: {error}".replace("\x00", "")[:1000]
    async with cur.connection.cursor(row_factory=tuple_row) as c:
        await c.execute(
            "UPDATE alarm_outbox SET done_at = now(), failed_at = now(), error = %s WHERE id = %s",
            (reason, outbox_id),
        )
        fields = payload if isinstance(payload, dict) else {}
        device, district = _text(fields.get("device")), _text(fields.get("district"))
        household = _text(fields.get("household"))
        if household is not None:
            await c.execute("SELECT 1 FROM households WHERE id = %s", (household,))
            if await c.fetchone() is None:
                household = None  # deleted, or never was: the ticket names it in its detail
        cause, category, priority = ticket_route(payload, route)
        # the ticket this alarm already has, else the household's open one of this cause
        await c.execute(
            "SELECT t.id FROM ticket_events e JOIN tickets t ON t.id = e.ticket_id "
            "WHERE e.alarm_id = %s AND t.status = ANY(%s) ORDER BY t.id DESC LIMIT 1 "
            "FOR UPDATE OF t",
            (alarm_id, list(OPEN)),
        )
        found = await c.fetchone()
        if found is None and household is not None:
            await c.execute(
                "SELECT id FROM tickets WHERE household_id = %s AND cause = %s "
                "AND status = ANY(%s) FOR UPDATE",
                (household, cause, list(OPEN)),
            )
            found = await c.fetchone()
        kind = "alarm_unreadable"
        if found is None:
            rule = _text(fields.get("rule"), 60) or "unknown rule"
            ticket = await insert_ticket(
                c, category=category, priority=priority, cause=cause, source="alarm",
                owner=owner, household_id=household, device_id=device, district=district,
                summary=f"unreadable alarm ({rule}) from {device or 'an unknown device'}",
            )  # fmt: skip
            if ticket is None:  # opened a moment ago by another instance
                await c.execute(
                    "SELECT id FROM tickets WHERE household_id = %s AND cause = %s "
                    "AND status = ANY(%s) FOR UPDATE",
                    (household, cause, list(OPEN)),
                )
                found = await c.fetchone()
                assert found is not None  # the conflict that refused the insert is this ticket
                ticket_id = int(found[0])
            else:
                ticket_id, kind = ticket, "opened"
        else:
            ticket_id = int(found[0])
        if kind != "opened":  # a repeat: counts, and can only make the ticket more urgent
            await c.execute(
                "UPDATE tickets SET repeats = repeats + 1, updated_at = now(), inhibited = false, "
                "priority = (%(order)s::text[])[greatest(array_position(%(order)s::text[], "
                "priority), array_position(%(order)s::text[], %(new)s))] WHERE id = %(id)s",
                {"order": list(PRIORITY_ORDER), "new": priority, "id": ticket_id},
            )
        detail = {
            "unreadable": True,
            "note": NOTE,
            "event": row.event,
            "error": reason,
            "raw": raw[:RAW_LIMIT],
            "raw_truncated": len(raw) > RAW_LIMIT,
            "household": fields.get("household") if household is None else household,
        }
        await c.execute(
            "INSERT INTO ticket_events (ticket_id, actor, kind, alarm_id, outbox_id, detail) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (ticket_id, owner, kind, alarm_id, outbox_id, Jsonb(detail)),
        )
    return ticket_id


async def failed_rows(
    conn: psycopg.AsyncConnection[Any], limit: int = 50, since_hours: float = 24 * 365
) -> list[dict[str, Any]]:
    """The latest outbox rows that failed, with the ticket each is on (newest first)."""
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(
            "SELECT o.id, o.alarm_id, o.event, o.failed_at, o.error, e.ticket_id, t.status "
            "FROM alarm_outbox o LEFT JOIN ticket_events e ON e.outbox_id = o.id "
            "LEFT JOIN tickets t ON t.id = e.ticket_id "
            "WHERE o.failed_at > now() - %s * interval '1 hour' "
            "ORDER BY o.failed_at DESC, o.id DESC LIMIT %s",
            (since_hours, limit),
        )
        names = ("id", "alarm_id", "event", "failed_at", "error", "ticket_id", "ticket_status")
        return [dict(zip(names, r, strict=True)) for r in await cur.fetchall()]
