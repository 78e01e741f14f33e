"""Signing in and out. The token comes back in the body (for API clients) and as an HttpOnly
session cookie (for the console, whose live feed cannot send headers)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response, status

from alerting import auth
from alerting.api.deps import COOKIE, Conn, CurrentUser
from alerting.api.models import LoginIn, TokenOut, UserOut

router = APIRouter(prefix="/api/auth", tags=["auth"])


@router.post("/login", response_model=TokenOut, responses={401: {"description": "wrong"}})
async def login(body: LoginIn, conn: Conn, request: Request, response: Response) -> dict[str, Any]:
    hours = request.app.state.settings.hotline_token_hours
    async with conn.cursor() as cur:
        granted = await auth.login(cur, body.username, body.password, hours)
        if granted is None:
            await auth.audit(cur, body.username, "login.failed")
            await conn.commit()  # the failed attempt stays on record
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "wrong username or password")
        token, user, expires = granted
        await auth.audit(cur, user.username, "login")
    response.set_cookie(
        COOKIE, token, max_age=int(hours * 3600), httponly=True, samesite="strict",
        secure=request.url.scheme == "https",
    )  # fmt: skip
    return {"token": token, "expires_at": expires, "user": user.__dict__}


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT, responses={401: {}})
async def logout(user: CurrentUser, conn: Conn, request: Request, response: Response) -> None:
    header = request.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(COOKIE)
    async with conn.cursor() as cur:
        if token:
            await auth.revoke(cur, token)
        await auth.audit(cur, user.username, "logout")
    response.delete_cookie(COOKIE)


@router.get("/me", response_model=UserOut, responses={401: {"description": "not signed in"}})
async def me(user: CurrentUser) -> dict[str, Any]:
    return user.__dict__
