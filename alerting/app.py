"""The hotline service: FastAPI on PostgreSQL. ``create_app`` wires the routes, the database
pool and the background work (outbox, escalation, live feed, valve bridge, webhook), all
started and stopped with the app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import psycopg
from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from psycopg_pool import AsyncConnectionPool

from alerting import tickets
from alerting.api.models import HealthOut
from alerting.api.routes import admin, alarms, auth, households, live, pages, reports
from alerting.api.routes import tickets as ticket_routes
from alerting.live import Feed
from alerting.metrics import CONTENT_TYPE_LATEST, prometheus_text
from alerting.outbox import Policy
from alerting.service import Escalator, OutboxWorker, Supervisor
from alerting.settings import HotlineSettings
from alerting.unreadable import failed_rows
from gasguard import __version__

log = logging.getLogger(__name__)


def create_app(settings: HotlineSettings | None = None) -> FastAPI:
    settings = settings or HotlineSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            settings.database_url, min_size=2, max_size=12, open=False, name="hotline"
        )
        await pool.open()
        app.state.pool = pool

        async def describe(ticket_ids: list[int]) -> dict[int, dict[str, Any]]:
            async with pool.connection() as conn:
                return await tickets.summaries(conn, ticket_ids)

        tasks: list[asyncio.Task[None]] = []
        supervisor: Supervisor = app.state.supervisor

        def start(name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
            """A background task, kept running by the supervisor until the app stops."""
            tasks.append(asyncio.create_task(supervisor.keep(name, factory), name=name))

        app.state.valve_bridge = bridge = _start_valve(settings, start)
        wake_valve = bridge.wake if bridge is not None else lambda: None
        app.state.wake_valve = wake_valve
        outbox = OutboxWorker(
            settings.database_url,
            Policy(settings.hotline_storm_tickets, settings.hotline_storm_window_s,
                   settings.hotline_valve_rules, settings.hotline_cooldown),
            settings.hotline_outbox_batch,
            settings.hotline_outbox_poll_s,
            wake_valve,
        )  # fmt: skip
        feed = Feed(settings.database_url, describe, outbox.wake)
        app.state.feed, app.state.outbox = feed, outbox
        start("live-feed", feed.run)
        start("outbox", outbox.run)
        escalator = Escalator(
            settings.database_url, settings.hotline_ack_minutes, settings.hotline_escalate_every_s
        )
        app.state.escalator = escalator
        start("escalation", escalator.run)
        app.state.webhook = _start_webhook(settings, start)
        log.info("hotline %s serving (database %s)", settings.hotline_instance,
                 settings.database_url.rsplit("@", 1)[-1])  # fmt: skip
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await pool.close()

    app = FastAPI(
        title="GasGuard hotline",
        version=__version__,
        description="Tickets from alarms and calls, dispatch, escalation and the live console.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.supervisor = Supervisor()
    app.state.webhook = None
    for module in (auth, ticket_routes, alarms, households, reports, admin, live, pages):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=pages.STATIC), name="static")

    @app.exception_handler(psycopg.errors.DataError)
    async def bad_data(_request: Request, exc: psycopg.errors.DataError) -> JSONResponse:
        return JSONResponse({"detail": f"invalid value: {exc.diag.message_primary or exc}"},
                            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)  # fmt: skip

    @app.exception_handler(psycopg.OperationalError)
    async def database_down(_request: Request, exc: psycopg.OperationalError) -> JSONResponse:
        log.error("request failed, database unavailable: %s", exc)
        return JSONResponse({"detail": "the database is unavailable; try again shortly"},
                            status_code=status.HTTP_503_SERVICE_UNAVAILABLE)  # fmt: skip

    @app.get("/health", response_model=HealthOut, tags=["health"],
             responses={503: {"model": HealthOut}})  # fmt: skip
    async def health(request: Request) -> Any:
        database = True
        try:
            async with request.app.state.pool.connection(timeout=2.0) as conn:
                await conn.execute("SELECT 1")
        except psycopg.Error as exc:  # PoolTimeout is one too
            log.debug("health: database check failed: %s", exc)
            database = False
        feed: Feed = request.app.state.feed
        down = sorted(request.app.state.supervisor.down)
        failed: list[int] = []
        if database:
            async with request.app.state.pool.connection(timeout=2.0) as conn:
                failed = [r["id"] for r in await failed_rows(conn, limit=20, since_hours=24)]
        healthy = database and feed.listening.is_set() and not down
        body = {"status": "ok" if healthy else "degraded", "database": database,
                "live_feed": feed.listening.is_set(), "consoles": feed.subscribers,
                "stopped_tasks": down, "task_restarts": request.app.state.supervisor.restarts,
                "failed_outbox_rows": failed}  # fmt: skip
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    async def metrics(request: Request) -> PlainTextResponse:
        """Prometheus text: the background tasks' counters (rows, failures, restarts)."""
        return PlainTextResponse(prometheus_text(request.app.state), media_type=CONTENT_TYPE_LATEST)

    return app


def _start_valve(settings: HotlineSettings, start: Any) -> Any:
    """The valve bridge (MQTT commands to gateways), when enabled."""
    if not settings.hotline_valve_enabled:
        return None
    from alerting.valve import ValveBridge

    options = settings.mqtt_options()
    bridge = ValveBridge(
        settings.database_url,
        options,
        instance=settings.hotline_instance,
        timeout_s=settings.hotline_valve_timeout_s,
        expiry_s=settings.hotline_valve_expiry_s,
    )
    start("valve", bridge.run)
    return bridge


def _start_webhook(settings: HotlineSettings, start: Any) -> Any:
    if not settings.hotline_webhook_url:
        return None
    from alerting.webhook import WebhookSender

    assert settings.hotline_webhook_secret is not None  # the settings refuse a URL without it
    sender = WebhookSender(
        settings.database_url,
        settings.hotline_webhook_url,
        settings.hotline_webhook_secret.get_secret_value(),
        timeout_s=settings.hotline_webhook_timeout_s,
    )
    start("webhook", sender.run)
    return sender
