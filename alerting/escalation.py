"""Escalation and the same-day report (DOMAIN.md: complaints are escalated the same day; every
category has a published promise, and breaches are counted).

- A critical ticket not acknowledged within ``ack_minutes`` is re-notified (the console sounds
  again) and escalated one level, and again every ``ack_minutes`` while it stays unacknowledged.
- A promise that passes (on site, or resolved) escalates the ticket once per promise.

Test tickets and tickets held under an incident are not escalated (the incident ticket is).
Each scan is a few set-based statements in one transaction, safe with several instances.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any

import psycopg
from psycopg.rows import dict_row

from alerting.tickets import SUMMARY, jsonable

ACTOR = "system:escalation"


@dataclass
class Escalated:
    unacknowledged: int = 0
    on_site_breached: int = 0
    resolve_breached: int = 0


async def escalate(conn: psycopg.AsyncConnection[Any], ack_minutes: float) -> Escalated:
    out = Escalated()
    async with conn.transaction(), conn.cursor() as cur:
        await cur.execute(
            """
            WITH late AS (
                UPDATE tickets SET escalation_level = escalation_level + 1, notified_at = now(),
                                   updated_at = now()
                WHERE priority = 'critical' AND status = 'new' AND NOT test_mode AND NOT inhibited
                  AND notified_at < now() - %(ack)s::float8 * interval '1 minute'
                RETURNING id, escalation_level
            )
            INSERT INTO ticket_events (ticket_id, actor, kind, detail)
            SELECT id, %(actor)s, 'escalated',
                   jsonb_build_object('reason', 'not acknowledged', 'level', escalation_level,
                                      'after_minutes', %(ack)s::float8)
            FROM late
            """,
            {"ack": ack_minutes, "actor": ACTOR},
        )
        out.unacknowledged = cur.rowcount
        for promise, due, states in (
            ("on_site", "on_site_due", "('new', 'acknowledged', 'dispatched')"),
            ("resolve", "resolve_due", "('new', 'acknowledged', 'dispatched', 'on_site')"),
        ):
            await cur.execute(
                f"""
                WITH breached AS (
                    UPDATE tickets SET {promise}_breached = true,
                                       escalation_level = escalation_level + 1,
                                       updated_at = now()
                    WHERE status IN {states} AND NOT {promise}_breached AND NOT test_mode
                      AND NOT inhibited AND {due} < now()
                    RETURNING id, escalation_level, {due} AS due
                )
                INSERT INTO ticket_events (ticket_id, actor, kind, detail)
                SELECT id, %(actor)s, 'promise_breached',
                       jsonb_build_object('promise', %(promise)s::text, 'due', due,
                                          'level', escalation_level)
                FROM breached
                """.encode(),
                {"actor": ACTOR, "promise": promise},
            )
            setattr(out, f"{promise}_breached", cur.rowcount)
    return out


def local_day_bounds(day: date, utc_offset_hours: float) -> tuple[datetime, datetime]:
    tz = timezone(timedelta(hours=utc_offset_hours))
    start = datetime(day.year, day.month, day.day, tzinfo=tz)
    return start, start + timedelta(days=1)


async def same_day_report(
    conn: psycopg.AsyncConnection[Any], day: date, utc_offset_hours: float
) -> dict[str, Any]:
    """What the hotline reports up the same day: open complaints, breached promises and
    escalations of that (local) day, and the day's figures per category."""
    start, end = local_day_bounds(day, utc_offset_hours)
    span = {"start": start, "end": end}
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"{SUMMARY} WHERE t.category = 'complaint' AND t.status IN "
            "('new', 'acknowledged', 'dispatched', 'on_site') ORDER BY t.opened_at".encode()
        )
        complaints = [jsonable(r) for r in await cur.fetchall()]
        report: dict[str, Any] = {
            "day": day.isoformat(),
            "utc_offset_hours": utc_offset_hours,
            "open_complaints": complaints,
        }
        for key, kind in (("breaches", "promise_breached"), ("escalations", "escalated")):
            await cur.execute(
                "SELECT e.ticket_id, e.at, e.detail, t.category, t.priority, t.status, "
                "t.household_id, t.district, t.owner FROM ticket_events e "
                "JOIN tickets t ON t.id = e.ticket_id "
                "WHERE e.kind = %(kind)s AND e.at >= %(start)s AND e.at < %(end)s ORDER BY e.at",
                {"kind": kind, **span},
            )
            report[key] = [jsonable(r) for r in await cur.fetchall()]
        await cur.execute(
            """
            SELECT category,
                   count(*) FILTER (WHERE opened_at >= %(start)s AND opened_at < %(end)s) AS opened,
                   count(*) FILTER (WHERE resolved_at >= %(start)s AND resolved_at < %(end)s)
                       AS resolved,
                   count(*) FILTER (WHERE status IN ('new', 'acknowledged', 'dispatched',
                                                     'on_site')) AS open,
                   count(*) FILTER (WHERE on_site_breached OR resolve_breached) AS breached
            FROM tickets WHERE NOT test_mode AND NOT is_incident
            GROUP BY category ORDER BY category
            """,
            span,
        )
        report["by_category"] = list(await cur.fetchall())
    return report
