"""The vectorised kernels against the slow reference (test_detect_model.py) on seeded random
streams with replays, late readings, random batch boundaries and shuffled batches: the events
and the final state must be exactly equal."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.detect import (
    DETECTOR_RULES,
    METER_RULES,
    DetectorParams,
    DetectorState,
    MeterParams,
    MeterState,
    Rule,
    detect_detectors,
    detect_meters,
)
from ingest.detect.params import HOUR_MS, MINUTE_MS
from tests.ingest.test_detect_model import Event, Reference, event_rows
from tests.ingest.test_detect_streams import (
    detector_stream,
    meter_stream,
    split,
    to_columns,
    with_late,
    with_replays,
)

DEVICES = 6


def detector_params(variant: int, rng: np.random.Generator) -> DetectorParams:
    if variant == 0:
        return DetectorParams()
    low = rng.choice([np.nan, 4.0, 8.0, 15.0], DEVICES)
    high = rng.choice([np.nan, 15.0, 30.0], DEVICES)
    return DetectorParams(
        gas_low_by_device=low,
        gas_high_by_device=high,
        gas_low_samples=3,
        gas_high_clear_samples=3,
        rise_per_min=3.0,
        stuck_samples=8,
        stuck_ms=4 * MINUTE_MS,
        stuck_above_lel=0.3,  # the streams' clean air (about 0.4) can be stuck too
        fault_clear_samples=3,
    )


def meter_params(variant: int, rng: np.random.Generator) -> tuple[MeterParams, np.ndarray]:
    qmax = rng.choice([2.5, 4.0, 6.0, np.nan], DEVICES)
    if variant == 0:
        return MeterParams(qmax_by_device=qmax), qmax
    return (
        MeterParams(
            qmax_by_device=qmax,
            burst_learn_samples=20,
            burst_peak_decay_per_day=0.5,
            continuous_ms=2 * HOUR_MS,
            continuous_ms_by_device=rng.choice([np.nan, 1.0 * HOUR_MS], DEVICES),
            utc_offset_ms=-5 * HOUR_MS,
            micro_night_ms=HOUR_MS,
            micro_never_zero_ms=8 * HOUR_MS,
            pressure_low_by_device=rng.choice([np.nan, 1.0, 1.8], DEVICES),
            pressure_low_samples=2,
            valve_samples=1,
            tamper_clear_samples=3,
            register_still_ms=HOUR_MS,
            micro_register_ms=3 * HOUR_MS,
            mismatch_samples=2,
            mismatch_clear_samples=4,
            battery_low_samples=2,
        ),
        qmax,
    )


def run_both(
    kind: str, params: Any, stream: dict[str, np.ndarray], rng: np.random.Generator, mean: int
) -> tuple[list[Event], list[Event], int, int, Any, Reference]:
    state: Any = DetectorState(DEVICES) if kind == "detector" else MeterState(DEVICES)
    kernel = detect_detectors if kind == "detector" else detect_meters
    ref = Reference(kind, params, DEVICES)
    got: list[Event] = []
    want: list[Event] = []
    stale_got = stale_want = 0
    for part in split(rng, stream, mean):
        cols = to_columns(kind, part)
        events, state = kernel(cols, params, state)
        got += event_rows(events)
        stale_got += events.stale
        ev, stale = ref.process(cols)
        want += ev
        stale_want += stale
    return got, want, stale_got, stale_want, state, ref


def assert_same_state(state: Any, ref: Reference) -> None:
    arrays = state.to_arrays()
    want = ref.state_arrays(list(arrays))
    for name, arr in arrays.items():
        np.testing.assert_array_equal(arr, want[name].astype(arr.dtype), err_msg=name)


def check(kind: str, seed: int, variant: int, mean: int, length: int) -> Counter[tuple[int, bool]]:
    rng = np.random.default_rng(seed)
    if kind == "detector":
        params: Any = detector_params(variant, rng)
        stream = detector_stream(rng, DEVICES, length)
    else:
        params, qmax = meter_params(variant, rng)
        stream = meter_stream(rng, DEVICES, length, qmax)
    stream = with_late(rng, with_replays(rng, stream, 0.03), 0.01)
    got, want, stale_got, stale_want, state, ref = run_both(kind, params, stream, rng, mean)
    assert stale_got == stale_want
    assert got == want
    assert_same_state(state, ref)
    return Counter((e[2], e[3]) for e in got)


@pytest.mark.parametrize("kind", ["detector", "meter"])
@pytest.mark.parametrize("variant", [0, 1])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kernel_equals_reference_on_seeded_streams(kind: str, variant: int, seed: int) -> None:
    check(kind, seed, variant, mean=40, length=1200)


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(
    kind=st.sampled_from(["detector", "meter"]),
    seed=st.integers(0, 2**32 - 1),
    variant=st.sampled_from([0, 1]),
    mean=st.sampled_from([1, 3, 20, 200, 5000]),
)
def test_kernel_equals_reference_on_random_streams(
    kind: str, seed: int, variant: int, mean: int
) -> None:
    check(kind, seed, variant, mean, length=150 if mean < 5 else 800)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["detector", "meter"])
def test_streams_raise_and_clear_every_rule(kind: str) -> None:
    """The generated streams really exercise every rule both ways (else the equivalence
    tests above would prove little)."""
    seen: Counter[tuple[int, bool]] = Counter()
    for seed in range(2):
        for variant in (0, 1):
            seen += check(kind, 100 + seed, variant, mean=50, length=1500)
    rules = DETECTOR_RULES if kind == "detector" else METER_RULES
    rules = tuple(r for r in rules if r is not Rule.NEVER_REPORTED)  # the scan's alone
    missing = [(Rule(r).name, up) for r in rules for up in (True, False) if seen[(r, up)] < 3]
    assert not missing, f"too few events: {missing}; seen {dict(seen)}"
