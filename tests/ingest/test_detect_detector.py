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


def test_gas_low_needs_two_of_three_readings_at_level_and_clears_below_five() -> None:
    cols = stream([0, 12, 0, 0, 12, 12, 30, 6, 4, 6, 4, 4])
    assert run(cols, Rule.GAS_LOW) == [(5, True), (11, False)]
    cols = stream([0, 12, 0, 12, 0, 0, 0])  # 2 of 3, the latest at level
    assert run(cols, Rule.GAS_LOW) == [(3, True), (5, False)]


def test_gas_hovering_at_the_alarm_level_raises_gas_low_once_and_never_flaps() -> None:
    """A detector whose own alarm did not trip, alternating just under and just over
    10 %LEL for ten minutes: one alarm within about a minute, no clear while it hovers."""
    for under, over in ((9.8, 10.2), (9.99, 10.0), (9.0, 14.0)):
        cols = stream([under, over] * 10 + [0.5, 0.5], dt=30_000)  # a reading every 30 s
        assert run(cols, Rule.GAS_LOW, dt=30_000) == [(3, True), (21, False)]
    cols = stream([10.5, 9.5, 9.5] * 7)  # at level on one reading in three: not "most"
    assert run(cols, Rule.GAS_LOW) == []


def test_gas_low_counts_the_window_across_batches() -> None:
    state = DetectorState(1)
    p = DetectorParams()
    first, _ = detect_detectors(stream([0, 12, 0]), p, state)
    second, _ = detect_detectors(stream([12], ts=[T0 + 3 * MIN]), p, state)
    gas_low = [
        [(t, up) for _, t, r, up, _ in e.rows() if r == Rule.GAS_LOW] for e in (first, second)
    ]
    assert gas_low == [[], [(T0 + 3 * MIN, True)]]


def test_an_impossible_ch4_value_is_a_sensor_fault_and_never_a_gas_alarm() -> None:
    for value in (1e300, 1e30, 150.0, -50.0):
        cols = stream([0, value, value, value, 0, 0])
        events, _ = detect_detectors(cols, DetectorParams(), DetectorState(1))
        rules = {(r, up) for _, _, r, up, _ in events.rows()}
        assert rules == {(Rule.SENSOR_FAULT, True), (Rule.SENSOR_FAULT, False)}, value
        raised = [v for _, _, r, up, v in events.rows() if up]
        assert raised == [value], "the raw value is the fault's evidence"


def test_late_gas_readings_raise_their_alarm_once() -> None:
    """Leak readings that arrive after a newer reading of the same device are judged."""
    state, p = DetectorState(1), DetectorParams()
    detect_detectors(stream([0.5] * 5, ts=[T0 + 10 * MIN + i * MIN for i in range(5)]), p, state)
    late = stream([40.0, 38.0, 0.4], alarm=[1, 1, 0], ts=[T0, T0 + MIN, T0 + 2 * MIN])
    events, _ = detect_detectors(late, p, state)
    assert [(r, up, t) for _, t, r, up, _ in events.rows()] == [
        (Rule.GAS_LOW, True, T0), (Rule.GAS_HIGH, True, T0)]  # fmt: skip
    again, _ = detect_detectors(late, p, state)  # a replay while they are open: nothing
    assert len(again) == 0
    later = stream([0.5, 0.5], ts=[T0 + 15 * MIN, T0 + 16 * MIN])  # clean air now: both clear
    cleared, _ = detect_detectors(later, p, state)
    assert {(r, up) for _, _, r, up, _ in cleared.rows()} == {
        (Rule.GAS_LOW, False), (Rule.GAS_HIGH, False)}  # fmt: skip
    replay, _ = detect_detectors(late, p, state)  # inside the alarmed episode: no second alarm
    assert len(replay) == 0
    older = stream([30.0], ts=[T0 - 60 * MIN])  # older than its clear: the same leak
    assert len(detect_detectors(older, p, state)[0]) == 0
    detect_detectors(stream([0.5] * 4, ts=[T0 + (17 + i) * MIN for i in range(4)]), p, state)
    after = stream([30.0], ts=[T0 + 18 * MIN])  # after the clear, arriving late: a new leak
    assert [(r, t) for _, t, r, _, _ in detect_detectors(after, p, state)[0].rows()] == [
        (Rule.GAS_HIGH, T0 + 18 * MIN)
    ]


def test_a_single_late_reading_at_the_low_level_is_not_a_leak() -> None:
    state, p = DetectorState(1), DetectorParams()
    detect_detectors(stream([0.5] * 3, ts=[T0 + 10 * MIN + i * MIN for i in range(3)]), p, state)
    events, _ = detect_detectors(stream([12.0], ts=[T0]), p, state)
    assert len(events) == 0
    events, _ = detect_detectors(stream([12.0, 13.0], ts=[T0 + MIN, T0 + 2 * MIN]), p, state)
    assert [(r, up) for _, _, r, up, _ in events.rows()] == [(Rule.GAS_LOW, True)]


def test_a_reading_stamped_ahead_raises_clock_skew_once_with_the_skew() -> None:
    cols = stream([0.5] * 6)
    cols = DetectorColumns(cols.idx, cols.ts, cols.ch4_lel, cols.alarm,
                           ahead_ms=np.array([0, 180_000, 240_000, 0, 0, 0], np.float64))  # fmt: skip
    events, _ = detect_detectors(cols, DetectorParams(), DetectorState(1))
    assert [(r, up, v) for _, _, r, up, v in events.rows()] == [
        (Rule.CLOCK_SKEW, True, 180.0), (Rule.CLOCK_SKEW, False, 0.0)]  # fmt: skip


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


def test_gas_rising_is_a_trend_over_five_readings_and_clears_when_flat() -> None:
    # +1.5 %LEL a minute for five readings from 3 %LEL: rising at the fifth; cleared once the
    # window's trend is flat on two readings
    cols = stream([3, 4.5, 6, 7.5, 9, 9, 9, 9, 9])
    assert run(cols, Rule.GAS_RISING) == [(4, True), (8, False)]
    # the same rise at half the pace is 0.75 %LEL/min: below the 1 %LEL/min trend
    assert run(stream([3, 3.75, 4.5, 5.25, 6]), Rule.GAS_RISING) == []
    # a steep rise below the 3 %LEL floor: noise near zero, not a leak
    assert run(stream([0, 0.6, 1.2, 1.8, 2.4], dt=10_000), Rule.GAS_RISING, dt=10_000) == []


def test_gas_rising_never_fires_on_one_uptick_or_on_falling_gas() -> None:
    """The demo's decaying leak, with one reading up now and then, raised nothing but noise."""
    decaying = [20, 18, 19.5, 16, 14, 15.5, 12, 10, 11, 8, 6, 7.5, 5, 4, 4.2, 3]
    assert run(stream(decaying), Rule.GAS_RISING) == []
    assert run(stream([3, 3, 3, 3, 12]), Rule.GAS_RISING) == []  # one uptick: median ~0
    rising_then_one_dip = [3, 5, 7, 9, 11, 10.5]
    assert run(stream(rising_then_one_dip), Rule.GAS_RISING) == [(4, True)]


def test_gas_rising_needs_its_readings_close_together_and_spanning_four_minutes() -> None:
    gap = 10 * MIN + 1
    assert run(stream([3, 15, 27, 39, 51], dt=gap), Rule.GAS_RISING, dt=gap) == []
    assert run(stream([3, 15, 27, 39, 51], dt=10 * MIN), Rule.GAS_RISING, dt=10 * MIN) == [
        (4, True)
    ]
    fast = 30_000  # five readings within two minutes: too short a span to call a trend
    assert run(stream([3, 5, 7, 9, 11], dt=fast), Rule.GAS_RISING, dt=fast) == []


def test_gas_rising_window_spans_batches_and_comm_lost_readings() -> None:
    state = DetectorState(1)
    detect_detectors(stream([3, 4.5, 6]), DetectorParams(), state)
    cols = stream([NAN, 7.5, 9], comm=[1, 0, 0], ts=[T0 + 150_000, T0 + 3 * MIN, T0 + 4 * MIN])
    events, _ = detect_detectors(cols, DetectorParams(), state)
    assert [(r, up, t) for _, t, r, up, _ in events.rows() if r != Rule.SILENT] == [
        (Rule.GAS_RISING, True, T0 + 4 * MIN)
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
    # three intervals and 30 s of grace for a reading due then, still on its way
    assert len(scan_silence(state, T0 + 3 * MIN + 30_000, params)) == 0
    events = scan_silence(state, T0 + 3 * MIN + 30_001, params)
    assert events.rows() == [(0, T0 + 3 * MIN + 30_001, Rule.SILENT, True, 210.001)]
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


def test_gas_rising_too_slowly_for_a_trend_is_gas_present_after_ten_minutes() -> None:
    # 0.3 %LEL a minute from clean air to 8 %LEL and held there: under the trend's 1 %LEL/min
    # and under gas_low's 10 %LEL, yet gas in the home
    ch4 = [min(0.4 + 0.3 * k, 8.0) for k in range(60)] + [2.0, 2.0]
    cols = stream(ch4)
    first_at_5 = next(k for k, x in enumerate(ch4) if x >= 5.0)
    assert run(cols, Rule.GAS_RISING) == []
    assert run(cols, Rule.GAS_LOW) == []
    assert run(cols, Rule.GAS_PRESENT) == [(first_at_5 + 10, True), (61, False)]
    # clean air with a cooking puff over 5 %LEL for a few minutes: nothing
    puff = [0.4] * 10 + [6.0, 7.0, 6.5, 5.5] + [0.4] * 10
    assert run(stream(puff), Rule.GAS_PRESENT) == []
    # a reading just under the level restarts the ten minutes
    dip = [6.0] * 8 + [4.9] + [6.0] * 11
    assert run(stream(dip), Rule.GAS_PRESENT) == [(19, True)]
