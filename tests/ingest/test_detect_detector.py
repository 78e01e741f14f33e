"""Hand-written detector streams: each rule raises and clears where DESIGN.md says it does."""

from __future__ import annotations

import numpy as np

from ingest.detect import (
    DetectorColumns,
    DetectorParams,
    DetectorState,
    Rule,
    detect_detectors,
    scan_silence,
)

T0 = 1_767_225_600_000
MIN = 60_000
NAN = float("nan")


def stream(
    ch4: list[float],
    *,
    dt: int = MIN,
    alarm: list[int] | None = None,
    fault: list[int] | None = None,
    eol: list[int] | None = None,
    comm: list[int] | None = None,
    ts: list[int] | None = None,
) -> DetectorColumns:
    n = len(ch4)

    def flags(v: list[int] | None) -> np.ndarray | None:
        return None if v is None else np.array(v, np.bool_)

    return DetectorColumns(
        idx=np.zeros(n, np.int64),
        ts=np.array(ts, np.int64) if ts is not None else T0 + dt * np.arange(n, dtype=np.int64),
        ch4_lel=np.array(ch4, np.float64),
        alarm=np.zeros(n, np.bool_) if alarm is None else np.array(alarm, np.bool_),
        fault=flags(fault),
        eol=flags(eol),
        comm_lost=flags(comm),
    )


def run(
    cols: DetectorColumns, rule: Rule, params: DetectorParams | None = None, dt: int = MIN
) -> list[tuple[int, bool]]:
    """(reading number, raised) of ``rule``'s events."""
    events, _ = detect_detectors(cols, params or DetectorParams(), DetectorState(1))
    return [((t - T0) // dt, up) for _, t, r, up, _ in events.rows() if r == rule]


def test_gas_low_needs_two_consecutive_readings_and_clears_below_five() -> None:
    cols = stream([0, 12, 0, 12, 12, 30, 6, 4, 6, 4, 4])
    assert run(cols, Rule.GAS_LOW) == [(4, True), (10, False)]


def test_gas_low_raises_at_once_on_the_detectors_own_alarm_and_holds_while_it_is_set() -> None:
    cols = stream([2, 2, 2, 2, 2, 2], alarm=[0, 1, 1, 0, 0, 0])
    assert run(cols, Rule.GAS_LOW) == [(1, True), (4, False)]


def test_gas_low_per_device_threshold() -> None:
    params = DetectorParams(gas_low_by_device=np.array([6.0]))
    assert run(stream([7, 7, 2, 2]), Rule.GAS_LOW, params) == [(1, True), (3, False)]
    params = DetectorParams(gas_low_by_device=np.array([np.nan]))  # NaN: the default
    assert run(stream([7, 7, 2, 2]), Rule.GAS_LOW, params) == []


def test_gas_high_raises_at_once_and_clears_below_twenty_twice() -> None:
    cols = stream([0, 26, 22, 19, 21, 19, 19, 30])
    assert run(cols, Rule.GAS_HIGH) == [(1, True), (6, False), (7, True)]


def test_gas_rising_on_rate_between_consecutive_readings() -> None:
    # +7 %LEL in a minute at 8 %LEL: rising; flat twice: cleared
    assert run(stream([0, 1, 8, 9, 9, 9]), Rule.GAS_RISING) == [(2, True), (5, False)]
    # the same rise over two minutes is only 3.5 %LEL/min
    assert run(stream([1, 8], dt=2 * MIN), Rule.GAS_RISING, dt=2 * MIN) == []
    # fast but below the 3 %LEL floor: noise near zero, not a leak
    assert run(stream([0, 2.9], dt=10_000), Rule.GAS_RISING, dt=10_000) == []


def test_gas_rising_ignores_pairs_more_than_ten_minutes_apart() -> None:
    assert run(stream([0, 70], dt=10 * MIN + 1), Rule.GAS_RISING, dt=10 * MIN + 1) == []
    assert run(stream([0, 70], dt=10 * MIN), Rule.GAS_RISING, dt=10 * MIN) == [(1, True)]


def test_gas_rising_pairs_across_batches_and_comm_lost_readings() -> None:
    state = DetectorState(1)
    detect_detectors(stream([1]), DetectorParams(), state)
    cols = stream([NAN, 9], comm=[1, 0], ts=[T0 + 30_000, T0 + MIN])
    events, _ = detect_detectors(cols, DetectorParams(), state)
    assert [(r, up) for _, _, r, up, _ in events.rows() if r != Rule.SILENT] == [
        (Rule.GAS_RISING, True)
    ]


def test_sensor_fault_on_flags_and_out_of_range_values() -> None:
    assert run(stream([1, 1.1, 1.2, 1.3], fault=[0, 1, 0, 0]), Rule.SENSOR_FAULT) == [
        (1, True),
        (3, False),
    ]
    assert run(stream([1, 1.1, 1.2, 1.3], eol=[1, 0, 0, 0]), Rule.SENSOR_FAULT) == [
        (0, True),
        (2, False),
    ]
    assert run(stream([1, 105, -0.5, 0.2, -1.5]), Rule.SENSOR_FAULT) == [
        (1, True),
        (3, False),
        (4, True),
    ]
    assert run(stream([1, NAN, 1.1]), Rule.SENSOR_FAULT) == [(1, True)]


def test_stuck_value_needs_thirty_identical_readings_over_fifteen_minutes() -> None:
    # one a minute: the 30th identical reading spans 29 minutes
    cols = stream([0.3] + [1.7] * 30 + [1.8, 1.9])
    assert run(cols, Rule.SENSOR_FAULT) == [(30, True), (32, False)]
    # every 20 s: 30 readings span under 10 minutes; the 46th reaches 15 minutes
    cols = stream([1.7] * 50, dt=20_000)
    assert run(cols, Rule.SENSOR_FAULT, dt=20_000) == [(45, True)]


def test_clean_air_reading_a_steady_zero_is_not_a_stuck_sensor() -> None:
    # coarse sensors read 0 (or a steady small value) for hours in clean air
    assert run(stream([0.0] * 120), Rule.SENSOR_FAULT) == []
    assert run(stream([1.0] * 120), Rule.SENSOR_FAULT) == []
    assert run(stream([1.1] * 40), Rule.SENSOR_FAULT) == [(29, True)]


def test_stuck_value_across_batches() -> None:
    state = DetectorState(1)
    events = []
    for start in range(0, 40, 7):
        chunk = range(start, min(start + 7, 40))
        cols = stream([1.7] * len(chunk), ts=[T0 + MIN * i for i in chunk])
        ev, state = detect_detectors(cols, DetectorParams(), state)
        events += [((t - T0) // MIN, up) for _, t, r, up, _ in ev.rows() if r == Rule.SENSOR_FAULT]
    assert events == [(29, True)]


def test_comm_lost_raises_silent_and_leaves_other_runs_alone() -> None:
    cols = stream([12, NAN, 12, 1, 1], comm=[0, 1, 0, 0, 0])
    assert run(cols, Rule.SILENT) == [(1, True), (2, False)]
    assert run(cols, Rule.GAS_LOW) == [(2, True), (4, False)]


def test_scan_silence_raises_once_after_three_intervals_and_a_reading_clears() -> None:
    params = DetectorParams()
    state = DetectorState(3)
    detect_detectors(stream([1]), params, state)  # device 0 reports at T0; 1 and 2 never do
    assert len(scan_silence(state, T0 + 3 * MIN, params)) == 0
    events = scan_silence(state, T0 + 3 * MIN + 1, params)
    assert events.rows() == [(0, T0 + 3 * MIN + 1, Rule.SILENT, True, 180.001)]
    assert len(scan_silence(state, T0 + 60 * MIN, params)) == 0  # never twice
    assert state.is_open(Rule.SILENT).tolist() == [True, False, False]
    ev, _ = detect_detectors(stream([1], ts=[T0 + 61 * MIN]), params, state)
    assert [(r, up) for _, _, r, up, _ in ev.rows()] == [(Rule.SILENT, False)]


def test_scan_silence_per_device_expected_interval() -> None:
    params = DetectorParams(expected_interval_ms_by_device=np.array([10 * MIN, np.nan]))
    state = DetectorState(2)
    cols = DetectorColumns(
        idx=np.array([0, 1]),
        ts=np.array([T0, T0]),
        ch4_lel=np.array([1.0, 1.0]),
        alarm=np.zeros(2, np.bool_),
    )
    detect_detectors(cols, params, state)
    assert scan_silence(state, T0 + 5 * MIN, params).idx.tolist() == [1]
    assert scan_silence(state, T0 + 31 * MIN, params).idx.tolist() == [0]
