"""Alarms into tickets: the alerting service's side of the alarm outbox.

Rows are taken with ``FOR UPDATE SKIP LOCKED``; each row's effect on the tickets and the row's
``done_at`` are written in one transaction, so every alarm makes its effect exactly once,
across restarts and with several service instances. One open ticket per (household, cause):
a repeat appends an event to it and counts; a clear is recorded on it; a confirmation from a
second device raises its priority. With none open, an alarm of the leak a ticket was just
resolved for is recorded on that ticket instead of opening another (:mod:`alerting.cooldown`).

Each row is applied inside its own savepoint: a row that cannot be applied as designed (an
unknown rule, a field of the wrong type, a household that is gone, a bug) is rolled back alone,
marked failed with its error and handed to :mod:`alerting.unreadable`, which opens (or adds to)
a ticket holding the raw payload so that a person looks at it. The rows after it go on. Only a
lost connection (``OperationalError``) ends the batch, to be taken again after reconnecting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg

from alerting.cooldown import Cooldown, during_cooldown, new_rise, resolved_within
from alerting.tickets import TEST_ENDED, end_test_tickets, insert_ticket, silenced
from alerting.unreadable import OutboxRow, ticket_unreadable

log = logging.getLogger(__name__)

# alarm rule -> (cause, category, priority for a critical alarm, priority otherwise)
RULES: dict[str, tuple[str, str, str, str]] = {
    "gas_low": ("gas_leak", "emergency_repair", "critical", "high"),
    "gas_high": ("gas_leak", "emergency_repair", "critical", "critical"),
    "gas_rising": ("gas_leak", "emergency_repair", "critical", "high"),
    "gas_present": ("gas_leak", "emergency_repair", "critical", "high"),
    "burst": ("burst", "emergency_repair", "critical", "critical"),
    "continuous_flow": ("leak_behind_meter", "inspection", "high", "normal"),
    "micro_leak": ("leak_behind_meter", "inspection", "high", "normal"),
    "pressure_low": ("supply_pressure", "engineering", "high", "high"),
    "pressure_high": ("supply_pressure", "engineering", "high", "high"),
    "clock_skew": ("device_fault", "inspection", "normal", "low"),
    "silent": ("device_silent", "inspection", "normal", "low"),
    "sensor_fault": ("device_fault", "inspection", "normal", "low"),
    "valve_fault": ("valve_passing", "emergency_repair", "critical", "high"),
    "meter_mismatch": ("device_fault", "inspection", "normal", "low"),
    "battery_low": ("battery_low", "inspection", "high", "normal"),
    "never_reported": ("device_silent", "inspection", "normal", "low"),
    "tamper": ("device_fault", "inspection", "normal", "low"),
    "reverse_flow": ("device_fault", "inspection", "normal", "low"),
}
SYSTEM_OWNER = "system:alarms"
# what can kill is never held under a district incident: grouped for the overview, each of
# these stays in the queue, dispatchable, with its own promise (like any critical ticket)
NEVER_HELD = ("gas_leak", "burst", "valve_passing")


INCIDENT_OWNER = "system:incidents"
PRIORITY_ORDER = ["low", "normal", "high", "critical"]


@dataclass(frozen=True)
class Policy:
    storm_tickets: int = 5
    storm_window_s: float = 300.0
    valve_rules: tuple[str, ...] = ("gas_high", "burst")
    cooldown: Cooldown = field(default_factory=Cooldown)


@dataclass
class Taken:
    rows: int = 0
    opened: int = 0
    appended: int = 0
    cooled: int = 0  # alarms recorded on a just-resolved ticket instead of opening one
    incidents: int = 0
    failed: list[int] = field(default_factory=list)  # outbox ids ticketed as unreadable
    valve_commands: list[str] = field(default_factory=list)


class UnknownRuleError(ValueError):
    """An outbox row names a rule that has no route to a ticket (a newer ingest, or a bug)."""


async def take_outbox(
    conn: psycopg.AsyncConnection[Any], limit: int = 100, policy: Policy | None = None
) -> Taken:
    """Apply up to ``limit`` pending outbox rows in one transaction."""
    policy = policy or Policy()
    taken = Taken()
    async with conn.transaction(), conn.cursor() as cur:
        # critical alarms first, then the rest in the order ingest wrote them. An alarm's own
        # events keep their order: a row waits while an earlier row of its alarm is pending
        # (perhaps locked by another instance right now).
        await cur.execute(
            "SELECT o.id, o.alarm_id, o.event, o.payload, o.payload::text FROM alarm_outbox o "
            "WHERE o.done_at IS NULL AND NOT EXISTS (SELECT 1 FROM alarm_outbox p "
            "WHERE p.alarm_id = o.alarm_id AND p.id < o.id AND p.done_at IS NULL) "
            "ORDER BY (o.payload->>'severity' = 'critical') IS NOT TRUE, o.id "
            "LIMIT %s FOR UPDATE OF o SKIP LOCKED",
            (limit,),
        )
        rows = await cur.fetchall()
        applied = []
        for outbox_id, alarm_id, event, payload, raw in rows:
            row = OutboxRow(int(outbox_id), int(alarm_id), str(event), payload, str(raw))
            taken.rows += 1
            try:
                async with conn.transaction():  # a savepoint: a failing row rolls back alone
                    opened = await _apply(cur, row, policy, taken)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                raise  # the connection, not the row: the whole batch is taken again
            except Exception as exc:  # any row, whatever it holds, ends with a person looking
                expected = isinstance(exc, UnknownRuleError | TypeError | psycopg.Error)
                log.error("outbox row %d (alarm %d) could not be applied: %s: %s; ticketed for "
                          "a person", row.id, row.alarm_id, type(exc).__name__, exc,
                          exc_info=not expected)  # fmt: skip
                await _fail(cur, row, exc)
                taken.failed.append(row.id)
                continue
            applied.append(row.id)
            taken.opened += opened
            taken.appended += not opened
        if applied:
            await cur.execute(
                "UPDATE alarm_outbox SET done_at = now() WHERE id = ANY(%s)", (applied,)
            )
    return taken


async def _apply(cur: psycopg.AsyncCursor[Any], item: OutboxRow, policy: Policy,
                 taken: Taken) -> bool:  # fmt: skip
    """One outbox row's effect; True when it opened a ticket. Raises on a row that does not
    read as designed (the caller tickets it as unreadable)."""
    outbox_id, alarm_id, event, payload = item.id, item.alarm_id, item.event, item.payload
    if not isinstance(payload, dict):
        raise TypeError(f"the payload is a JSON {type(payload).__name__}, not an object")
    rule = _rule(payload)
    if rule is None or rule not in RULES:
        raise UnknownRuleError(f"rule {payload.get('rule')!r} has no route to a ticket")
    cause, category, if_critical, otherwise = RULES[rule]
    household = payload.get("household")
    detail = item.raw  # the stored JSON as PostgreSQL reads it back (any number it could store)
    if event == "cleared":  # half the traffic: one statement
        await cur.execute(
            """
            WITH open AS (
                SELECT id FROM tickets WHERE household_id = %(h)s AND cause = %(cause)s
                  AND status NOT IN ('resolved', 'closed', 'cancelled') FOR UPDATE
            ), touched AS (
                UPDATE tickets t SET updated_at = now() FROM open WHERE t.id = open.id
                RETURNING t.id
            )
            INSERT INTO ticket_events (ticket_id, actor, kind, alarm_id, outbox_id, detail)
            SELECT id, %(actor)s, 'alarm_cleared', %(alarm)s, %(outbox)s, %(detail)s
            FROM touched
            """,
            {"h": household, "cause": cause, "actor": SYSTEM_OWNER, "alarm": alarm_id,
             "outbox": outbox_id, "detail": detail},
        )  # fmt: skip
        return False
    await cur.execute(
        "SELECT id, test_mode FROM tickets WHERE household_id = %s AND cause = %s "
        "AND status NOT IN ('resolved', 'closed', 'cancelled') FOR UPDATE",
        (household, cause),
    )
    row = await cur.fetchone()
    if row is not None and row[1] and event == "raised" and payload.get("test") is not True:
        # a real alarm after the household's test mode ran out: the test ticket ends and the
        # alarm opens a real one (never a repeat on a ticket nobody may dispatch)
        ended = await end_test_tickets(cur, household, payload.get("device"), SYSTEM_OWNER,
                                       f"{TEST_ENDED}; a real {rule} alarm followed")  # fmt: skip
        row = None if ended else row
    opened = False
    ticket_id = 0
    priority = if_critical if payload.get("severity") == "critical" else otherwise
    test = False
    note: dict[str, Any] = {}  # added to the event's detail beside the payload
    if row is None and event == "raised":
        test = payload.get("test") is True or await silenced(cur, household, payload.get("device"))
        resolved = None if test else await resolved_within(cur, household, cause, policy.cooldown)
        if resolved is not None:
            rise = new_rise(payload.get("severity"), payload.get("value"), resolved,
                            policy.cooldown.margin)  # fmt: skip
            if rise is None:
                await during_cooldown(cur, item, resolved, policy.cooldown, SYSTEM_OWNER)
                taken.cooled += 1
                return False
            note = {"cooldown_ticket": resolved.ticket_id,
                    "cooldown_note": f"a new rise after ticket {resolved.ticket_id} was "
                                     f"resolved: {rise}"}  # fmt: skip
        ticket = await insert_ticket(
            cur, category=category, priority=priority, cause=cause, source="alarm",
            owner=SYSTEM_OWNER, household_id=household, device_id=payload.get("device"),
            test_mode=test, district=payload.get("district"),
            summary=f"{rule} alarm from {payload.get('device')}",
        )  # fmt: skip
        if ticket is None:  # another instance opened it a moment ago: this is a repeat
            await cur.execute(
                "SELECT id FROM tickets WHERE household_id = %s AND cause = %s "
                "AND status NOT IN ('resolved', 'closed', 'cancelled') FOR UPDATE",
                (household, cause),
            )
            row = await cur.fetchone()
        else:
            ticket_id, opened = ticket, True
    if opened:
        kind = "opened"
    elif row is None:
        kind = ""  # a clear or confirmation for a ticket already closed by a person
    else:
        ticket_id = int(row[0])
        kind = {"raised": "repeat", "cleared": "alarm_cleared", "confidence": "confirmed"}[event]
        if event == "raised":  # a repeat counts, and can only make the ticket more urgent
            await cur.execute(
                "UPDATE tickets SET repeats = repeats + 1, updated_at = now(), "
                "priority = (%(order)s::text[])[greatest(array_position(%(order)s::text[], "
                "priority), array_position(%(order)s::text[], %(new)s))], "
                "inhibited = inhibited AND %(new)s <> 'critical' WHERE id = %(id)s",
                {"order": PRIORITY_ORDER, "new": priority, "id": ticket_id},
            )
        elif event == "confidence":
            await cur.execute(
                "UPDATE tickets SET confidence = 'high', updated_at = now(), priority = CASE "
                "WHEN priority = 'critical' THEN 'critical' ELSE 'high' END WHERE id = %s",
                (ticket_id,),
            )
        elif event == "cleared":
            await cur.execute("UPDATE tickets SET updated_at = now() WHERE id = %s", (ticket_id,))
    if kind:
        await cur.execute(
            "INSERT INTO ticket_events (ticket_id, actor, kind, alarm_id, outbox_id, detail) "
            "VALUES (%s, %s, %s, %s, %s, %s::jsonb || %s::jsonb)",
            (ticket_id, SYSTEM_OWNER, kind, alarm_id, outbox_id, detail,
             orjson.dumps(note if kind == "opened" else {}).decode()),
        )  # fmt: skip
    if opened and not test and payload.get("district"):
        taken.incidents += await _group_storm(
            cur,
            ticket_id=ticket_id,
            district=str(payload["district"]),
            cause=cause,
            category=category,
            priority=priority,
            policy=policy,
        )
    if (
        kind in ("opened", "repeat")
        and payload.get("severity") == "critical"
        and rule in policy.valve_rules
    ):
        command = await _close_valve_by_policy(cur, ticket_id, rule, payload)
        if command:
            taken.valve_commands.append(command)
    return opened


async def _fail(cur: psycopg.AsyncCursor[Any], row: OutboxRow, exc: Exception) -> None:
    """A row that could not be applied: ticketed as unreadable. Should even that fail, the row
    is still marked failed (never taken again, never blocking its alarm's later rows): the
    console and /health list it, without a ticket."""
    try:
        async with cur.connection.transaction():
            route = RULES.get(_rule(row.payload) or "")
            await ticket_unreadable(cur, row, exc, SYSTEM_OWNER, route)
    except (psycopg.OperationalError, psycopg.InterfaceError):
        raise
    except Exception as second:
        log.critical("outbox row %d could not be ticketed either: %r", row.id, second,
                     exc_info=second)  # fmt: skip
        reason = f"{type(exc).__name__}: {exc}; no ticket: {type(second).__name__}: {second}"
        await cur.execute(
            "UPDATE alarm_outbox SET done_at = now(), failed_at = now(), error = %s WHERE id = %s",
            (reason.replace("\x00", "")[:1000], row.id),
        )


def _rule(payload: Any) -> str | None:
    rule = payload.get("rule") if isinstance(payload, dict) else None
    return rule if isinstance(rule, str) else None


async def _group_storm(
    cur: psycopg.AsyncCursor[Any],
    *,
    ticket_id: int,
    district: str,
    cause: str,
    category: str,
    priority: str,
    policy: Policy,
) -> int:
    """Put a newly opened household ticket under its district's incident, opening the
    incident when this ticket makes a storm. Returns incidents opened (0 or 1)."""
    await cur.execute(
        "SELECT i.id FROM incidents i WHERE district = %s AND cause = %s AND closed_at IS NULL",
        (district, cause),
    )
    row = await cur.fetchone()
    opened = 0
    if row is None:
        await cur.execute(
            "SELECT count(*) FROM tickets WHERE district = %s AND cause = %s "
            "AND source = 'alarm' AND NOT test_mode AND NOT is_incident "
            "AND opened_at > now() - %s * interval '1 second' "
            "AND status IN ('new', 'acknowledged', 'dispatched', 'on_site')",
            (district, cause, policy.storm_window_s),
        )
        count = await cur.fetchone()
        if count is None or count[0] < policy.storm_tickets:
            return 0
        await cur.execute(
            "INSERT INTO incidents (district, cause) VALUES (%s, %s) "
            "ON CONFLICT (district, cause) WHERE closed_at IS NULL DO NOTHING RETURNING id",
            (district, cause),
        )
        row = await cur.fetchone()
        if row is None:  # another instance opened it a moment ago
            return await _group_storm(
                cur,
                ticket_id=ticket_id,
                district=district,
                cause=cause,
                category=category,
                priority=priority,
                policy=policy,
            )
        opened = 1
        incident_id = int(row[0])
        incident_ticket = await insert_ticket(
            cur, category=category, priority="critical" if priority == "critical" else "high",
            cause=cause, source="incident", owner=INCIDENT_OWNER, district=district,
            summary=f"district incident: {cause} in {district}", incident_id=incident_id,
        )  # fmt: skip
        assert incident_ticket is not None  # the incident is new: so is its ticket
        await cur.execute(
            "INSERT INTO ticket_events (ticket_id, actor, kind, detail) VALUES (%s, %s, %s, %s)",
            (incident_ticket, INCIDENT_OWNER, "opened",
             orjson.dumps({"source": "incident", "district": district, "cause": cause}).decode()),
        )  # fmt: skip
        # the storm's tickets so far go under it; critical ones and NEVER_HELD stay in the queue
        await cur.execute(
            "UPDATE tickets SET incident_id = %s, "
            "inhibited = (priority <> 'critical' AND cause <> ALL(%s)), "
            "updated_at = now() WHERE district = %s AND cause = %s AND NOT is_incident "
            "AND NOT test_mode AND incident_id IS NULL "
            "AND status IN ('new', 'acknowledged', 'dispatched', 'on_site') RETURNING id",
            (incident_id, list(NEVER_HELD), district, cause),
        )
        attached = [int(r[0]) for r in await cur.fetchall()]
    else:
        incident_id = int(row[0])
        await cur.execute(
            "UPDATE tickets SET incident_id = %s, "
            "inhibited = (priority <> 'critical' AND cause <> ALL(%s)), "
            "updated_at = now() WHERE id = %s",
            (incident_id, list(NEVER_HELD), ticket_id),
        )
        attached = [ticket_id]
    await cur.execute(
        "UPDATE incidents SET households = households + %s WHERE id = %s",
        (len(attached), incident_id),
    )
    await cur.execute(
        "UPDATE tickets SET updated_at = now(), repeats = repeats + %s "
        "WHERE incident_id = %s AND is_incident RETURNING id",
        (len(attached), incident_id),
    )
    incident_ticket_row = await cur.fetchone()
    grouped = orjson.dumps(
        {"incident": incident_id, "incident_ticket": incident_ticket_row and incident_ticket_row[0]}
    ).decode()
    for child in attached:
        await cur.execute(
            "INSERT INTO ticket_events (ticket_id, actor, kind, detail) VALUES (%s, %s, %s, %s)",
            (child, INCIDENT_OWNER, "grouped", grouped),
        )
    return opened


async def _close_valve_by_policy(
    cur: psycopg.AsyncCursor[Any], ticket_id: int, rule: str, payload: dict[str, Any]
) -> str | None:
    """Request a close-valve command for this ticket, unless it is a test ticket or one was
    already requested. A burst closes the meter that saw it; a gas leak closes the household's
    meter (its valve cuts the supply), or the detector's own valve output when it has no meter."""
    from alerting.valve import request_valve

    await cur.execute("SELECT test_mode, household_id FROM tickets WHERE id = %s", (ticket_id,))
    row = await cur.fetchone()
    if row is None or row[0]:
        return None
    await cur.execute(
        "SELECT 1 FROM valve_commands WHERE ticket_id = %s AND action = 'close_valve' "
        "AND status IN ('pending', 'sent', 'done')",
        (ticket_id,),
    )
    if await cur.fetchone() is not None:
        return None
    device = payload.get("device")
    if rule != "burst":
        await cur.execute(
            "SELECT id FROM devices WHERE household_id = %s AND kind = 'meter' ORDER BY id LIMIT 1",
            (row[1],),
        )
        meter = await cur.fetchone()
        if meter is not None:
            device = meter[0]
    if not device:
        return None
    return await request_valve(cur, ticket_id, str(device), "close_valve", "policy:valve")
