"""Methane detector rules: GAS_LOW, GAS_HIGH, GAS_RISING, GAS_PRESENT, SENSOR_FAULT,
CLOCK_SKEW (and SILENT, NEVER_REPORTED).

Each rule is a hysteresis switch over the device's readings in time order; runs of
consecutive readings continue from the state, so the result does not depend on where batches
end. Readings flagged ``comm_lost`` only feed SILENT: every other rule skips them (they
neither advance nor break a run, and the rate of rise pairs across them). A CH4 value outside
what a sensor can report (``ch4_min``..``ch4_max``) is a SENSOR_FAULT and counts as no value
for the gas rules: it never raises a gas alarm by itself. Late readings are judged by GAS_LOW
and GAS_HIGH as ``late.py`` says.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .batch import Batch, flag, floats, run_start, within
from .events import BoolArray, Events, EventSink, FloatArray, IntArray, Rule
from .late import late_hits, raise_late, track_clears
from .params import DetectorColumns, DetectorParams, per_device
from .rising import apply_rising
from .runs import NO_TS, run_began, run_lengths, sat32
from .silence import begin_batch, clock_skew
from .state import DetectorState


def detect_detectors(
    cols: DetectorColumns, params: DetectorParams, state: DetectorState
) -> tuple[Events, DetectorState]:
    """Run every detector rule over one batch; ``state`` is updated in place and returned.

    Readings may come in any order and interleave devices; each device's are taken in ts
    order. Readings not newer than the device's last processed one are ignored and counted in
    ``Events.stale``.
    """
    idx = np.asarray(cols.idx, np.int64)
    lengths = {"ts": len(cols.ts), "ch4_lel": len(cols.ch4_lel), "alarm": len(cols.alarm)}
    for name in ("fault", "eol", "comm_lost"):
        col = getattr(cols, name)
        if col is not None:
            lengths[name] = len(col)
    for name in ("ahead_ms",):
        col = getattr(cols, name)
        if col is not None:
            lengths[name] = len(col)
    ts_all = np.asarray(cols.ts, np.int64)
    fresh = begin_batch(idx, ts_all, cols.comm_lost, state, lengths)
    b, order = fresh.batch, fresh.order
    if len(fresh.late):
        _late(fresh.sink, params, state, cols, fresh.late, idx=idx, ts=ts_all)
    if b is not None:
        raw = np.asarray(cols.ch4_lel, np.float64)[order]
        ch4 = plausible(raw, params)
        prev_raw = b.sg.shift_f(raw, state.last_ch4[b.dev])
        prev_ts = b.sg.shift_i(b.ts, state.norm_ts[b.dev])
        _gas(b, params, state, ch4=ch4, alarm=np.asarray(cols.alarm, np.bool_)[order])
        apply_rising(b, params, state, ch4=ch4)
        _present(b, params, state, ch4=ch4)
        fault = flag(cols.fault, order) | flag(cols.eol, order)
        _sensor_fault(b, params, state, ch4=raw, prev_ch4=prev_raw, prev_ts=prev_ts, fault=fault)
        ahead = np.nan_to_num(floats(cols.ahead_ms, order), nan=0.0)
        clock_skew(b, params.skew_clear_samples, state, ahead)
        state.last_ch4[b.dev] = raw[b.last]
        state.norm_ts[b.dev] = b.ts[b.last]
    events = fresh.sink.build(fresh.stale)
    track_clears(events, Rule.GAS_LOW, state.gl_until)
    track_clears(events, Rule.GAS_HIGH, state.gh_until)
    return events, state


def plausible(ch4: FloatArray, p: DetectorParams) -> FloatArray:
    """CH4 as the gas rules see it: NaN where no sensor could report it."""
    return within(ch4, p.ch4_min, p.ch4_max)


def _late(
    sink: EventSink,
    p: DetectorParams,
    st: DetectorState,
    cols: DetectorColumns,
    rows: IntArray,
    *,
    idx: IntArray,
    ts: IntArray,
) -> None:
    """GAS_HIGH at its level; GAS_LOW on the detector's own flag, or at its level on at least
    ``gas_low_samples`` of the device's late readings in this batch."""
    li, lt = idx[rows], ts[rows]
    ch4 = plausible(np.asarray(cols.ch4_lel, np.float64)[rows], p)
    alarm = np.asarray(cols.alarm, np.bool_)[rows]
    high = ch4 >= per_device(p.gas_high_by_device, p.gas_high, li)
    raise_late(sink, st.open, Rule.GAS_HIGH, rows=(li, lt), hit=high, value=ch4,
               until=st.gh_until)  # fmt: skip
    at_low = ch4 >= per_device(p.gas_low_by_device, p.gas_low, li)
    low = alarm | late_hits(li, at_low, st.capacity, p.gas_low_samples)
    raise_late(sink, st.open, Rule.GAS_LOW, rows=(li, lt), hit=low, value=ch4,
               until=st.gl_until)  # fmt: skip


def _gas(
    b: Batch, p: DetectorParams, st: DetectorState, *, ch4: FloatArray, alarm: BoolArray
) -> None:
    """GAS_LOW (at its level on ``gas_low_samples`` of the last ``gas_low_window`` readings,
    this one included, or the detector's own alarm flag) and GAS_HIGH (at once)."""
    dev, last = b.dev, b.last
    low = b.param(p.gas_low_by_device, p.gas_low)
    at_low = ch4 >= low
    hi_run = run_lengths(b.sg, at_low, st.gl_hi[dev])
    hits = _window_hits(b, at_low, st.gl_hist, p.gas_low_window)
    calm = (ch4 < np.minimum(p.gas_low_clear, low)) & ~alarm
    clr_run = run_lengths(b.sg, calm, st.gl_clr[dev])
    b.switch(
        Rule.GAS_LOW,
        (at_low & (hits >= p.gas_low_samples)) | alarm,
        clr_run >= p.gas_low_clear_samples,
        ch4,
    )
    st.gl_hi[dev] = sat32(hi_run[last])
    st.gl_clr[dev] = sat32(clr_run[last])

    high = b.param(p.gas_high_by_device, p.gas_high)
    clr_run = run_lengths(b.sg, ch4 < np.minimum(p.gas_high_clear, high), st.gh_clr[dev])
    b.switch(Rule.GAS_HIGH, ch4 >= high, clr_run >= p.gas_high_clear_samples, ch4)
    st.gh_clr[dev] = sat32(clr_run[last])


def _present(b: Batch, p: DetectorParams, st: DetectorState, *, ch4: FloatArray) -> None:
    """GAS_PRESENT: CH4 at or above ``present_lel`` on every reading for ``present_ms`` (by
    the readings' time: gas that rises too slowly for GAS_RISING, or stays below GAS_LOW's
    level); cleared below ``present_clear`` on ``present_clear_samples`` readings."""
    dev, last = b.dev, b.last
    at = ch4 >= p.present_lel
    start = run_start(b, at, st.gp_start)
    held = at & (b.ts - np.where(at, start, b.ts) >= p.present_ms)
    clr_run = run_lengths(b.sg, ch4 < p.present_clear, st.gp_clr[dev])
    b.switch(Rule.GAS_PRESENT, held, clr_run >= p.present_clear_samples, ch4)
    st.gp_start[dev] = np.where(at[last], start[last], NO_TS)
    st.gp_clr[dev] = sat32(clr_run[last])


def _window_hits(b: Batch, cond: BoolArray, hist: npt.NDArray[np.int32], window: int) -> IntArray:
    """How many of each reading's last ``window`` readings (itself included) meet ``cond``;
    the readings before the batch come from ``hist`` (bit 0: the device's latest reading),
    which is then moved on to the batch's last readings."""
    sg = b.sg
    csum = np.concatenate([[0], np.cumsum(cond, dtype=np.int64)])
    here = sg.pos - sg.start  # position within the device's readings of this batch
    lo = np.maximum(sg.start, sg.pos - window + 1)
    count = csum[sg.pos + 1] - csum[lo]
    need = np.clip(window - 1 - here, 0, None)  # readings still to take from before the batch
    carried = sg.rows(hist[sg.dev]) & ((np.int64(1) << need) - 1)
    count += np.bitwise_count(carried).astype(np.int64)
    keep = window - 1
    if keep:
        lengths = sg.lengths
        older = hist[sg.dev].astype(np.int64) << np.minimum(lengths, keep)
        bits = np.where(lengths < keep, older, 0)
        for q in range(keep):  # the batch's last readings, newest at bit 0
            row = sg.last - q
            bits |= np.where(q < lengths, cond[np.maximum(row, 0)].astype(np.int64) << q, 0)
        hist[sg.dev] = bits & ((1 << keep) - 1)
    return np.asarray(count, np.int64)


def _sensor_fault(
    b: Batch,
    p: DetectorParams,
    st: DetectorState,
    *,
    ch4: FloatArray,
    prev_ch4: FloatArray,
    prev_ts: IntArray,
    fault: BoolArray,
) -> None:
    """SENSOR_FAULT: fault or end-of-life flag, CH4 out of range (or missing), or stuck:
    identical CH4 above ``stuck_above_lel`` on ``stuck_samples`` readings spanning
    ``stuck_ms`` (a live sensor has noise; clean air may read a steady 0)."""
    dev, last = b.dev, b.last
    same_run, began = run_began(b.sg, ch4 == prev_ch4, np.maximum(st.same_n[dev] - 1, 0))
    same_n = same_run + 1
    # the stretch's first reading is the one before the run of "equal to the previous" began
    start = b.ts.copy()
    m = np.flatnonzero(same_run > 0)
    began = began[m]
    start[m] = np.where(began >= 0, prev_ts[np.maximum(began, 0)], st.same_ts[b.idx[m]])
    stuck = (same_n >= p.stuck_samples) & (b.ts - start >= p.stuck_ms) & (ch4 > p.stuck_above_lel)
    bad = fault | ~((ch4 >= p.ch4_min) & (ch4 <= p.ch4_max)) | stuck
    ok_run = run_lengths(b.sg, ~bad, st.sf_ok[dev])
    b.switch(Rule.SENSOR_FAULT, bad, ok_run >= p.fault_clear_samples, ch4)
    st.sf_ok[dev] = sat32(ok_run[last])
    st.same_n[dev] = sat32(same_n[last])
    st.same_ts[dev] = start[last]
