"""The dispatcher console and the same-day report page (static files; they use the API)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

router = APIRouter(include_in_schema=False)
STATIC = Path(__file__).resolve().parent.parent.parent / "static"


@router.get("/")
async def console() -> FileResponse:
    return FileResponse(STATIC / "console.html", media_type="text/html")


@router.get("/report")
async def report() -> FileResponse:
    return FileResponse(STATIC / "report.html", media_type="text/html")
