"""The hotline service for tests: the real app served by uvicorn on a free port in a thread,
on a fresh migrated database, with one user per role."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import psycopg
import uvicorn

from alerting.app import create_app
from alerting.auth import ROLES, add_user
from alerting.settings import HotlineSettings
from tests.conftest import free_port

PASSWORD = "correct-horse-battery"  # every test user's


def add_users(database: str) -> None:
    """One user per role, named after it (``dispatcher``, ``call_taker`` ...)."""

    async def run() -> None:
        async with await psycopg.AsyncConnection.connect(database) as conn, conn.cursor() as cur:
            for role in ROLES:
                await add_user(cur, role.replace("_", "-"), role.title(), role, PASSWORD)

    asyncio.run(run())


class Hotline:
    def __init__(self, settings: HotlineSettings) -> None:
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.hotline_port}"
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=settings.hotline_port,
                                log_level="warning", lifespan="on")  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="hotline", daemon=True)
        self._tokens: dict[str, str] = {}

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"the hotline at {self.url} did not become healthy")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def token(self, username: str) -> str:
        if username not in self._tokens:
            r = httpx.post(f"{self.url}/api/auth/login",
                           json={"username": username, "password": PASSWORD})  # fmt: skip
            r.raise_for_status()
            self._tokens[username] = r.json()["token"]
        return self._tokens[username]

    def client(self, username: str | None) -> httpx.Client:
        """An HTTP client signed in as ``username`` (anonymous for None)."""
        headers = {} if username is None else {"Authorization": f"Bearer {self.token(username)}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)


@contextmanager
def running_hotline(database: str, **extra: Any) -> Iterator[Hotline]:
    values: dict[str, Any] = {
        "database_url": database,
        "hotline_port": free_port(),
        "hotline_valve_enabled": False,
        "hotline_outbox_poll_s": 0.5,
        "hotline_escalate_every_s": 0.2,
    }
    values.update(extra)
    add_users(database)
    hotline = Hotline(HotlineSettings(**values))
    hotline.start()
    try:
        yield hotline
    finally:
        hotline.stop()
