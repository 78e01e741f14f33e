"""Alarms into tickets: the alerting service's side of the alarm outbox.

Rows are taken with ``FOR UPDATE SKIP LOCKED``; each row's effect on the tickets and the row's
``done_at`` are written in one transaction, so every alarm makes its effect exactly once,
across restarts and with several service instances. One open ticket per (household, cause):
a repeat appends an event to it and counts; a clear is recorded on it; a confirmation from a
second device raises its priority. (Issue 5's first slice: storms, silences, escalation,
the API and the console build on this.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg

log = logging.getLogger(__name__)

# alarm rule -> (cause, category, priority for a critical alarm, priority otherwise)
RULES: dict[str, tuple[str, str, str, str]] = {
    "gas_low": ("gas_leak", "emergency_repair", "critical", "high"),
    "gas_high": ("gas_leak", "emergency_repair", "critical", "critical"),
    "gas_rising": ("gas_leak", "emergency_repair", "critical", "high"),
    "burst": ("burst", "emergency_repair", "critical", "critical"),
    "continuous_flow": ("leak_behind_meter", "inspection", "high", "normal"),
    "micro_leak": ("leak_behind_meter", "inspection", "high", "normal"),
    "pressure_low": ("supply_pressure", "engineering", "high", "high"),
    "silent": ("device_silent", "inspection", "normal", "low"),
    "sensor_fault": ("device_fault", "inspection", "normal", "low"),
    "valve_fault": ("device_fault", "inspection", "normal", "low"),
    "tamper": ("device_fault", "inspection", "normal", "low"),
    "reverse_flow": ("device_fault", "inspection", "normal", "low"),
}
SYSTEM_OWNER = "system:alarms"


@dataclass
class Taken:
    rows: int = 0
    opened: int = 0
    appended: int = 0


async def take_outbox(conn: psycopg.AsyncConnection[Any], limit: int = 100) -> Taken:
    """Apply up to ``limit`` pending outbox rows in one transaction."""
    taken = Taken()
    async with conn.transaction(), conn.cursor() as cur:
        await cur.execute(
            "SELECT id, alarm_id, event, payload FROM alarm_outbox WHERE done_at IS NULL "
            "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
            (limit,),
        )
        rows = await cur.fetchall()
        for outbox_id, alarm_id, event, payload in rows:
            opened = await _apply(cur, int(outbox_id), int(alarm_id), str(event), payload)
            taken.rows += 1
            taken.opened += opened
            taken.appended += not opened
        if rows:
            await cur.execute(
                "UPDATE alarm_outbox SET done_at = now() WHERE id = ANY(%s)",
                ([int(r[0]) for r in rows],),
            )
    return taken


async def _apply(
    cur: psycopg.AsyncCursor[Any],
    outbox_id: int,
    alarm_id: int,
    event: str,
    payload: dict[str, Any],
) -> bool:
    """One outbox row's effect; True when it opened a ticket."""
    rule = str(payload.get("rule"))
    cause, category, if_critical, otherwise = RULES.get(
        rule, ("other", "inspection", "normal", "low")
    )
    household = payload.get("household")
    detail = orjson.dumps(payload).decode()
    await cur.execute(
        "SELECT id FROM tickets WHERE household_id = %s AND cause = %s "
        "AND status NOT IN ('resolved', 'closed', 'cancelled') FOR UPDATE",
        (household, cause),
    )
    row = await cur.fetchone()
    opened = False
    ticket_id = 0
    priority = if_critical if payload.get("severity") == "critical" else otherwise
    if row is None and event == "raised":
        await cur.execute(
            """
            INSERT INTO tickets (category, priority, household_id, device_id, cause, source, owner,
                                 test_mode, on_site_due, resolve_due)
            SELECT %s, %s, %s, %s, %s, 'alarm', %s, %s,
                   now() + make_interval(mins => s.on_site_minutes),
                   now() + make_interval(mins => s.resolve_minutes)
            FROM service_times s WHERE s.category = %s
            ON CONFLICT (household_id, cause)
                WHERE status NOT IN ('resolved', 'closed', 'cancelled') DO NOTHING
            RETURNING id
            """,
            (
                category,
                priority,
                household,
                payload.get("device"),
                cause,
                SYSTEM_OWNER,
                bool(payload.get("test")),
                category,
            ),
        )
        ticket = await cur.fetchone()
        if ticket is None:  # another instance opened it a moment ago: this is a repeat
            await cur.execute(
                "SELECT id FROM tickets WHERE household_id = %s AND cause = %s "
                "AND status NOT IN ('resolved', 'closed', 'cancelled') FOR UPDATE",
                (household, cause),
            )
            row = await cur.fetchone()
        else:
            ticket_id, opened = int(ticket[0]), True
    if opened:
        kind = "opened"
    elif row is None:
        kind = ""  # a clear or confirmation for a ticket already closed by a person
    else:
        ticket_id = int(row[0])
        kind = {"raised": "repeat", "cleared": "alarm_cleared", "confidence": "confirmed"}[event]
        if event == "raised":  # a repeat counts, and can only make the ticket more urgent
            await cur.execute(
                "UPDATE tickets SET repeats = repeats + 1, priority = (%(order)s::text[])"
                "[greatest(array_position(%(order)s::text[], priority), "
                "array_position(%(order)s::text[], %(new)s))] WHERE id = %(id)s",
                {"order": ["low", "normal", "high", "critical"], "new": priority, "id": ticket_id},
            )
        elif event == "confidence":
            await cur.execute(
                "UPDATE tickets SET confidence = 'high', priority = CASE "
                "WHEN priority = 'critical' THEN 'critical' ELSE 'high' END WHERE id = %s",
                (ticket_id,),
            )
    if kind:
        await cur.execute(
            "INSERT INTO ticket_events (ticket_id, actor, kind, alarm_id, outbox_id, detail) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (ticket_id, SYSTEM_OWNER, kind, alarm_id, outbox_id, detail),
        )
    return opened
