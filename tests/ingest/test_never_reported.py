"""A registered device that has never sent one reading raises NEVER_REPORTED once after the
commissioning grace (counted from its registration, or from ingest's start when that is later:
without a saved state ingest cannot know who reported before), and its first reading clears
it. Ingest's clock is passed in (no sleeps)."""

from __future__ import annotations

import numpy as np

from ingest.detect.params import HOUR_MS
from ingest.detection import Detection
from ingest.registry import DeviceInfo, Registry

NOW = 1_767_225_600_000


def registry(registered: dict[str, int]) -> Registry:
    reg = Registry(gateways={"GW-1"})
    for key, (dev, at) in enumerate(registered.items(), 1):
        kind = "detector" if dev.startswith("D-") else "meter"
        info = DeviceInfo(key, dev, kind, "GW-1", f"H-{key:04d}", "district-1", 60, False, 4.0,
                          registered_ms=at)  # type: ignore[arg-type]  # fmt: skip
        reg.by_id[dev] = info
        reg.by_key[key] = info
    return reg


def never(changes: list) -> list[tuple[str, bool]]:  # type: ignore[type-arg]
    return [(c.device_id, c.raised) for c in changes if c.rule == "never_reported"]


def test_a_device_that_never_reported_after_the_grace_raises_once_and_its_reading_clears() -> None:
    reg = registry({"D-0001": NOW - 30 * HOUR_MS, "M-0002": NOW - 25 * HOUR_MS,
                    "D-0003": NOW - 2 * HOUR_MS, "D-0004": NOW - 40 * HOUR_MS})  # fmt: skip
    detection = Detection(started_ms=NOW - 100 * HOUR_MS)
    heard = {"device_key": np.array([4], np.int32), "ts": np.array([NOW - HOUR_MS], np.int64),
             "ch4_lel": np.array([0.5]), "alarm": np.array([False])}  # fmt: skip
    assert never(detection.run("detector", heard, reg, now_ms=NOW - HOUR_MS)) == []
    changes = detection.silence(NOW, reg)
    assert sorted(never(changes)) == [("D-0001", True), ("M-0002", True)]
    hours = {c.device_id: c.value for c in changes if c.rule == "never_reported"}
    assert hours == {"D-0001": 30.0, "M-0002": 25.0}
    assert never(detection.silence(NOW + 60_000, reg)) == []  # once
    cols = {"device_key": np.array([1], np.int32), "ts": np.array([NOW + 120_000], np.int64),
            "ch4_lel": np.array([0.4]), "alarm": np.array([False])}  # fmt: skip
    assert never(detection.run("detector", cols, reg, now_ms=NOW + 120_000)) == [("D-0001", False)]
    # the young one after its grace; the one that reported, never
    later = never(detection.silence(NOW + 23 * HOUR_MS, reg))
    assert later == [("D-0003", True)]


def test_grace_counts_from_ingest_start_when_it_started_without_state() -> None:
    reg = registry({"D-0001": NOW - 300 * HOUR_MS})
    detection = Detection(started_ms=NOW - HOUR_MS)
    assert never(detection.silence(NOW, reg)) == []
    assert never(detection.silence(NOW + 24 * HOUR_MS, reg)) == [("D-0001", True)]


def test_a_shard_judges_only_its_own_gateways_devices() -> None:
    """Another shard's devices send it nothing: they are not "never reported"."""
    reg = registry({"D-0001": NOW - 30 * HOUR_MS, "M-0002": NOW - 30 * HOUR_MS})
    reg.by_id["M-0002"].gateway_id = "GW-2"
    detection = Detection(started_ms=NOW - 100 * HOUR_MS)
    assert never(detection.silence(NOW, reg, {"GW-2"})) == [("M-0002", True)]
