"""A surprise in one micro-batch (a bug, a value nobody foresaw) dead-letters that batch with
the reason; the consumer goes on and the other batches of the same micro-batch are stored."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gasguard.wire import encode_batch, make_batch, topic
from ingest.consumer import Ingest
from ingest.detection import Detection
from ingest.settings import IngestSettings
from tests.conftest import Broker
from tests.ingest.conftest import register, registry_csv
from tests.ingest.harness import IngestThread, publish_all, scalar, settings_for, wait_for

pytestmark = pytest.mark.integration
POISON = 66.6  # the %LEL this test's detection chokes on


class ChokingDetection(Detection):
    """Detection with a bug that shows only on one value."""

    def run(self, kind: Any, columns: dict[str, np.ndarray], registry: Any) -> Any:
        if kind == "detector" and np.any(np.isclose(columns["ch4_lel"], POISON)):
            raise RuntimeError("a bug in detection")
        return super().run(kind, columns, registry)


class ChokingIngest(Ingest):
    def __init__(self, settings: IngestSettings) -> None:
        super().__init__(settings)
        self.detection = ChokingDetection(settings.ingest_utc_offset_hours)


def batch(seq: int, device: str, lel: float, ts: int) -> tuple[str, bytes]:
    b = make_batch("GW-A", seq, "detector", [device], [ts], {"ch4_lel": [lel], "alarm": [False]})
    return topic("GW-A", "telemetry"), encode_batch(b)


def test_an_unexpected_error_dead_letters_only_its_batch_and_ingest_goes_on(
    database: str, mosquitto: Broker, tmp_path: Path
) -> None:
    register(database, registry_csv(tmp_path / "r.csv", "GW-A", 3, 0))
    now = int(time.time() * 1000)
    # one micro-batch (a long wait gathers them): two good batches around the poisoned one
    first = [batch(1, "D-0001", 1.0, now), batch(2, "D-0002", POISON, now),
             batch(3, "D-0003", 30.0, now)]  # fmt: skip
    ingest = IngestThread(settings_for(database, mosquitto, ingest_max_wait_ms=300), ChokingIngest)
    try:
        publish_all(mosquitto, first)
        wait_for(lambda: scalar(database, "SELECT count(*) FROM dead_letters") == 1,
                 what="the poisoned batch dead-lettered")  # fmt: skip
        publish_all(mosquitto, [batch(4, "D-0002", 2.0, now + 1000)])  # after it: as usual
        wait_for(lambda: scalar(database, "SELECT count(*) FROM detector_readings") == 3,
                 what="every other reading stored")  # fmt: skip
        assert ingest.ingest is not None
        assert ingest.ingest.health.batch_errors._value.get() == 1
    finally:
        ingest.stop()  # raises what stopped the consumer, if anything did
    rows = scalar(
        database,
        "SELECT array_agg(d.id || ':' || r.ch4_lel ORDER BY d.id) FROM detector_readings r "
        "JOIN devices d ON d.key = r.device_key",
    )
    assert rows == ["D-0001:1", "D-0002:2", "D-0003:30"]
    topic_, reason, payload = scalar(
        database, "SELECT array[topic, reason, convert_from(payload, 'UTF8')] FROM dead_letters"
    )
    assert topic_ == "gasguard/v1/GW-A/telemetry"
    assert "RuntimeError: a bug in detection" in reason
    assert '"seq":2' in payload  # the poisoned batch itself, kept for evidence
    # the gas in the good batch after it still raised its alarm
    assert scalar(database, "SELECT count(*) FROM alarms WHERE device_id = 'D-0003'") >= 1
    assert scalar(database, "SELECT count(*) FROM ingested_batches") == 3  # not the poisoned one
