"""The hotline's background tasks come back when they stop (a bug, not a row), and /health says
which are down meanwhile."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from alerting import service
from alerting.live import Feed
from alerting.service import Supervisor
from alerting.valve import ValveBridge
from alerting.webhook import WebhookSender
from tests.alerting.harness import running_hotline
from tests.alerting.helpers import query, raise_alarm
from tests.conftest import Broker, free_port
from tests.ingest.conftest import register, registry_csv
from tests.ingest.harness import wait_for


def test_a_task_that_stops_is_down_until_started_again_with_backoff() -> None:
    async def run() -> None:
        supervisor = Supervisor(base=0.01, cap=0.04)
        starts = 0
        running = asyncio.Event()

        async def flaky() -> None:
            nonlocal starts
            starts += 1
            if starts <= 3:
                raise RuntimeError(f"bug #{starts}")
            running.set()
            await asyncio.Event().wait()

        task = asyncio.create_task(supervisor.keep("flaky", flaky))
        await asyncio.wait_for(running.wait(), 5)
        assert supervisor.restarts == {"flaky": 3} and supervisor.down == {}
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        slow = Supervisor(base=30, cap=30)  # down for a long while after its first stop
        task = asyncio.create_task(slow.keep("outbox", _raises("no luck")))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if slow.down:
                break
        assert slow.down == {"outbox": "RuntimeError: no luck"} and slow.restarts["outbox"] == 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert slow.down == {}, "a cancelled task is stopped, not down"

    asyncio.run(run())


def _raises(message: str) -> Callable[[], Awaitable[None]]:
    async def factory() -> None:
        raise RuntimeError(message)

    return factory


def once(original: Callable[..., Awaitable[Any]], tripped: threading.Event) -> Any:
    """``original``, except that its first call raises (a bug in the task's inner loop)."""

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not tripped.is_set():
            tripped.set()
            raise RuntimeError("a bug in the inner loop")
        return await original(*args, **kwargs)

    return wrapper


@pytest.mark.integration
def test_each_background_task_comes_back_after_its_inner_loop_died(
    database: str, mosquitto: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(database, registry_csv(tmp_path / "r.csv", "GW-1", 2, 2))
    tripped = {name: threading.Event() for name in
               ("outbox", "escalation", "live-feed", "valve", "webhook")}  # fmt: skip
    monkeypatch.setattr(service, "take_outbox", once(service.take_outbox, tripped["outbox"]))
    monkeypatch.setattr(service, "escalate", once(service.escalate, tripped["escalation"]))
    monkeypatch.setattr(Feed, "_listen", once(Feed._listen, tripped["live-feed"]))
    monkeypatch.setattr(ValveBridge, "_sweep", once(ValveBridge._sweep, tripped["valve"]))
    monkeypatch.setattr(WebhookSender, "_hold_lock",
                        once(WebhookSender._hold_lock, tripped["webhook"]))  # fmt: skip
    nobody = f"http://127.0.0.1:{free_port()}/hook"  # the webhook's receiver is away
    with running_hotline(database, hotline_valve_enabled=True, mqtt_host=mosquitto.host,
                         mqtt_port=mosquitto.port, hotline_webhook_url=nobody,
                         hotline_webhook_secret="s3cret-for-tests") as hotline:  # fmt: skip
        health = hotline.client(None)

        def all_back() -> bool:
            body = health.get("/health").json()
            restarted = {k for k, v in body["task_restarts"].items() if v >= 1}
            return restarted == set(tripped) and body["stopped_tasks"] == []

        wait_for(all_back, 30, "every task started again")
        assert all(t.is_set() for t in tripped.values())
        assert health.get("/health").status_code == 200
        # and they work: an alarm becomes a ticket whose valve command is sent to the broker
        raise_alarm(database, "D-0001", "gas_high", "critical")
        wait_for(lambda: query(database, "SELECT status FROM valve_commands") == [("sent",)], 20,
                 "the valve command sent")  # fmt: skip
        metrics = health.get("/metrics").text
        for name in tripped:
            assert f'gasguard_hotline_task_restarts_total{{task="{name}"}} 1.0' in metrics


@pytest.mark.integration
def test_health_names_a_task_while_it_is_down(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = threading.Event()
    real = service.take_outbox

    async def take(*args: Any, **kwargs: Any) -> Any:
        if failing.is_set():
            raise RuntimeError("the outbox task has a bug")
        return await real(*args, **kwargs)

    monkeypatch.setattr(service, "take_outbox", take)
    with running_hotline(database, hotline_outbox_poll_s=0.05) as hotline:
        client = hotline.client(None)
        failing.set()

        def down() -> bool:
            r = client.get("/health")
            return r.status_code == 503 and r.json()["stopped_tasks"] == ["outbox"]

        wait_for(down, 10, "the outbox named as down")
        failing.clear()
        wait_for(lambda: client.get("/health").status_code == 200, 40, "healthy again")
