"""BURST: flow above the meter's qmax, or (once learned) above k x the household's usual peak.

The usual peak is the running maximum of flow over non-burst readings, decaying by
``burst_peak_decay_per_day`` per day since it was set; it counts as learned after
``burst_learn_samples`` non-zero non-burst readings. The threshold depends on the peak, the
peak on whether the alarm is open, and the alarm on the threshold: a genuinely sequential
state machine, so it is not vectorised along the readings of one meter. Instead it is
vectorised across meters and iterated over the positions within the segments: step k handles
the k-th reading of every meter that has one (O(n) numpy work in total plus ~50 numpy calls
per step). Steps = the longest segment, typically 1-10 readings of one meter per batch. When
only a few meters still have readings (one meter draining a long backlog), the rest of their
readings go through the same arithmetic one by one, which is cheaper than a numpy step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .batch import Batch
from .events import BoolArray, FloatArray, IntArray, Rule, rule_bit
from .params import DAY_MS, MeterParams
from .runs import NO_TS, sat32
from .state import MeterState

_BIT = rule_bit(Rule.BURST)
_SCALAR_BELOW = 4
"""finish the remaining readings one by one once fewer meters than this have any"""


@dataclass(eq=False)
class _Burst:
    """Per-segment burst state, segments ordered longest first (a step's segments are a
    prefix, so the state is worked on through slices)."""

    first: IntArray
    peak: FloatArray
    peak_ts: IntArray
    peak_n: IntArray
    clr: IntArray
    is_open: BoolArray
    qmax: FloatArray  # per segment, or 0-d
    ts: IntArray  # per row, as flow
    flow: FloatArray
    p: MeterParams


def apply_burst(
    b: Batch, p: MeterParams, st: MeterState, *, flow: FloatArray, qmax: FloatArray
) -> None:
    """BURST over a batch's readings that carry values; ``qmax`` per row (or 0-d)."""
    sg = b.sg
    by_len = np.argsort(-sg.lengths, kind="stable")
    neg_len = -sg.lengths[by_len]
    first = sg.first[by_len]
    dev = sg.dev[by_len]
    s = _Burst(
        first=first,
        peak=st.peak[dev],
        peak_ts=st.peak_ts[dev],
        peak_n=st.peak_n[dev].astype(np.int64),
        clr=st.burst_clr[dev].astype(np.int64),
        is_open=b.carried(_BIT)[by_len],
        qmax=qmax if qmax.ndim == 0 else qmax[first],
        ts=b.ts,
        flow=flow,
        p=p,
    )
    ev_rows: list[IntArray] = []
    ev_up: list[BoolArray] = []
    for k in range(int(-neg_len[0])):
        c = int(np.searchsorted(neg_len, -k, side="left"))
        if c < _SCALAR_BELOW:
            rows, up = _scalar_tail(s, c, k, -neg_len[:c])
            ev_rows.append(rows)
            ev_up.append(up)
            break
        r = first[:c] + k
        up, down = _step(s, c, r)
        changed = np.flatnonzero(up | down)
        if len(changed):
            ev_rows.append(r[changed])
            ev_up.append(up[changed])
    if ev_rows:
        rows = np.concatenate(ev_rows)
        b.sink.add(Rule.BURST, b.idx[rows], b.ts[rows], np.concatenate(ev_up), flow[rows])
    st.peak[dev] = s.peak
    st.peak_ts[dev] = s.peak_ts
    st.peak_n[dev] = sat32(s.peak_n)
    st.burst_clr[dev] = sat32(s.clr)
    unsort = np.empty_like(by_len)
    unsort[by_len] = np.arange(len(by_len))
    b.put(_BIT, s.is_open[unsort])


def _step(s: _Burst, c: int, r: IntArray) -> tuple[BoolArray, BoolArray]:
    """The reading ``r`` of each of the first ``c`` segments: (raised, cleared)."""
    ts, flow, p = s.ts, s.flow, s.p
    f = flow[r]
    was = s.is_open[:c]
    q = s.qmax if s.qmax.ndim == 0 else s.qmax[:c]
    # the usual peak decayed to now, only where it can matter (flow > 0, or open): elsewhere
    # flow <= 0 (or NaN) can neither exceed a threshold nor set a new peak
    decayed = np.zeros(c)
    need = np.flatnonzero(((f > 0) | was) & (s.peak_ts[:c] != NO_TS))
    if len(need):
        age = (ts[r[need]] - s.peak_ts[need]) / DAY_MS
        decayed[need] = s.peak[need] * np.power(p.burst_peak_decay_per_day, age)
    learned = s.peak_n[:c] >= p.burst_learn_samples
    thr = np.where(learned, np.minimum(q, p.burst_peak_factor * decayed), q)
    up = ~was & (f > thr)
    below = np.where(was & (f < p.burst_clear_ratio * thr), s.clr[:c] + 1, 0)
    down = below >= p.burst_clear_samples
    s.clr[:c] = np.where(down, 0, below)  # counts only while open
    calm = ~((was | up) & ~down)
    s.is_open[:c] = ~calm
    new_peak = np.flatnonzero(calm & (f > decayed))
    s.peak[new_peak] = f[new_peak]
    s.peak_ts[new_peak] = ts[r[new_peak]]
    s.peak_n[:c] += calm & (f > p.near_zero)
    return up, down


def _scalar_tail(s: _Burst, c: int, k: int, lengths: IntArray) -> tuple[IntArray, BoolArray]:
    """Readings k.. of the first ``c`` segments one by one, with ``_step``'s arithmetic.
    Returns the rows where the alarm changed and whether it was raised there."""
    ts, flow, p = s.ts, s.flow, s.p
    rows: list[int] = []
    ups: list[bool] = []
    base, factor, ratio = p.burst_peak_decay_per_day, p.burst_peak_factor, p.burst_clear_ratio
    for j in range(c):
        q = float(s.qmax if s.qmax.ndim == 0 else s.qmax[j])
        pk, pts, pn = float(s.peak[j]), int(s.peak_ts[j]), int(s.peak_n[j])
        clr, is_open = int(s.clr[j]), bool(s.is_open[j])
        for row in range(int(s.first[j]) + k, int(s.first[j] + lengths[j])):
            f, t = float(flow[row]), int(ts[row])
            decayed = 0.0
            if (f > 0 or is_open) and pts != NO_TS:
                decayed = pk * float(np.power(base, (t - pts) / DAY_MS))
            thr = min(q, factor * decayed) if pn >= p.burst_learn_samples else q
            if is_open:
                clr = clr + 1 if f < ratio * thr else 0
                if clr >= p.burst_clear_samples:
                    is_open, clr = False, 0
                    rows.append(row)
                    ups.append(False)
            elif f > thr:
                is_open = True
                rows.append(row)
                ups.append(True)
            if not is_open:
                if f > decayed:
                    pk, pts = f, t
                if f > p.near_zero:
                    pn += 1
        s.peak[j], s.peak_ts[j], s.peak_n[j], s.clr[j], s.is_open[j] = pk, pts, pn, clr, is_open
    return np.array(rows, np.int64), np.array(ups, np.bool_)
