"""Alarms as ingest raised them (the evidence behind alarm tickets): open or recent, per device
or household. A technician's selftest waits on these before it lifts test mode."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from psycopg.rows import dict_row

from alerting.api.deps import Conn, need
from alerting.api.models import AlarmOut, FailedOutboxRowOut
from alerting.auth import User
from alerting.unreadable import failed_rows

router = APIRouter(prefix="/api/alarms", tags=["alarms"])
Id = Annotated[str | None, Query(pattern=r"^[^\x00-\x20\x7f]{1,64}$")]


@router.get("/failed", response_model=list[FailedOutboxRowOut], responses={401: {}, 403: {}})
async def failed(
    conn: Conn,
    _user: Annotated[User, Depends(need("tickets.read"))],
    hours: Annotated[float, Query(gt=0, le=24 * 366)] = 24,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    """Alarm rows the hotline could not apply as designed, newest first, each with the ticket
    that holds its raw payload."""
    return await failed_rows(conn, limit=limit, since_hours=hours)


@router.get("", response_model=list[AlarmOut], responses={401: {}, 403: {}})
async def alarms(
    conn: Conn,
    _user: Annotated[User, Depends(need("tickets.read"))],
    device_id: Id = None,
    household_id: Id = None,
    open_only: Annotated[bool, Query(alias="open", description="only alarms not cleared")] = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    """The latest alarms first."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT id, device_id, household_id, district, rule, severity, confidence, test_mode, "
            "raised_at, cleared_at, raise_value, clear_value FROM alarms "
            "WHERE (%(d)s::text IS NULL OR device_id = %(d)s) "
            "AND (%(h)s::text IS NULL OR household_id = %(h)s) "
            "AND (NOT %(open)s OR cleared_at IS NULL) ORDER BY id DESC LIMIT %(limit)s",
            {"d": device_id, "h": household_id, "open": open_only, "limit": limit},
        )
        return list(await cur.fetchall())
