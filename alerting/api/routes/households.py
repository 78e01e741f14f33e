"""Finding the caller's household: by address, phone, household id or meter number, with the
tickets already open there shown first."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from alerting import tickets
from alerting.api.deps import Conn, need
from alerting.api.models import HouseholdOut
from alerting.auth import User

router = APIRouter(prefix="/api/households", tags=["households"])


@router.get("", response_model=list[HouseholdOut], responses={401: {}, 403: {}})
async def find(
    conn: Conn,
    _user: Annotated[User, Depends(need("households.read"))],
    q: Annotated[str, Query(min_length=2, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$",
                            description="address (any part), phone, household id or meter number")],
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> list[dict[str, Any]]:  # fmt: skip
    return await tickets.find_households(conn, q.strip(), limit)
