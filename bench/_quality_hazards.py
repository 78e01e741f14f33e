"""Hazards laid over normal life (bench/detection_quality.py): which household gets which,
when, how strong, the timestamp of the reading that decides it, and the readings it changes.

The labels are the generator's own: each kind's decisive reading follows from the values it
writes and the thresholds DOMAIN.md and the documented defaults give (written out in the
table of detection_quality.py); nothing here calls or reads detection code.

Every hazard has its own household (one hazard a household, none on shut-off households).
A hazard changes its device's readings from ``start`` (inclusive) to ``end`` (exclusive);
``first`` is the device's first reading in that window. Flow through the meter (a burst, a
leak) enters the register exactly as normal use does, unless the kind says it does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from _quality_fleet import (
    COOKING_PEAK,
    DAY_MS,
    HOUR_MS,
    MINUTE_MS,
    PER_GATEWAY,
    UTC_OFFSET_MS,
    BoolArray,
    Columns,
    Config,
    Fleet,
    FloatArray,
    IntArray,
)

from gasguard.fields import Kind
from ingest.detect.params import DetectorParams, MeterParams

STUCK_SAMPLES, STUCK_MS = 30, 15 * MINUTE_MS  # identical CH4 this often, this long
CONTINUOUS_MS = 6 * HOUR_MS  # flow that never returns to zero for longer
NIGHT_START_MS, NIGHT_MS = 1 * HOUR_MS, 2 * HOUR_MS  # small flow 01:00-03:00 local
RISE_LEL = 3.0  # a trend: CH4 this far above its level before, and at least this


@dataclass(frozen=True)
class HazardKind:
    """One row of the hazard table: what is injected and which rule(s) should catch it."""

    name: str
    device: Kind
    expected: tuple[str, ...]  # rules that should catch it (any one of them)
    also: tuple[str, ...]  # rules it may raise besides without being a false alarm
    injected: str
    decisive: str


@dataclass(eq=False)
class Plan:
    """The month's hazards, one row each."""

    kind: list[str]
    device: list[Kind]
    hh: IntArray
    start: IntArray
    end: IntArray
    first: IntArray  # the device's first reading at or after start
    decisive: IntArray  # ts of the deciding reading, or the deadline for a silence
    by_deadline: BoolArray  # decided by the absence of readings (a silence scan)
    mag: FloatArray
    mag2: FloatArray
    q_flow: FloatArray  # extra flow the meter shows, m3/h
    q_volume: FloatArray  # extra flow through the register, m3/h

    def __len__(self) -> int:
        return len(self.hh)


Sampler = Callable[[np.random.Generator, Fleet, int], tuple[float, float, float]]
"""(rng, fleet, household) -> (duration ms, mag, mag2)"""


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _minutes(rng: np.random.Generator, lo: float, hi: float) -> float:
    return _u(rng, lo, hi) * MINUTE_MS


def _rise(
    rng: np.random.Generator, f: Fleet, h: int, lo: float, hi: float
) -> tuple[float, float, float]:
    rate = _u(rng, lo, hi)  # %LEL per minute
    base = round(float(f.ch4_base[h]), 1)
    top = _u(rng, max(base + RISE_LEL + 0.5, 6.0), 9.5)
    ramp = (top - base) / rate * MINUTE_MS
    return ramp + _minutes(rng, 10, 20), rate, top


def _interval(f: Fleet, kind: str) -> int:
    return f.cfg.interval_ms(kind)


# name -> (eligible households, duration and magnitudes)
_SAMPLERS: dict[str, tuple[Callable[[Fleet], BoolArray] | None, Sampler]] = {
    "gas_low": (None, lambda r, f, h: (_minutes(r, 10, 60), _u(r, 10.8, 24.0), 0.0)),
    "gas_low_boundary": (None, lambda r, f, h: (_minutes(r, 10, 60), 10.0, 0.0)),
    "gas_low_flicker": (
        None,
        lambda r, f, h: (
            max(10 * MINUTE_MS, 4 * _interval(f, "detector")),
            round(_u(r, 10.0, 10.5), 1),
            round(_u(r, 9.5, 9.9), 1),
        ),
    ),
    "gas_high": (
        None,
        lambda r, f, h: (_minutes(r, 5, 30), _u(r, 25.0, 60.0), float(r.random() < 1 / 3)),
    ),
    "gas_rising_fast": (None, lambda r, f, h: _rise(r, f, h, 7.5, 15.0)),
    "gas_rising_slow": (None, lambda r, f, h: _rise(r, f, h, 0.1, 1.0)),
    "detector_alarm_flag": (None, lambda r, f, h: (_minutes(r, 5, 30), _u(r, 4.0, 9.5), 0.0)),
    "stuck_sensor": (
        None,
        lambda r, f, h: (_minutes(r, 60, 24 * 60), round(_u(r, 1.1, 2.0), 1), 0.0),
    ),
    "stuck_sensor_low": (
        lambda f: ~f.coarse,
        lambda r, f, h: (_minutes(r, 60, 24 * 60), round(_u(r, 0.2, 1.0), 1), 0.0),
    ),
    "ch4_impossible_high": (None, lambda r, f, h: (0.0, 1e300, float(r.integers(1, 4)))),
    "ch4_negative": (None, lambda r, f, h: (0.0, -50.0, float(r.integers(1, 4)))),
    "detector_silent": (None, lambda r, f, h: (_minutes(r, 60, 12 * 60), 0.0, 0.0)),
    "detector_comm_lost": (None, lambda r, f, h: (_minutes(r, 30, 180), 0.0, 0.0)),
    "never_reported": (None, lambda r, f, h: (math.inf, 0.0, 0.0)),
    "burst": (
        None,
        lambda r, f, h: (
            _minutes(r, 10, 60) + 2 * _interval(f, "meter"),
            1.02 if r.random() < 0.25 else _u(r, 1.02, 3.0),
            0.0,
        ),
    ),
    "burst_over_peak": (
        lambda f: ~f.heater & (3.85 * f.scale < 0.97 * f.qmax),
        lambda r, f, h: (_minutes(r, 10, 60) + 2 * _interval(f, "meter"), _u(r, 3.5, 5.0), 0.0),
    ),
    "continuous_flow": (None, lambda r, f, h: (_minutes(r, 7 * 60, 14 * 60), _u(r, 0.12, 0.5), 0)),
    "micro_leak": (None, lambda r, f, h: (_u(r, 1, 3) * DAY_MS, _u(r, 0.006, 0.1), 0.0)),
    "micro_leak_tiny": (None, lambda r, f, h: (_u(r, 1, 3) * DAY_MS, _u(r, 0.001, 0.005), 0.0)),
    "micro_leak_zero_flow": (None, lambda r, f, h: (_u(r, 1, 3) * DAY_MS, _u(r, 0.01, 0.1), 0)),
    "valve_closed_flow": (
        None,
        lambda r, f, h: (max(_minutes(r, 15, 120), 3 * _interval(f, "meter")), _u(r, 0.02, 1), 0),
    ),
    "valve_closed_register": (
        None,
        lambda r, f, h: (max(_minutes(r, 15, 120), 3 * _interval(f, "meter")), _u(r, 0.02, 1), 0),
    ),
    "pressure_low": (
        lambda f: f.gateway_pressure[np.arange(f.cfg.households) // PER_GATEWAY],
        lambda r, f, h: (
            max(_minutes(r, 20, 180), 5 * _interval(f, "meter")),
            1.19 if r.random() < 0.25 else _u(r, 0.3, 1.19),
            0.0,
        ),
    ),
    "pressure_high": (
        lambda f: f.gateway_pressure[np.arange(f.cfg.households) // PER_GATEWAY],
        lambda r, f, h: (max(_minutes(r, 20, 180), 5 * _interval(f, "meter")), _u(r, 3.2, 6), 0),
    ),
    "battery_low": (None, lambda r, f, h: (math.inf, round(_u(r, 2.0, 9.0), 1), 0.0)),
    "meter_silent": (
        None,
        lambda r, f, h: (max(_minutes(r, 60, 12 * 60), 4 * _interval(f, "meter")), 0.0, 0.0),
    ),
    "flow_impossible": (None, lambda r, f, h: (0.0, 1e300, float(r.integers(1, 3)))),
}
NIGHT_KINDS = ("valve_closed_flow", "valve_closed_register")  # start 00:30-03:00 local
DAY_KINDS = ("micro_leak", "micro_leak_tiny", "micro_leak_zero_flow")  # start 10:00-22:00
FLOW_KINDS: dict[str, tuple[bool, bool]] = {  # name -> (flow shows it, register counts it)
    "burst": (True, True),
    "burst_over_peak": (True, True),
    "continuous_flow": (True, True),
    "micro_leak": (True, True),
    "micro_leak_tiny": (True, True),
    "micro_leak_zero_flow": (False, True),
    "valve_closed_flow": (True, True),
    "valve_closed_register": (False, True),
}


def injector_names() -> set[str]:
    return set(_SAMPLERS)


def plan_hazards(fleet: Fleet, kinds: list[HazardKind], per_kind: int, seed: int) -> Plan:
    """Pick households and times for ``per_kind`` hazards of every kind."""
    rng = np.random.default_rng([seed, 4])
    cfg = fleet.cfg
    free = ~fleet.shut_off
    span = cfg.end_ms - cfg.t0_ms
    warm = min(DAY_MS, span // 5)
    rows: list[tuple[str, Kind, int, int, int, float, float]] = []
    for k in kinds:
        eligible_fn, sample = _SAMPLERS[k.name]
        pool = np.flatnonzero(free & (eligible_fn(fleet) if eligible_fn else True))
        chosen = rng.choice(pool, min(per_kind, len(pool)), replace=False)
        free[chosen] = False
        for h in chosen.tolist():
            dur, mag, mag2 = sample(rng, fleet, h)
            iv = _interval(fleet, k.device)
            if k.name in ("ch4_impossible_high", "ch4_negative", "flow_impossible"):
                dur = mag2 * iv
            if math.isinf(dur):  # from a time in the month to its end (never: all month)
                start = cfg.t0_ms if k.name == "never_reported" else _at(rng, cfg, warm, 0)
                end = cfg.end_ms
            elif k.name in NIGHT_KINDS:
                start = _local_time(rng, cfg, warm, int(dur), lo_h=0.5, hi_h=3.0)
                end = start + int(dur)
            elif k.name in DAY_KINDS:
                start = _local_time(rng, cfg, warm, 30 * HOUR_MS, lo_h=10.0, hi_h=22.0)
                end = min(start + int(dur), cfg.end_ms)
            else:
                start = _at(rng, cfg, warm, int(dur) + max(HOUR_MS, 6 * iv))
                end = start + int(dur)
            rows.append((k.name, k.device, h, start, end, mag, mag2))
    n = len(rows)
    plan = Plan(
        kind=[r[0] for r in rows],
        device=[r[1] for r in rows],
        hh=np.array([r[2] for r in rows], np.int64),
        start=np.array([r[3] for r in rows], np.int64),
        end=np.array([r[4] for r in rows], np.int64),
        first=np.zeros(n, np.int64),
        decisive=np.zeros(n, np.int64),
        by_deadline=np.zeros(n, np.bool_),
        mag=np.array([r[5] for r in rows]),
        mag2=np.array([r[6] for r in rows]),
        q_flow=np.zeros(n),
        q_volume=np.zeros(n),
    )
    for i in range(n):
        h, name, device = int(plan.hh[i]), plan.kind[i], plan.device[i]
        plan.first[i] = fleet.grid_at_or_after(device, h, int(plan.start[i]))
        plan.decisive[i], plan.by_deadline[i] = _decisive(fleet, plan, i)
        shows, counts = FLOW_KINDS.get(name, (False, False))
        q = float(plan.mag[i])
        if name == "burst":  # a multiple of the meter's Qmax
            q *= float(fleet.qmax[h])
        elif name == "burst_over_peak":  # a multiple of the household's cooking peak
            q *= COOKING_PEAK * float(fleet.scale[h])
        plan.q_flow[i] = q if shows else 0.0
        plan.q_volume[i] = q if counts else 0.0
    fleet.protected[plan.hh] = True
    return plan


def _at(rng: np.random.Generator, cfg: Config, warm: int, room: int) -> int:
    hi = max(cfg.end_ms - room, cfg.t0_ms + warm + 1)
    return int(rng.integers(cfg.t0_ms + warm, hi))


def _local_time(
    rng: np.random.Generator, cfg: Config, warm: int, room: int, *, lo_h: float, hi_h: float
) -> int:
    """A start at local time lo_h..hi_h on a day that leaves ``room`` before the end."""
    first_day = (cfg.t0_ms + warm + UTC_OFFSET_MS) // DAY_MS
    last_day = max((cfg.end_ms - room + UTC_OFFSET_MS) // DAY_MS - 1, first_day)
    day = int(rng.integers(first_day, last_day + 1))
    return day * DAY_MS - UTC_OFFSET_MS + int(rng.uniform(lo_h, hi_h) * HOUR_MS)


def _decisive(fleet: Fleet, plan: Plan, i: int) -> tuple[int, bool]:
    """The deciding reading's ts (or a silence's deadline), by the table's definitions."""
    name, device, h = plan.kind[i], plan.device[i], int(plan.hh[i])
    iv = _interval(fleet, device)
    first = int(plan.first[i])
    if name == "never_reported":  # registered at the month's start: the commissioning grace
        return fleet.cfg.t0_ms + int(MeterParams().never_reported_ms), True
    if name in ("detector_silent", "meter_silent"):
        return first - iv + 3 * iv, True  # three intervals after the last reading
    if name == "battery_low":
        return first + 2 * iv, False  # the third reading below 20 %
    if name == "valve_closed_register":  # the register more than 2 L up, on 2 readings
        litres_per_reading = float(plan.mag[i]) * 1000 * iv / HOUR_MS
        return first + (int(2.0 // litres_per_reading) + 2) * iv, False
    if name in ("gas_low", "gas_low_boundary", "valve_closed_flow"):
        return first + iv, False  # the second reading
    if name == "gas_low_flicker":
        return first + 2 * iv, False  # the second reading at >= 10 %LEL
    if name in ("pressure_low", "pressure_high"):
        return first + 2 * iv, False  # the third reading
    if name in ("gas_rising_fast", "gas_rising_slow"):
        return first + _rise_decided(fleet, plan, i, iv) * iv, False
    if name in ("stuck_sensor", "stuck_sensor_low"):
        j = max(STUCK_SAMPLES - 1, -(-STUCK_MS // iv))
        return first + j * iv, False
    if name == "continuous_flow":
        return first + (CONTINUOUS_MS // iv + 1) * iv, False
    if name in DAY_KINDS:
        local = int(plan.start[i]) + UTC_OFFSET_MS
        night = (local // DAY_MS + 1) * DAY_MS - UTC_OFFSET_MS + NIGHT_START_MS
        seen = fleet.grid_at_or_after(device, h, night)
        return fleet.grid_at_or_after(device, h, seen + NIGHT_MS), False
    return first, False  # the first reading of the hazard


def _rise_decided(fleet: Fleet, plan: Plan, i: int, iv: int) -> int:
    """The rising reading (0: the first) that decides GAS_RISING by its definition (a
    Theil-Sen trend over ``rise_samples`` readings spanning ``rise_min_span_ms``) or
    GAS_PRESENT (``present_lel`` on every reading for ``present_ms``), whichever comes first;
    the readings before the rise at the household's clean-air level."""
    p = DetectorParams()
    base = round(float(fleet.ch4_base[int(plan.hh[i])]), 1)
    values = [base] * (p.rise_samples - 1)
    span = (p.rise_samples - 1) * iv
    present_from: int | None = None
    for j in range(10**5):
        x = _rise_value(base, float(plan.mag[i]), float(plan.mag2[i]), j, iv)
        values.append(x)
        w = values[-p.rise_samples :]
        slopes = [(w[b] - w[a]) / ((b - a) * iv) * MINUTE_MS
                  for a in range(len(w)) for b in range(a + 1, len(w))]  # fmt: skip
        trend = float(np.median(slopes)) > p.rise_per_min and span >= p.rise_min_span_ms
        if trend and x >= p.rise_min_lel and x >= w[-2]:
            return j
        present_from = j if present_from is None and x >= p.present_lel else present_from
        if present_from is not None and (j - present_from) * iv >= p.present_ms:
            return j
    return j


def _rise_value(base: float, rate: float, top: float, j: int, iv: int) -> float:
    return round(min(base + rate * (j + 1) * iv / MINUTE_MS, top), 1)


@dataclass(eq=False)
class Round:
    """One round of one device kind, every household: hazards change it in place."""

    kind: Kind
    t: int
    ts: IntArray
    cols: Columns
    present: BoolArray


class Hazards:
    """Lays the plan over each round."""

    def __init__(self, fleet: Fleet, plan: Plan) -> None:
        self.fleet = fleet
        self.plan = plan
        self.rng = np.random.default_rng([fleet.cfg.seed, 5])
        self._by_device = {
            d: np.array([i for i, dev in enumerate(plan.device) if dev == d], np.int64)
            for d in ("detector", "meter")
        }
        flows = np.flatnonzero(plan.q_volume > 0)
        self._flows = flows[np.argsort(plan.start[flows], kind="stable")]

    def apply(self, rnd: Round) -> None:
        p = self.plan
        iv = _interval(self.fleet, rnd.kind)
        rows = self._by_device[rnd.kind]
        live = rows[(p.start[rows] - 2 * iv <= rnd.t + iv) & (p.end[rows] + iv > rnd.t)]
        if rnd.kind == "meter":
            self._flow(rnd)
        for i in live.tolist():
            h = int(p.hh[i])
            t = int(rnd.ts[h])
            name = p.kind[i]
            if name in ("gas_rising_fast", "gas_rising_slow") and t == p.first[i] - iv:
                rnd.cols["ch4_lel"][h] = round(float(self.fleet.ch4_base[h]), 1)  # the anchor
            if not p.start[i] <= t < p.end[i]:
                continue
            j = (t - int(p.first[i])) // iv
            self._one(rnd, name, h, j=j, mag=float(p.mag[i]), mag2=float(p.mag2[i]), iv=iv)

    def _one(
        self, rnd: Round, name: str, h: int, *, j: int, mag: float, mag2: float, iv: int
    ) -> None:
        c = rnd.cols
        noise = float(self.rng.standard_normal())
        if name == "gas_low":
            c["ch4_lel"][h] = round(max(mag + 0.2 * noise, 10.2), 1)
        elif name == "gas_low_boundary":  # at the threshold, with the sensor's noise
            c["ch4_lel"][h] = mag + float(self.rng.integers(0, 3)) / 10
        elif name in ("stuck_sensor", "stuck_sensor_low"):
            c["ch4_lel"][h] = mag
        elif name == "gas_low_flicker":
            c["ch4_lel"][h] = mag if j % 2 == 0 else mag2
        elif name == "gas_high":
            boundary = 25.0 + float(self.rng.integers(0, 2)) / 10  # 25.0 or 25.1
            c["ch4_lel"][h] = boundary if mag2 else round(max(mag + 0.5 * noise, 25.0), 1)
        elif name in ("gas_rising_fast", "gas_rising_slow"):
            c["ch4_lel"][h] = _rise_value(round(float(self.fleet.ch4_base[h]), 1), mag, mag2, j, iv)
        elif name == "detector_alarm_flag":
            c["ch4_lel"][h] = round(min(max(mag + 0.2 * noise, 3.0), 9.8), 1)
            c["alarm"][h] = True
        elif name in ("ch4_impossible_high", "ch4_negative"):
            c["ch4_lel"][h] = mag
        elif name in ("detector_silent", "meter_silent", "never_reported"):
            rnd.present[h] = False
        elif name == "detector_comm_lost":
            c["comm_lost"][h] = True
            c["ch4_lel"][h] = np.nan
            c["alarm"][h] = False
        elif name in NIGHT_KINDS:
            c["valve_closed"][h] = True
        elif name == "pressure_low":  # noise never lifts it out of the hazard
            c["pressure_kpa"][h] = round(min(max(mag + 0.01 * noise, 0.0), mag, 1.19), 2)
        elif name == "pressure_high":
            c["pressure_kpa"][h] = round(max(mag + 0.01 * noise, 3.2), 2)
        elif name == "battery_low":
            c["battery_pct"][h] = mag
        elif name == "flow_impossible":
            c["flow_m3h"][h] = mag

    def _flow(self, rnd: Round) -> None:
        """Leaks and bursts: the flow the meter shows, and the register's integral of it."""
        p = self.plan
        rows = self._flows[p.start[self._flows] <= rnd.t + _interval(self.fleet, "meter")]
        if not len(rows):
            return
        h = p.hh[rows]
        t = rnd.ts[h]
        inside = (p.start[rows] <= t) & (t < p.end[rows])
        flow = rnd.cols["flow_m3h"]
        np.add.at(flow, h[inside], p.q_flow[rows][inside])
        flow[h] = np.round(flow[h], 4)
        used = np.clip(t - p.start[rows], 0, p.end[rows] - p.start[rows]) / HOUR_MS
        volume = rnd.cols["volume_m3"]
        np.add.at(volume, h, p.q_volume[rows] * used)
        volume[h] = np.round(volume[h], 4)
