"""Running an ingest consumer in a thread of its own, against the test's database and broker."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from ingest.consumer import Ingest
from ingest.settings import IngestSettings
from tests.conftest import Broker, call_in_loop

T = TypeVar("T")


def settings_for(database: str, broker: Broker, **extra: Any) -> IngestSettings:
    values: dict[str, Any] = {
        "database_url": database,
        "mqtt_host": broker.host,
        "mqtt_port": broker.port,
        "ingest_client_id": f"ingest-test-{uuid.uuid4().hex[:8]}",
        "ingest_metrics_port": 0,
        "ingest_max_wait_ms": 20,
        "ingest_health_every_s": 1.0,
        "ingest_state_every_s": 1.0,
        "ingest_silence_every_s": 1.0,
        "ingest_registry_every_s": 1.0,
    }
    values.update(extra)
    return IngestSettings(**values)


class IngestThread:
    def __init__(self, settings: IngestSettings, factory: type[Ingest] = Ingest) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.ingest: Ingest | None = None
        self.error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        ready = threading.Event()

        async def main() -> None:
            self._stop = asyncio.Event()
            self.ingest = factory(settings)
            ready.set()
            await self.ingest.run(self._stop)

        def run() -> None:
            try:
                self.loop.run_until_complete(main())
            except BaseException as exc:
                self.error = exc
                ready.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10), "ingest did not start"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.error is None:
            # subscribed: the broker granted the filters (before that it drops what comes)
            if self.ingest is not None and self.subscribed():
                break
            time.sleep(0.05)
        assert self.error is None, self.error
        assert self.subscribed(), "ingest did not subscribe"

    def subscribed(self) -> bool:
        ingest = self.ingest
        if ingest is None or not ingest.link.connected:
            return False
        return {t for t, _ in ingest._subscriptions()} <= ingest.link.granted

    def call(self, fn: Callable[[], T]) -> T:
        return call_in_loop(self.loop, fn)

    def stop(self) -> None:
        if self._stop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)
        assert not self.thread.is_alive(), "ingest did not stop"
        if self.error is not None:
            raise self.error


def publish_all(broker: Broker, messages: list[tuple[str, bytes]]) -> None:
    """Publish with QoS 1 and wait for every PUBACK."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    client.max_inflight_messages_set(1000)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        infos = [client.publish(t, p, qos=1) for t, p in messages]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()


def scalar(url: str, sql: str, params: Any = None) -> Any:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql, params).fetchone()
        return None if row is None else row[0]


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not met within {timeout} s")
