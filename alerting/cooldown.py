"""The cool-down after a ticket is resolved: a household's leak that a crew has just dealt with
does not open a second ticket while its gas (or flow) dies away.

A ``raised`` alarm for a household and cause with no open ticket, arriving within the cool-down
after the household's latest ticket of that cause was resolved, is the same decaying leak when
it is no more severe than the worst alarm that ticket had and its value is no more than a small
margin above the highest value that ticket's alarms were raised at. Such an alarm opens no
second ticket with a new promise: it is recorded on the resolved ticket (an
``alarm_during_cooldown`` event) and that ticket is reopened (status ``new``, its promised
times kept, so it shows at the top of the queue as overdue): gas back in a home a crew has just
left is never hidden on a resolved ticket. No valve command is sent for it. Anything else is a
new rise and opens a ticket as usual: a higher severity, a higher value, a value that cannot be
compared (missing, not a finite number, or none on the ticket), a cancelled or test ticket, or
the cool-down over. When unsure, a ticket is opened.

Only causes whose alarm value is one quantity that grows with the hazard take part: CH4 %LEL
for a gas leak, flow m3/h for the flow causes. A supply-pressure ticket (a low pressure is the
worse one), a device fault or a silent device (values in mixed units) open tickets as before.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
import psycopg

from alerting.unreadable import OutboxRow

log = logging.getLogger(__name__)

# causes whose alarms all carry one quantity that is higher the worse the hazard is
COOLDOWN_CAUSES = frozenset({"gas_leak", "burst", "leak_behind_meter", "valve_passing"})
# alarm severities, least severe first (ingest's ``Severity``; a test pins the two together)
SEVERITY_ORDER = ("minor", "major", "critical")
# ticket events that carried an alarm while the ticket was open: what the crew dealt with
_TICKET_ALARM_KINDS = ["opened", "repeat"]


@dataclass(frozen=True)
class Cooldown:
    """How long after a resolved ticket a decaying leak stays on it, and by how much (a
    fraction of the ticket's highest value) a value must exceed it to be a new rise."""

    minutes: float = 30.0
    margin: float = 0.1


@dataclass(frozen=True)
class Resolved:
    """A household's latest ticket of one cause, resolved within the cool-down, with the worst
    severity and the highest value its alarms were raised at (None when none is known)."""

    ticket_id: int
    resolved_at: datetime
    worst_severity: str | None
    highest_value: float | None


def new_rise(severity: Any, value: Any, resolved: Resolved, margin: float) -> str | None:
    """Why an alarm (its payload's severity and value) is a new rise after ``resolved``, or
    None when it is the same decaying leak."""
    if severity not in SEVERITY_ORDER:
        return f"severity {severity!r} cannot be compared"
    worst = resolved.worst_severity
    if worst not in SEVERITY_ORDER:
        return "the resolved ticket has no alarm severity to compare with"
    if SEVERITY_ORDER.index(severity) > SEVERITY_ORDER.index(worst):
        return f"severity {severity} above the resolved ticket's {worst}"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return f"value {value!r} cannot be compared"
    highest = resolved.highest_value
    if highest is None or not math.isfinite(highest):
        return "the resolved ticket has no alarm value to compare with"
    limit = highest + abs(highest) * margin
    if value > limit:
        return f"value {value:g} above the resolved ticket's highest {highest:g} (+{margin:.0%})"
    return None


async def resolved_within(
    cur: psycopg.AsyncCursor[Any], household: Any, cause: str, cooldown: Cooldown
) -> Resolved | None:
    """The household's latest ticket of this cause when it was resolved (or resolved and then
    closed) within the cool-down, locked; None otherwise. Test tickets and district incidents
    are not considered; a cancelled latest ticket ends the cool-down (nobody repaired it)."""
    if cause not in COOLDOWN_CAUSES or cooldown.minutes <= 0 or not isinstance(household, str):
        return None
    await cur.execute(
        "SELECT id, status, resolved_at, resolved_at > now() - make_interval(secs => %s) "
        "FROM tickets WHERE household_id = %s AND cause = %s AND NOT test_mode "
        "AND NOT is_incident ORDER BY id DESC LIMIT 1 FOR UPDATE",
        (cooldown.minutes * 60.0, household, cause),
    )
    row = await cur.fetchone()
    if row is None or row[1] not in ("resolved", "closed") or not row[3]:
        return None
    ticket_id, resolved_at = int(row[0]), row[2]
    await cur.execute(
        "SELECT max(array_position(%s::text[], a.severity)), "
        "max(a.raise_value) FILTER (WHERE a.raise_value <> 'NaN') "
        "FROM ticket_events e JOIN alarms a ON a.id = e.alarm_id "
        "WHERE e.ticket_id = %s AND e.kind = ANY(%s)",
        (list(SEVERITY_ORDER), ticket_id, _TICKET_ALARM_KINDS),
    )
    worst_rank, highest = await cur.fetchone() or (None, None)
    return Resolved(
        ticket_id=ticket_id,
        resolved_at=resolved_at,
        worst_severity=None if worst_rank is None else SEVERITY_ORDER[int(worst_rank) - 1],
        highest_value=None if highest is None else float(highest),
    )


async def during_cooldown(
    cur: psycopg.AsyncCursor[Any], item: OutboxRow, resolved: Resolved, cooldown: Cooldown,
    actor: str,
) -> None:  # fmt: skip
    """Record an alarm of the leak a ticket was just resolved for in that ticket's history, as
    an ``alarm_during_cooldown`` event with its payload, and reopen the ticket (status ``new``,
    its promised times as they were: the crew goes back; the live feed and the webhook
    announce it like any other change)."""
    payload = item.payload
    until = resolved.resolved_at + timedelta(minutes=cooldown.minutes)
    note = {
        "cooldown_note": "the same leak decaying after this ticket was resolved "
        f"({payload.get('severity')} at {payload.get('value')!r}, not above "
        f"{resolved.worst_severity} at {resolved.highest_value!r}): no new ticket, this one "
        "reopened",
        "cooldown_until": until.isoformat(),
    }
    await cur.execute(
        "UPDATE tickets SET status = 'new', updated_at = now() WHERE id = %s",
        (resolved.ticket_id,),
    )
    await cur.execute(
        "INSERT INTO ticket_events (ticket_id, actor, kind, alarm_id, outbox_id, detail) "
        "VALUES (%s, %s, 'alarm_during_cooldown', %s, %s, %s::jsonb || %s::jsonb)",
        (resolved.ticket_id, actor, item.alarm_id, item.id, item.raw,
         orjson.dumps(note).decode()),
    )  # fmt: skip
    log.info("alarm %d (%s, household %s) recorded on ticket %d, resolved at %s: within its "
             "cool-down", item.alarm_id, payload.get("rule"), payload.get("household"),
             resolved.ticket_id, resolved.resolved_at.isoformat())  # fmt: skip
