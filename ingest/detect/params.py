"""Thresholds (defaults from DOMAIN.md, every one configurable) and the batch columns.

Per-device overrides are optional float arrays indexed by the device index; NaN in one means
"use the default" for that device. Times are milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

import numpy as np
import numpy.typing as npt

from .events import BoolArray, FloatArray, IntArray

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000

QMAX_BY_SIZE: dict[str, float] = {"G1.6": 2.5, "G2.5": 4.0, "G4": 6.0}
"""Maximum flow (m3/h) of household meter sizes."""


def qmax_for_sizes(sizes: Iterable[str | None], default: float = np.nan) -> FloatArray:
    """Per-device qmax from meter sizes ("G1.6", "G2.5", "G4"); unknown -> ``default`` (NaN:
    the parameter's default)."""
    return np.array([QMAX_BY_SIZE.get(s or "", default) for s in sizes], dtype=np.float64)


def per_device(override: FloatArray | None, default: float, idx: IntArray) -> FloatArray:
    """The parameter for each row's device: the override where given (not NaN), else default.
    Without an override: a 0-d array (broadcasts like a scalar)."""
    if override is None:
        return np.array(default, np.float64)
    if len(idx) and int(idx.max()) >= len(override):
        raise ValueError(
            f"per-device override has {len(override)} entries, device {int(idx.max())} needs more"
        )
    v = np.asarray(override, np.float64)[idx]
    return np.where(np.isnan(v), default, v)


@dataclass(frozen=True, kw_only=True, eq=False)
class DetectorParams:
    gas_low: float = 10.0  # %LEL, raise when reached on gas_low_samples consecutive readings
    gas_low_samples: int = 2  # ... of the last gas_low_window readings (k of n)
    gas_low_window: int = 3
    gas_low_clear: float = 5.0  # clear below this (and alarm flag off) ...
    gas_low_clear_samples: int = 2  # ... on this many consecutive readings
    gas_low_by_device: FloatArray | None = None
    gas_high: float = 25.0  # raise at once
    gas_high_clear: float = 20.0
    gas_high_clear_samples: int = 2
    gas_high_by_device: FloatArray | None = None
    rise_per_min: float = 1.0  # %LEL per minute: the trend (Theil-Sen slope) over ...
    rise_samples: int = 5  # ... this many readings (2 to 5) ...
    rise_min_span_ms: int = 4 * MINUTE_MS  # ... spanning at least this long ...
    rise_max_gap_ms: int = 10 * MINUTE_MS  # ... none further than this from the one before
    rise_min_lel: float = 3.0  # ... with the latest at least this CH4
    rise_clear_below: float = 5.0  # clear when CH4 below this or slope <= 0 ...
    rise_clear_samples: int = 2  # ... on this many consecutive readings
    # gas that rises too slowly for a trend (or stays) below the alarm level is still gas:
    present_lel: float = 5.0  # %LEL: CH4 at or above this on every reading ...
    present_ms: int = 10 * MINUTE_MS  # ... for this long: GAS_PRESENT
    present_clear: float = 3.0  # cleared below this ...
    present_clear_samples: int = 2  # ... on this many readings in a row
    ch4_min: float = -1.0  # outside [ch4_min, ch4_max] (or NaN) is a sensor fault
    ch4_max: float = 101.0
    stuck_samples: int = 30  # identical CH4 on this many readings ...
    stuck_ms: int = 15 * MINUTE_MS  # ... spanning at least this long is a stuck sensor
    # ... above this CH4: clean air reads a steady 0 (or a steady small value) on sensors
    # with a coarse resolution, which is not a fault
    stuck_above_lel: float = 1.0
    fault_clear_samples: int = 2
    expected_interval_ms: float = 60_000.0
    expected_interval_ms_by_device: FloatArray | None = None
    silent_factor: float = 3.0
    silent_grace_ms: float = 30_000.0  # ... plus this: gateway batching and delivery take time
    never_reported_ms: float = 24 * HOUR_MS  # registered this long and not one reading yet
    skew_clear_samples: int = 2  # readings in a row within the clock tolerance clear CLOCK_SKEW

    def __post_init__(self) -> None:
        _check_counts(self)
        if self.gas_low_clear > self.gas_low or self.gas_high_clear > self.gas_high:
            raise ValueError("a gas clear level must not exceed its raise level")
        if not self.gas_low_samples <= self.gas_low_window <= 31:
            raise ValueError("gas_low_window must be >= gas_low_samples and at most 31")
        if not 2 <= self.rise_samples <= 5:
            raise ValueError("rise_samples must be 2 to 5")


@dataclass(frozen=True, kw_only=True, eq=False)
class MeterParams:
    qmax: float = QMAX_BY_SIZE["G4"]  # m3/h; pass qmax_by_device (qmax_for_sizes) per meter
    qmax_by_device: FloatArray | None = None
    near_zero: float = 0.005  # m3/h: |flow| at or below this is no flow
    burst_peak_factor: float = 3.0  # burst above this x the usual peak, once learned
    burst_learn_samples: int = 100  # non-zero readings before the usual peak counts
    burst_peak_decay_per_day: float = 0.99
    burst_clear_ratio: float = 0.9  # clear below this x the threshold ...
    burst_clear_samples: int = 2  # ... on this many consecutive readings
    continuous_ms: int = 6 * HOUR_MS  # flow above near zero for longer than this
    continuous_ms_by_device: FloatArray | None = None
    utc_offset_ms: int = 8 * HOUR_MS  # local time = UTC + offset
    night_start_ms: int = 1 * HOUR_MS  # local time of day, [start, end)
    night_end_ms: int = 5 * HOUR_MS
    micro_max: float = 0.1  # m3/h: night flow in (near_zero, micro_max] ...
    micro_night_ms: int = 2 * HOUR_MS  # ... on every reading for this long of one night
    micro_never_zero_ms: int = 48 * HOUR_MS  # or flow above near zero for this long
    pressure_low: float = 1.2  # kPa
    pressure_low_samples: int = 3
    pressure_clear: float = 1.5
    pressure_clear_samples: int = 3
    pressure_low_by_device: FloatArray | None = None
    # Over-pressure: household appliances are made for 0.5-1.5 x the nominal supply pressure
    # (2.0 kPa for natural gas in GB/T 13611), so above 3.0 kPa burners may lift or burn
    # incompletely and a regulator has likely failed.
    pressure_high: float = 3.0  # kPa, raised after pressure_high_samples readings above
    pressure_high_samples: int = 2
    pressure_high_clear: float = 2.8  # cleared after pressure_clear_samples at or below this
    pressure_min: float = 0.0  # kPa: outside [min, max] no meter's sensor reports: a fault
    pressure_max: float = 100.0
    valve_samples: int = 2  # gas past the closed valve (flow, or the register) on this many
    valve_clear_samples: int = 2  # readings; cleared after this many without
    valve_passing_m3: float = 0.002  # the register up by more than this since the valve closed
    # The register (volume_m3, 1 L resolution on the wire) for what the flow cannot show:
    register_step_m3: float = 0.0005  # the register moved: it crossed a multiple of this
    register_still_ms: int = 3 * HOUR_MS  # still this long: no leak (any home's quiet night)
    micro_register_ms: int = 24 * HOUR_MS  # moving, never still, for a day: MICRO_LEAK
    mismatch_ratio: float = 3.0  # register vs the flow's integral: off by this factor ...
    mismatch_tol_m3: float = 0.002  # ... plus this (2 L: rounding of the register) ...
    mismatch_samples: int = 3  # ... on this many intervals in a row: METER_MISMATCH
    mismatch_clear_samples: int = 3  # cleared after this many agreeing while gas flowed
    mismatch_max_gap_ms: int = 30 * MINUTE_MS  # intervals longer than this are not compared
    battery_low: float = 20.0  # %: BATTERY_LOW below this ...
    battery_low_samples: int = 3  # ... on this many readings in a row
    battery_low_clear: float = 25.0  # cleared at or above this on battery_low_samples
    tamper_clear_samples: int = 2
    reverse_clear_samples: int = 2
    volume_drop_m3: float = 0.001  # the register going back by more is a fault
    flow_max_factor: float = 10.0  # flow outside [-qmax, factor x qmax] (or NaN) is a fault
    battery_min: float = 0.0
    battery_max: float = 100.0
    fault_clear_samples: int = 2
    expected_interval_ms: float = 60_000.0
    expected_interval_ms_by_device: FloatArray | None = None
    silent_factor: float = 3.0
    silent_grace_ms: float = 30_000.0  # ... plus this: gateway batching and delivery take time
    never_reported_ms: float = 24 * HOUR_MS  # registered this long and not one reading yet
    skew_clear_samples: int = 2

    def __post_init__(self) -> None:
        _check_counts(self)
        if self.pressure_clear < self.pressure_low:
            raise ValueError("pressure_clear must not be below pressure_low")
        if not self.pressure_clear <= self.pressure_high_clear <= self.pressure_high:
            raise ValueError("need pressure_clear <= pressure_high_clear <= pressure_high")
        if not 0 <= self.night_start_ms < self.night_end_ms <= DAY_MS:
            raise ValueError("night window must satisfy 0 <= start < end <= 24 h")
        if not 0 < self.register_still_ms < self.micro_register_ms:
            raise ValueError("need 0 < register_still_ms < micro_register_ms")
        if self.battery_low_clear < self.battery_low:
            raise ValueError("battery_low_clear must not be below battery_low")
        if not self.mismatch_ratio > 1:
            raise ValueError("mismatch_ratio must be above 1")


def _check_counts(params: DetectorParams | MeterParams) -> None:
    for f in fields(params):
        v = getattr(params, f.name)
        if f.name.endswith("_samples") and v < 1:
            raise ValueError(f"{f.name} must be >= 1, not {v}")


def _opt_bool(cols: Mapping[str, npt.ArrayLike], name: str) -> BoolArray | None:
    v = cols.get(name)
    return None if v is None else np.asarray(v, np.bool_)


def _opt_float(cols: Mapping[str, npt.ArrayLike], name: str) -> FloatArray | None:
    v = cols.get(name)
    return None if v is None else np.asarray(v, np.float64)


@dataclass(frozen=True, eq=False)
class DetectorColumns:
    """One batch of detector readings as columns (any order, devices interleaved)."""

    idx: IntArray
    ts: IntArray
    ch4_lel: FloatArray
    alarm: BoolArray
    fault: BoolArray | None = None
    eol: BoolArray | None = None
    comm_lost: BoolArray | None = None
    valve_closed: BoolArray | None = None  # not used by detection
    temp_c: FloatArray | None = None  # not used by detection
    ahead_ms: FloatArray | None = None  # how far the stamp was ahead of ingest's clock (0: not)

    @classmethod
    def from_mapping(cls, idx: npt.ArrayLike, cols: Mapping[str, npt.ArrayLike]) -> DetectorColumns:
        """From decoded wire columns (``ts`` and field names); unknown keys are ignored."""
        return cls(
            idx=np.asarray(idx, np.int64),
            ts=np.asarray(cols["ts"], np.int64),
            ch4_lel=np.asarray(cols["ch4_lel"], np.float64),
            alarm=np.asarray(cols["alarm"], np.bool_),
            fault=_opt_bool(cols, "fault"),
            eol=_opt_bool(cols, "eol"),
            comm_lost=_opt_bool(cols, "comm_lost"),
            ahead_ms=_opt_float(cols, "ahead_ms"),
        )


@dataclass(frozen=True, eq=False)
class MeterColumns:
    """One batch of meter readings as columns (any order, devices interleaved)."""

    idx: IntArray
    ts: IntArray
    volume_m3: FloatArray
    flow_m3h: FloatArray
    pressure_kpa: FloatArray | None = None  # None or all NaN: the meter has no pressure sensor
    valve_closed: BoolArray | None = None
    battery_pct: FloatArray | None = None
    tamper: BoolArray | None = None
    reverse_flow: BoolArray | None = None
    comm_lost: BoolArray | None = None
    ahead_ms: FloatArray | None = None  # how far the stamp was ahead of ingest's clock (0: not)

    @classmethod
    def from_mapping(cls, idx: npt.ArrayLike, cols: Mapping[str, npt.ArrayLike]) -> MeterColumns:
        """From decoded wire columns (``ts`` and field names); unknown keys are ignored."""
        return cls(
            idx=np.asarray(idx, np.int64),
            ts=np.asarray(cols["ts"], np.int64),
            volume_m3=np.asarray(cols["volume_m3"], np.float64),
            flow_m3h=np.asarray(cols["flow_m3h"], np.float64),
            pressure_kpa=_opt_float(cols, "pressure_kpa"),
            valve_closed=_opt_bool(cols, "valve_closed"),
            battery_pct=_opt_float(cols, "battery_pct"),
            tamper=_opt_bool(cols, "tamper"),
            reverse_flow=_opt_bool(cols, "reverse_flow"),
            comm_lost=_opt_bool(cols, "comm_lost"),
            ahead_ms=_opt_float(cols, "ahead_ms"),
        )
