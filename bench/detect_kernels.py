"""Detection kernels alone: readings per second of ``detect_detectors`` and ``detect_meters``
on 1M readings over 100k devices per call, against the slow reference loop of the tests
(tests/ingest/test_detect_model.py) measured in the same run on a smaller sample and
extrapolated per reading; plus the state's memory for 100k devices of each kind.

    .venv/bin/python bench/detect_kernels.py [--devices 100000] [--per-device 10] [--repeat 3]

The batch is in arrival order (poll rounds: every device once, then again), so the kernel
sorts it by (device, ts); ``--shuffled`` measures a randomly ordered batch as well. Each
measured call continues from the state the previous call left, as in the consumer.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ingest.detect import (  # noqa: E402
    DetectorColumns,
    DetectorParams,
    DetectorState,
    MeterColumns,
    MeterParams,
    MeterState,
    detect_detectors,
    detect_meters,
)
from tests.ingest.test_detect_model import Reference  # noqa: E402

T0 = 1_767_225_600_000
INTERVAL = 60_000


def detector_batch(
    rng: np.random.Generator, devices: int, per: int, t0: int, shuffled: bool
) -> DetectorColumns:
    """``per`` poll rounds of every device: clean air with noise, a few leaks and faults."""
    n = devices * per
    idx = np.tile(np.arange(devices, dtype=np.int64), per)
    rounds = np.repeat(np.arange(per, dtype=np.int64), devices)
    ts = t0 + rounds * INTERVAL + rng.integers(0, 5_000, n)
    ch4 = np.round(np.clip(0.4 + 0.25 * rng.standard_normal(n), 0, None), 1)
    leaking = rng.random(devices) < 0.01
    ch4 += np.where(leaking[idx], rounds * 4.0, 0.0)
    comm = rng.random(n) < 0.01
    ch4[comm] = np.nan
    order = rng.permutation(n) if shuffled else np.arange(n)
    return DetectorColumns(
        idx=idx[order],
        ts=ts[order],
        ch4_lel=ch4[order],
        alarm=(ch4 >= 10)[order],
        fault=(rng.random(n) < 0.001)[order],
        eol=np.zeros(n, np.bool_),
        comm_lost=comm[order],
    )


def meter_batch(
    rng: np.random.Generator, devices: int, per: int, t0: int, shuffled: bool
) -> MeterColumns:
    """``per`` poll rounds of every meter: mostly idle, some use, a few leaks and bursts."""
    n = devices * per
    idx = np.tile(np.arange(devices, dtype=np.int64), per)
    rounds = np.repeat(np.arange(per, dtype=np.int64), devices)
    ts = t0 + rounds * INTERVAL + rng.integers(0, 5_000, n)
    using = rng.random(n) < 0.2
    flow = np.where(using, rng.uniform(0.1, 2.0, n), 0.0)
    flow = np.where(rng.random(devices)[idx] < 0.01, flow + 0.03, flow)  # small leaks
    flow[rng.random(n) < 0.0005] = 9.0  # bursts
    comm = rng.random(n) < 0.01
    pressure = 1.6 + 0.05 * rng.standard_normal(n)
    pressure[rng.random(devices)[idx] < 0.25] = np.nan  # no pressure sensor
    volume = 1000.0 + idx * 0.01 + (ts - T0) * 1e-8  # rising across calls too
    for a in (flow, pressure, volume):
        a[comm] = np.nan
    order = rng.permutation(n) if shuffled else np.arange(n)
    return MeterColumns(
        idx=idx[order],
        ts=ts[order],
        volume_m3=volume[order],
        flow_m3h=flow[order],
        pressure_kpa=pressure[order],
        valve_closed=(rng.random(n) < 0.001)[order],
        battery_pct=rng.uniform(20, 100, n)[order],
        tamper=(rng.random(n) < 0.0005)[order],
        reverse_flow=np.zeros(n, np.bool_),
        comm_lost=comm[order],
    )


KINDS: dict[str, tuple[Any, Any, Any, Any]] = {
    "detector": (detector_batch, DetectorParams(), DetectorState, detect_detectors),
    "meter": (meter_batch, MeterParams(), MeterState, detect_meters),
}


def kernel_rate(
    kind: str, devices: int, per: int, repeat: int, shuffled: bool
) -> tuple[float, float, int]:
    """Best readings/s over ``repeat`` consecutive calls (each continuing the state), by the
    wall clock and by CPU time (less disturbed by other work on the machine), and the events
    of the last call."""
    make, params, state_cls, kernel = KINDS[kind]
    rng = np.random.default_rng(1)
    state = state_cls(devices)
    span = per * INTERVAL
    kernel(make(rng, devices, per, T0, shuffled), params, state)  # warm state and caches
    wall = cpu = float("inf")
    events = 0
    for r in range(1, repeat + 1):
        cols = make(rng, devices, per, T0 + r * span, shuffled)
        t, c = time.perf_counter(), time.process_time()
        ev, state = kernel(cols, params, state)
        wall = min(wall, time.perf_counter() - t)
        cpu = min(cpu, time.process_time() - c)
        events = len(ev)
    return devices * per / wall, devices * per / cpu, events


def reference_rate(kind: str, devices: int, per: int, repeat: int = 2) -> float:
    """Readings/s of the reference loop on the same kind of batch (best of ``repeat``)."""
    make, params, _, _ = KINDS[kind]
    rng = np.random.default_rng(2)
    ref = Reference(kind, params, devices)
    ref.process(make(rng, devices, per, T0, False))
    best = float("inf")
    for r in range(1, repeat + 1):
        cols = make(rng, devices, per, T0 + r * per * INTERVAL, False)
        t = time.perf_counter()
        ref.process(cols)
        best = min(best, time.perf_counter() - t)
    return devices * per / best


def peak_working_memory(kind: str, devices: int, per: int) -> int:
    make, params, state_cls, kernel = KINDS[kind]
    rng = np.random.default_rng(3)
    state = state_cls(devices)
    cols = make(rng, devices, per, T0, False)
    tracemalloc.start()
    kernel(cols, params, state)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--per-device", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--reference-devices", type=int, default=2_000)
    ap.add_argument("--shuffled", action="store_true", help="also time a shuffled batch")
    args = ap.parse_args()
    n = args.devices * args.per_device
    print(f"detection kernels: {n:,} readings over {args.devices:,} devices per call")
    for kind in KINDS:
        rate, cpu_rate, events = kernel_rate(
            kind, args.devices, args.per_device, args.repeat, False
        )
        ref = reference_rate(kind, args.reference_devices, args.per_device)
        line = (
            f"  {kind:8s} {rate / 1e6:5.2f} M readings/s ({cpu_rate / 1e6:.2f} M/s by CPU time,"
            f" {events:,} events)   reference loop {ref / 1e3:5.1f} k/s   ratio {rate / ref:4.0f}x"
        )
        if args.shuffled:
            shuffled = kernel_rate(kind, args.devices, args.per_device, args.repeat, True)[0]
            line += f"   shuffled batch {shuffled / 1e6:5.2f} M/s"
        print(line)
    det = DetectorState(args.devices).nbytes
    met = MeterState(args.devices).nbytes
    print(
        f"state for {args.devices:,} devices of each kind: detectors {det / 1e6:.1f} MB"
        f" + meters {met / 1e6:.1f} MB = {(det + met) / 1e6:.1f} MB"
    )
    for kind in KINDS:
        peak = peak_working_memory(kind, args.devices, args.per_device)
        print(f"  peak working memory of one {kind} call on {n:,} readings: {peak / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
