"""Every reading judged, whatever order or clock it comes with: through a real Mosquitto, the
consumer and PostgreSQL, with batches written by hand to the wire format (ground truth: what
was published)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from gasguard.wire import encode_batch, make_batch, topic
from tests.conftest import Broker
from tests.ingest.conftest import register, registry_csv
from tests.ingest.harness import IngestThread, publish_all, scalar, settings_for, wait_for

pytestmark = pytest.mark.integration
MIN = 60_000


def detector_batch(seq: int, device: str, ts: list[int], ch4: list[float],
                   alarm: list[bool] | None = None) -> tuple[str, bytes]:  # fmt: skip
    flags = alarm or [False] * len(ts)
    b = make_batch("GW-A", seq, "detector", [device] * len(ts), ts,
                   {"ch4_lel": ch4, "alarm": flags})  # fmt: skip
    return topic("GW-A", "telemetry"), encode_batch(b)


def meter_batch(seq: int, device: str, ts: list[int], **fields: list[Any]) -> tuple[str, bytes]:
    n = len(ts)
    columns = {"volume_m3": [100.0] * n, "flow_m3h": [0.0] * n} | fields
    b = make_batch("GW-A", seq, "meter", [device] * n, ts, columns)
    return topic("GW-A", "telemetry"), encode_batch(b)


def alarms(database: str, device: str) -> list[tuple[str, int, bool]]:
    """(rule, raised at in ms, cleared) of the device's alarms, oldest first."""
    rows = scalar(
        database,
        "SELECT coalesce(array_agg(array[rule, (extract(epoch FROM raised_at) * 1000)::bigint"
        "::text, (cleared_at IS NOT NULL)::text] ORDER BY raised_at, rule), '{}') FROM alarms "
        "WHERE device_id = %s",
        (device,),
    )
    return [(r, int(t), c == "true") for r, t, c in rows]


@pytest.fixture
def ingest(database: str, mosquitto: Broker, tmp_path: Path) -> Any:
    register(database, registry_csv(tmp_path / "r.csv", "GW-A", 4, 4))
    thread = IngestThread(settings_for(database, mosquitto, ingest_clock_tolerance_ms=30_000))
    yield thread
    thread.stop()


def test_late_leak_readings_are_judged_and_raise_their_alarm_once(
    database: str, mosquitto: Broker, ingest: IngestThread
) -> None:
    now = int(time.time() * 1000)
    # the device's newest readings first (clean air), then an outage's readings of a leak
    publish_all(mosquitto, [detector_batch(1, "D-0001", [now - 2 * MIN, now - MIN], [0.5, 0.5])])
    wait_for(lambda: scalar(database, "SELECT count(*) FROM detector_readings") == 2)
    leak = detector_batch(2, "D-0001", [now - 30 * MIN, now - 29 * MIN], [40.0, 35.0],
                          [True, True])  # fmt: skip
    publish_all(mosquitto, [leak])
    wait_for(lambda: len(alarms(database, "D-0001")) == 2, what="the late leak alarmed")
    assert alarms(database, "D-0001") == [
        ("gas_high", now - 30 * MIN, False), ("gas_low", now - 30 * MIN, False)]  # fmt: skip
    # the same readings again under a new batch id (a second path): stored once, no new alarm
    again = detector_batch(3, "D-0001", [now - 30 * MIN, now - 29 * MIN], [40.0, 35.0],
                           [True, True])  # fmt: skip
    publish_all(mosquitto, [again, detector_batch(4, "D-0001", [now], [0.4])])
    wait_for(lambda: scalar(database, "SELECT count(*) FROM ingested_batches") == 4)
    assert scalar(database, "SELECT count(*) FROM detector_readings") == 5
    assert ingest.ingest.health.repeated_readings._value.get() == 2
    assert [a[:2] for a in alarms(database, "D-0001")] == [
        ("gas_high", now - 30 * MIN), ("gas_low", now - 30 * MIN)]  # fmt: skip


def test_late_burst_and_gas_past_a_closed_valve_raise_their_alarms(
    database: str, mosquitto: Broker, ingest: IngestThread
) -> None:
    now = int(time.time() * 1000)
    publish_all(mosquitto, [meter_batch(1, "M-0002", [now - MIN, now])])
    wait_for(lambda: scalar(database, "SELECT count(*) FROM meter_readings") == 2)
    late = meter_batch(2, "M-0002", [now - 20 * MIN, now - 19 * MIN, now - 18 * MIN],
                       flow_m3h=[9.0, 0.3, 0.3], valve_closed=[False, True, True])  # fmt: skip
    publish_all(mosquitto, [late])
    wait_for(lambda: len(alarms(database, "M-0002")) == 2, what="both alarmed")
    assert [a[:2] for a in alarms(database, "M-0002")] == [
        ("burst", now - 20 * MIN), ("valve_fault", now - 19 * MIN)]  # fmt: skip


def test_a_reading_stamped_ahead_never_blinds_the_detector_and_raises_clock_skew(
    database: str, mosquitto: Broker, ingest: IngestThread
) -> None:
    now = int(time.time() * 1000)
    ahead = now + 4 * MIN  # the wire accepts up to 5 minutes ahead
    publish_all(mosquitto, [detector_batch(1, "D-0003", [ahead], [0.5])])
    wait_for(lambda: len(alarms(database, "D-0003")) == 1, what="clock skew alarmed")
    (rule, _, cleared), = alarms(database, "D-0003")  # fmt: skip
    skew = scalar(database, "SELECT raise_value FROM alarms WHERE device_id = 'D-0003'")
    assert (rule, cleared) == ("clock_skew", False) and 200 < skew <= 240
    stored = scalar(database, "SELECT (extract(epoch FROM ts) * 1000)::bigint "
                              "FROM detector_readings")  # fmt: skip
    assert stored == ahead, "stored with its own stamp"
    # true-time readings of a leak after it, in separate micro-batches: judged, not "older"
    for seq, at in ((2, now + 5_000), (3, now + 10_000)):
        publish_all(mosquitto, [detector_batch(seq, "D-0003", [at], [30.0])])
        time.sleep(0.2)
    wait_for(lambda: "gas_high" in [a[0] for a in alarms(database, "D-0003")],
             what="the leak after the skewed reading alarmed")  # fmt: skip
    wait_for(lambda: all(a[2] for a in alarms(database, "D-0003") if a[0] == "clock_skew"),
             what="clock skew cleared by readings within the tolerance")  # fmt: skip


def test_gas_hovering_at_the_alarm_level_raises_one_gas_low_through_the_consumer(
    database: str, mosquitto: Broker, ingest: IngestThread
) -> None:
    now = int(time.time() * 1000) - 20 * MIN
    ts = [now + i * 30_000 for i in range(20)]
    ch4 = [9.8 if i % 2 == 0 else 10.2 for i in range(20)]
    publish_all(mosquitto, [detector_batch(i + 1, "D-0004", [t], [x])
                            for i, (t, x) in enumerate(zip(ts, ch4, strict=True))])  # fmt: skip
    wait_for(lambda: scalar(database, "SELECT count(*) FROM detector_readings") == 20)
    assert alarms(database, "D-0004") == [("gas_low", ts[3], False)]


def test_a_leak_stamped_minutes_ahead_of_the_wire_limit_is_judged_not_dead_lettered(
    database: str, mosquitto: Broker, ingest: IngestThread
) -> None:
    """A gateway whose clock runs 7 minutes ahead (past the wire's 5-minute default)."""
    now = int(time.time() * 1000)
    ahead = now + 7 * MIN
    publish_all(mosquitto, [detector_batch(1, "D-0002", [ahead], [45.0])])
    wait_for(lambda: len(alarms(database, "D-0002")) == 2, what="leak and skew alarmed")
    rules = sorted(a[0] for a in alarms(database, "D-0002"))
    assert rules == ["clock_skew", "gas_high"]
    raised = dict((a[0], a[1]) for a in alarms(database, "D-0002"))
    assert now <= raised["gas_high"] < ahead, "judged as of its arrival"
    assert scalar(database, "SELECT count(*) FROM dead_letters") == 0
