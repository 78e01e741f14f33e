"""Methane detector rules: GAS_LOW, GAS_HIGH, GAS_RISING, SENSOR_FAULT (and SILENT).

Each rule is a hysteresis switch over the device's readings in time order; runs of
consecutive readings continue from the state, so the result does not depend on where batches
end. Readings flagged ``comm_lost`` only feed SILENT: every other rule skips them (they
neither advance nor break a run, and the rate of rise pairs across them).
"""

from __future__ import annotations

import numpy as np

from .batch import Batch, flag
from .events import BoolArray, Events, FloatArray, IntArray, Rule
from .params import MINUTE_MS, DetectorColumns, DetectorParams
from .runs import NO_TS, run_began, run_lengths, sat32
from .silence import begin_batch
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
    fresh = begin_batch(idx, np.asarray(cols.ts, np.int64), cols.comm_lost, state, lengths)
    b, order = fresh.batch, fresh.order
    if b is not None:
        ch4 = np.asarray(cols.ch4_lel, np.float64)[order]
        prev_ch4 = b.sg.shift_f(ch4, state.last_ch4[b.dev])
        prev_ts = b.sg.shift_i(b.ts, state.norm_ts[b.dev])
        _gas(b, params, state, ch4=ch4, alarm=np.asarray(cols.alarm, np.bool_)[order])
        _rising(b, params, state, ch4=ch4, prev_ch4=prev_ch4, prev_ts=prev_ts)
        fault = flag(cols.fault, order) | flag(cols.eol, order)
        _sensor_fault(b, params, state, ch4=ch4, prev_ch4=prev_ch4, prev_ts=prev_ts, fault=fault)
        state.last_ch4[b.dev] = ch4[b.last]
        state.norm_ts[b.dev] = b.ts[b.last]
    return fresh.sink.build(fresh.stale), state


def _gas(
    b: Batch, p: DetectorParams, st: DetectorState, *, ch4: FloatArray, alarm: BoolArray
) -> None:
    """GAS_LOW (sustained, or the detector's own alarm flag) and GAS_HIGH (at once)."""
    dev, last = b.dev, b.last
    low = b.param(p.gas_low_by_device, p.gas_low)
    hi_run = run_lengths(b.sg, ch4 >= low, st.gl_hi[dev])
    calm = (ch4 < np.minimum(p.gas_low_clear, low)) & ~alarm
    clr_run = run_lengths(b.sg, calm, st.gl_clr[dev])
    b.switch(
        Rule.GAS_LOW,
        (hi_run >= p.gas_low_samples) | alarm,
        clr_run >= p.gas_low_clear_samples,
        ch4,
    )
    st.gl_hi[dev] = sat32(hi_run[last])
    st.gl_clr[dev] = sat32(clr_run[last])

    high = b.param(p.gas_high_by_device, p.gas_high)
    clr_run = run_lengths(b.sg, ch4 < np.minimum(p.gas_high_clear, high), st.gh_clr[dev])
    b.switch(Rule.GAS_HIGH, ch4 >= high, clr_run >= p.gas_high_clear_samples, ch4)
    st.gh_clr[dev] = sat32(clr_run[last])


def _rising(
    b: Batch,
    p: DetectorParams,
    st: DetectorState,
    *,
    ch4: FloatArray,
    prev_ch4: FloatArray,
    prev_ts: IntArray,
) -> None:
    """GAS_RISING: rate of rise between consecutive readings (the first pairs with the carried
    one; pairs more than ``rise_max_gap_ms`` apart have no rate)."""
    has_prev = prev_ts != NO_TS
    dt = b.ts - np.where(has_prev, prev_ts, b.ts)
    pair = has_prev & (dt <= p.rise_max_gap_ms)
    rate = (ch4 - prev_ch4) / (np.where(pair, dt, MINUTE_MS) / float(MINUTE_MS))
    rate[~pair] = np.nan
    rising = (rate > p.rise_per_min) & (ch4 >= p.rise_min_lel)
    calm = ~rising & ((ch4 < p.rise_clear_below) | (rate <= 0))
    clr_run = run_lengths(b.sg, calm, st.gr_clr[b.dev])
    b.switch(Rule.GAS_RISING, rising, clr_run >= p.rise_clear_samples, ch4)
    st.gr_clr[b.dev] = sat32(clr_run[b.last])


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
