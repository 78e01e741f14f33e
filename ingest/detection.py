"""Detection inside the consumer: the kernels of ``ingest.detect`` over the micro-batch, with
state indexed by device key, parameters from the registry (meter size -> Qmax, expected
interval), and events turned into alarm changes for registered devices.

The state can be checkpointed before a transaction and restored if it fails, so a retried
micro-batch is judged against the same state as the first attempt.
"""

from __future__ import annotations

import numpy as np

from gasguard.fields import KINDS, Kind
from ingest.detect import (
    SEVERITY,
    DetectorColumns,
    DetectorParams,
    DetectorState,
    Events,
    MeterColumns,
    MeterParams,
    MeterState,
    Rule,
    detect_detectors,
    detect_meters,
    scan_silence,
)
from ingest.registry import Registry
from ingest.writer import AlarmChange

Checkpoint = dict[Kind, dict[str, np.ndarray]]

# A household's usual peak is learned over a week of readings at one a minute before a flow
# far above it counts as a burst (a day of a continuous flow would otherwise become the peak).
BURST_LEARN_SAMPLES = 7 * 24 * 60


class Detection:
    def __init__(self, utc_offset_hours: float = 8.0) -> None:
        self.utc_offset_ms = int(utc_offset_hours * 3_600_000)
        self.detectors = DetectorState(0)
        self.meters = MeterState(0)
        self._params_for: int | None = None
        self._detector_params = DetectorParams()
        self._meter_params = MeterParams(
            utc_offset_ms=self.utc_offset_ms, burst_learn_samples=BURST_LEARN_SAMPLES
        )

    def _prepare(self, registry: Registry) -> None:
        capacity = registry.capacity
        for state in (self.detectors, self.meters):
            if state.capacity < capacity:
                state.grow(capacity)
        if self._params_for != id(registry):
            interval = registry.interval_array().astype(np.float64)
            self._detector_params = DetectorParams(expected_interval_ms_by_device=interval)
            self._meter_params = MeterParams(
                burst_learn_samples=BURST_LEARN_SAMPLES,
                utc_offset_ms=self.utc_offset_ms,
                qmax_by_device=np.where(
                    np.isfinite(registry.qmax_array()), registry.qmax_array(), np.nan
                ),
                expected_interval_ms_by_device=interval,
            )
            self._params_for = id(registry)

    def run(
        self, kind: Kind, columns: dict[str, np.ndarray], registry: Registry
    ) -> list[AlarmChange]:
        """Judge one kind's readings (``device_key`` and field columns)."""
        self._prepare(registry)
        idx = columns["device_key"].astype(np.int64)
        if kind == "detector":
            events, _ = detect_detectors(
                DetectorColumns.from_mapping(idx, columns), self._detector_params, self.detectors
            )
        else:
            events, _ = detect_meters(
                MeterColumns.from_mapping(idx, columns), self._meter_params, self.meters
            )
        return changes(events, registry)

    def silence(self, now_ms: int, registry: Registry) -> list[AlarmChange]:
        self._prepare(registry)
        out = changes(scan_silence(self.detectors, now_ms, self._detector_params), registry)
        return out + changes(scan_silence(self.meters, now_ms, self._meter_params), registry)

    def checkpoint(self) -> Checkpoint:
        return {"detector": self.detectors.to_arrays(), "meter": self.meters.to_arrays()}

    def restore(self, checkpoint: Checkpoint) -> None:
        for kind in KINDS:
            self.load(kind, checkpoint[kind])

    def arrays(self, kind: Kind) -> dict[str, np.ndarray]:
        return (self.detectors if kind == "detector" else self.meters).to_arrays()

    def load(self, kind: Kind, arrays: dict[str, np.ndarray]) -> None:
        if kind == "detector":
            self.detectors = DetectorState.from_arrays(arrays)
        else:
            self.meters = MeterState.from_arrays(arrays)


def changes(events: Events, registry: Registry) -> list[AlarmChange]:
    out = []
    for key, ts, rule, raised, value in zip(
        events.idx.tolist(),
        events.ts.tolist(),
        events.rule.tolist(),
        events.raised.tolist(),
        events.value.tolist(),
        strict=True,
    ):
        info = registry.by_key.get(key)
        if info is None:
            continue  # the device was removed from the registry meanwhile
        r = Rule(rule)
        out.append(
            AlarmChange(
                device_key=key,
                device_id=info.id,
                household_id=info.household_id,
                district=info.district,
                rule=r.name.lower(),
                severity=SEVERITY[r].name.lower(),
                raised=bool(raised),
                ts_ms=int(ts),
                value=float(value),
                test_mode=info.test_mode,
            )
        )
    return out
