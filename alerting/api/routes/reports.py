"""The same-day report: open complaints, breached promises and escalations of a day."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from alerting.api.deps import Conn, need
from alerting.api.models import ReportOut
from alerting.auth import User
from alerting.escalation import same_day_report

router = APIRouter(prefix="/api/reports", tags=["reports"])


@router.get("/today", response_model=ReportOut, responses={401: {}, 403: {}})
async def today(
    conn: Conn,
    request: Request,
    _user: Annotated[User, Depends(need("reports.read"))],
    day: Annotated[date | None, Query(description="a local day; today when not given")] = None,
) -> dict[str, Any]:
    offset = request.app.state.settings.hotline_utc_offset_hours
    if day is None:
        day = datetime.now(timezone(timedelta(hours=offset))).date()
    return await same_day_report(conn, day, offset)
