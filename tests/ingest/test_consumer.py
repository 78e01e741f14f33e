"""The consumer on a real Mosquitto (started by the test) and the real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from firmware_sim.engine import Simulation
from firmware_sim.mqtt_native import SeqCounter, snapshot_batches
from firmware_sim.scenario import FleetSpec, Scenario
from gasguard.wire import encode_batch, make_batch, topic
from ingest.consumer import Ingest
from tests.conftest import Broker
from tests.ingest.conftest import register, registry_csv
from tests.ingest.harness import IngestThread, publish_all, scalar, settings_for, wait_for

pytestmark = pytest.mark.integration


def fleet_messages(
    gateway: str, households: int, snapshots: int, every_s: float = 60.0
) -> tuple[list[tuple[str, bytes]], int]:
    sim = Simulation(
        Scenario(seed=3, fleet=FleetSpec(detectors=households, meters=households)),
        dt=10.0,
        start_ms=int(time.time() * 1000) - int(snapshots * every_s * 1000) - 60_000,
    )
    seq = SeqCounter()
    out, readings = [], 0
    for _ in range(snapshots):
        sim.run_for(every_s)
        for b in snapshot_batches(sim, gateway, seq, 200):
            out.append((topic(gateway, "telemetry"), encode_batch(b)))
            readings += len(b)
    return out, readings


def test_every_reading_is_stored_once_and_redeliveries_are_no_ops(
    database: str, mosquitto: Broker, tmp_path: Path
) -> None:
    register(database, registry_csv(tmp_path / "r.csv", "GW-A", 30, 30))
    messages, readings = fleet_messages("GW-A", 30, 20)
    ingest = IngestThread(settings_for(database, mosquitto))
    try:
        publish_all(mosquitto, messages)
        publish_all(mosquitto, messages[:10] + messages[-5:])  # a gateway replaying after an outage

        def stored() -> int:
            return scalar(
                database,
                "SELECT (SELECT count(*) FROM detector_readings) + (SELECT count(*) FROM meter_readings)",
            )

        wait_for(
            lambda: (
                stored() == readings
                and scalar(database, "SELECT count(*) FROM ingested_batches") == len(messages)
            ),
            what="all stored",
        )
        time.sleep(1.0)  # the replays have been processed too
        assert stored() == readings
        assert ingest.ingest.health.duplicates._value.get() == 15  # type: ignore[union-attr]
    finally:
        ingest.stop()
    assert scalar(database, "SELECT count(*) FROM dead_letters") == 0
    assert scalar(database, "SELECT count(DISTINCT device_key) FROM meter_readings") == 30
    # the hourly rollups, merged micro-batch by micro-batch, agree with the readings
    mismatch = scalar(
        database,
        """
        SELECT count(*) FROM (
            SELECT date_trunc('hour', ts) AS bucket, device_key, min(volume_m3) AS lo,
                   max(volume_m3) AS hi, max(flow_m3h) AS fmax, count(*) AS n
            FROM meter_readings WHERE NOT comm_lost GROUP BY 1, 2
        ) r FULL JOIN meter_hourly h USING (bucket, device_key)
        WHERE h.min_volume_m3 IS DISTINCT FROM r.lo OR h.max_volume_m3 IS DISTINCT FROM r.hi
           OR h.max_flow_m3h IS DISTINCT FROM r.fmax OR h.readings IS DISTINCT FROM r.n::int
           OR h.consumption_m3 IS DISTINCT FROM r.hi - r.lo
        """,
    )
    assert mismatch == 0
    assert scalar(database, "SELECT sum(readings) FROM detector_hourly") == readings // 2


def test_bad_messages_go_to_dead_letters_and_good_ones_are_still_stored(
    database: str, mosquitto: Broker, tmp_path: Path
) -> None:
    register(database, registry_csv(tmp_path / "r.csv", "GW-A", 2, 2))
    register(
        database,
        registry_csv(tmp_path / "s.csv", "GW-B", 0, 0)
        if False
        else registry_csv(tmp_path / "s.csv", "GW-A", 2, 2),
    )
    now = int(time.time() * 1000)
    good = make_batch(
        "GW-A",
        1,
        "detector",
        ["D-0001", "D-0002"],
        [now, now],
        {"ch4_lel": [0.5, 0.6], "alarm": [False, False]},
    )
    stranger = make_batch(
        "GW-X", 1, "detector", ["D-0001"], [now], {"ch4_lel": [0.5], "alarm": [False]}
    )
    unregistered = make_batch(
        "GW-A", 2, "detector", ["D-0099"], [now], {"ch4_lel": [0.5], "alarm": [False]}
    )
    ancient = make_batch(
        "GW-A",
        4,
        "detector",
        ["D-0001"],
        [now - 500 * 86_400_000],
        {"ch4_lel": [0.5], "alarm": [False]},
    )
    wrong_kind = make_batch(
        "GW-A", 3, "meter", ["D-0001"], [now], {"volume_m3": [1.0], "flow_m3h": [0.0]}
    )
    bad = [
        (topic("GW-A", "telemetry"), b"\x00\xffnot json"),
        (topic("GW-A", "telemetry"), orjson.dumps({"v": 2})),
        (topic("GW-A", "telemetry"), encode_batch(good).replace(b'"v":1', b'"v":7')),
        (topic("GW-X", "telemetry"), encode_batch(stranger)),
        (topic("GW-A", "telemetry"), encode_batch(unregistered)),
        (topic("GW-A", "telemetry"), encode_batch(wrong_kind)),
        (topic("GW-A", "telemetry"), encode_batch(ancient)),
        (topic("GW-B", "telemetry"), encode_batch(good)),  # payload from GW-A on GW-B's topic
    ]
    ingest = IngestThread(settings_for(database, mosquitto))
    try:
        publish_all(mosquitto, [*bad, (topic("GW-A", "telemetry"), encode_batch(good))])
        wait_for(
            lambda: scalar(database, "SELECT count(*) FROM dead_letters") == len(bad),
            what="dead letters",
        )
        wait_for(
            lambda: scalar(database, "SELECT count(*) FROM detector_readings") == 2,
            what="good readings",
        )
    finally:
        ingest.stop()
    reasons = [
        r
        for r in scalar(
            database,
            "SELECT array_agg(coalesce(field, '-') || ': ' || reason ORDER BY id) FROM dead_letters",
        )
    ]
    assert any("not valid JSON" in r or "JSON" in r for r in reasons), reasons
    assert any("unsupported version" in r for r in reasons), reasons
    assert "gw: unknown gateway 'GW-X'" in reasons
    assert "dev: device 'D-0099' is not registered to gateway 'GW-A'" in reasons
    assert "dev: device 'D-0001' is a detector, the batch says meter" in reasons
    assert "gw: payload is from 'GW-A', topic from 'GW-B'" in reasons
    assert any(
        r.startswith("ts: timestamp") and "older than the 400-day retention" in r for r in reasons
    ), reasons
    payload = scalar(database, "SELECT payload FROM dead_letters ORDER BY id LIMIT 1")
    assert bytes(payload) == b"\x00\xffnot json", "the raw payload is kept"


class SlowFirst(Ingest):
    """The real consumer, whose first micro-batch is slow to reach the database (as one whose
    connection is still being opened): the next one's claim of the batch ids gets there first."""

    calls = 0

    async def _transaction(self, *args: object, **kwargs: object) -> int:
        type(self).calls += 1
        if type(self).calls == 1:
            await asyncio.sleep(0.5)
        return await super()._transaction(*args, **kwargs)  # type: ignore[arg-type]


def test_a_batch_repeated_in_the_next_micro_batch_in_flight_is_stored_once_without_a_deadlock(
    database: str, mosquitto: Broker, tmp_path: Path
) -> None:
    register(database, registry_csv(tmp_path / "r.csv", "GW-A", 5, 5))
    messages, readings = fleet_messages("GW-A", 5, 2)
    settings = settings_for(database, mosquitto, ingest_max_messages=1, ingest_pipeline=2)
    IngestThread(settings, SlowFirst).stop()  # its persistent session holds what comes next
    SlowFirst.calls = 0
    publish_all(mosquitto, [messages[0], *messages])  # the first one twice, back to back
    ingest = IngestThread(settings, SlowFirst)
    try:
        wait_for(
            lambda: scalar(database, "SELECT count(*) FROM ingested_batches") == len(messages),
            timeout=20,
            what="every batch (the first two micro-batches must not wait on each other)",
        )
        time.sleep(0.5)
        duplicates = ingest.ingest.health.duplicates._value.get()  # type: ignore[union-attr]
    finally:
        ingest.stop()
    assert (
        scalar(
            database,
            "SELECT (SELECT count(*) FROM detector_readings) + (SELECT count(*) FROM meter_readings)",
        )
        == readings
    )
    assert duplicates == 1
