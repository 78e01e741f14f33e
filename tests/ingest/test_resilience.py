"""Crashes and outages: a consumer killed mid-stream, the database away, two consumers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from ingest.consumer import shard_of
from tests.conftest import ROOT, Broker, free_port
from tests.ingest.conftest import register, registry_csv
from tests.ingest.harness import IngestThread, publish_all, scalar, settings_for, wait_for
from tests.ingest.test_consumer import fleet_messages

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STORED = "SELECT (SELECT count(*) FROM detector_readings) + (SELECT count(*) FROM meter_readings)"


def consumer_process(
    database: str, broker: Broker, client_id: str, log: Path
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "GASGUARD_DATABASE_URL": database,
        "GASGUARD_MQTT_PORT": str(broker.port),
        "GASGUARD_INGEST_CLIENT_ID": client_id,
        "GASGUARD_INGEST_METRICS_PORT": "0",
        "GASGUARD_INGEST_MAX_MESSAGES": "5",
        "GASGUARD_INGEST_STATE_EVERY_S": "0.5",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "gasguard.cli", "ingest", "run"],
        cwd=ROOT,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def test_consumer_killed_mid_stream_stores_every_reading_exactly_once(
    database: str, mosquitto: Broker, tmp_path: Path
) -> None:
    register(database, registry_csv(tmp_path / "r.csv", "GW-K", 40, 40))
    messages, readings = fleet_messages("GW-K", 40, 150)  # 600 messages, 12,000 readings
    client_id = f"ingest-kill-{uuid.uuid4().hex[:6]}"
    log = tmp_path / "consumer.log"
    first = consumer_process(database, mosquitto, client_id, log)
    try:
        wait_for(lambda: "consuming from" in log.read_text(), timeout=30, what="consumer up")
        publisher = threading.Thread(target=publish_all, args=(mosquitto, messages))
        publisher.start()
        wait_for(lambda: (scalar(database, STORED) or 0) > 0, timeout=60, what="some stored")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        publisher.join(60)
        partial = scalar(database, STORED)
        assert partial < readings, "killed before the end of the stream"
        second = consumer_process(database, mosquitto, client_id, log)
        try:
            wait_for(
                lambda: scalar(database, "SELECT count(*) FROM ingested_batches") == len(messages),
                timeout=90,
                what="all batches",
            )
            time.sleep(1.0)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    assert scalar(database, STORED) == readings, "every reading once: none lost, none twice"
    assert second.returncode == 0, log.read_text()[-2000:]


class Proxy:
    """A TCP proxy to PostgreSQL that a test can cut (like psycopg's own tests do)."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target = target_port
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.start()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_w}
        await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))

    def start(self) -> None:
        async def go() -> None:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(5)

    def cut(self) -> None:
        async def go() -> None:
            assert self.server is not None
            self.server.close()
            for w in self.writers:
                w.transport.abort()
            self.writers.clear()

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(5)


def test_database_away_then_back_loses_nothing(
    database: str, mosquitto: Broker, tmp_path: Path
) -> None:
    register(database, registry_csv(tmp_path / "r.csv", "GW-D", 20, 20))
    messages, readings = fleet_messages("GW-D", 20, 40)
    proxy = Proxy(5432)
    via_proxy = database.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    ingest = IngestThread(settings_for(via_proxy, mosquitto, ingest_max_messages=10))
    try:
        publish_all(mosquitto, messages[:40])
        wait_for(
            lambda: scalar(database, "SELECT count(*) FROM ingested_batches") == 40,
            what="first part",
        )
        proxy.cut()
        publish_all(mosquitto, messages[40:])  # arrives while the database is unreachable
        time.sleep(3.0)
        assert scalar(database, "SELECT count(*) FROM ingested_batches") == 40, (
            "nothing stored while away"
        )
        assert ingest.ingest.health.db_errors._value.get() >= 1  # type: ignore[union-attr]
        proxy.start()
        wait_for(
            lambda: scalar(database, "SELECT count(*) FROM ingested_batches") == len(messages),
            timeout=60,
            what="the rest",
        )
    finally:
        ingest.stop()
    assert scalar(database, STORED) == readings


def test_two_consumers_split_gateways_and_store_everything_once(
    database: str, mosquitto: Broker, tmp_path: Path
) -> None:
    names = [f"GW-{i}" for i in range(20)]
    gw0 = next(g for g in names if shard_of(g, 2) == 0)
    gw1 = next(g for g in names if shard_of(g, 2) == 1)
    register(database, registry_csv(tmp_path / "a.csv", gw0, 10, 10))
    csv = registry_csv(tmp_path / "b.csv", gw1, 10, 10)
    csv.write_text(
        csv.read_text().replace("D-00", "D-10").replace("M-00", "M-10").replace("H-00", "H-10")
    )
    register(database, csv)
    m0, r0 = fleet_messages(gw0, 10, 30)
    m1, r1 = fleet_messages(gw1, 10, 30)
    m1 = [(t, p.replace(b'"D-00', b'"D-10').replace(b'"M-00', b'"M-10')) for t, p in m1]
    consumers = [
        IngestThread(settings_for(database, mosquitto, ingest_shards=2, ingest_shard=i))
        for i in (0, 1)
    ]
    try:
        publish_all(mosquitto, [m for pair in zip(m0, m1, strict=True) for m in pair])
        wait_for(
            lambda: scalar(database, "SELECT count(*) FROM ingested_batches") == len(m0) + len(m1),
            what="all batches",
        )
        time.sleep(0.5)
        counts = [c.ingest.health.readings._value.get() for c in consumers]  # type: ignore[union-attr]
    finally:
        for c in consumers:
            c.stop()
    assert scalar(database, STORED) == r0 + r1
    assert counts == [r0, r1], "each gateway's readings went to its own consumer only"
    assert scalar(database, "SELECT count(*) FROM dead_letters") == 0
