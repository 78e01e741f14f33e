"""The meter's volume register and battery, through a real Mosquitto, the consumer and
PostgreSQL, with batches written by hand to the wire format: a leak too small for the flow, gas
past a closed valve that the flow does not show, a register and flow that disagree, a weak
battery (ground truth: what was published)."""

from __future__ import annotations

import time

import pytest

from tests.conftest import Broker
from tests.ingest.harness import publish_all, scalar, wait_for
from tests.ingest.test_late_and_skewed import MIN, alarms, ingest, meter_batch  # noqa: F401

pytestmark = pytest.mark.integration
HOUR = 60 * MIN


def severity(database: str, device: str, rule: str) -> str:
    return str(scalar(database, "SELECT severity FROM alarms WHERE device_id = %s AND rule = %s",
                      (device, rule)))  # fmt: skip


@pytest.mark.usefixtures("ingest")  # the consumer, registered GW-A (4 detectors, 4 meters)
def test_register_hazards_raise_their_alarms(database: str, mosquitto: Broker) -> None:
    now = int(time.time() * 1000)
    t0 = now - 27 * HOUR
    # M-0001: 1 L/h behind the meter for 27 hours, a reading every 10 minutes; the flow reads 0
    ts = [t0 + k * 10 * MIN for k in range(27 * 6)]
    creep = [round(250.0 + (t - t0) / HOUR / 1000, 3) for t in ts]
    messages = [meter_batch(1, "M-0001", ts, volume_m3=creep, flow_m3h=[0.0] * len(ts))]
    # M-0002: valve closed, flow 0, yet the register climbs a litre a minute
    ts2 = [now - 10 * MIN + k * MIN for k in range(8)]
    past = [round(80.0 + 0.001 * k, 3) for k in range(8)]
    messages.append(meter_batch(2, "M-0002", ts2, volume_m3=past, flow_m3h=[0.0] * 8,
                                valve_closed=[True] * 8))  # fmt: skip
    # M-0003: the flow sensor reads 0 while the home uses 0.6 m3/h (10 L a minute)
    used = [round(90.0 + 0.01 * k, 3) for k in range(8)]
    messages.append(meter_batch(3, "M-0003", ts2, volume_m3=used, flow_m3h=[0.0] * 8))
    # M-0004: a battery running down to 15 %
    messages.append(meter_batch(4, "M-0004", ts2, battery_pct=[30, 25, 21, 19, 17, 16, 15, 15]))
    publish_all(mosquitto, messages)
    wait_for(lambda: scalar(database, "SELECT count(*) FROM ingested_batches") == 4)
    assert [a[0] for a in alarms(database, "M-0001")] == ["micro_leak"]
    raised_at = alarms(database, "M-0001")[0][1]
    assert t0 + 24 * HOUR <= raised_at <= t0 + 25 * HOUR  # a day without a still stretch
    assert [a[0] for a in alarms(database, "M-0002")] == ["valve_fault"]
    assert severity(database, "M-0002", "valve_fault") == "critical"
    assert [a[0] for a in alarms(database, "M-0003")] == ["meter_mismatch"]
    assert [a[:2] for a in alarms(database, "M-0004")] == [("battery_low", ts2[5])]
