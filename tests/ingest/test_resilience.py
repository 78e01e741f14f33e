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

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gasguard.wire import decode_batch
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
        # subscribed (the broker granted it, the consumer recorded it): before that, the
        # broker would drop what the publisher sends
        wait_for(
            lambda: (
                scalar(
                    database,
                    "SELECT count(*) FROM ingest_subscriptions WHERE client_id = %s",
                    (f"{client_id}-0",),
                )
                == 2
            ),
            timeout=30,
            what="consumer subscribed",
        )
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


def building(tmp_path: Path, gateway: str, n: int) -> tuple[Path, list[tuple[str, bytes]], int]:
    """A registry file and telemetry for 5 households on ``gateway``, device ids D-n0xx."""
    csv = registry_csv(tmp_path / f"{gateway}.csv", gateway, 5, 5)
    csv.write_text(
        csv.read_text()
        .replace("D-00", f"D-{n}0")
        .replace("M-00", f"M-{n}0")
        .replace("H-00", f"H-{n}0")
    )
    messages, readings = fleet_messages(gateway, 5, 10)
    messages = [
        (t, p.replace(b'"D-00', f'"D-{n}0'.encode()).replace(b'"M-00', f'"M-{n}0'.encode()))
        for t, p in messages
    ]
    return csv, messages, readings


def test_shards_follow_registry_imports_and_hand_over_a_layout_change_without_a_gap(
    database: str, mosquitto: Broker, tmp_path: Path
) -> None:
    """A consumer that ran unsharded (its persistent session holds the wildcard) restarts as
    shard 0 of 2: it keeps the wildcard, and so the gateways of shard 1, until shard 1's
    consumer has subscribed; then lets go. A gateway imported while they run is subscribed by
    its shard at once (no registry polling here), and the import says so."""
    names = [f"GW-{i}" for i in range(40)]
    gw0 = next(g for g in names if shard_of(g, 2) == 0)
    gw1, gw2 = [g for g in names if shard_of(g, 2) == 1][:2]
    (csv0, m0, r0), (csv1, m1, r1), (csv2, m2, r2) = (
        building(tmp_path, g, n) for n, g in enumerate((gw0, gw1, gw2), start=1)
    )
    register(database, csv0)
    register(database, csv1)
    prefix = f"ingest-layout-{uuid.uuid4().hex[:6]}"

    def consumer(shards: int, shard: int) -> IngestThread:
        return IngestThread(
            settings_for(
                database,
                mosquitto,
                ingest_client_id=prefix,
                ingest_shards=shards,
                ingest_shard=shard,
                ingest_registry_every_s=3600,
            )
        )

    def recorded(client: str) -> set[str]:
        with psycopg.connect(database) as conn:
            rows = conn.execute(
                "SELECT topic FROM ingest_subscriptions WHERE client_id = %s", (client,)
            ).fetchall()
        return {str(t) for (t,) in rows}

    wildcard = {"gasguard/v1/+/telemetry", "gasguard/v1/+/alarm"}
    own0 = {f"gasguard/v1/{gw0}/telemetry", f"gasguard/v1/{gw0}/alarm"}
    unsharded = consumer(1, 0)
    try:
        wait_for(lambda: recorded(f"{prefix}-0") == wildcard, what="wildcard recorded")
    finally:
        unsharded.stop()

    shard0 = consumer(2, 0)
    shard1 = None
    try:
        wait_for(lambda: recorded(f"{prefix}-0") == wildcard | own0, what="shard 0 recorded")
        time.sleep(0.5)
        assert recorded(f"{prefix}-0") == wildcard | own0, "let go before shard 1 listens"
        first = m1[: len(m1) // 2]
        publish_all(mosquitto, first)  # nobody owns gw1 yet: shard 0 hears it on the wildcard
        wait_for(
            lambda: scalar(database, "SELECT count(*) FROM ingested_batches") == len(first),
            what="gw1's first half",
        )
        shard1 = consumer(2, 1)
        wait_for(lambda: recorded(f"{prefix}-0") == own0, what="shard 0 lets go of the wildcard")

        out = subprocess.run(
            [sys.executable, "-m", "gasguard.cli", "devices", "import", str(csv2), "--wait", "10"],
            cwd=ROOT,
            env={**os.environ, "GASGUARD_DATABASE_URL": database},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert f"{gw2}: heard by ingest ({prefix}-1)" in out, out
        publish_all(mosquitto, m1[len(m1) // 2 :] + m0 + m2)
        total = len(m0) + len(m1) + len(m2)
        wait_for(
            lambda: scalar(database, "SELECT count(*) FROM ingested_batches") == total,
            what="every batch",
        )
        time.sleep(0.5)
        counts = [c.ingest.health.readings._value.get() for c in (shard0, shard1)]  # type: ignore[union-attr]
    finally:
        shard0.stop()
        if shard1 is not None:
            shard1.stop()
    first_readings = sum(len(decode_batch(p)) for _, p in first)
    assert scalar(database, STORED) == r0 + r1 + r2
    assert counts == [r0 + first_readings, r1 - first_readings + r2]
    assert scalar(database, "SELECT count(*) FROM dead_letters") == 0

    # shard 1 is removed for good: its session and records go, nothing else
    env = {
        **os.environ,
        "GASGUARD_DATABASE_URL": database,
        "GASGUARD_MQTT_PORT": str(mosquitto.port),
    }
    out = subprocess.run(
        [sys.executable, "-m", "gasguard.cli", "ingest", "forget", f"{prefix}-1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "4 recorded subscription(s)" in out, out
    assert recorded(f"{prefix}-1") == set() and recorded(f"{prefix}-0") == own0
    assert not session_present(mosquitto, f"{prefix}-1")
    assert session_present(mosquitto, f"{prefix}-0")


def session_present(broker: Broker, client_id: str) -> bool:
    """Whether the broker kept a session for ``client_id`` (connecting to look keeps it)."""
    seen: list[bool] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, u, flags, rc, props: seen.append(flags.session_present)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    client.connect(broker.host, broker.port, clean_start=False, properties=props)
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        client.loop(0.05)
    client.disconnect()
    assert seen, "no CONNACK"
    return seen[0]
