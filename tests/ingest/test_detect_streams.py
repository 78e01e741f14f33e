"""Seeded random reading streams for the detection tests: realistic values driven across every
rule's thresholds (ramps and spikes of gas, stuck sensors, runs of zero and of small flow,
bursts, night hours, pressure dips and NaN pressure, comm_lost rows, flags), then replays,
random batch boundaries and shuffling within a batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ingest.detect import DetectorColumns, MeterColumns
from ingest.detect.params import HOUR_MS, MINUTE_MS

T0 = 1_767_225_600_000  # 2026-01-01 00:00 UTC
Columns = dict[str, np.ndarray]

DETECTOR_FIELDS = ("idx", "ts", "ch4_lel", "alarm", "fault", "eol", "comm_lost")
METER_FIELDS = (
    "idx",
    "ts",
    "volume_m3",
    "flow_m3h",
    "pressure_kpa",
    "valve_closed",
    "battery_pct",
    "tamper",
    "reverse_flow",
    "comm_lost",
)


def _merge(per_device: list[Columns]) -> Columns:
    cols = {k: np.concatenate([d[k] for d in per_device]) for k in per_device[0]}
    order = np.lexsort((cols["idx"], cols["ts"]))  # time order across devices
    return {k: v[order] for k, v in cols.items()}


def detector_stream(rng: np.random.Generator, devices: int, length: int) -> Columns:
    out = []
    for i in range(devices):
        dt = rng.integers(20_000, 90_000, length)
        dt[rng.random(length) < 0.02] = rng.integers(10 * MINUTE_MS, 40 * MINUTE_MS)
        dt[rng.random(length) < 0.01] = 10 * MINUTE_MS  # exactly the rate's max gap
        ts = T0 + int(rng.integers(0, HOUR_MS)) + np.cumsum(dt)
        ch4 = np.empty(length)
        alarm = np.zeros(length, np.bool_)
        fault = np.zeros(length, np.bool_)
        x, mode, left, rate = 0.4, "clean", 0, 0.0
        for j in range(length):
            if left <= 0:
                mode = str(
                    rng.choice(
                        ["clean", "ramp", "hold", "stuck", "decay"], p=[0.45, 0.15, 0.2, 0.1, 0.1]
                    )
                )
                left = int(rng.integers(30, 45)) if mode == "stuck" else int(rng.geometric(0.1))
                rate = float(rng.uniform(1, 15))
                hold = float(rng.choice([4.0, 9.0, 10.0, 19.0, 22.0, 26.0]))
            left -= 1
            if mode == "clean":
                x = max(0.0, 0.4 + 0.25 * rng.standard_normal())
            elif mode == "ramp":
                x = min(x + rate * dt[j] / MINUTE_MS, 60.0)
            elif mode == "hold":
                x = max(0.0, hold + 1.5 * rng.standard_normal())
            elif mode == "decay":
                x *= 0.6
            ch4[j] = round(x, 1)  # 0.1 %LEL resolution: equal neighbours happen
            alarm[j] = (x >= 12 and rng.random() < 0.5) or rng.random() < 0.01
            fault[j] = rng.random() < 0.01
        ch4[rng.random(length) < 0.004] = np.nan
        ch4[rng.random(length) < 0.004] = rng.choice([-3.0, 105.0, 1e300, -50.0, 1e30])
        comm = rng.random(length) < 0.03
        ch4[comm] = np.nan
        alarm[comm] = fault[comm] = False
        eol = (rng.random(length) < 0.003) & ~comm
        out.append(
            {
                "idx": np.full(length, i, np.int64),
                "ts": ts.astype(np.int64),
                "ch4_lel": ch4,
                "alarm": alarm,
                "fault": fault,
                "eol": eol,
                "comm_lost": comm,
                "ahead_ms": ahead_column(rng, length),
            }
        )
    return _merge(out)


def ahead_column(rng: np.random.Generator, length: int) -> np.ndarray:
    """How far ahead of ingest's clock each reading was stamped: mostly not at all, with a few
    stretches of a clock running minutes ahead."""
    ahead = np.zeros(length)
    j = 0
    while j < length:
        if rng.random() < 0.01:
            n = int(rng.integers(1, 6))
            ahead[j : j + n] = rng.uniform(60_000, 600_000, len(ahead[j : j + n])).round()
            j += n
        j += 1
    return ahead


def meter_stream(rng: np.random.Generator, devices: int, length: int, qmax: np.ndarray) -> Columns:
    out = []
    for i in range(devices):
        q = float(qmax[i]) if not np.isnan(qmax[i]) else 6.0
        base = int(rng.choice([60_000, 300_000, 600_000]))
        dt = (base * rng.uniform(0.8, 1.2, length)).astype(np.int64) + 1
        dt[rng.random(length) < 0.01] = rng.integers(HOUR_MS, 8 * HOUR_MS)
        dt[rng.random(length) < 0.004] = rng.integers(20 * HOUR_MS, 26 * HOUR_MS)  # a day away
        ts = T0 + int(rng.integers(0, 24 * HOUR_MS)) + np.cumsum(dt)
        scale = float(rng.choice([0.5, 2.0]))  # small households learn a low usual peak
        flow = np.empty(length)
        counted = np.zeros(length)  # what the register counts beyond the reported flow
        valve = np.zeros(length, np.bool_)
        tamper = np.zeros(length, np.bool_)
        mode, left, closed_left, tamper_left, micro = "off", 0, 0, 0, 0.05
        hidden_left, hidden = 0, 0.0
        for j in range(length):
            local_h = ((int(ts[j]) + 8 * HOUR_MS) % (24 * HOUR_MS)) / HOUR_MS
            if left <= 0:
                night = 1 <= local_h < 5
                choices = ["off", "use", "micro", "leak", "burst", "reverse"]
                p = (
                    [0.3, 0.35, 0.15, 0.05, 0.1, 0.05]
                    if not night
                    else [0.3, 0.1, 0.5, 0.05, 0, 0.05]
                )
                mode = str(rng.choice(choices, p=p))
                mean = {"off": 8, "use": 4, "micro": 40, "leak": 400, "burst": 3, "reverse": 2}
                left = int(rng.geometric(1 / mean[mode]))
                micro = float(rng.uniform(0.01, 0.1))
            left -= 1
            if mode == "off":
                f = 0.0 if rng.random() < 0.7 else float(rng.uniform(-0.004, 0.004))
            elif mode == "use":
                f = float(rng.uniform(0.1, scale))
            elif mode == "micro":
                f = micro + float(rng.uniform(-0.003, 0.003))
            elif mode == "leak":
                f = micro + (float(rng.uniform(0.1, scale)) if rng.random() < 0.2 else 0.0)
            elif mode == "burst":
                f = float(rng.uniform(1.05, 2.0)) * (q if rng.random() < 0.5 else scale * 1.2)
            else:
                f = float(rng.uniform(-0.3, -0.01))
            if closed_left <= 0 and rng.random() < 0.01:
                closed_left = int(rng.geometric(0.05))
            if closed_left > 0:
                closed_left -= 1
                valve[j] = True
                f = f if rng.random() < 0.3 else 0.0
            if tamper_left <= 0 and rng.random() < 0.01:
                tamper_left = int(rng.integers(1, 4))
            if tamper_left > 0:
                tamper_left -= 1
                tamper[j] = True
            # stretches where the register sees gas the flow does not: a leak below near
            # zero (a few L/h), or a flow sensor that reads 0 under real use
            if hidden_left <= 0 and rng.random() < 0.01:
                hidden_left = int(rng.geometric(0.01))
                hidden = float(rng.choice([0.002, 0.004, 0.3, 1.0]))
            if hidden_left > 0:
                hidden_left -= 1
                counted[j] = hidden
                if hidden >= 0.3:
                    f = 0.0
            flow[j] = round(f, 4)
        flow[rng.random(length) < 0.003] = np.nan
        flow[rng.random(length) < 0.002] = rng.choice([20 * q, 1e300, -50.0])
        hours = np.diff(ts, prepend=ts[0]) / HOUR_MS
        volume = 1000 + np.cumsum((np.nan_to_num(np.abs(flow)) + counted) * hours)
        volume = np.round(volume, 3)  # the register's 1 L resolution
        drop = rng.random(length) < 0.005
        volume[drop] -= rng.uniform(0.0005, 0.1, int(drop.sum()))
        volume[rng.random(length) < 0.003] = np.nan
        pressure = np.empty(length)
        pr = 1.6
        for j in range(length):
            pr += 0.15 * rng.standard_normal() + 0.1 * (1.6 - pr)
            if rng.random() < 0.02:
                pr = float(rng.uniform(0.8, 1.3))
            elif rng.random() < 0.015:
                pr = float(rng.uniform(2.9, 3.8))  # a failed regulator
            pressure[j] = round(pr, 2)
        pressure[rng.random(length) < 0.003] = rng.choice([1e300, -5.0, 150.0])
        pressure[rng.random(length) < 0.05] = np.nan
        if i % 4 == 3:
            pressure[:] = np.nan  # a profile without a pressure sensor
        battery = 80 + rng.standard_normal(length)
        if i % 3 == 1:  # a weak battery: around the low level, in and out
            phase = rng.uniform(0, 6.3)
            battery = (
                22.5 + 5 * np.sin(np.arange(length) / 40 + phase) + rng.standard_normal(length)
            )
        battery[rng.random(length) < 0.1] = np.nan
        battery[rng.random(length) < 0.003] = 120.0
        reverse = rng.random(length) < 0.005
        comm = rng.random(length) < 0.02
        for a in (volume, flow, pressure, battery):
            a[comm] = np.nan
        for a in (valve, tamper, reverse):
            a[comm] = False
        out.append(
            {
                "idx": np.full(length, i, np.int64),
                "ts": ts.astype(np.int64),
                "volume_m3": volume,
                "flow_m3h": flow,
                "pressure_kpa": pressure,
                "valve_closed": valve,
                "battery_pct": battery,
                "tamper": tamper,
                "reverse_flow": reverse,
                "comm_lost": comm,
                "ahead_ms": ahead_column(rng, length),
            }
        )
    return _merge(out)


def with_replays(rng: np.random.Generator, cols: Columns, share: float) -> Columns:
    """Exact copies of earlier readings inserted later in the stream (redelivered batches)."""
    n = len(cols["ts"])
    k = int(n * share)
    src = rng.integers(0, n, k)
    dst = np.minimum(src + rng.integers(1, 400, k), n)
    order = np.argsort(np.concatenate([np.arange(n) * 2.0, dst * 2.0 - 1.0]), kind="stable")
    return {key: np.concatenate([v, v[src]])[order] for key, v in cols.items()}


def with_late(rng: np.random.Generator, cols: Columns, share: float) -> Columns:
    """Some readings moved later in the stream (older than what has been seen since)."""
    n = len(cols["ts"])
    pos = np.arange(n, dtype=np.float64)
    late = rng.random(n) < share
    pos[late] += rng.integers(2, 300, int(late.sum()))
    order = np.argsort(pos, kind="stable")
    return {key: v[order] for key, v in cols.items()}


def split(
    rng: np.random.Generator, cols: Columns, mean: int, shuffle: bool = True
) -> Iterator[Columns]:
    """Random batch boundaries (sizes ~ geometric around ``mean``), shuffled within a batch."""
    n = len(cols["ts"])
    at = 0
    while at < n:
        size = int(rng.geometric(1 / mean))
        part = np.arange(at, min(at + size, n))
        if shuffle:
            part = rng.permutation(part)
        yield {k: v[part] for k, v in cols.items()}
        at += size


def to_columns(kind: str, cols: Columns) -> Any:
    return DetectorColumns(**cols) if kind == "detector" else MeterColumns(**cols)


def test_streams_are_time_ordered_per_device_and_cross_thresholds() -> None:
    rng = np.random.default_rng(1)
    det = detector_stream(rng, 3, 500)
    for i in range(3):
        assert np.all(np.diff(det["ts"][det["idx"] == i]) > 0)
    assert np.nanmax(det["ch4_lel"]) >= 25 and det["comm_lost"].any()
    met = meter_stream(rng, 4, 500, np.array([2.5, 4.0, np.nan, 6.0]))
    assert np.isnan(met["pressure_kpa"][met["idx"] == 3]).all()
    assert (met["flow_m3h"] > 2.5).any() and (met["flow_m3h"] < 0).any()


def test_replays_and_splits_keep_every_reading() -> None:
    rng = np.random.default_rng(2)
    det = detector_stream(rng, 2, 100)
    rep = with_replays(rng, det, 0.05)
    assert len(rep["ts"]) == 210
    parts = list(split(rng, rep, 7))
    assert sum(len(p["ts"]) for p in parts) == 210
    assert sorted(np.concatenate([p["ts"] for p in parts])) == sorted(rep["ts"])
