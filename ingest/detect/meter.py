"""Gas meter rules: BURST, CONTINUOUS_FLOW, MICRO_LEAK, PRESSURE_LOW, PRESSURE_HIGH,
VALVE_FAULT (gas past a closed valve: critical), TAMPER, REVERSE_FLOW, METER_MISMATCH,
BATTERY_LOW, SENSOR_FAULT, CLOCK_SKEW (and SILENT).

As for detectors: hysteresis switches over each meter's readings in time order, runs carried
in the state, ``comm_lost`` readings seen only by SILENT. A reading without pressure (NaN) is
skipped by PRESSURE_LOW alone. "Flowing" is flow > near_zero; "no flow" is |flow| <= near_zero
(a NaN or reverse flow is neither: it breaks a run of flow without clearing its alarm).
A flow outside ``[-qmax, flow_max_factor x qmax]`` or a pressure outside ``[pressure_min,
pressure_max]`` is a SENSOR_FAULT and counts as no value for the flow and pressure rules (a
value no meter can report never raises a burst by itself). Late readings are judged by BURST
(over Qmax), VALVE_FAULT and PRESSURE_HIGH as ``late.py`` says.
"""

from __future__ import annotations

import numpy as np

from .batch import Batch, counted_switch, flag, floats, run_start, within
from .burst import apply_burst
from .events import BoolArray, Events, EventSink, FloatArray, IntArray, Rule, rule_bit
from .late import late_hits, raise_late, track_clears
from .params import DAY_MS, HOUR_MS, MeterColumns, MeterParams, per_device
from .runs import NO_TS, Switch, latch, run_began, run_lengths, sat32
from .silence import begin_batch, clock_skew
from .state import ML_DAYS_BIT, ML_NIGHT_BIT, ML_REGISTER_BIT, MeterState

_OPTIONAL = ("pressure_kpa", "valve_closed", "battery_pct", "tamper", "reverse_flow", "comm_lost",
             "ahead_ms")  # fmt: skip


def detect_meters(
    cols: MeterColumns, params: MeterParams, state: MeterState
) -> tuple[Events, MeterState]:
    """Run every meter rule over one batch; ``state`` is updated in place and returned.

    Readings may come in any order and interleave devices; each device's are taken in ts
    order. Readings not newer than the device's last processed one are ignored and counted in
    ``Events.stale``.
    """
    idx = np.asarray(cols.idx, np.int64)
    lengths = {"ts": len(cols.ts), "volume_m3": len(cols.volume_m3), "flow_m3h": len(cols.flow_m3h)}
    for name in _OPTIONAL:
        col = getattr(cols, name)
        if col is not None:
            lengths[name] = len(col)
    ts_all = np.asarray(cols.ts, np.int64)
    fresh = begin_batch(idx, ts_all, cols.comm_lost, state, lengths)
    b, order = fresh.batch, fresh.order
    if len(fresh.late):
        _late(fresh.sink, params, state, cols, fresh.late, idx=idx, ts=ts_all)
    if b is not None:
        raw = np.asarray(cols.flow_m3h, np.float64)[order]
        qmax = b.param(params.qmax_by_device, params.qmax)
        flow = plausible_flow(raw, qmax, params)
        volume = np.asarray(cols.volume_m3, np.float64)[order]
        apply_burst(b, params, state, flow=flow, qmax=qmax)
        _flow_time(b, params, state, flow=flow, volume=volume)
        raw_pressure = floats(cols.pressure_kpa, order)
        pressure = plausible_pressure(raw_pressure, params)
        if cols.pressure_kpa is not None:
            _pressure(b, params, state, pressure=pressure)
        closed = flag(cols.valve_closed, order)
        leak = (closed & (np.abs(flow) > params.near_zero)) | _past_valve(
            b, params, state, closed=closed, volume=volume
        )
        tamper = flag(cols.tamper, order)
        reverse = flag(cols.reverse_flow, order) | (flow < -params.near_zero)
        _flags(b, params, state, flow=flow, leak=leak, tamper=tamper, reverse=reverse)
        _mismatch(b, params, state, flow=flow, volume=volume)
        battery = floats(cols.battery_pct, order)
        _battery(b, params, state, battery=battery)
        bad_pressure = ~np.isnan(raw_pressure) & np.isnan(pressure)
        _sensor_fault(b, params, state, flow=raw, qmax=qmax, volume=volume, battery=battery,
                      bad_pressure=bad_pressure)  # fmt: skip
        ahead = np.nan_to_num(floats(cols.ahead_ms, order), nan=0.0)
        clock_skew(b, params.skew_clear_samples, state, ahead)
        state.last_volume[b.dev] = volume[b.last]
        state.last_flow[b.dev] = flow[b.last]
        state.norm_ts[b.dev] = b.ts[b.last]
    events = fresh.sink.build(fresh.stale)
    track_clears(events, Rule.BURST, state.burst_until)
    track_clears(events, Rule.VALVE_FAULT, state.vf_until)
    track_clears(events, Rule.PRESSURE_HIGH, state.ph_until)
    return events, state


def plausible_flow(flow: FloatArray, qmax: FloatArray, p: MeterParams) -> FloatArray:
    """Flow as the flow rules see it: NaN where no meter of this size could report it."""
    return within(flow, -qmax, p.flow_max_factor * qmax)


def plausible_pressure(pressure: FloatArray, p: MeterParams) -> FloatArray:
    return within(pressure, p.pressure_min, p.pressure_max)


def _late(
    sink: EventSink,
    p: MeterParams,
    st: MeterState,
    cols: MeterColumns,
    rows: IntArray,
    *,
    idx: IntArray,
    ts: IntArray,
) -> None:
    """BURST over Qmax; gas past a closed valve (VALVE_FAULT) and PRESSURE_HIGH on as many
    late readings of the device as the rule needs in time order."""
    li, lt = idx[rows], ts[rows]
    qmax = per_device(p.qmax_by_device, p.qmax, li)
    flow = plausible_flow(np.asarray(cols.flow_m3h, np.float64)[rows], qmax, p)
    late = (li, lt)
    raise_late(sink, st.open, Rule.BURST, rows=late, hit=flow > qmax, value=flow,
               until=st.burst_until)  # fmt: skip
    passing = flag(cols.valve_closed, rows) & (np.abs(flow) > p.near_zero)
    passing = late_hits(li, passing, st.capacity, p.valve_samples)
    raise_late(sink, st.open, Rule.VALVE_FAULT, rows=late, hit=passing, value=flow,
               until=st.vf_until)  # fmt: skip
    pressure = plausible_pressure(floats(cols.pressure_kpa, rows), p)
    over = late_hits(li, pressure > p.pressure_high, st.capacity, p.pressure_high_samples)
    raise_late(sink, st.open, Rule.PRESSURE_HIGH, rows=late, hit=over, value=pressure,
               until=st.ph_until)  # fmt: skip


def _flow_time(
    b: Batch, p: MeterParams, st: MeterState, *, flow: FloatArray, volume: FloatArray
) -> None:
    """CONTINUOUS_FLOW and MICRO_LEAK: how long flow has gone on, by timestamps; MICRO_LEAK
    also from the register (``_register``)."""
    dev, last, ts = b.dev, b.last, b.ts
    no_flow = np.abs(flow) <= p.near_zero
    flowing = flow > p.near_zero
    flow_start = run_start(b, flowing, st.flow_start)
    flow_for = ts - np.where(flowing, flow_start, ts)
    limit = b.param(p.continuous_ms_by_device, float(p.continuous_ms))
    b.switch(Rule.CONTINUOUS_FLOW, flowing & (flow_for > limit), no_flow, flow)

    # night branch: small flow on every reading of one night's window, for micro_night_ms
    local = ts + p.utc_offset_ms
    day = local // DAY_MS  # local date: one night's window lies within one date
    tod = local - day * DAY_MS
    night = (tod >= p.night_start_ms) & (tod < p.night_end_ms)
    small = night & flowing & (flow <= p.micro_max)
    prev_ts = st.norm_ts[dev]
    prev_day = (np.where(prev_ts == NO_TS, ts[b.sg.first], prev_ts) + p.utc_offset_ms) // DAY_MS
    other_night = day != b.sg.shift_i(day, prev_day)
    night_start = run_start(b, small, st.night_start, restart=other_night)
    small_for = ts - np.where(small, night_start, ts)
    lt = latch(
        b.sg,
        [
            Switch(
                small & (small_for >= p.micro_night_ms),
                night & no_flow,
                b.carried(ML_NIGHT_BIT),
            ),
            # days branch: never no-flow for micro_never_zero_ms; any no-flow reading clears
            Switch(
                flowing & (flow_for >= p.micro_never_zero_ms),
                no_flow,
                b.carried(ML_DAYS_BIT),
            ),
            _register(b, p, st, volume=volume),
        ],
    )
    b.emit(Rule.MICRO_LEAK, lt, flow)
    night_open, days_open, register_open = lt.final
    b.put(ML_NIGHT_BIT, night_open)
    b.put(ML_DAYS_BIT, days_open)
    b.put(ML_REGISTER_BIT, register_open)
    b.put(rule_bit(Rule.MICRO_LEAK), night_open | days_open | register_open)
    st.flow_start[dev] = np.where(flowing[last], flow_start[last], NO_TS)
    st.night_start[dev] = np.where(small[last], night_start[last], NO_TS)


def _register(b: Batch, p: MeterParams, st: MeterState, *, volume: FloatArray) -> Switch:
    """MICRO_LEAK's register branch, for leaks below ``near_zero`` that the flow reads as none:
    the register has gone up at least once every ``register_still_ms`` (it never stood still
    that long) for ``micro_register_ms``. A still stretch, or the first rise after one, clears
    it. The register has moved when it crossed a multiple of ``register_step_m3`` (0.5 L),
    however small its steps. With a 1 L resolution that reaches leaks down to about 1 L over
    ``register_still_ms`` (0.33 L/h with the defaults), with 0.1 L to 0.5 L (0.17 L/h)."""
    ts = b.ts
    step = p.register_step_m3  # moved: crossed a multiple of it (a slow creep adds up)
    moved = np.floor(volume / step) > np.floor(b.sg.shift_f(volume, st.last_volume[b.dev]) / step)
    last_move = _last_where(b, moved, st.reg_move_ts)
    prev_move = b.sg.shift_i(last_move, st.reg_move_ts[b.dev])
    restart = moved & (_since(ts, prev_move) > p.register_still_ms)
    run_ts = _last_where(b, restart, st.reg_run_ts)
    still = _since(ts, last_move) > p.register_still_ms
    st.reg_move_ts[b.dev] = last_move[b.last]
    st.reg_run_ts[b.dev] = run_ts[b.last]
    return Switch(
        ~still & (_since(ts, run_ts) >= p.micro_register_ms) & (run_ts != NO_TS),
        still | restart,
        b.carried(ML_REGISTER_BIT),
    )


_FOREVER = np.iinfo(np.int64).max


def _since(ts: IntArray, then: IntArray) -> IntArray:
    """ts - then, and "forever" where ``then`` is NO_TS."""
    return np.where(then == NO_TS, _FOREVER, ts - np.where(then == NO_TS, ts, then))


def _last_where(b: Batch, cond: BoolArray, carried: IntArray) -> IntArray:
    """ts of the latest reading at or before each one where ``cond`` holds; ``carried`` (per
    device) where none in this batch does."""
    since = run_lengths(b.sg, ~cond, np.zeros(len(b.sg.first), np.int64))
    row = b.sg.pos - since
    return np.where(row >= b.sg.start, b.ts[np.maximum(row, 0)], b.sg.rows(carried[b.dev]))


def _past_valve(
    b: Batch, p: MeterParams, st: MeterState, *, closed: BoolArray, volume: FloatArray
) -> BoolArray:
    """Gas past the closed valve seen by the register: up by more than ``valve_passing_m3``
    since the first reading that showed the valve closed."""
    dev, last = b.dev, b.last
    run, began = run_began(b.sg, closed, st.vc_on[dev])
    at = np.clip(began, 0, b.sg.n - 1)  # (meaningless where the valve is open)
    anchor = np.where(began >= 0, volume[at], b.sg.rows(st.vc_vol[dev]))
    st.vc_on[dev] = sat32(run[last])
    st.vc_vol[dev] = np.where(closed[last], anchor[last], np.nan)
    return np.asarray(closed & (volume - anchor > p.valve_passing_m3), np.bool_)


def _mismatch(
    b: Batch, p: MeterParams, st: MeterState, *, flow: FloatArray, volume: FloatArray
) -> None:
    """METER_MISMATCH: between consecutive readings (at most ``mismatch_max_gap_ms`` apart) the
    register's increase and the flow's (trapezoid) integral differ by more than
    ``mismatch_ratio`` x plus ``mismatch_tol_m3``, either way, on ``mismatch_samples``
    intervals in a row (a flow sensor stuck at 0 under a climbing register, a register far
    ahead of the flow or standing while gas flows). Cleared by ``mismatch_clear_samples``
    intervals in a row that agree while gas flows; intervals without gas or values neither."""
    dev = b.dev
    prev_ts = b.sg.shift_i(b.ts, st.norm_ts[dev])
    dt = _since(b.ts, prev_ts)
    reg = volume - b.sg.shift_f(volume, st.last_volume[dev])
    forward = np.clip(flow, 0.0, None) + np.clip(b.sg.shift_f(flow, st.last_flow[dev]), 0.0, None)
    by_flow = forward / 2 * np.minimum(dt, p.mismatch_max_gap_ms) / HOUR_MS
    valid = (dt <= p.mismatch_max_gap_ms) & np.isfinite(reg) & np.isfinite(by_flow)
    tol, k = p.mismatch_tol_m3, p.mismatch_ratio
    bad = valid & ((reg > k * by_flow + tol) | (by_flow > k * np.clip(reg, 0.0, None) + tol))
    good = valid & ~bad & ((by_flow > tol) | (reg > tol))
    counted_switch(b, Rule.METER_MISMATCH, (bad, p.mismatch_samples, st.mm_bad),
                   (good, p.mismatch_clear_samples, st.mm_ok), reg)  # fmt: skip


def _battery(b: Batch, p: MeterParams, st: MeterState, *, battery: FloatArray) -> None:
    """BATTERY_LOW: below ``battery_low`` on ``battery_low_samples`` readings in a row, cleared
    at or above ``battery_low_clear`` on as many; a missing or impossible value neither."""
    batt = within(battery, p.battery_min, p.battery_max)
    n = p.battery_low_samples
    counted_switch(b, Rule.BATTERY_LOW, (batt < p.battery_low, n, st.bl_lo),
                   (batt >= p.battery_low_clear, n, st.bl_ok), batt)  # fmt: skip


def _pressure(b: Batch, p: MeterParams, st: MeterState, *, pressure: FloatArray) -> None:
    """PRESSURE_LOW and PRESSURE_HIGH over the readings that carry a pressure (NaN: skipped,
    as if absent)."""
    have = ~np.isnan(pressure)
    if not have.any():
        return
    if not have.all():
        b = Batch.of(b.idx[have], b.ts[have], b.mask, b.sink)
        pressure = pressure[have]
    low = b.param(p.pressure_low_by_device, p.pressure_low)
    counted_switch(b, Rule.PRESSURE_LOW, (pressure < low, p.pressure_low_samples, st.pl_lo),
                   (pressure >= np.maximum(p.pressure_clear, low), p.pressure_clear_samples,
                    st.pl_hi), pressure)  # fmt: skip
    counted_switch(b, Rule.PRESSURE_HIGH,
                   (pressure > p.pressure_high, p.pressure_high_samples, st.ph_hi),
                   (pressure <= p.pressure_high_clear, p.pressure_clear_samples, st.ph_ok),
                   pressure)  # fmt: skip


def _flags(
    b: Batch,
    p: MeterParams,
    st: MeterState,
    *,
    flow: FloatArray,
    leak: BoolArray,
    tamper: BoolArray,
    reverse: BoolArray,
) -> None:
    """VALVE_FAULT (flow with the valve closed), TAMPER, REVERSE_FLOW."""
    dev, last = b.dev, b.last
    on_run = run_lengths(b.sg, leak, st.vf_on[dev])
    off_run = run_lengths(b.sg, ~leak, st.vf_off[dev])
    b.switch(Rule.VALVE_FAULT, on_run >= p.valve_samples, off_run >= p.valve_clear_samples, flow)
    st.vf_on[dev] = sat32(on_run[last])
    st.vf_off[dev] = sat32(off_run[last])

    off_run = run_lengths(b.sg, ~tamper, st.tamper_off[dev])
    b.switch(Rule.TAMPER, tamper, off_run >= p.tamper_clear_samples, flow)
    st.tamper_off[dev] = sat32(off_run[last])

    off_run = run_lengths(b.sg, ~reverse, st.rf_off[dev])
    b.switch(Rule.REVERSE_FLOW, reverse, off_run >= p.reverse_clear_samples, flow)
    st.rf_off[dev] = sat32(off_run[last])


def _sensor_fault(
    b: Batch,
    p: MeterParams,
    st: MeterState,
    *,
    flow: FloatArray,
    qmax: FloatArray,
    volume: FloatArray,
    battery: FloatArray,
    bad_pressure: BoolArray,
) -> None:
    """SENSOR_FAULT: the volume register going back, volume missing, flow out of
    [-qmax, flow_max_factor x qmax] or missing, battery out of range (missing is fine), a
    pressure no sensor reports (missing is fine)."""
    bad = (
        (b.sg.shift_f(volume, st.last_volume[b.dev]) - volume > p.volume_drop_m3)
        | np.isnan(volume)
        | ~((flow >= -qmax) & (flow <= p.flow_max_factor * qmax))
        | (battery < p.battery_min)
        | (battery > p.battery_max)
        | bad_pressure
    )
    ok_run = run_lengths(b.sg, ~bad, st.sf_ok[b.dev])
    b.switch(Rule.SENSOR_FAULT, bad, ok_run >= p.fault_clear_samples, flow)
    st.sf_ok[b.dev] = sat32(ok_run[b.last])
