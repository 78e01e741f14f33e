"""Tickets: the queue, a ticket's page, calls, the life-cycle actions, notes, valve and the
evidence chart."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, status

from alerting import tickets
from alerting.api.deps import Conn, need
from alerting.api.models import (
    ActionIn,
    ActionRuleOut,
    CallTicketIn,
    CreatedOut,
    EvidenceOut,
    NoteIn,
    TicketDetailOut,
    TicketOut,
    ValveIn,
    ValveRequestedOut,
)
from alerting.auth import User, audit

router = APIRouter(prefix="/api/tickets", tags=["tickets"])
TicketId = Annotated[int, Path(ge=1, le=2**62, description="ticket number")]
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "not signed in"},
    403: {"description": "the role may not do this"},
    404: {"description": "no such ticket"},
    409: {"description": "the ticket's state does not allow it"},
}


def _fail(exc: tickets.TicketError) -> HTTPException:
    code = exc.status if exc.status != 400 else status.HTTP_422_UNPROCESSABLE_CONTENT
    return HTTPException(code, str(exc))


async def _summary(conn: Conn, ticket_id: int) -> dict[str, Any]:
    found = await tickets.summary(conn, ticket_id)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"ticket {ticket_id} does not exist")
    return found


@router.get("", response_model=list[TicketOut], responses=ERRORS)
async def list_tickets(
    conn: Conn,
    _user: Annotated[User, Depends(need("tickets.read"))],
    include_closed: bool = False,
    include_held: Annotated[
        bool, Query(description="also the household tickets held under an incident")
    ] = False,
    district: Annotated[str | None, Query(pattern=r"^[^\x00-\x1f]{1,64}$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[dict[str, Any]]:
    """The queue: most urgent first, then nearest promise."""
    return await tickets.queue(
        conn,
        include_closed=include_closed,
        include_held=include_held,
        district=district,
        limit=limit,
    )


@router.post("", response_model=CreatedOut, status_code=status.HTTP_201_CREATED, responses=ERRORS)
async def create_ticket(
    body: CallTicketIn,
    conn: Conn,
    user: Annotated[User, Depends(need("tickets.create"))],
) -> dict[str, Any]:
    """A ticket from a call. The caller's household is found first (GET /api/households);
    when an open ticket for the same cause exists there, the call joins it."""
    async with conn.cursor() as cur:
        try:
            ticket_id, joined = await tickets.create_from_call(
                cur,
                user,
                category=body.category,
                summary_text=body.summary,
                cause=body.cause,
                priority=body.priority,
                household_id=body.household_id,
                device_id=body.device_id,
                caller_name=body.caller_name,
                caller_phone=body.caller_phone,
            )
        except tickets.TicketError as exc:
            raise _fail(exc) from None
        await audit(cur, user.username, "ticket.join" if joined else "ticket.create",
                    f"ticket:{ticket_id}", body.model_dump(exclude_none=True))  # fmt: skip
    return {"id": ticket_id, "joined": joined, "ticket": await _summary(conn, ticket_id)}


@router.get(
    "/actions",
    response_model=dict[str, ActionRuleOut],
    responses={401: ERRORS[401], 403: ERRORS[403]},
)
async def action_rules(
    _user: Annotated[User, Depends(need("tickets.read"))],
) -> dict[str, dict[str, Any]]:
    """The life-cycle actions: the states each is allowed in and the state it leads to (the
    console enables its buttons by this table, the one the server enforces)."""
    return {
        action: {"starts": list(starts), "leads_to": target}
        for action, (starts, target, _) in tickets.TRANSITIONS.items()
    }


@router.get("/{ticket_id}", response_model=TicketDetailOut, responses=ERRORS)
async def get_ticket(
    ticket_id: TicketId, conn: Conn, _user: Annotated[User, Depends(need("tickets.read"))]
) -> dict[str, Any]:
    try:
        return await tickets.detail(conn, ticket_id)
    except tickets.TicketError as exc:
        raise _fail(exc) from None


async def _act(
    conn: Conn, ticket_id: int, action: str, user: User, body: ActionIn | None
) -> dict[str, Any]:
    body = body or ActionIn()
    async with conn.cursor() as cur:
        try:
            await tickets.transition(
                cur,
                ticket_id,
                action,
                user,
                department=body.department,
                crew=body.crew,
                reason=body.reason,
                note=body.note,
            )
        except tickets.TicketError as exc:
            raise _fail(exc) from None
        await audit(cur, user.username, f"ticket.{action}", f"ticket:{ticket_id}",
                    body.model_dump(exclude_none=True))  # fmt: skip
    return await _summary(conn, ticket_id)


# the life-cycle steps: (path, action, what it does); each needs the permission tickets.<action>
STEPS = (
    ("acknowledge", "acknowledge", "Take the ticket: a system ticket becomes the person's."),
    ("dispatch", "dispatch",
     "Send the work to a department (and crew); needs `department`. A test ticket is never "
     "dispatched."),
    ("on-site", "on_site", "The crew is on site."),
    ("resolve", "resolve", "Resolved (an emergency repair only after a crew was on site)."),
    ("close", "close", "Close a resolved ticket."),
    ("cancel", "cancel", "Cancel with a `reason` (required)."),
)  # fmt: skip


def _step_route(path: str, action: str, doc: str) -> None:
    allowed = Depends(need(f"tickets.{action}"))  # a default: annotations here are strings

    async def step(
        ticket_id: TicketId,
        conn: Conn,
        body: ActionIn | None = None,
        user: User = allowed,
    ) -> dict[str, Any]:
        return await _act(conn, ticket_id, action, user, body)

    step.__doc__ = doc
    router.post(f"/{{ticket_id}}/{path}", response_model=TicketOut, responses=ERRORS,
                name=action, operation_id=f"ticket_{action}")(step)  # fmt: skip


for _path, _action, _doc in STEPS:
    _step_route(_path, _action, _doc)


@router.post("/{ticket_id}/notes", response_model=TicketOut, responses=ERRORS)
async def add_note(
    ticket_id: TicketId,
    body: NoteIn,
    conn: Conn,
    user: Annotated[User, Depends(need("tickets.note"))],
) -> dict[str, Any]:
    async with conn.cursor() as cur:
        try:
            await tickets.add_note(cur, ticket_id, user, body.text)
        except tickets.TicketError as exc:
            raise _fail(exc) from None
        await audit(cur, user.username, "ticket.note", f"ticket:{ticket_id}")
    return await _summary(conn, ticket_id)


@router.post(
    "/{ticket_id}/valve",
    response_model=ValveRequestedOut,
    status_code=status.HTTP_202_ACCEPTED,
    responses=ERRORS,
)
async def valve(
    ticket_id: TicketId,
    body: ValveIn,
    conn: Conn,
    request: Request,
    user: Annotated[User, Depends(need("valve.close"))],
) -> dict[str, Any]:
    """Close (or, for a technician on site, reopen) the valve of the ticket's household. The
    command goes to the gateway; its result appears on the ticket."""
    from alerting.valve import ValveError, request_valve

    if body.action == "open_valve" and not user.may("valve.open"):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "reopening a valve needs a technician on site"
        )
    ticket = await _summary(conn, ticket_id)
    if body.action == "close_valve" and ticket["status"] in ("resolved", "closed", "cancelled"):
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"ticket {ticket_id} is {ticket['status']}: a valve is closed from a live ticket",
        )
    if body.action == "close_valve" and ticket["test_mode"]:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"ticket {ticket_id} is a test ticket: a test never closes a valve",
        )
    if body.action == "open_valve" and ticket["status"] != "on_site":
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"ticket {ticket_id} is {ticket['status']}: a valve is reopened only on site",
        )
    async with conn.cursor() as cur:
        device = body.device_id or await _valve_device(cur, ticket)
        if device is None:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"ticket {ticket_id} names no household device with a valve; give device_id",
            )
        await cur.execute("SELECT household_id FROM devices WHERE id = %s", (device,))
        owner = await cur.fetchone()
        if owner is None or owner[0] != ticket["household_id"]:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"device {device!r} is not a device of ticket {ticket_id}'s household",
            )
        try:
            command = await request_valve(cur, ticket_id, device, body.action, user.username)
        except ValveError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
        await audit(cur, user.username, f"valve.{body.action}", f"ticket:{ticket_id}",
                    {"device": device, "command": command, "reason": body.reason})  # fmt: skip
    await conn.commit()  # the command exists: the valve bridge may send it now
    request.app.state.wake_valve()
    return {"command_id": command}


async def _valve_device(cur: Any, ticket: dict[str, Any]) -> str | None:
    """The household's meter (its valve cuts the supply), else the ticket's own device."""
    await cur.execute(
        "SELECT id FROM devices WHERE household_id = %s AND kind = 'meter' ORDER BY id LIMIT 1",
        (ticket["household_id"],),
    )
    row = await cur.fetchone()
    return str(row[0]) if row is not None else ticket["device_id"]


FIELDS = {"detector": ("ch4_lel", "%LEL"), "meter": ("flow_m3h", "m3/h")}


@router.get("/{ticket_id}/evidence", response_model=EvidenceOut, responses=ERRORS)
async def evidence(
    ticket_id: TicketId,
    conn: Conn,
    _user: Annotated[User, Depends(need("tickets.read"))],
    hours: Annotated[float, Query(gt=0, le=24 * 7)] = 2.0,
    device_id: Annotated[str | None, Query(pattern=r"^[^\x00-\x20\x7f]{1,64}$")] = None,
) -> dict[str, Any]:
    """The device's recent CH4 (detector) or flow (meter) from the stored readings."""
    ticket = await _summary(conn, ticket_id)
    device = device_id or ticket["device_id"]
    async with conn.cursor() as cur:
        await cur.execute(
            "SELECT key, kind FROM devices WHERE id = %s AND household_id IS NOT DISTINCT FROM %s",
            (device, ticket["household_id"]),
        )
        row = await cur.fetchone()
        if row is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"ticket {ticket_id} has no device {device!r}"
            )
        key, kind = row
        field, unit = FIELDS[kind]
        table = "detector_readings" if kind == "detector" else "meter_readings"
        await cur.execute(
            f"SELECT ts, {field}, comm_lost FROM {table} WHERE device_key = %s "
            "AND ts > now() - %s ORDER BY ts DESC LIMIT 2000".encode(),
            (key, timedelta(hours=hours)),
        )
        rows = await cur.fetchall()
    points = [{"ts": ts, "value": value, "comm_lost": lost} for ts, value, lost in reversed(rows)]
    return {"device_id": device, "kind": kind, "field": field, "unit": unit, "points": points}
