"""The slow, obvious reference for ingest.detect: one Python loop over each device's readings,
rule by rule as DESIGN.md and the docstrings state them, with its own per-device state.

The vectorised kernels must agree with it exactly (events and final state) on seeded random
streams; see test_detect_equivalence.py. The stream generators live here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from ingest.detect import (
    NO_TS,
    DetectorColumns,
    DetectorParams,
    MeterColumns,
    MeterParams,
    Rule,
)
from ingest.detect.params import DAY_MS, MINUTE_MS
from ingest.detect.state import ML_DAYS_BIT, ML_NIGHT_BIT

Event = tuple[int, int, int, bool, float | None]  # idx, ts, rule, raised, value (None: NaN)
NAN = math.nan


def override(arr: np.ndarray | None, i: int, default: float) -> float:
    if arr is None or math.isnan(float(arr[i])):
        return default
    return float(arr[i])


@dataclass
class RefDevice:
    """Both kinds' fields; each kind's reference uses its own (names as in the kernel state)."""

    last_ts: int | None = None
    norm_ts: int | None = None
    open: set[int] = field(default_factory=set)
    internal: int = 0  # micro-leak branch bits
    # detector
    last_ch4: float = NAN
    gl_hi: int = 0
    gl_clr: int = 0
    gh_clr: int = 0
    gr_clr: int = 0
    sf_ok: int = 0
    same_n: int = 0
    same_ts: int | None = None
    # meter
    last_volume: float = NAN
    burst_clr: int = 0
    peak: float = 0.0
    peak_ts: int | None = None
    peak_n: int = 0
    flow_start: int | None = None
    night_start: int | None = None
    pl_lo: int = 0
    pl_hi: int = 0
    vf_on: int = 0
    vf_off: int = 0
    tamper_off: int = 0
    rf_off: int = 0
    ml_night: bool = False
    ml_days: bool = False


class Reference:
    """Feed it the same batches as the kernel; it keeps its own state."""

    def __init__(self, kind: str, params: Any, capacity: int) -> None:
        self.kind = kind
        self.p = params
        self.dev = [RefDevice() for _ in range(capacity)]

    def process(self, cols: Any) -> tuple[list[Event], int]:
        names = [f.name for f in fields(cols) if getattr(cols, f.name) is not None]
        n = len(cols.idx)
        rows = [{k: getattr(cols, k)[j].item() for k in names} for j in range(n)]
        rows.sort(key=lambda r: (r["idx"], r["ts"]))  # stable
        events: list[Event] = []
        stale = 0
        for r in rows:
            i = r["idx"]
            d = self.dev[i]
            if d.last_ts is not None and r["ts"] <= d.last_ts:
                stale += 1
                continue
            d.last_ts = r["ts"]
            out = _Out(i, r["ts"], d, events)
            if r.get("comm_lost", False):
                out.set(Rule.SILENT, True, NAN)
                continue
            out.set(Rule.SILENT, False, NAN)
            if self.kind == "detector":
                self._detector(i, d, r, out)
            else:
                self._meter(i, d, r, out)
            d.norm_ts = r["ts"]
        events.sort(key=lambda e: (e[1], e[0], e[2]))
        return events, stale

    def _detector(self, i: int, d: RefDevice, r: dict[str, Any], out: _Out) -> None:
        p: DetectorParams = self.p
        ts, x, alarm = r["ts"], r["ch4_lel"], r["alarm"]
        low = override(p.gas_low_by_device, i, p.gas_low)
        d.gl_hi = d.gl_hi + 1 if x >= low else 0
        d.gl_clr = d.gl_clr + 1 if x < min(p.gas_low_clear, low) and not alarm else 0
        if d.gl_hi >= p.gas_low_samples or alarm:
            out.set(Rule.GAS_LOW, True, x)
        elif d.gl_clr >= p.gas_low_clear_samples:
            out.set(Rule.GAS_LOW, False, x)

        high = override(p.gas_high_by_device, i, p.gas_high)
        d.gh_clr = d.gh_clr + 1 if x < min(p.gas_high_clear, high) else 0
        if x >= high:
            out.set(Rule.GAS_HIGH, True, x)
        elif d.gh_clr >= p.gas_high_clear_samples:
            out.set(Rule.GAS_HIGH, False, x)

        rate = NAN
        if d.norm_ts is not None and ts - d.norm_ts <= p.rise_max_gap_ms:
            rate = (x - d.last_ch4) / ((ts - d.norm_ts) / MINUTE_MS)
        rising = rate > p.rise_per_min and x >= p.rise_min_lel
        calm = not rising and (x < p.rise_clear_below or rate <= 0)
        d.gr_clr = d.gr_clr + 1 if calm else 0
        if rising:
            out.set(Rule.GAS_RISING, True, x)
        elif d.gr_clr >= p.rise_clear_samples:
            out.set(Rule.GAS_RISING, False, x)

        if x == d.last_ch4:
            d.same_n += 1
        else:
            d.same_n, d.same_ts = 1, ts
        assert d.same_ts is not None
        stuck = (
            d.same_n >= p.stuck_samples and ts - d.same_ts >= p.stuck_ms and x > p.stuck_above_lel
        )
        in_range = p.ch4_min <= x <= p.ch4_max
        bad = r.get("fault", False) or r.get("eol", False) or not in_range or stuck
        d.sf_ok = 0 if bad else d.sf_ok + 1
        if bad:
            out.set(Rule.SENSOR_FAULT, True, x)
        elif d.sf_ok >= p.fault_clear_samples:
            out.set(Rule.SENSOR_FAULT, False, x)
        d.last_ch4 = x

    def _meter(self, i: int, d: RefDevice, r: dict[str, Any], out: _Out) -> None:
        p: MeterParams = self.p
        ts, f = r["ts"], r["flow_m3h"]
        q = override(p.qmax_by_device, i, p.qmax)
        nz = p.near_zero
        # BURST: usual peak = decaying running max of flow over non-burst readings
        decayed = 0.0
        if d.peak_ts is not None:
            decayed = d.peak * p.burst_peak_decay_per_day ** ((ts - d.peak_ts) / DAY_MS)
        thr = q
        if d.peak_n >= p.burst_learn_samples:
            thr = min(q, p.burst_peak_factor * decayed)
        if Rule.BURST in d.open:  # count readings below the clear level while open
            d.burst_clr = d.burst_clr + 1 if f < p.burst_clear_ratio * thr else 0
            if d.burst_clr >= p.burst_clear_samples:
                out.set(Rule.BURST, False, f)
                d.burst_clr = 0
        elif f > thr:
            out.set(Rule.BURST, True, f)
        if Rule.BURST not in d.open:
            if f > decayed:
                d.peak, d.peak_ts = f, ts
            if f > nz:
                d.peak_n += 1

        flowing, no_flow = f > nz, abs(f) <= nz
        if not flowing:
            d.flow_start = None
        elif d.flow_start is None:
            d.flow_start = ts
        limit = override(p.continuous_ms_by_device, i, p.continuous_ms)
        if flowing and ts - d.flow_start > limit:
            out.set(Rule.CONTINUOUS_FLOW, True, f)
        elif no_flow:
            out.set(Rule.CONTINUOUS_FLOW, False, f)

        local = ts + p.utc_offset_ms
        night = p.night_start_ms <= local % DAY_MS < p.night_end_ms
        small = night and flowing and f <= p.micro_max
        if not small:
            d.night_start = None
        elif d.night_start is None or local // DAY_MS != (d.norm_ts + p.utc_offset_ms) // DAY_MS:
            d.night_start = ts
        if small and ts - d.night_start >= p.micro_night_ms:
            d.ml_night = True
        elif night and no_flow:
            d.ml_night = False
        if flowing and ts - d.flow_start >= p.micro_never_zero_ms:
            d.ml_days = True
        elif no_flow:
            d.ml_days = False
        out.set(Rule.MICRO_LEAK, d.ml_night or d.ml_days, f)

        pr = r.get("pressure_kpa", NAN)
        if not math.isnan(pr):
            low = override(p.pressure_low_by_device, i, p.pressure_low)
            d.pl_lo = d.pl_lo + 1 if pr < low else 0
            d.pl_hi = d.pl_hi + 1 if pr >= max(p.pressure_clear, low) else 0
            if d.pl_lo >= p.pressure_low_samples:
                out.set(Rule.PRESSURE_LOW, True, pr)
            elif d.pl_hi >= p.pressure_clear_samples:
                out.set(Rule.PRESSURE_LOW, False, pr)

        leak = r.get("valve_closed", False) and abs(f) > nz
        d.vf_on = d.vf_on + 1 if leak else 0
        d.vf_off = 0 if leak else d.vf_off + 1
        if d.vf_on >= p.valve_samples:
            out.set(Rule.VALVE_FAULT, True, f)
        elif d.vf_off >= p.valve_clear_samples:
            out.set(Rule.VALVE_FAULT, False, f)

        tamper = r.get("tamper", False)
        d.tamper_off = 0 if tamper else d.tamper_off + 1
        if tamper:
            out.set(Rule.TAMPER, True, f)
        elif d.tamper_off >= p.tamper_clear_samples:
            out.set(Rule.TAMPER, False, f)

        reverse = r.get("reverse_flow", False) or f < -nz
        d.rf_off = 0 if reverse else d.rf_off + 1
        if reverse:
            out.set(Rule.REVERSE_FLOW, True, f)
        elif d.rf_off >= p.reverse_clear_samples:
            out.set(Rule.REVERSE_FLOW, False, f)

        vol, batt = r["volume_m3"], r.get("battery_pct", NAN)
        bad = (
            d.last_volume - vol > p.volume_drop_m3
            or math.isnan(vol)
            or not (-q <= f <= p.flow_max_factor * q)
            or batt < p.battery_min
            or batt > p.battery_max
        )
        d.sf_ok = 0 if bad else d.sf_ok + 1
        if bad:
            out.set(Rule.SENSOR_FAULT, True, f)
        elif d.sf_ok >= p.fault_clear_samples:
            out.set(Rule.SENSOR_FAULT, False, f)
        d.last_volume = vol

    def state_arrays(self, names: list[str]) -> dict[str, np.ndarray]:
        """The reference state in the kernel state's layout (None -> NO_TS, open -> bits)."""
        out: dict[str, np.ndarray] = {}
        for name in names:
            vals = []
            for d in self.dev:
                if name == "open":
                    v: Any = sum(1 << int(r) for r in d.open)
                    v |= (ML_NIGHT_BIT if d.ml_night else 0) | (ML_DAYS_BIT if d.ml_days else 0)
                else:
                    v = getattr(d, name)
                vals.append(NO_TS if v is None else v)
            out[name] = np.array(vals)
        return out


@dataclass
class _Out:
    i: int
    ts: int
    d: RefDevice
    events: list[Event]

    def set(self, rule: Rule, on: bool, value: float) -> None:
        if on == (rule in self.d.open):
            return
        if on:
            self.d.open.add(rule)
        else:
            self.d.open.discard(rule)
        self.events.append((self.i, self.ts, int(rule), on, None if math.isnan(value) else value))


def event_rows(events: Any) -> list[Event]:
    """Kernel events in the reference's form."""
    return [(i, t, int(r), up, None if math.isnan(v) else v) for i, t, r, up, v in events.rows()]


def test_reference_sees_a_gas_leak() -> None:
    ref = Reference("detector", DetectorParams(), 1)
    ch4 = np.array([0.0, 12.0, 12.0, 1.0, 1.0])
    cols = DetectorColumns(
        idx=np.zeros(5, np.int64),
        ts=np.arange(5, dtype=np.int64) * 600_000,
        ch4_lel=ch4,
        alarm=np.zeros(5, np.bool_),
    )
    events, stale = ref.process(cols)
    assert stale == 0
    assert [(e[2], e[3]) for e in events] == [(Rule.GAS_LOW, True), (Rule.GAS_LOW, False)]


def test_reference_sees_a_burst() -> None:
    ref = Reference("meter", MeterParams(qmax=2.5), 1)
    flow = np.array([0.0, 3.0, 3.0, 1.0, 1.0])
    cols = MeterColumns(
        idx=np.zeros(5, np.int64),
        ts=np.arange(5, dtype=np.int64) * 60_000,
        volume_m3=np.zeros(5),
        flow_m3h=flow,
    )
    events, _ = ref.process(cols)
    assert [(e[1], e[2], e[3]) for e in events] == [
        (60_000, Rule.BURST, True),
        (240_000, Rule.BURST, False),
    ]
