"""Dependencies of the hotline's routes, as ``Annotated`` aliases: the database connection
(one transaction per request), the signed-in user, and a role check per permission."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

import psycopg
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import AsyncConnectionPool

from alerting.auth import User, user_for_token

COOKIE = "gasguard_token"
_bearer = HTTPBearer(auto_error=False, description="a token from POST /api/auth/login")
_cookie = APIKeyCookie(name=COOKIE, auto_error=False, description="set by the console's login")


def pool(request: Request) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
    return request.app.state.pool  # type: ignore[no-any-return]


async def connection(request: Request) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A pooled connection holding one transaction: committed when the route returns,
    rolled back when it raises."""
    async with pool(request).connection() as conn:
        yield conn


# scope="function": the transaction commits when the route returns, before the response goes
# out, so a client that got its answer finds the change in the database (the default scope
# would commit only after the response was sent)
Conn = Annotated[psycopg.AsyncConnection[Any], Depends(connection, scope="function")]


async def current_user(
    conn: Conn,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    cookie: Annotated[str | None, Depends(_cookie)],
) -> User:
    token = bearer.credentials if bearer is not None else cookie
    user = None
    if token:
        async with conn.cursor() as cur:
            user = await user_for_token(cur, token)
    if user is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "sign in first: a valid bearer token or session cookie is needed",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return user


CurrentUser = Annotated[User, Depends(current_user)]


def need(permission: str) -> Callable[[User], Coroutine[Any, Any, User]]:
    async def check(user: CurrentUser) -> User:
        if not user.may(permission):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, f"a {user.role} may not do this ({permission})"
            )
        return user

    return check
