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
from ingest.detect.params import DAY_MS, HOUR_MS, MINUTE_MS
from ingest.detect.state import ML_DAYS_BIT, ML_NIGHT_BIT, ML_REGISTER_BIT, RISE_HISTORY

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
    recent_low: list[bool] = field(default_factory=list)  # CH4 >= gas_low, oldest first
    rise_hist: list[tuple[float, int]] = field(default_factory=list)  # newest first
    cs_ok: int = 0
    gp_start: int | None = None
    gp_clr: int = 0
    until: dict[int, int] = field(default_factory=dict)  # rule -> its latest clear
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
    ph_hi: int = 0
    ph_ok: int = 0
    last_flow: float = NAN
    reg_move_ts: int | None = None
    reg_run_ts: int | None = None
    ml_reg: bool = False
    vc_on: int = 0
    vc_vol: float = NAN
    mm_bad: int = 0
    mm_ok: int = 0
    bl_lo: int = 0
    bl_ok: int = 0


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
        late: dict[int, list[dict[str, Any]]] = {}
        previous: tuple[int, int] | None = None
        for r in rows:  # late readings: older than the device's newest, not a repeat
            i, ts = r["idx"], r["ts"]
            d = self.dev[i]
            repeat = previous == (i, ts)
            previous = (i, ts)
            lost = r.get("comm_lost", False)
            if d.last_ts is not None and ts < d.last_ts and not repeat and not lost:
                late.setdefault(i, []).append(r)
        for i, mine in late.items():
            if self.kind == "detector":
                self._late_detector(i, mine, events)
            else:
                self._late_meter(i, mine, events)
        previous = None
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

    def _raise_late(self, i: int, rule: Rule, rows: list[dict[str, Any]], hits: list[bool],
                    values: list[float], events: list[Event]) -> None:  # fmt: skip
        """The first late hit outside what the rule's latest clear covers raises it."""
        d = self.dev[i]
        for r, hit, v in zip(rows, hits, values, strict=True):
            cleared = d.until.get(int(rule))
            if hit and rule not in d.open and (cleared is None or r["ts"] > cleared):
                _Out(i, r["ts"], d, events).set(rule, True, v)
                return

    def _late_detector(self, i: int, rows: list[dict[str, Any]], events: list[Event]) -> None:
        p: DetectorParams = self.p
        xs = [ch4_seen(r["ch4_lel"], p) for r in rows]
        high = override(p.gas_high_by_device, i, p.gas_high)
        self._raise_late(i, Rule.GAS_HIGH, rows, [x >= high for x in xs], xs, events)
        low = override(p.gas_low_by_device, i, p.gas_low)
        at_low = [x >= low for x in xs]
        enough = sum(at_low) >= p.gas_low_samples
        hits = [r["alarm"] or (a and enough) for r, a in zip(rows, at_low, strict=True)]
        self._raise_late(i, Rule.GAS_LOW, rows, hits, xs, events)

    def _late_meter(self, i: int, rows: list[dict[str, Any]], events: list[Event]) -> None:
        p: MeterParams = self.p
        q = override(p.qmax_by_device, i, p.qmax)
        fs = [flow_seen(r["flow_m3h"], q, p) for r in rows]
        self._raise_late(i, Rule.BURST, rows, [f > q for f in fs], fs, events)
        passing = [bool(r.get("valve_closed", False)) and abs(f) > p.near_zero
                   for r, f in zip(rows, fs, strict=True)]  # fmt: skip
        enough = sum(passing) >= p.valve_samples
        self._raise_late(i, Rule.VALVE_FAULT, rows, [h and enough for h in passing], fs, events)
        prs = [pressure_seen(r.get("pressure_kpa", NAN), p) for r in rows]
        over = [pr > p.pressure_high for pr in prs]
        enough = sum(over) >= p.pressure_high_samples
        self._raise_late(i, Rule.PRESSURE_HIGH, rows, [h and enough for h in over], prs, events)

    def _detector(self, i: int, d: RefDevice, r: dict[str, Any], out: _Out) -> None:
        p: DetectorParams = self.p
        ts, raw, alarm = r["ts"], r["ch4_lel"], r["alarm"]
        x = ch4_seen(raw, p)  # what the gas rules see: no value where no sensor could report
        low = override(p.gas_low_by_device, i, p.gas_low)
        at_low = x >= low
        d.gl_hi = d.gl_hi + 1 if at_low else 0
        window = d.recent_low[-(p.gas_low_window - 1) :] if p.gas_low_window > 1 else []
        hits = sum(window) + at_low
        d.recent_low = [*window, at_low]
        d.gl_clr = d.gl_clr + 1 if x < min(p.gas_low_clear, low) and not alarm else 0
        if (at_low and hits >= p.gas_low_samples) or alarm:
            out.set(Rule.GAS_LOW, True, x)
        elif d.gl_clr >= p.gas_low_clear_samples:
            out.set(Rule.GAS_LOW, False, x)

        high = override(p.gas_high_by_device, i, p.gas_high)
        d.gh_clr = d.gh_clr + 1 if x < min(p.gas_high_clear, high) else 0
        if x >= high:
            out.set(Rule.GAS_HIGH, True, x)
        elif d.gh_clr >= p.gas_high_clear_samples:
            out.set(Rule.GAS_HIGH, False, x)

        win = [(float(np.float32(x)), ts), *d.rise_hist]  # newest first
        d.rise_hist = win[:RISE_HISTORY]
        m, slope = p.rise_samples, NAN
        w = win[:m]
        if (
            len(w) == m
            and not any(math.isnan(v) for v, _ in w)
            and all(w[k][1] - w[k + 1][1] <= p.rise_max_gap_ms for k in range(m - 1))
            and w[0][1] - w[-1][1] >= p.rise_min_span_ms
        ):
            pairs = [
                (w[i][0] - w[j][0]) / max(float(w[i][1] - w[j][1]), 1.0) * MINUTE_MS
                for i in range(m)
                for j in range(i + 1, m)
            ]
            slope = float(np.median(pairs))
        rising = slope > p.rise_per_min and x >= p.rise_min_lel and win[0][0] >= win[1][0]
        calm = not rising and (x < p.rise_clear_below or slope <= 0)
        d.gr_clr = d.gr_clr + 1 if calm else 0
        if rising:
            out.set(Rule.GAS_RISING, True, x)
        elif d.gr_clr >= p.rise_clear_samples:
            out.set(Rule.GAS_RISING, False, x)

        present = x >= p.present_lel
        if not present:
            d.gp_start = None
        elif d.gp_start is None:
            d.gp_start = ts
        d.gp_clr = d.gp_clr + 1 if x < p.present_clear else 0
        if present and ts - d.gp_start >= p.present_ms:
            out.set(Rule.GAS_PRESENT, True, x)
        elif d.gp_clr >= p.present_clear_samples:
            out.set(Rule.GAS_PRESENT, False, x)

        if raw == d.last_ch4:
            d.same_n += 1
        else:
            d.same_n, d.same_ts = 1, ts
        assert d.same_ts is not None
        stuck = (
            d.same_n >= p.stuck_samples and ts - d.same_ts >= p.stuck_ms and raw > p.stuck_above_lel
        )
        in_range = p.ch4_min <= raw <= p.ch4_max
        bad = r.get("fault", False) or r.get("eol", False) or not in_range or stuck
        d.sf_ok = 0 if bad else d.sf_ok + 1
        if bad:
            out.set(Rule.SENSOR_FAULT, True, raw)
        elif d.sf_ok >= p.fault_clear_samples:
            out.set(Rule.SENSOR_FAULT, False, raw)
        self._clock(d, r, out, p.skew_clear_samples)
        d.last_ch4 = raw

    @staticmethod
    def _clock(d: RefDevice, r: dict[str, Any], out: _Out, clear_samples: int) -> None:
        ahead = r.get("ahead_ms", 0.0)
        ahead = 0.0 if math.isnan(ahead) else ahead
        d.cs_ok = d.cs_ok + 1 if ahead == 0 else 0
        if ahead > 0:
            out.set(Rule.CLOCK_SKEW, True, ahead / 1000.0)
        elif d.cs_ok >= clear_samples:
            out.set(Rule.CLOCK_SKEW, False, ahead / 1000.0)

    def _meter(self, i: int, d: RefDevice, r: dict[str, Any], out: _Out) -> None:
        p: MeterParams = self.p
        ts, raw = r["ts"], r["flow_m3h"]
        q = override(p.qmax_by_device, i, p.qmax)
        f = flow_seen(raw, q, p)  # what the flow rules see
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
        vol = r["volume_m3"]
        restart = False
        if crossed(d.last_volume, vol, p.register_step_m3):  # the register moved
            if d.reg_move_ts is None or ts - d.reg_move_ts > p.register_still_ms:
                d.reg_run_ts, restart = ts, True
            d.reg_move_ts = ts
        still = d.reg_move_ts is None or ts - d.reg_move_ts > p.register_still_ms
        if still or restart:
            d.ml_reg = False
        elif d.reg_run_ts is not None and ts - d.reg_run_ts >= p.micro_register_ms:
            d.ml_reg = True
        out.set(Rule.MICRO_LEAK, d.ml_night or d.ml_days or d.ml_reg, f)

        raw_pr = r.get("pressure_kpa", NAN)
        pr = pressure_seen(raw_pr, p)
        if not math.isnan(pr):
            low = override(p.pressure_low_by_device, i, p.pressure_low)
            d.pl_lo = d.pl_lo + 1 if pr < low else 0
            d.pl_hi = d.pl_hi + 1 if pr >= max(p.pressure_clear, low) else 0
            if d.pl_lo >= p.pressure_low_samples:
                out.set(Rule.PRESSURE_LOW, True, pr)
            elif d.pl_hi >= p.pressure_clear_samples:
                out.set(Rule.PRESSURE_LOW, False, pr)
            d.ph_hi = d.ph_hi + 1 if pr > p.pressure_high else 0
            d.ph_ok = d.ph_ok + 1 if pr <= p.pressure_high_clear else 0
            if d.ph_hi >= p.pressure_high_samples:
                out.set(Rule.PRESSURE_HIGH, True, pr)
            elif d.ph_ok >= p.pressure_clear_samples:
                out.set(Rule.PRESSURE_HIGH, False, pr)

        closed = r.get("valve_closed", False)
        if closed:
            d.vc_vol = vol if d.vc_on == 0 else d.vc_vol
            d.vc_on += 1
        else:
            d.vc_on, d.vc_vol = 0, NAN
        leak = closed and (abs(f) > nz or vol - d.vc_vol > p.valve_passing_m3)
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

        self._mismatch(d, ts, f, vol, out)
        batt = r.get("battery_pct", NAN)
        seen = batt if p.battery_min <= batt <= p.battery_max else NAN
        d.bl_lo = d.bl_lo + 1 if seen < p.battery_low else 0
        d.bl_ok = d.bl_ok + 1 if seen >= p.battery_low_clear else 0
        if d.bl_lo >= p.battery_low_samples:
            out.set(Rule.BATTERY_LOW, True, seen)
        elif d.bl_ok >= p.battery_low_samples:
            out.set(Rule.BATTERY_LOW, False, seen)
        bad = (
            d.last_volume - vol > p.volume_drop_m3
            or math.isnan(vol)
            or not (-q <= raw <= p.flow_max_factor * q)
            or batt < p.battery_min
            or batt > p.battery_max
            or (not math.isnan(raw_pr) and math.isnan(pr))
        )
        d.sf_ok = 0 if bad else d.sf_ok + 1
        if bad:
            out.set(Rule.SENSOR_FAULT, True, raw)
        elif d.sf_ok >= p.fault_clear_samples:
            out.set(Rule.SENSOR_FAULT, False, raw)
        self._clock(d, r, out, p.skew_clear_samples)
        d.last_volume, d.last_flow = vol, f

    def _mismatch(self, d: RefDevice, ts: int, f: float, vol: float, out: _Out) -> None:
        p: MeterParams = self.p
        bad = good = False
        reg = vol - d.last_volume
        if d.norm_ts is not None and ts - d.norm_ts <= p.mismatch_max_gap_ms:
            by_flow = (forward(f) + forward(d.last_flow)) / 2 * (ts - d.norm_ts) / HOUR_MS
            if math.isfinite(reg) and math.isfinite(by_flow):
                tol, k = p.mismatch_tol_m3, p.mismatch_ratio
                bad = reg > k * by_flow + tol or by_flow > k * max(reg, 0.0) + tol
                good = not bad and (by_flow > tol or reg > tol)
        d.mm_bad = d.mm_bad + 1 if bad else 0
        d.mm_ok = d.mm_ok + 1 if good else 0
        if d.mm_bad >= p.mismatch_samples:
            out.set(Rule.METER_MISMATCH, True, reg)
        elif d.mm_ok >= p.mismatch_clear_samples:
            out.set(Rule.METER_MISMATCH, False, reg)

    def state_arrays(self, names: list[str]) -> dict[str, np.ndarray]:
        """The reference state in the kernel state's layout (None -> NO_TS, open -> bits)."""
        out: dict[str, np.ndarray] = {}
        for name in names:
            vals = []
            for d in self.dev:
                if name == "open":
                    v: Any = sum(1 << int(r) for r in d.open)
                    v |= (ML_NIGHT_BIT if d.ml_night else 0) | (ML_DAYS_BIT if d.ml_days else 0)
                    v |= ML_REGISTER_BIT if d.ml_reg else 0
                elif name == "gl_hist":  # bit 0: the latest reading
                    keep = getattr(self.p, "gas_low_window", 1) - 1
                    recent = d.recent_low[-keep:] if keep else []
                    v = sum(1 << q for q, hit in enumerate(reversed(recent)) if hit)
                elif name in ("rise_x", "rise_ts"):
                    col = 0 if name == "rise_x" else 1
                    fill: Any = NAN if name == "rise_x" else NO_TS
                    have = [h[col] for h in d.rise_hist]
                    v = have + [fill] * (RISE_HISTORY - len(have))
                elif name.endswith("_until"):
                    v = d.until.get(int(UNTIL_RULES[name]))
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
            self.d.until[int(rule)] = max(self.d.until.get(int(rule), self.ts), self.ts)
        self.events.append((self.i, self.ts, int(rule), on, None if math.isnan(value) else value))


UNTIL_RULES = {"gl_until": Rule.GAS_LOW, "gh_until": Rule.GAS_HIGH, "burst_until": Rule.BURST,
               "vf_until": Rule.VALVE_FAULT, "ph_until": Rule.PRESSURE_HIGH}  # fmt: skip


def crossed(before: float, after: float, step: float) -> bool:
    """The register went past a multiple of ``step`` (NaN: no)."""
    if math.isnan(before) or math.isnan(after):
        return False
    return math.floor(after / step) > math.floor(before / step)


def forward(flow: float) -> float:
    """The flow the register counts (NaN stays NaN, as np.clip)."""
    return flow if math.isnan(flow) else max(flow, 0.0)


def ch4_seen(x: float, p: DetectorParams) -> float:
    return x if p.ch4_min <= x <= p.ch4_max else NAN


def flow_seen(f: float, q: float, p: MeterParams) -> float:
    return f if -q <= f <= p.flow_max_factor * q else NAN


def pressure_seen(pr: float, p: MeterParams) -> float:
    return pr if p.pressure_min <= pr <= p.pressure_max else NAN


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
    gas_low = [(e[2], e[3]) for e in events if e[2] == Rule.GAS_LOW]
    assert gas_low == [(Rule.GAS_LOW, True), (Rule.GAS_LOW, False)]
    assert (Rule.GAS_PRESENT, True) in [(e[2], e[3]) for e in events]  # 10 min at >= 5 %LEL


def test_reference_sees_a_burst() -> None:
    ref = Reference("meter", MeterParams(qmax=2.5), 1)
    flow = np.array([0.0, 3.0, 3.0, 1.0, 1.0])
    cols = MeterColumns(
        idx=np.zeros(5, np.int64),
        ts=np.arange(5, dtype=np.int64) * 60_000,
        volume_m3=np.zeros(5),  # a register standing under a burst: METER_MISMATCH too
        flow_m3h=flow,
    )
    events, _ = ref.process(cols)
    assert [(e[1], e[2], e[3]) for e in events if e[2] == Rule.BURST] == [
        (60_000, Rule.BURST, True),
        (240_000, Rule.BURST, False),
    ]
