"""Detection inside the consumer: the kernels of ``ingest.detect`` over the micro-batch, with
state indexed by device key, parameters from the registry (meter size -> Qmax, expected
interval), and events turned into alarm changes for registered devices.

The state can be checkpointed before a transaction and restored if it fails, so a retried
micro-batch is judged against the same state as the first attempt.
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from gasguard.fields import Kind
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
    scan_never_reported,
    scan_silence,
)
from ingest.detect.runs import NO_TS
from ingest.registry import Registry
from ingest.writer import AlarmChange

Checkpoint = dict[str, dict[str, np.ndarray]]

# A household's usual peak is learned over 1000 readings with flow before a flow far above it
# counts as a burst: about a week of a household cooking and heating water two hours a day at
# a reading a minute, so its occasional big appliance has been seen. (Counting every reading,
# a week of them, a household using gas two hours a day would have taken two months.)
BURST_LEARN_SAMPLES = 1000


class ThresholdsError(ValueError):
    """The thresholds file is unusable; the message names the file and the key."""


# Per-device overrides a thresholds file may give, and the parameter array each one fills.
DEVICE_KEYS: dict[str, tuple[Kind, str]] = {
    "gas_low": ("detector", "gas_low_by_device"),
    "gas_high": ("detector", "gas_high_by_device"),
    "qmax": ("meter", "qmax_by_device"),
    "continuous_ms": ("meter", "continuous_ms_by_device"),
    "pressure_low": ("meter", "pressure_low_by_device"),
}


@dataclass(frozen=True)
class Thresholds:
    """Detection thresholds: defaults from DOMAIN.md, changed by a TOML file::

    [detector]
    gas_low = 8.0
    [meter]
    continuous_ms = 21600000
    [devices."M-0007"]
    qmax = 2.5
    """

    detector: dict[str, Any] = field(default_factory=dict)
    meter: dict[str, Any] = field(default_factory=dict)
    devices: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> Thresholds:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ThresholdsError(f"thresholds {path}: {exc}") from None
        unknown = sorted(set(data) - {"detector", "meter", "devices"})
        if unknown:
            raise ThresholdsError(f"thresholds {path}: unknown sections {unknown}")
        out = cls(
            dict(data.get("detector", {})),
            dict(data.get("meter", {})),
            dict(data.get("devices", {})),
        )
        for kind, section, model in (
            ("detector", out.detector, DetectorParams),
            ("meter", out.meter, MeterParams),
        ):
            names = {f.name for f in fields(model)} - {
                f for f in (f.name for f in fields(model)) if f.endswith("_by_device")
            }
            for key in section:
                if key not in names:
                    raise ThresholdsError(f"thresholds {path}: [{kind}] {key}: unknown threshold")
            try:
                model(**section)
            except (TypeError, ValueError) as exc:
                raise ThresholdsError(f"thresholds {path}: [{kind}]: {exc}") from None
        for device, values in out.devices.items():
            for key, value in values.items():
                if key not in DEVICE_KEYS:
                    raise ThresholdsError(
                        f"thresholds {path}: [devices.{device!r}] {key}: not a per-device "
                        f"threshold (one of {', '.join(DEVICE_KEYS)})"
                    )
                if not isinstance(value, int | float) or isinstance(value, bool):
                    raise ThresholdsError(
                        f"thresholds {path}: [devices.{device!r}] {key}: not a number"
                    )
        return out


class Detection:
    def __init__(
        self,
        utc_offset_hours: float = 8.0,
        thresholds: Thresholds | None = None,
        clock_tolerance_ms: int = 30_000,
        started_ms: int | None = None,
    ) -> None:
        self.utc_offset_ms = int(utc_offset_hours * 3_600_000)
        # NEVER_REPORTED counts from here for devices registered earlier: without a saved
        # state ingest cannot know who reported before it started
        self.started_ms = int(time.time() * 1000) if started_ms is None else started_ms
        self._since_cache: dict[tuple[int, int, Kind], np.ndarray] = {}
        self.clock_tolerance_ms = clock_tolerance_ms
        self.thresholds = thresholds or Thresholds()
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
            qmax = registry.qmax_array()
            per_device: dict[str, np.ndarray] = {
                "expected_interval_ms_by_device": interval,
                "qmax_by_device": np.where(np.isfinite(qmax), qmax, np.nan),
            }
            for device, values in self.thresholds.devices.items():
                info = registry.by_id.get(device)
                if info is None:
                    continue  # not (yet) registered
                for key, value in values.items():
                    kind, array = DEVICE_KEYS[key]
                    if kind == info.kind:
                        target = per_device.setdefault(array, np.full(capacity, np.nan))
                        target[info.key] = value
            t = self.thresholds
            detector_arrays = {k: v for k, v in per_device.items() if k in _DETECTOR_ARRAYS}
            meter_arrays = {k: v for k, v in per_device.items() if k in _METER_ARRAYS}
            self._detector_params = DetectorParams(**{**t.detector, **detector_arrays})
            self._meter_params = MeterParams(
                **{
                    "burst_learn_samples": BURST_LEARN_SAMPLES,
                    "utc_offset_ms": self.utc_offset_ms,
                    **t.meter,
                    **meter_arrays,
                }
            )
            self._params_for = id(registry)

    def run(
        self,
        kind: Kind,
        columns: dict[str, np.ndarray],
        registry: Registry,
        now_ms: int | None = None,
    ) -> list[AlarmChange]:
        """Judge one kind's readings (``device_key`` and field columns) that arrived at
        ``now_ms`` (ingest's clock; now by default).

        A reading stamped more than the clock tolerance ahead of ``now_ms`` is judged as of
        ``now_ms`` (stored with its own stamp): a clock running ahead never makes the device's
        true-time readings look old. Its device raises CLOCK_SKEW with the skew."""
        self._prepare(registry)
        idx = columns["device_key"].astype(np.int64)
        now = int(time.time() * 1000) if now_ms is None else now_ms
        ahead = columns["ts"] - now
        skewed = ahead > self.clock_tolerance_ms
        columns = columns | {"ahead_ms": np.where(skewed, ahead, 0).astype(np.float64)}
        if skewed.any():
            columns["ts"] = np.where(skewed, now, columns["ts"])
        if kind == "detector":
            events, _ = detect_detectors(
                DetectorColumns.from_mapping(idx, columns), self._detector_params, self.detectors
            )
        else:
            events, _ = detect_meters(
                MeterColumns.from_mapping(idx, columns), self._meter_params, self.meters
            )
        return changes(events, registry)

    def silence(
        self, now_ms: int, registry: Registry, gateways: set[str] | None = None
    ) -> list[AlarmChange]:
        """SILENT and NEVER_REPORTED as of ``now_ms``; NEVER_REPORTED only for the devices
        behind ``gateways`` (a shard's: the others report to another shard; None: all)."""
        self._prepare(registry)
        out: list[AlarmChange] = []
        kinds: tuple[tuple[Kind, DetectorState | MeterState, DetectorParams | MeterParams], ...] = (
            ("detector", self.detectors, self._detector_params),
            ("meter", self.meters, self._meter_params),
        )
        for kind, state, params in kinds:
            out += changes(scan_silence(state, now_ms, params), registry)
            never = scan_never_reported(
                state, now_ms, self._since(registry, kind, gateways), params.never_reported_ms
            )
            out += changes(never, registry)
        return out

    def _since(self, registry: Registry, kind: Kind, gateways: set[str] | None) -> np.ndarray:
        """Per key, when NEVER_REPORTED starts counting; built once per registry (the scan
        runs every few seconds, the registry changes when it is reloaded)."""
        key = (id(registry), len(registry.by_key), kind)
        if key not in self._since_cache:
            if len(self._since_cache) > 4:
                self._since_cache.clear()
            registered = registry.registered_array(kind, gateways)
            self._since_cache[key] = np.where(
                registered == NO_TS, NO_TS, np.maximum(registered, self.started_ms)
            )
        return self._since_cache[key]

    def checkpoint(self, keys: np.ndarray) -> Checkpoint:
        """The state of the devices ``keys`` (those a micro-batch touches), to restore if its
        transaction fails; the silence scan may touch others, but only after a commit."""
        out: Checkpoint = {}
        for kind, state in (("detector", self.detectors), ("meter", self.meters)):
            rows = keys[keys < state.capacity]
            out[kind] = {"__keys__": rows} | {
                name: getattr(state, name)[rows].copy() for name, _, _ in state.FIELDS
            }
        return out

    def restore(self, checkpoint: Checkpoint) -> None:
        for kind, state in (("detector", self.detectors), ("meter", self.meters)):
            saved = checkpoint[kind]
            rows = saved["__keys__"]
            for name, _, _ in state.FIELDS:
                getattr(state, name)[rows] = saved[name]

    def arrays(self, kind: Kind) -> dict[str, np.ndarray]:
        return (self.detectors if kind == "detector" else self.meters).to_arrays()

    def load(self, kind: Kind, arrays: dict[str, np.ndarray]) -> None:
        if kind == "detector":
            self.detectors = DetectorState.from_arrays(arrays)
        else:
            self.meters = MeterState.from_arrays(arrays)


_DETECTOR_ARRAYS = {f.name for f in fields(DetectorParams) if f.name.endswith("_by_device")}
_METER_ARRAYS = {f.name for f in fields(MeterParams) if f.name.endswith("_by_device")}


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
