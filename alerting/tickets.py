"""Tickets: the life cycle a person moves them through, and what the queue and a ticket's page
show. Every function takes a cursor inside the caller's transaction and returns plain data;
a refused change raises a :class:`TicketError` that says why.

Life cycle: new -> acknowledged -> dispatched -> on_site -> resolved -> closed, or cancelled
with a reason from any open state. A test ticket (device or household silenced, or a
simulated test) is never dispatched. An emergency repair is resolved only after a crew was on
site. Resolving a district incident resolves the household tickets held under it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
import psycopg
from psycopg.rows import dict_row

from alerting.auth import OWN_TICKETS_ONLY, User

OPEN = ("new", "acknowledged", "dispatched", "on_site")
# action -> (states it starts from, state it leads to, timestamp column it sets)
TRANSITIONS: dict[str, tuple[tuple[str, ...], str, str | None]] = {
    "acknowledge": (("new",), "acknowledged", "acknowledged_at"),
    "dispatch": (("new", "acknowledged"), "dispatched", "dispatched_at"),
    "on_site": (("dispatched",), "on_site", "on_site_at"),
    "resolve": (("acknowledged", "dispatched", "on_site"), "resolved", "resolved_at"),
    "close": (("resolved",), "closed", "closed_at"),
    "cancel": (OPEN, "cancelled", None),
}
SYSTEM_OWNERS = ("system:alarms", "system:incidents")


class TicketError(Exception):
    status = 400


class TicketNotFoundError(TicketError):
    status = 404


class TicketConflictError(TicketError):
    """The ticket is not in a state that allows the change."""

    status = 409


class ForbiddenError(TicketError):
    status = 403


SUMMARY = """
    SELECT t.id, t.category, t.priority, t.status, t.household_id, h.address, t.district,
           t.device_id, t.cause, t.source, t.summary, t.department, t.crew, t.owner,
           t.test_mode, t.repeats, t.confidence, t.opened_at, t.on_site_due, t.resolve_due,
           coalesce(t.on_site_due, t.resolve_due) AS due, t.escalation_level, t.incident_id,
           t.is_incident, t.inhibited, t.valve_state, t.on_site_breached, t.resolve_breached,
           t.cancel_reason, t.updated_at,
           (SELECT count(*) FROM tickets c WHERE c.incident_id = t.incident_id
                AND t.is_incident AND NOT c.is_incident) AS households_under
    FROM tickets t LEFT JOIN households h ON h.id = t.household_id
"""
_RANK = "array_position(ARRAY['critical','high','normal','low'], t.priority)"


def jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}


async def queue(
    conn: psycopg.AsyncConnection[Any],
    *,
    include_closed: bool = False,
    include_held: bool = False,
    district: str | None = None,
    limit: int = 200,
) -> list[dict[str, Any]]:
    """The dispatcher's queue: most urgent first, then nearest promise."""
    where = ["TRUE"]
    params: dict[str, Any] = {"limit": limit}
    if not include_closed:
        where.append("t.status IN ('new', 'acknowledged', 'dispatched', 'on_site')")
    if not include_held:
        where.append("NOT t.inhibited")
    if district is not None:
        where.append("t.district = %(district)s")
        params["district"] = district
    sql = f"{SUMMARY} WHERE {' AND '.join(where)} ORDER BY {_RANK}, due, t.id LIMIT %(limit)s"
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql.encode(), params)
        return [jsonable(r) for r in await cur.fetchall()]


async def summary(conn: psycopg.AsyncConnection[Any], ticket_id: int) -> dict[str, Any] | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(f"{SUMMARY} WHERE t.id = %s".encode(), (ticket_id,))
        row = await cur.fetchone()
    return None if row is None else jsonable(row)


async def summaries(
    conn: psycopg.AsyncConnection[Any], ticket_ids: list[int]
) -> dict[int, dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(f"{SUMMARY} WHERE t.id = ANY(%s)".encode(), (ticket_ids,))
        return {int(r["id"]): jsonable(r) for r in await cur.fetchall()}


async def detail(conn: psycopg.AsyncConnection[Any], ticket_id: int) -> dict[str, Any]:
    """A ticket's page: the summary, its history, its valve commands and its household."""
    ticket = await summary(conn, ticket_id)
    if ticket is None:
        raise TicketNotFoundError(f"ticket {ticket_id} does not exist")
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT id, at, actor, kind, alarm_id, detail FROM ticket_events "
            "WHERE ticket_id = %s ORDER BY id",
            (ticket_id,),
        )
        ticket["events"] = [jsonable(r) for r in await cur.fetchall()]
        await cur.execute(
            "SELECT id, device_id, action, requested_by, requested_at, sent_at, status, reason, "
            "result_at FROM valve_commands WHERE ticket_id = %s ORDER BY requested_at",
            (ticket_id,),
        )
        ticket["valve_commands"] = [jsonable(r) for r in await cur.fetchall()]
        await cur.execute(
            "SELECT id, kind, meter_size, test_mode FROM devices WHERE household_id = %s "
            "ORDER BY kind, id",
            (ticket["household_id"],),
        )
        ticket["devices"] = list(await cur.fetchall())
    return ticket


async def insert_ticket(
    cur: psycopg.AsyncCursor[Any],
    *,
    category: str,
    priority: str,
    cause: str,
    source: str,
    owner: str,
    household_id: str | None = None,
    device_id: str | None = None,
    test_mode: bool = False,
    district: str | None = None,
    summary: str = "",
    caller_name: str | None = None,
    caller_phone: str | None = None,
    incident_id: int | None = None,
) -> int | None:
    """Open a ticket with the promises of its category's published service time (an incident
    ticket when ``source`` is 'incident'). None when an open ticket with the same key (household
    and cause, or district and cause for an incident) exists: someone opened it a moment ago."""
    await cur.execute(
        """
        INSERT INTO tickets (category, priority, household_id, device_id, cause, source, owner,
                             test_mode, on_site_due, resolve_due, district, summary, caller_name,
                             caller_phone, is_incident, incident_id)
        SELECT %(category)s, %(priority)s, %(household)s, %(device)s, %(cause)s, %(source)s,
               %(owner)s, %(test)s, now() + make_interval(mins => s.on_site_minutes),
               now() + make_interval(mins => s.resolve_minutes), %(district)s, %(summary)s,
               %(caller_name)s, %(caller_phone)s, %(source)s = 'incident', %(incident)s
        FROM service_times s WHERE s.category = %(category)s
        ON CONFLICT DO NOTHING
        RETURNING id
        """,
        {"category": category, "priority": priority, "household": household_id,
         "device": device_id, "cause": cause, "source": source, "owner": owner,
         "test": test_mode, "district": district, "summary": summary,
         "caller_name": caller_name, "caller_phone": caller_phone, "incident": incident_id},
    )  # fmt: skip
    row = await cur.fetchone()
    return None if row is None else int(row[0])


async def add_event(
    cur: psycopg.AsyncCursor[Any],
    ticket_id: int,
    actor: str,
    kind: str,
    detail: dict[str, Any] | None = None,
) -> None:
    await cur.execute(
        "INSERT INTO ticket_events (ticket_id, actor, kind, detail) VALUES (%s, %s, %s, %s)",
        (ticket_id, actor, kind, orjson.dumps(detail or {}).decode()),
    )


async def transition(
    cur: psycopg.AsyncCursor[Any],
    ticket_id: int,
    action: str,
    user: User,
    *,
    department: str | None = None,
    crew: str | None = None,
    reason: str | None = None,
    note: str | None = None,
) -> str:
    """Move a ticket one step; returns its new status."""
    starts, target, stamp = TRANSITIONS[action]
    await cur.execute(
        "SELECT status, owner, test_mode, category, is_incident, incident_id FROM tickets "
        "WHERE id = %s FOR UPDATE",
        (ticket_id,),
    )
    row = await cur.fetchone()
    if row is None:
        raise TicketNotFoundError(f"ticket {ticket_id} does not exist")
    status, owner, test_mode, category, is_incident, incident_id = row
    if user.role in OWN_TICKETS_ONLY and owner != user.username:
        raise ForbiddenError(
            f"ticket {ticket_id} is owned by {owner}; a {user.role} moves only their own"
        )
    if status not in starts:
        raise TicketConflictError(
            f"ticket {ticket_id} is {status}; '{action}' needs it {' or '.join(starts)}"
        )
    if action == "dispatch":
        if test_mode:
            raise TicketConflictError(
                f"ticket {ticket_id} is a test ticket: it is never dispatched"
            )
        if not department:
            raise TicketError("dispatch needs a department (and optionally a crew)")
    emergency = category == "emergency_repair" and not test_mode
    if action == "resolve" and emergency and status != "on_site":
        raise TicketConflictError(
            f"ticket {ticket_id} is an emergency repair: it is resolved only after a crew "
            "was on site"
        )
    if action == "cancel" and not (reason and reason.strip()):
        raise TicketError("cancel needs a reason")
    sets = ["status = %(target)s", "updated_at = now()"]
    if stamp and stamp != "acknowledged_at":
        sets.append(f"{stamp} = now()")
    if action in ("acknowledge", "dispatch"):
        sets.append("acknowledged_at = coalesce(acknowledged_at, now())")
        if owner in SYSTEM_OWNERS:  # first person to take an automatic ticket owns it
            sets.append("owner = %(user)s")
    if action == "dispatch":
        sets += ["department = %(department)s", "crew = %(crew)s"]
    if action == "cancel":
        sets.append("cancel_reason = %(reason)s")
    await cur.execute(
        f"UPDATE tickets SET {', '.join(sets)} WHERE id = %(id)s".encode(),
        {
            "target": target,
            "user": user.username,
            "department": department,
            "crew": crew,
            "reason": reason,
            "id": ticket_id,
        },
    )
    detail: dict[str, Any] = {"from": status, "to": target}
    for key, value in (("department", department), ("crew", crew), ("reason", reason)):
        if value:
            detail[key] = value
    if note:
        detail["note"] = note
    await add_event(cur, ticket_id, user.username, action, detail)
    if is_incident and target in ("resolved", "closed", "cancelled"):
        await _settle_incident(cur, incident_id, ticket_id, target, user)
    return target


async def _settle_incident(
    cur: psycopg.AsyncCursor[Any], incident_id: int, ticket_id: int, target: str, user: User
) -> None:
    """An incident ticket is done: the incident closes, and the household tickets held under
    it are resolved with it (ones a dispatcher took out of the incident stay as they are)."""
    await cur.execute(
        "UPDATE incidents SET closed_at = now() WHERE id = %s AND closed_at IS NULL",
        (incident_id,),
    )
    if target == "cancelled":
        await cur.execute(
            "UPDATE tickets SET inhibited = false, updated_at = now() "
            "WHERE incident_id = %s AND inhibited RETURNING id",
            (incident_id,),
        )
        kind = "released_from_incident"
    else:
        await cur.execute(
            "UPDATE tickets SET status = 'resolved', resolved_at = now(), updated_at = now() "
            "WHERE incident_id = %s AND inhibited AND status IN "
            "('new', 'acknowledged', 'dispatched', 'on_site') RETURNING id",
            (incident_id,),
        )
        kind = "resolved_with_incident"
    for (child,) in await cur.fetchall():
        await add_event(cur, child, user.username, kind, {"incident_ticket": ticket_id})


async def add_note(cur: psycopg.AsyncCursor[Any], ticket_id: int, user: User, text: str) -> None:
    await cur.execute("SELECT 1 FROM tickets WHERE id = %s", (ticket_id,))
    if await cur.fetchone() is None:
        raise TicketNotFoundError(f"ticket {ticket_id} does not exist")
    await add_event(cur, ticket_id, user.username, "note", {"text": text})
    await cur.execute("UPDATE tickets SET updated_at = now() WHERE id = %s", (ticket_id,))


async def silenced(
    cur: psycopg.AsyncCursor[Any], household: str | None, device: str | None
) -> bool:
    """Is this device or household in test or maintenance mode now?"""
    await cur.execute(
        """
        SELECT EXISTS (SELECT 1 FROM silences WHERE lifted_at IS NULL
                       AND now() >= starts_at AND now() < ends_at
                       AND (household_id = %(h)s OR device_id = %(d)s))
            OR EXISTS (SELECT 1 FROM devices WHERE id = %(d)s AND test_mode)
        """,
        {"h": household, "d": device},
    )
    row = await cur.fetchone()
    return bool(row and row[0])


TEST_ENDED = "test mode ended"


async def end_test_tickets(
    cur: psycopg.AsyncCursor[Any], household: str | None, device: str | None, actor: str,
    why: str = TEST_ENDED,
) -> list[int]:  # fmt: skip
    """Test mode ended for a household or device (lifted, or a real alarm came after it ran
    out): its open test tickets end, cancelled and noted as test, so that nothing of the test
    stays in the live queue and a real alarm opens a real ticket. Nothing ends while another
    silence still covers them. Returns the tickets ended."""
    async with cur.connection.cursor() as plain:  # whatever row factory ``cur`` has
        if await silenced(plain, household, device):
            return []
        await plain.execute(
            "UPDATE tickets SET status = 'cancelled', cancel_reason = %(why)s, "
            "updated_at = now() WHERE test_mode AND status = ANY(%(open)s) "
            "AND (household_id = %(h)s OR (%(d)s::text IS NOT NULL AND device_id = %(d)s)) "
            "RETURNING id",
            {"why": why, "open": list(OPEN), "h": household, "d": device},
        )
        ended = [int(r[0]) for r in await plain.fetchall()]
        for ticket_id in ended:
            await _noted_test_end(plain, ticket_id, actor, why)
    return ended


async def _noted_test_end(
    cur: psycopg.AsyncCursor[Any], ticket_id: int, actor: str, why: str
) -> None:
    await add_event(cur, ticket_id, actor, "cancel",
                    {"to": "cancelled", "reason": why, "test_mode": True})  # fmt: skip


async def create_from_call(
    cur: psycopg.AsyncCursor[Any],
    user: User,
    *,
    category: str,
    summary_text: str,
    cause: str | None = None,
    priority: str | None = None,
    household_id: str | None = None,
    device_id: str | None = None,
    caller_name: str | None = None,
    caller_phone: str | None = None,
) -> tuple[int, bool]:
    """A call-taker's ticket. Returns (ticket id, joined): a call about a household that
    already has an open ticket for the same cause joins it (a neighbour reporting the same
    leak) instead of opening a second one, and confirms an alarm ticket (high confidence; gas
    in the home: critical). A call is never a test: a household's open test ticket of that
    cause ends and the call opens a real ticket."""
    cause = cause or category
    district = None
    if household_id is not None:
        await cur.execute("SELECT district FROM households WHERE id = %s", (household_id,))
        row = await cur.fetchone()
        if row is None:
            raise TicketError(f"household {household_id!r} is not in the registry")
        district = row[0]
        await cur.execute(
            "SELECT id, test_mode, source FROM tickets WHERE household_id = %s AND cause = %s "
            "AND status IN ('new', 'acknowledged', 'dispatched', 'on_site') FOR UPDATE",
            (household_id, cause),
        )
        existing = await cur.fetchone()
        if existing is not None and existing[1]:
            # a person calling is never a test: the test ticket ends, the call opens a real one
            why = "a real call during test mode"
            await cur.execute(
                "UPDATE tickets SET status = 'cancelled', cancel_reason = %s, updated_at = now() "
                "WHERE id = %s",
                (why, existing[0]),
            )
            await _noted_test_end(cur, existing[0], user.username, why)
            existing = None
        if existing is not None:
            # the caller confirms the alarm: high confidence; gas in the home becomes critical
            await cur.execute(
                "UPDATE tickets SET repeats = repeats + 1, updated_at = now(), "
                "confidence = CASE WHEN source = 'alarm' THEN 'high' ELSE confidence END, "
                "priority = CASE WHEN cause = 'gas_leak' THEN 'critical' ELSE priority END, "
                "inhibited = inhibited AND cause <> 'gas_leak' WHERE id = %s",
                (existing[0],),
            )
            await add_event(
                cur,
                existing[0],
                user.username,
                "joined",
                {"summary": summary_text, "caller_name": caller_name, "caller_phone": caller_phone},
            )
            return int(existing[0]), True
    if device_id is not None:
        await cur.execute("SELECT household_id FROM devices WHERE id = %s", (device_id,))
        row = await cur.fetchone()
        if row is None or (household_id is not None and row[0] != household_id):
            raise TicketError(
                f"device {device_id!r} is not registered to household {household_id!r}"
            )
    test = False  # a person calling is never a test, whatever mode the household is in
    if priority is None:
        priority = "critical" if category == "emergency_repair" else "normal"
    opened = await insert_ticket(
        cur, category=category, priority=priority, cause=cause, source="call",
        owner=user.username, household_id=household_id, device_id=device_id, test_mode=test,
        district=district, summary=summary_text, caller_name=caller_name,
        caller_phone=caller_phone,
    )  # fmt: skip
    if opened is None:
        raise TicketConflictError(
            f"a {cause} ticket for household {household_id} was opened a moment ago: "
            "search the household again and join it"
        )
    ticket_id = opened
    await add_event(
        cur,
        ticket_id,
        user.username,
        "opened",
        {"source": "call", "summary": summary_text, "caller_name": caller_name,
         "caller_phone": caller_phone, "test": test},
    )  # fmt: skip
    return ticket_id, False


async def find_households(
    conn: psycopg.AsyncConnection[Any], query: str, limit: int = 20
) -> list[dict[str, Any]]:
    """Households by address (any part), phone, household id or meter (device) number, each
    with its devices and its open tickets, so a call-taker sees what is already open there."""
    digits = "".join(ch for ch in query if ch.isdigit())
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            """
            SELECT h.id, h.district, h.address, h.phone FROM households h
            WHERE h.id = %(q)s OR h.address ILIKE %(like)s
               OR (%(digits)s <> '' AND regexp_replace(coalesce(h.phone, ''), '\\D', '', 'g')
                   = %(digits)s)
               OR EXISTS (SELECT 1 FROM devices d WHERE d.household_id = h.id AND d.id = %(q)s)
            ORDER BY h.id LIMIT %(limit)s
            """,
            {"q": query, "like": f"%{_escape_like(query)}%", "digits": digits, "limit": limit},
        )
        households = list(await cur.fetchall())
        for household in households:
            await cur.execute(
                "SELECT id, kind, meter_size, test_mode FROM devices WHERE household_id = %s "
                "ORDER BY kind, id",
                (household["id"],),
            )
            household["devices"] = list(await cur.fetchall())
            await cur.execute(
                f"{SUMMARY} WHERE t.household_id = %s AND t.status IN "
                "('new', 'acknowledged', 'dispatched', 'on_site') ORDER BY t.id".encode(),
                (household["id"],),
            )
            household["open_tickets"] = [jsonable(r) for r in await cur.fetchall()]
    return households


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
