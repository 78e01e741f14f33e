"""Hand-written meter streams: each rule raises and clears where DESIGN.md says it does."""

from __future__ import annotations

from typing import Any

import numpy as np

from ingest.detect import MeterColumns, MeterParams, MeterState, Rule, detect_meters
from ingest.detect.events import SEVERITY, Severity
from ingest.detect.params import HOUR_MS, MINUTE_MS

T0 = 1_767_225_600_000  # 2026-01-01 00:00 UTC = 08:00 local (UTC+8)
LOCAL_MIDNIGHT = T0 + 16 * HOUR_MS  # 2026-01-02 00:00 local
NAN = float("nan")


def stream(flow: list[float], *, dt: int = MINUTE_MS, t0: int = T0, **cols: Any) -> MeterColumns:
    n = len(flow)
    extra = {k: np.asarray(v) for k, v in cols.items()}
    ts = extra.pop("ts", t0 + dt * np.arange(n, dtype=np.int64))
    return MeterColumns(
        idx=np.zeros(n, np.int64),
        ts=np.asarray(ts, np.int64),
        volume_m3=extra.pop("volume_m3", np.full(n, 100.0)),
        flow_m3h=np.array(flow, np.float64),
        **extra,
    )


def run(
    cols: MeterColumns,
    rule: Rule,
    params: MeterParams | None = None,
    dt: int = MINUTE_MS,
    t0: int = T0,
) -> list[tuple[int, bool]]:
    """(reading number, raised) of ``rule``'s events."""
    events, _ = detect_meters(cols, params or MeterParams(), MeterState(1))
    return [((t - t0) // dt, up) for _, t, r, up, _ in events.rows() if r == rule]


G16 = MeterParams(qmax_by_device=np.array([2.5]))


def test_burst_above_qmax_clears_below_ninety_percent_twice() -> None:
    cols = stream([0.5, 3.0, 2.3, 2.0, 3.0, 2.0, 2.0])
    assert run(cols, Rule.BURST, G16) == [(1, True), (6, False)]
    assert run(cols, Rule.BURST) == []  # default qmax is a G4's 6 m3/h


def test_burst_above_three_times_the_learned_usual_peak() -> None:
    flows = [0.5] * 100 + [1.6, 1.0, 1.0]
    assert run(stream(flows), Rule.BURST) == [(100, True), (102, False)]
    # not learned yet after 99 non-zero readings
    assert run(stream([0.5] * 99 + [1.6]), Rule.BURST) == []
    # zero readings do not count towards learning
    assert run(stream([0.5, 0.0] * 99 + [1.6]), Rule.BURST) == []


def test_usual_peak_decays_with_time() -> None:
    params = MeterParams(burst_peak_decay_per_day=0.5)
    day = 24 * HOUR_MS
    # 100 readings of 0.5 a minute apart, then one day later the usual peak is ~0.25
    ts = [T0 + i * MINUTE_MS for i in range(100)] + [T0 + 99 * MINUTE_MS + day]
    cols = stream([0.5] * 100 + [0.8], ts=ts)
    assert run(cols, Rule.BURST, params, dt=day, t0=T0) == [(1, True)]
    assert run(cols, Rule.BURST, MeterParams(burst_peak_decay_per_day=1.0)) == []


def test_continuous_flow_by_time_not_by_count() -> None:
    hours = [0, 3, 6, 7, 8]
    cols = stream([0.02] * 4 + [0.0], ts=[T0 + h * HOUR_MS for h in hours])
    assert run(cols, Rule.CONTINUOUS_FLOW, dt=HOUR_MS) == [(7, True), (8, False)]


def test_continuous_flow_needs_longer_than_six_hours() -> None:
    ts = [T0, T0 + 6 * HOUR_MS, T0 + 6 * HOUR_MS + 1]
    events, _ = detect_meters(stream([0.02] * 3, ts=ts), MeterParams(), MeterState(1))
    assert [(t, r, up) for _, t, r, up, _ in events.rows()] == [(ts[2], Rule.CONTINUOUS_FLOW, True)]


def test_continuous_flow_broken_by_a_near_zero_reading() -> None:
    hours = [0, 4, 5, 9, 12]
    cols = stream([0.5, 0.5, 0.004, 0.5, 0.5], ts=[T0 + h * HOUR_MS for h in hours])
    assert run(cols, Rule.CONTINUOUS_FLOW, dt=HOUR_MS) == []


def test_micro_leak_small_flow_for_two_hours_of_the_night() -> None:
    # every 10 min from 00:30 to 04:50 local, 0.03 m3/h: the night run starts at 01:00
    t0 = LOCAL_MIDNIGHT + 30 * MINUTE_MS
    dt = 10 * MINUTE_MS
    cols = stream([0.03] * 27, dt=dt, t0=t0)
    assert run(cols, Rule.MICRO_LEAK, dt=dt, t0=t0) == [(15, True)]  # 03:00
    # a reading above the micro range breaks the run (01:30), a night zero clears (03:50)
    flows = [0.03] * 6 + [0.5] + [0.03] * 13 + [0.0] + [0.03] * 3
    assert run(stream(flows, dt=dt, t0=t0), Rule.MICRO_LEAK, dt=dt, t0=t0) == [
        (19, True),
        (20, False),
    ]


def test_micro_leak_is_cleared_by_a_night_zero_not_a_daytime_one() -> None:
    dt = 10 * MINUTE_MS
    t0 = LOCAL_MIDNIGHT + HOUR_MS  # 01:00
    night1 = [0.03] * 13  # 01:00 .. 03:00: raised at 03:00
    ts = [t0 + i * dt for i in range(13)]
    ts += [LOCAL_MIDNIGHT + 12 * HOUR_MS]  # noon, no flow: breaks nothing at night
    ts += [LOCAL_MIDNIGHT + 25 * HOUR_MS]  # 01:00 next night, no flow: clears
    cols = stream([*night1, 0.0, 0.0], ts=ts)
    events, _ = detect_meters(cols, MeterParams(), MeterState(1))
    got = [(t, up) for _, t, r, up, _ in events.rows() if r == Rule.MICRO_LEAK]
    assert got == [(ts[12], True), (ts[14], False)]


def test_micro_leak_night_run_restarts_on_the_next_night() -> None:
    # small flow at 04:50 and then (device silent all day) from 01:10 the next night
    first = LOCAL_MIDNIGHT + 4 * HOUR_MS + 50 * MINUTE_MS
    nxt = LOCAL_MIDNIGHT + 25 * HOUR_MS + 10 * MINUTE_MS
    ts = [first, *(nxt + i * 10 * MINUTE_MS for i in range(13))]
    cols = stream([0.03] * 14, ts=ts)
    params = MeterParams(micro_never_zero_ms=10**12)
    events, _ = detect_meters(cols, params, MeterState(1))
    got = [t for _, t, r, up, _ in events.rows() if r == Rule.MICRO_LEAK and up]
    assert got == [nxt + 2 * HOUR_MS]


def test_micro_leak_never_zero_for_two_days() -> None:
    ts = [T0 + h * HOUR_MS for h in (0, 12, 24, 36, 48, 50, 52)]
    cols = stream([0.5, 0.5, 0.5, 0.5, 0.5, 0.0, 0.5], ts=ts)
    events, _ = detect_meters(cols, MeterParams(), MeterState(1))
    got = [(t, up) for _, t, r, up, _ in events.rows() if r == Rule.MICRO_LEAK]
    assert got == [(ts[4], True), (ts[5], False)]  # any zero clears this branch


def test_pressure_low_three_readings_nan_skipped() -> None:
    p = [1.6, 1.1, NAN, 1.1, 1.0, 1.6, 1.6, NAN, 1.5]
    cols = stream([0.0] * len(p), pressure_kpa=p)
    assert run(cols, Rule.PRESSURE_LOW) == [(4, True), (8, False)]
    assert run(stream([0.0] * 5, pressure_kpa=[NAN] * 5), Rule.PRESSURE_LOW) == []
    assert run(stream([0.0] * 5), Rule.PRESSURE_LOW) == []  # no pressure column


def test_valve_fault_flow_through_a_closed_valve() -> None:
    cols = stream([0.0, 0.1, 0.1, 0.0, 0.1, 0.0, 0.0], valve_closed=[1] * 7)
    assert run(cols, Rule.VALVE_FAULT) == [(2, True), (6, False)]
    assert run(stream([0.1, 0.1], valve_closed=[0, 0]), Rule.VALVE_FAULT) == []


def test_tamper_at_once_clears_after_two_clean_readings() -> None:
    cols = stream([0.0] * 5, tamper=[0, 1, 0, 1, 0])
    assert run(cols, Rule.TAMPER) == [(1, True)]
    cols = stream([0.0] * 5, tamper=[1, 0, 0, 0, 0])
    assert run(cols, Rule.TAMPER) == [(0, True), (2, False)]


def test_reverse_flow_flag_or_negative_flow() -> None:
    cols = stream([0.1, -0.1, 0.1, 0.1, 0.1, -0.004], reverse_flow=[0, 0, 0, 0, 0, 0])
    assert run(cols, Rule.REVERSE_FLOW) == [(1, True), (3, False)]
    cols = stream([0.1] * 4, reverse_flow=[1, 0, 0, 0])
    assert run(cols, Rule.REVERSE_FLOW) == [(0, True), (2, False)]


def test_meter_sensor_fault_volume_back_flow_range_battery() -> None:
    vol = [100.0, 100.1, 100.09, 100.1, 100.2, 100.1995]
    assert run(stream([0.1] * 6, volume_m3=vol), Rule.SENSOR_FAULT) == [(2, True), (4, False)]
    assert run(stream([0.1, 61.0, 0.1, 0.1, -7.0], volume_m3=[100.0] * 5), Rule.SENSOR_FAULT) == [
        (1, True),
        (3, False),
        (4, True),
    ]
    cols = stream([0.1] * 4, battery_pct=[50, 120, NAN, 90])
    assert run(cols, Rule.SENSOR_FAULT) == [(1, True), (3, False)]


def test_comm_lost_is_skipped_by_the_other_rules() -> None:
    cols = stream(
        [0.1, NAN, 0.1, 0.0, 0.0],
        valve_closed=[1, 0, 1, 1, 1],
        comm_lost=[0, 1, 0, 0, 0],
        volume_m3=[100.0, NAN, 100.0, 100.0, 100.0],
    )
    assert run(cols, Rule.VALVE_FAULT) == [(2, True), (4, False)]
    assert run(cols, Rule.SILENT) == [(1, True), (2, False)]
    assert run(cols, Rule.SENSOR_FAULT) == []


def test_supply_over_pressure_raises_after_two_readings_and_clears_at_or_below_2_8() -> None:
    p = [2.0, 3.2, 2.9, 3.5, 3.1, 2.9, 2.8, 2.7, NAN, 2.0]
    cols = stream([0.0] * len(p), pressure_kpa=p)
    assert run(cols, Rule.PRESSURE_HIGH) == [(4, True), (9, False)]
    assert run(stream([0.0] * 4, pressure_kpa=[3.0] * 4), Rule.PRESSURE_HIGH) == []


def test_an_impossible_flow_or_pressure_is_a_sensor_fault_and_never_a_burst() -> None:
    for flow in (1e300, 1e30, 61.0, -50.0):
        events, _ = detect_meters(stream([0.1, flow, flow, 0.1, 0.1]), G16, MeterState(1))
        assert {r for _, _, r, _, _ in events.rows()} == {Rule.SENSOR_FAULT}, flow
    p = [2.0, 1e300, -5.0, 2.0, 2.0]
    events, _ = detect_meters(stream([0.0] * 5, pressure_kpa=p), G16, MeterState(1))
    assert [(r, up) for _, _, r, up, _ in events.rows()] == [
        (Rule.SENSOR_FAULT, True), (Rule.SENSOR_FAULT, False)]  # fmt: skip


def test_late_burst_gas_past_a_closed_valve_and_over_pressure_raise_their_alarms() -> None:
    state = MeterState(1)
    detect_meters(stream([0.1] * 5, t0=T0 + HOUR_MS, pressure_kpa=[2.0] * 5), G16, state)
    one = stream([0.2], ts=[T0 + 2 * MINUTE_MS], valve_closed=[1], pressure_kpa=[4.0])
    assert len(detect_meters(one, G16, state)[0]) == 0, "one late reading: as in time order"
    late = stream([5.0, 0.2, 0.2], ts=[T0, T0 + MINUTE_MS, T0 + 3 * MINUTE_MS],
                  valve_closed=[0, 1, 1], pressure_kpa=[2.0, 4.0, 4.0])  # fmt: skip
    events, _ = detect_meters(late, G16, state)
    assert [(r, up, t) for _, t, r, up, _ in events.rows()] == [
        (Rule.BURST, True, T0), (Rule.VALVE_FAULT, True, T0 + MINUTE_MS),
        (Rule.PRESSURE_HIGH, True, T0 + MINUTE_MS)]  # fmt: skip
    assert len(detect_meters(late, G16, state)[0]) == 0, "a replay while open: nothing"


# ---------------------------------------------------------------- the volume register


def register(litres_per_hour: list[float], dt: int, start: float = 1234.5) -> np.ndarray:
    """A register (1 L resolution) fed ``litres_per_hour`` over each interval."""
    added = np.cumsum(np.asarray(litres_per_hour) / 1000 * dt / HOUR_MS)
    return np.round(start + np.concatenate([[0.0], added[:-1]]), 3)


def test_a_leak_below_near_zero_is_a_micro_leak_seen_by_the_register() -> None:
    # 1 L/h behind the meter: the flow reads 0 (below near zero), the register creeps up
    dt = 10 * MINUTE_MS
    n = 28 * 6  # 28 hours
    cols = stream([0.0] * n, dt=dt, volume_m3=register([1.0] * n, dt))
    raised = run(cols, Rule.MICRO_LEAK, dt=dt)
    assert len(raised) == 1 and raised[0][1]
    assert 24 * 6 <= raised[0][0] <= 26 * 6  # after about micro_register_ms (a day)
    # the same home with a quiet night (the register still 4 h) in the middle: nothing
    quiet = [1.0] * 20 * 6 + [0.0] * 24 + [1.0] * 20 * 6
    cols = stream([0.0] * len(quiet), dt=dt, volume_m3=register(quiet, dt))
    assert run(cols, Rule.MICRO_LEAK, dt=dt) == []
    # and a household cooking three times a day with nights off: nothing in a week
    day = [0.0] * 7 * 6 + [500.0] * 3 + [0.0] * 4 * 6 + [800.0] * 3 + [0.0] * 6 * 6 + [600.0] * 6
    week = (day + [0.0] * (24 * 6 - len(day))) * 7
    flows = [litres / 1000 for litres in week]
    cols = stream(flows, dt=dt, volume_m3=register(week, dt))
    assert run(cols, Rule.MICRO_LEAK, dt=dt) == []
    assert run(cols, Rule.METER_MISMATCH, dt=dt) == []


def test_micro_leak_from_the_register_clears_when_the_register_stands_still() -> None:
    dt = 30 * MINUTE_MS
    litres = [1.0] * 54 + [0.0] * 10
    cols = stream([0.0] * 64, dt=dt, volume_m3=register(litres, dt))
    events = run(cols, Rule.MICRO_LEAK, dt=dt)
    assert [up for _, up in events] == [True, False]
    assert events[1][0] >= 54 + 6  # still for more than register_still_ms (3 h)


def test_register_climbing_while_the_flow_reads_zero_is_a_meter_mismatch() -> None:
    # a flow sensor stuck at 0 while the home uses 0.6 m3/h
    n = 12
    cols = stream([0.0] * n, volume_m3=register([600.0] * n, MINUTE_MS))
    assert run(cols, Rule.METER_MISMATCH) == [(3, True)]  # the third interval in a row
    # ... and the register far ahead of the reported flow (0.1 m3/h reported, 1.2 counted)
    cols = stream([0.1] * n, volume_m3=register([1200.0] * n, MINUTE_MS))
    assert run(cols, Rule.METER_MISMATCH) == [(3, True)]
    # ... and a register standing still while 0.9 m3/h flows; agreement clears it
    vol = np.concatenate([np.full(6, 50.0), register([900.0] * 6, MINUTE_MS, start=50.0)])
    cols = stream([0.9] * 12, volume_m3=vol)
    assert run(cols, Rule.METER_MISMATCH) == [(3, True), (9, False)]


def test_register_and_flow_that_agree_raise_no_mismatch() -> None:
    flows = [0.0, 0.0, 0.4, 0.5, 0.45, 0.0, 0.0, 1.2, 1.3, 0.0] * 10
    litres = [1000 * f for f in flows]
    cols = stream(flows, volume_m3=register(litres, MINUTE_MS))
    assert run(cols, Rule.METER_MISMATCH) == []


def test_gas_past_a_closed_valve_seen_by_the_register_is_critical() -> None:
    # the valve reports closed, the flow reads 0, yet the register climbs 3 L
    vol = [100.0, 100.0, 100.001, 100.002, 100.003, 100.004]
    cols = stream([0.0] * 6, volume_m3=vol, valve_closed=[1] * 6)
    events, _ = detect_meters(cols, MeterParams(), MeterState(1))
    raised = [t for _, t, r, up, _ in events.rows() if r == Rule.VALVE_FAULT and up]
    assert [(t - T0) // MINUTE_MS for t in raised] == [5]  # 2 readings past 2 L
    assert SEVERITY[Rule.VALVE_FAULT] == Severity.CRITICAL
    # a register that stays put behind the closed valve: nothing
    cols = stream([0.0] * 6, volume_m3=[100.0] * 6, valve_closed=[1] * 6)
    assert run(cols, Rule.VALVE_FAULT) == []
    # gas counted before the valve closed does not count
    cols = stream([0.5, 0.5, 0.0, 0.0, 0.0], volume_m3=[100.0, 100.01, 100.02, 100.02, 100.02],
                  valve_closed=[0, 0, 1, 1, 1])  # fmt: skip
    assert run(cols, Rule.VALVE_FAULT) == []


def test_low_battery_raises_once_and_clears_above_the_clear_level() -> None:
    batt = [30.0, 19.0, 19.5, 18.0, 21.0, 19.0, 22.0, 26.0, 26.0, 27.0]
    cols = stream([0.0] * 10, battery_pct=batt)
    assert run(cols, Rule.BATTERY_LOW) == [(3, True), (9, False)]
    # a battery the meter cannot have is a sensor fault, not a low battery
    cols = stream([0.0] * 4, battery_pct=[-5.0, -5.0, -5.0, -5.0])
    assert run(cols, Rule.BATTERY_LOW) == []


def test_a_register_creeping_in_steps_smaller_than_its_step_still_counts_as_moving() -> None:
    # 0.1 L resolution, 1 L/h read every 5 minutes: each reading adds 0.1 L or nothing
    dt = 5 * MINUTE_MS
    n = 26 * 12
    litres = np.round(500.0 + np.arange(n) * (1.0 / 12) / 1000, 4)
    cols = stream([0.0] * n, dt=dt, volume_m3=litres)
    raised = run(cols, Rule.MICRO_LEAK, dt=dt)
    assert len(raised) == 1 and raised[0][1] and raised[0][0] <= 25 * 12
