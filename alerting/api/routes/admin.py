"""Users, the published service times, silences (test and maintenance mode) and the audit log."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, status
from psycopg.rows import dict_row

from alerting import auth
from alerting.api.deps import Conn, need
from alerting.api.models import (
    AuditOut,
    ServiceTimeIn,
    ServiceTimeOut,
    SilenceIn,
    SilenceOut,
    UserIn,
    UserOut,
)
from alerting.auth import User
from alerting.tickets import end_test_tickets

router = APIRouter(prefix="/api", tags=["admin"])
DENIED: dict[int | str, dict[str, Any]] = {
    401: {"description": "not signed in"},
    403: {"description": "the role may not do this"},
}


@router.get("/users", response_model=list[UserOut], responses=DENIED)
async def list_users(
    conn: Conn, _user: Annotated[User, Depends(need("users.manage"))]
) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT username, display_name, role FROM users WHERE active ORDER BY username"
        )
        return list(await cur.fetchall())


@router.post("/users", response_model=UserOut, status_code=201, responses=DENIED)
async def put_user(
    body: UserIn, conn: Conn, user: Annotated[User, Depends(need("users.manage"))]
) -> dict[str, Any]:
    """Create a user (or replace an existing one's name, role and password)."""
    async with conn.cursor() as cur:
        await auth.add_user(cur, body.username, body.display_name, body.role, body.password)
        await auth.audit(cur, user.username, "user.put", f"user:{body.username}",
                         {"role": body.role})  # fmt: skip
    return {"username": body.username, "display_name": body.display_name, "role": body.role}


@router.get("/service-times", response_model=list[ServiceTimeOut], responses=DENIED)
async def service_times(
    conn: Conn, _user: Annotated[User, Depends(need("tickets.read"))]
) -> list[dict[str, Any]]:
    """The published promise per category (minutes to be on site, and to resolve)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute("SELECT * FROM service_times ORDER BY category")
        return list(await cur.fetchall())


@router.put("/service-times/{category}", response_model=ServiceTimeOut,
            responses={**DENIED, 404: {"description": "no such category"}})  # fmt: skip
async def put_service_time(
    category: Annotated[str, Path(pattern=r"^[a-z_]{1,32}$")],
    body: ServiceTimeIn,
    conn: Conn,
    user: Annotated[User, Depends(need("service_times.manage"))],
) -> dict[str, Any]:
    """Change a published promise; tickets opened from now on carry it."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "UPDATE service_times SET on_site_minutes = %s, resolve_minutes = %s "
            "WHERE category = %s RETURNING *",
            (body.on_site_minutes, body.resolve_minutes, category),
        )
        row = await cur.fetchone()
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no category {category!r}")
        await auth.audit(cur, user.username, "service_time.put", f"category:{category}",
                         body.model_dump())  # fmt: skip
    return row


@router.get("/silences", response_model=list[SilenceOut], responses=DENIED)
async def list_silences(
    conn: Conn, _user: Annotated[User, Depends(need("tickets.read"))]
) -> list[dict[str, Any]]:
    """Silences in force now."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT * FROM silences WHERE lifted_at IS NULL AND ends_at > now() ORDER BY id"
        )
        return list(await cur.fetchall())


@router.post("/silences", response_model=SilenceOut, status_code=201,
             responses={**DENIED, 422: {"description": "unknown device or household"}})  # fmt: skip
async def add_silence(
    body: SilenceIn, conn: Conn, user: Annotated[User, Depends(need("silences.manage"))]
) -> dict[str, Any]:
    """Put a device or a household in test or maintenance mode: its tickets are marked test
    and never dispatched until the silence ends or is lifted."""
    if (body.household_id is None) == (body.device_id is None):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            "give exactly one of household_id and device_id")  # fmt: skip
    async with conn.cursor(row_factory=dict_row) as cur:
        table, key = (("households", body.household_id) if body.household_id
                      else ("devices", body.device_id))  # fmt: skip
        await cur.execute(f"SELECT 1 FROM {table} WHERE id = %s".encode(), (key,))
        if await cur.fetchone() is None:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                f"{table[:-1]} {key!r} is not in the registry")  # fmt: skip
        await cur.execute(
            "INSERT INTO silences (household_id, device_id, reason, created_by, ends_at) "
            "VALUES (%s, %s, %s, %s, now() + %s) RETURNING *",
            (body.household_id, body.device_id, body.reason, user.username,
             timedelta(minutes=body.minutes)),
        )  # fmt: skip
        row = await cur.fetchone()
        assert row is not None
        await auth.audit(cur, user.username, "silence.add", f"silence:{row['id']}",
                         body.model_dump(exclude_none=True))  # fmt: skip
    return row


@router.delete("/silences/{silence_id}", response_model=SilenceOut,
               responses={**DENIED, 404: {"description": "no such silence in force"}})  # fmt: skip
async def lift_silence(
    silence_id: Annotated[int, Path(ge=1, le=2**62)],
    conn: Conn,
    user: Annotated[User, Depends(need("silences.manage"))],
) -> dict[str, Any]:
    """Lift a silence now; the test tickets it covered end with it (cancelled, noted as test)
    unless another silence still covers them."""
    async with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "UPDATE silences SET lifted_at = now() WHERE id = %s AND lifted_at IS NULL RETURNING *",
            (silence_id,),
        )
        row = await cur.fetchone()
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no silence {silence_id} in force")
        ended = await end_test_tickets(cur, row["household_id"], row["device_id"], user.username)
        await auth.audit(cur, user.username, "silence.lift", f"silence:{silence_id}",
                         {"test_tickets_ended": ended} if ended else None)  # fmt: skip
    return row


@router.get("/audit", response_model=list[AuditOut], responses=DENIED)
async def audit_log(
    conn: Conn,
    _user: Annotated[User, Depends(need("audit.read"))],
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    """The latest changes: who did what, when."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute("SELECT * FROM audit_log ORDER BY id DESC LIMIT %s", (limit,))
        return list(await cur.fetchall())


@router.get("/webhook", response_model=dict[str, Any], responses=DENIED)
async def webhook(
    conn: Conn, request: Request, _user: Annotated[User, Depends(need("webhook.read"))]
) -> dict[str, Any]:
    """The outbound webhook: whether it is on, how far it got, and its latest failures."""
    from alerting.webhook import webhook_status

    sender = request.app.state.webhook
    if sender is None:
        return {"enabled": False}
    status_now = await webhook_status(conn)
    status_now.update(
        enabled=True,
        active=sender.active,
        delivered=sender.delivered,
        failed_attempts=sender.failed_attempts,
        last_error=sender.last_error,
    )
    return status_now
