"""The console's live feed: server-sent events, one per ticket change, each with the ticket's
current summary; ``resync`` tells the console to reload the queue (after it fell behind or the
feed lost the database for a moment)."""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.sse import EventSourceResponse, ServerSentEvent

from alerting.api.deps import COOKIE
from alerting.auth import User, user_for_token
from alerting.jsontext import dumps
from alerting.live import Feed

router = APIRouter(prefix="/api", tags=["live"])


async def stream_user(request: Request) -> User:
    """The signed-in user, checked on a short connection of its own: the usual per-request
    connection would stay taken for as long as the console is open."""
    header = request.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(COOKIE)
    user = None
    if token:
        async with request.app.state.pool.connection() as conn, conn.cursor() as cur:
            user = await user_for_token(cur, token)
    if user is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "sign in first")
    return user


@router.get(
    "/events",
    response_class=EventSourceResponse,
    responses={401: {"description": "not signed in"}},
)
async def events(
    request: Request, user: Annotated[User, Depends(stream_user)]
) -> AsyncIterable[ServerSentEvent]:
    """Ticket events as they happen (``event: ticket``), for every signed-in role."""
    feed: Feed = request.app.state.feed
    sub = feed.subscribe()
    try:
        hello = orjson.dumps({"user": user.username}).decode()
        yield ServerSentEvent(event="hello", raw_data=hello, retry=2000)
        while True:
            message = await sub.queue.get()
            kind = "resync" if message.get("resync") else "ticket"
            if kind == "resync":
                sub.overflowed = False
            yield ServerSentEvent(event=kind, raw_data=dumps(message).decode())
    finally:
        feed.unsubscribe(sub)
