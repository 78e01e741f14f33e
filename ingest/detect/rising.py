"""GAS_RISING: gas rising as a trend, never on one uptick and never on falling gas.

Over a device's last ``rise_samples`` readings (this one included, the ones before the batch
from the state), all with a plausible CH4, none more than ``rise_max_gap_ms`` after the one
before and spanning at least ``rise_min_span_ms``, the Theil-Sen slope (the median of the
slopes between every pair of readings: one outlier moves it little) must exceed
``rise_per_min`` %LEL a minute, the latest reading must be at ``rise_min_lel`` or more and not
below the one before. It clears after ``rise_clear_samples`` readings in a row that are not
rising and are below ``rise_clear_below`` or have a slope <= 0.

Values enter the window rounded to float32 (CH4 has a 0.1 %LEL resolution), as they are kept
in the state: the result does not depend on where batches end.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from .batch import Batch
from .events import FloatArray, IntArray, Rule
from .params import MINUTE_MS, DetectorParams
from .runs import NO_TS, run_lengths, sat32
from .state import RISE_HISTORY, DetectorState


def window(b: Batch, x: FloatArray, hx: np.ndarray, ht: np.ndarray) -> tuple[FloatArray, IntArray]:
    """Per reading, its value and ts and those of the ``RISE_HISTORY`` readings before it
    (column q: q readings back); before the batch from ``hx``/``ht`` (devices x history)."""
    sg = b.sg
    cols = RISE_HISTORY + 1
    here = sg.pos - sg.start
    xs = np.empty((sg.n, cols))
    ts = np.empty((sg.n, cols), np.int64)
    dev_row = sg.rows(sg.dev)
    for q in range(cols):
        in_batch = here >= q
        back = np.clip(q - here - 1, 0, RISE_HISTORY - 1)
        src = np.maximum(sg.pos - q, 0)
        xs[:, q] = np.where(in_batch, x[src], hx[dev_row, back])
        ts[:, q] = np.where(in_batch, b.ts[src], ht[dev_row, back])
    return xs, ts


def apply_rising(b: Batch, p: DetectorParams, st: DetectorState, *, ch4: FloatArray) -> None:
    x = ch4.astype(np.float32).astype(np.float64)
    xs, ts = window(b, x, st.rise_x, st.rise_ts)
    m = p.rise_samples
    xw, tw = xs[:, :m], ts[:, :m]
    present = (tw != NO_TS).all(axis=1) & ~np.isnan(xw).any(axis=1)
    gaps_ok = (np.where(present[:, None], tw[:, :-1] - tw[:, 1:], 0) <= p.rise_max_gap_ms).all(
        axis=1
    )
    span = np.where(present, tw[:, 0] - tw[:, m - 1], 0)
    valid = present & gaps_ok & (span >= p.rise_min_span_ms)
    slopes = []
    for i, j in combinations(range(m), 2):
        dt = np.where(valid, tw[:, i] - tw[:, j], MINUTE_MS).astype(np.float64)
        slopes.append((xw[:, i] - xw[:, j]) / np.maximum(dt, 1.0) * MINUTE_MS)
    slope = np.where(valid, np.median(np.stack(slopes, axis=1), axis=1), np.nan)
    rising = (slope > p.rise_per_min) & (x >= p.rise_min_lel) & (xs[:, 0] >= xs[:, 1])
    calm = ~rising & ((x < p.rise_clear_below) | (slope <= 0))
    clr_run = run_lengths(b.sg, calm, st.gr_clr[b.dev])
    b.switch(Rule.GAS_RISING, rising, clr_run >= p.rise_clear_samples, ch4)
    st.gr_clr[b.dev] = sat32(clr_run[b.last])
    last = b.last
    st.rise_x[b.dev] = xs[last, :RISE_HISTORY].astype(np.float32)
    st.rise_ts[b.dev] = ts[last, :RISE_HISTORY]
