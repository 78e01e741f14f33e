"""Each simulated scenario event produces its alarm, and the alarm clears when the condition
ends: the simulator publishes, the consumer detects, the database holds the alarms and the
outbox rows for the hotline."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from firmware_sim.engine import Simulation
from firmware_sim.mqtt_native import SeqCounter, snapshot_batches
from firmware_sim.scenario import FleetSpec, Scenario, parse_event
from gasguard.wire import encode_batch, make_batch, topic
from ingest.consumer import Ingest
from tests.conftest import Broker
from tests.ingest.conftest import new_database, register, registry_csv
from tests.ingest.harness import IngestThread, publish_all, scalar, settings_for, wait_for

pytestmark = pytest.mark.integration

EVENTS = [
    {
        "at": "30m",
        "device": "D-0001",
        "type": "gas_leak",
        "rate_lel_per_min": 6,
        "peak_lel": 60,
        "duration": "20m",
    },
    {"at": "1h", "device": "M-0002", "type": "burst", "duration": "5m"},
    {"at": "0s", "device": "M-0003", "type": "continuous_flow", "flow_m3h": 0.3, "duration": "7h"},
    {"at": "0s", "device": "M-0004", "type": "micro_leak", "flow_m3h": 0.02, "duration": "5h30m"},
    {
        "at": "2h",
        "district": "district-2",
        "type": "pressure_drop",
        "to_kpa": 0.8,
        "duration": "30m",
    },
    {"at": "3h", "device": "D-0002", "type": "sensor_fault", "duration": "20m"},
    {"at": "5h", "device": "M-0005", "type": "tamper", "duration": "10m"},
    {"at": "5h30m", "device": "M-0006", "type": "reverse_flow", "duration": "10m"},
]
EXPECTED = {
    ("D-0001", "gas_low"),
    ("D-0001", "gas_high"),
    ("D-0001", "gas_rising"),
    ("D-0001", "gas_present"),
    ("M-0002", "burst"),
    ("M-0003", "continuous_flow"),
    ("M-0004", "micro_leak"),
    ("M-0007", "pressure_low"),
    ("M-0008", "pressure_low"),
    ("D-0002", "sensor_fault"),
    ("M-0005", "tamper"),
    ("M-0006", "reverse_flow"),
    ("M-0005", "pressure_low"),
    ("M-0006", "pressure_low"),
    # a burst is a disconnected hose: gas escapes in that household too
    ("D-0002", "gas_low"),
    ("D-0002", "gas_high"),
    ("D-0002", "gas_rising"),
    ("D-0002", "gas_present"),
}


def local_22h_two_days_ago() -> int:
    """22:00 local (UTC+8, the simulation's households) two days ago, in epoch ms."""
    local_now = datetime.now(UTC) + timedelta(hours=8)
    day = local_now.replace(hour=22, minute=0, second=0, microsecond=0) - timedelta(days=2)
    return int((day - timedelta(hours=8)).timestamp() * 1000)


def scenario_messages(events: list[dict[str, object]], hours: int) -> list[tuple[str, bytes]]:
    """GW-S's telemetry (8 households in 2 districts, a reading a minute) for ``hours`` of
    the scenario with ``events``, starting 22:00 local two days ago."""
    scenario = Scenario(
        seed=21,
        fleet=FleetSpec(detectors=8, meters=8, districts=2),
        events=tuple(parse_event(e) for e in events),
    )
    sim = Simulation(scenario, dt=10.0, start_ms=local_22h_two_days_ago())
    seq, messages = SeqCounter(), []
    for _ in range(hours * 60):
        sim.run_for(60)
        messages += [
            (topic("GW-S", "telemetry"), encode_batch(b))
            for b in snapshot_batches(sim, "GW-S", seq, 200)
        ]
    return messages


def test_every_scenario_event_raises_its_alarm_and_clears_it(
    database: str, mosquitto: Broker, tmp_path: Path
) -> None:
    register(database, registry_csv(tmp_path / "r.csv", "GW-S", 8, 8, districts=2))
    messages = scenario_messages(EVENTS, hours=14)
    # the past timeline would look silent to the wall clock: no silence scan in this test
    ingest = IngestThread(settings_for(database, mosquitto, ingest_silence_every_s=3600))
    try:
        publish_all(mosquitto, messages)
        wait_for(
            lambda: scalar(database, "SELECT count(*) FROM ingested_batches") == len(messages),
            what="all batches",
        )
        assert ingest.ingest is not None
        flapped = int(ingest.ingest.health.alarms_flapping._value.get())
    finally:
        ingest.stop()
    with psycopg.connect(database) as conn:
        incidents = conn.execute(
            "SELECT district, households, closed_at FROM district_incidents"
        ).fetchall()
        short = conn.execute(
            "SELECT count(*) FROM alarms WHERE cleared_at - raised_at < interval '1 minute'"
        ).fetchone()
        rows = conn.execute(
            "SELECT device_id, rule, raised_at, cleared_at, severity FROM alarms"
        ).fetchall()
        outbox = conn.execute("SELECT event, count(*) FROM alarm_outbox GROUP BY event").fetchall()
    raised = {(d, r) for d, r, *_ in rows}
    assert raised >= EXPECTED, f"missing {EXPECTED - raised}"
    still_open = {(d, r) for d, r, _, cleared, _ in rows if cleared is None and (d, r) in EXPECTED}
    assert not still_open, f"not cleared: {still_open}"
    severities = {(d, r): s for d, r, _, _, s in rows}
    assert (
        severities[("D-0001", "gas_high")] == "critical"
        and severities[("M-0002", "burst")] == "critical"
    )
    assert dict(outbox)["raised"] == len(rows) and dict(outbox)["cleared"] >= len(EXPECTED)
    assert not (raised - EXPECTED), f"alarms nobody caused: {raised - EXPECTED}"
    assert short is not None and flapped == short[0] == 0, "no alarm flaps on the scenario"
    assert [(d, closed is not None) for d, _, closed in incidents] == [("district-2", True)]
    assert incidents[0][1] >= 3, "one network incident for the district, with its households"


def test_silent_devices_are_found_by_the_scan_and_clear_when_they_report(
    database: str, mosquitto: Broker, tmp_path: Path
) -> None:
    csv = registry_csv(tmp_path / "r.csv", "GW-Q", 2, 0)
    csv.write_text(csv.read_text().replace(",60,false", ",1,false"))  # expected every second
    register(database, csv)

    def reading(seq: int, devices: list[str]) -> tuple[str, bytes]:
        now = int(time.time() * 1000)
        b = make_batch(
            "GW-Q",
            seq,
            "detector",
            devices,
            [now] * len(devices),
            {"ch4_lel": [0.4] * len(devices), "alarm": [False] * len(devices)},
        )
        return topic("GW-Q", "telemetry"), encode_batch(b)

    ingest = IngestThread(settings_for(database, mosquitto, ingest_silence_every_s=0.5))
    try:
        publish_all(mosquitto, [reading(1, ["D-0001", "D-0002"])])
        for seq in range(2, 12):  # D-0002 keeps reporting, D-0001 falls silent
            time.sleep(0.5)
            publish_all(mosquitto, [reading(seq, ["D-0002"])])
        wait_for(
            lambda: (
                scalar(
                    database,
                    "SELECT count(*) FROM alarms WHERE rule = 'silent' AND cleared_at IS NULL",
                )
                == 1
            ),
            what="silent raised",
        )
        assert scalar(database, "SELECT device_id FROM alarms WHERE rule = 'silent'") == "D-0001"
        publish_all(mosquitto, [reading(20, ["D-0001", "D-0002"])])
        wait_for(
            lambda: (
                scalar(
                    database,
                    "SELECT count(*) FROM alarms WHERE rule = 'silent' AND cleared_at IS NOT NULL",
                )
                == 1
            ),
            what="silent cleared",
        )
    finally:
        ingest.stop()


def test_a_leak_that_began_before_a_restart_is_still_seen(
    database: str, mosquitto: Broker, tmp_path: Path
) -> None:
    register(database, registry_csv(tmp_path / "r.csv", "GW-R", 1, 0))
    now = int(time.time() * 1000) - 600_000

    def reading(seq: int, ch4: float) -> tuple[str, bytes]:
        b = make_batch(
            "GW-R",
            seq,
            "detector",
            ["D-0001"],
            [now + seq * 60_000],
            {"ch4_lel": [ch4], "alarm": [False]},
        )
        return topic("GW-R", "telemetry"), encode_batch(b)

    first = IngestThread(settings_for(database, mosquitto, ingest_client_id="ingest-restart"))
    try:
        publish_all(
            mosquitto, [reading(1, 9.0), reading(2, 12.0)]
        )  # one sample over 10 %LEL: not yet
        wait_for(
            lambda: scalar(database, "SELECT count(*) FROM detector_readings") == 2, what="stored"
        )
    finally:
        first.stop()
    assert scalar(database, "SELECT count(*) FROM alarms") == 0
    second = IngestThread(settings_for(database, mosquitto, ingest_client_id="ingest-restart"))
    try:
        publish_all(
            mosquitto, [reading(3, 14.0)]
        )  # the second consecutive sample, after the restart
        wait_for(
            lambda: scalar(database, "SELECT count(*) FROM alarms WHERE rule = 'gas_low'") == 1,
            what="gas_low",
        )
    finally:
        second.stop()


class Overlapping(Ingest):
    """The real consumer, counting how many micro-batches were in their transaction at once."""

    most = 0
    _now = 0

    async def _transaction(self, *args: object, **kwargs: object) -> int:
        type(self)._now += 1
        type(self).most = max(type(self).most, type(self)._now)
        try:
            return await super()._transaction(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            type(self)._now -= 1


def test_overlapping_micro_batches_give_the_alarms_of_one_at_a_time(
    database: str, mosquitto: Broker, tmp_path: Path
) -> None:
    """Micro-batches of two messages, three in flight, with every tenth message delivered
    twice in a row (the repeat often in the next micro-batch, still uncommitted): the same
    readings, alarms (raised and cleared at the same readings) and outbox rows, in the same
    order, as one large micro-batch at a time."""
    events = [e for e in EVENTS if e.get("at") in ("30m", "1h", "2h")]
    messages = scenario_messages(events, hours=3)
    with_repeats = [m for i, m in enumerate(messages) for _ in range(2 if i % 10 == 5 else 1)]

    def run(url: str, factory: type[Ingest], **extra: object) -> dict[str, object]:
        register(url, registry_csv(tmp_path / f"{factory.__name__}.csv", "GW-S", 8, 8, districts=2))
        settings = settings_for(url, mosquitto, ingest_silence_every_s=3600, **extra)
        IngestThread(settings, factory).stop()  # its persistent session is subscribed ...
        publish_all(mosquitto, with_repeats)  # ... and holds the whole stream when it is back
        ingest = IngestThread(settings, factory)
        try:
            wait_for(
                lambda: scalar(url, "SELECT count(*) FROM ingested_batches") == len(messages),
                timeout=120,
                what="all batches",
            )
            time.sleep(0.5)  # the last repeats
        finally:
            ingest.stop()
        with psycopg.connect(url) as conn:
            return {
                "readings": conn.execute(
                    "SELECT (SELECT count(*) FROM detector_readings), "
                    "(SELECT count(*) FROM meter_readings)"
                ).fetchone(),
                "alarms": conn.execute(
                    "SELECT device_id, rule, raised_at, cleared_at, raise_value FROM alarms "
                    "ORDER BY device_id, rule, raised_at"
                ).fetchall(),
                "outbox": conn.execute(
                    "SELECT a.device_id, a.rule, o.event FROM alarm_outbox o "
                    "JOIN alarms a ON a.id = o.alarm_id ORDER BY o.id"
                ).fetchall(),
            }

    serial = run(database, Ingest, ingest_pipeline=1, ingest_max_messages=1000)
    with new_database() as other:
        overlapped = run(other, Overlapping, ingest_pipeline=3, ingest_max_messages=2)
    assert Overlapping.most >= 2, "the micro-batches never overlapped"
    assert overlapped["readings"] == serial["readings"]
    assert {(d, r) for d, r, *_ in serial["alarms"]} >= {  # type: ignore[attr-defined]
        ("D-0001", "gas_high"),
        ("M-0002", "burst"),
    }
    assert overlapped["alarms"] == serial["alarms"]
    assert overlapped["outbox"] == serial["outbox"]


def test_confidence_is_judged_change_by_change_within_a_micro_batch(
    database: str, tmp_path: Path
) -> None:
    """A burst and a gas alarm open together in a household make both high confidence, even
    when the burst clears later in the same micro-batch (judged at the end, the pair would
    never be seen open together)."""
    from ingest.writer import AlarmChange, write_alarms

    register(database, registry_csv(tmp_path / "r.csv", "GW-C", 1, 1))
    keys = dict(query_all(database, "SELECT id, key FROM devices"))
    t = int(time.time() * 1000)

    def change(device: str, rule: str, raised: bool, at: int) -> AlarmChange:
        return AlarmChange(
            device_key=keys[device], device_id=device, household_id="H-0001",
            district="district-1", rule=rule, severity="critical", raised=raised,
            ts_ms=t + at, value=1.0, test_mode=False,
        )  # fmt: skip

    async def write() -> int:
        async with (
            await psycopg.AsyncConnection.connect(database) as conn,
            conn.transaction(),
            conn.cursor() as cur,
        ):
            changes = [
                change("M-0001", "burst", True, 0),
                change("D-0001", "gas_low", True, 1000),
                change("M-0001", "burst", False, 2000),
            ]
            return (await write_alarms(cur, changes)).confidence_raised

    assert asyncio.run(write()) == 2
    events = query_all(
        database,
        "SELECT a.device_id, o.event FROM alarm_outbox o JOIN alarms a ON a.id = o.alarm_id "
        "ORDER BY o.id",
    )
    assert events[:2] == [("M-0001", "raised"), ("D-0001", "raised")]
    assert sorted(events[2:4]) == [("D-0001", "confidence"), ("M-0001", "confidence")]
    assert events[4:] == [("M-0001", "cleared")]


def test_an_alarm_cleared_within_a_minute_is_counted_as_flapping(
    database: str, tmp_path: Path
) -> None:
    from ingest.writer import AlarmChange, write_alarms

    register(database, registry_csv(tmp_path / "r.csv", "GW-F", 2, 0))
    keys = dict(query_all(database, "SELECT id, key FROM devices"))
    t = int(time.time() * 1000)

    def change(device: str, raised: bool, at: int) -> AlarmChange:
        return AlarmChange(
            device_key=keys[device], device_id=device, household_id="H-0001",
            district="district-1", rule="gas_low", severity="major", raised=raised,
            ts_ms=t + at, value=11.0, test_mode=False,
        )  # fmt: skip

    async def write(changes: list[AlarmChange]) -> int:
        async with (
            await psycopg.AsyncConnection.connect(database) as conn,
            conn.transaction(),
            conn.cursor() as cur,
        ):
            return (await write_alarms(cur, changes)).flapping

    # raised and cleared 59 s apart (in two micro-batches): flapping; 61 s apart: not
    assert asyncio.run(write([change("D-0001", True, 0), change("D-0002", True, 0)])) == 0
    assert asyncio.run(write([change("D-0001", False, 59_000)])) == 1
    assert asyncio.run(write([change("D-0002", False, 61_000)])) == 0
    # a clear stamped before the raise (a silence found by the scan at ingest's clock, ended by
    # a reading stamped earlier that was still on its way) is never recorded before it
    assert asyncio.run(write([change("D-0001", True, 120_000)])) == 0
    asyncio.run(write([change("D-0001", False, 115_000)]))
    assert query_all(database, "SELECT count(*) FROM alarms WHERE cleared_at < raised_at") == [(0,)]


def query_all(url: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(sql).fetchall())
