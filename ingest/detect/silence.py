"""SILENT: a device that stops reporting is itself a hazard (a dead detector protects no one);
and CLOCK_SKEW, a device whose clock runs ahead.

Raised by a reading flagged ``comm_lost`` (the gateway could not read the device) and by
``scan_silence`` (no reading at all for ``silent_factor`` x the expected interval and a grace
for gateway batching and delivery); cleared by
the next reading that carries values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .batch import Batch, check_batch, flag
from .events import BoolArray, Events, EventSink, FloatArray, IntArray, Rule, rule_bit
from .params import HOUR_MS, DetectorParams, MeterParams, per_device
from .runs import NO_TS, order_fresh, run_lengths, sat32
from .state import DetectorState, MeterState

_BIT = rule_bit(Rule.SILENT)


@dataclass(frozen=True, eq=False)
class Fresh:
    """A batch after SILENT: the readings that carry values, for the other rules."""

    batch: Batch | None
    """None when no fresh reading carries values"""
    order: IntArray
    """rows of the input columns, in the batch's order"""
    sink: EventSink
    stale: int
    late: IntArray
    """rows of late readings that carry values, by (device, ts) (see ``order_fresh``)"""


def begin_batch(
    idx: IntArray,
    ts: IntArray,
    comm_lost: npt.ArrayLike | None,
    state: DetectorState | MeterState,
    lengths: dict[str, int],
) -> Fresh:
    """Check a batch, drop replays, sort it by (device, ts), run SILENT over every fresh
    reading and advance ``last_ts``; then set ``comm_lost`` readings aside."""
    check_batch(idx, state.capacity, lengths)
    order, late, stale = order_fresh(idx, ts, state.last_ts)
    late = late[~flag(comm_lost, late)]
    sink = EventSink()
    if len(order) == 0:
        return Fresh(None, order, sink, stale, late)
    comm = flag(comm_lost, order)
    idx, ts = idx[order], ts[order]
    batch = Batch.of(idx, ts, state.open, sink)
    batch.switch(Rule.SILENT, comm, ~comm, np.array(np.nan))
    heard = np.ones(len(idx), np.bool_)  # any reading at all ends NEVER_REPORTED
    batch.switch(Rule.NEVER_REPORTED, ~heard, heard, np.array(np.nan))
    state.last_ts[batch.dev] = ts[batch.last]
    if comm.any():
        keep = ~comm
        order = order[keep]
        if len(order) == 0:
            return Fresh(None, order, sink, stale, late)
        batch = Batch.of(idx[keep], ts[keep], state.open, sink)
    return Fresh(batch, order, sink, stale, late)


def clock_skew(
    b: Batch, clear_samples: int, st: DetectorState | MeterState, ahead: FloatArray
) -> None:
    """CLOCK_SKEW: a reading stamped ahead of ingest's clock beyond the tolerance (``ahead``
    ms, > 0; the consumer judged it at its arrival time) raises it, with the skew in seconds;
    ``clear_samples`` readings in a row within the tolerance clear it."""
    skewed = ahead > 0
    ok_run = run_lengths(b.sg, ahead == 0, st.cs_ok[b.dev])
    b.switch(Rule.CLOCK_SKEW, skewed, ok_run >= clear_samples, ahead / 1000.0)
    st.cs_ok[b.dev] = sat32(ok_run[b.last])


def scan_silence(
    state: DetectorState | MeterState, now_ms: int, params: DetectorParams | MeterParams
) -> Events:
    """Raise SILENT (at ``now_ms``) for every device that has reported at least once, whose
    last reading of any kind is older than ``silent_factor`` x its expected interval plus
    ``silent_grace_ms`` (a reading due now may still be on its way), and whose
    SILENT alarm is not open yet. Updates ``state`` in place; value = seconds since the last
    reading. Call it periodically (e.g. every expected interval) with the consumer's clock.
    """
    cap = state.capacity
    expected = per_device(
        params.expected_interval_ms_by_device, params.expected_interval_ms, np.arange(cap)
    )
    last = state.last_ts
    reported = last != NO_TS
    age = np.where(reported, np.int64(now_ms) - np.where(reported, last, 0), 0)
    silent = (
        reported
        & ((state.open & np.uint32(_BIT)) == 0)
        & (age > params.silent_factor * expected + params.silent_grace_ms)
    )
    dev = np.flatnonzero(silent)
    state.open[dev] |= np.uint32(_BIT)
    return Events(
        idx=dev,
        ts=np.full(len(dev), now_ms, np.int64),
        rule=np.full(len(dev), int(Rule.SILENT), np.int16),
        raised=np.ones(len(dev), np.bool_),
        value=age[dev] / 1000.0,
    )


def scan_never_reported(
    state: DetectorState | MeterState, now_ms: int, since_ms: IntArray, after_ms: float
) -> Events:
    """Raise NEVER_REPORTED (at ``now_ms``) for every device that has not sent one reading,
    with ``since_ms`` (per device: its registration, or when ingest started without a saved
    state if later; NO_TS: not a device of this state's kind) more than ``after_ms`` ago, once;
    its first reading clears it (``begin_batch``). Value: hours since ``since_ms``."""
    since = np.asarray(since_ms, np.int64)[: state.capacity]
    have = np.flatnonzero(since != NO_TS)
    age = np.int64(now_ms) - since[have]
    bit = np.uint32(rule_bit(Rule.NEVER_REPORTED))
    due = (state.last_ts[have] == NO_TS) & ((state.open[have] & bit) == 0) & (age > after_ms)
    dev, age = have[due], age[due]
    state.open[dev] |= bit
    return Events(
        idx=dev,
        ts=np.full(len(dev), now_ms, np.int64),
        rule=np.full(len(dev), int(Rule.NEVER_REPORTED), np.int16),
        raised=np.ones(len(dev), np.bool_),
        value=age / HOUR_MS,
    )


def district_incidents(
    open_pressure_low: BoolArray,
    district: IntArray,
    min_share: float = 0.3,
    min_count: int = 3,
) -> IntArray:
    """Districts where supply pressure is low at many meters at once: one network incident,
    not many household leaks. ``open_pressure_low`` and ``district`` are per meter (e.g.
    ``state.is_open(Rule.PRESSURE_LOW)`` and the registry's district id, negative = unknown).
    A district counts when at least ``min_count`` of its meters, and at least ``min_share`` of
    them, have PRESSURE_LOW open. Returns the district ids, ascending."""
    open_pl = np.asarray(open_pressure_low, np.bool_)
    dist = np.asarray(district, np.int64)
    if open_pl.shape != dist.shape:
        raise ValueError("open_pressure_low and district must have the same shape")
    known = dist >= 0
    if not known.any():
        return np.empty(0, np.int64)
    total = np.bincount(dist[known])
    hit = np.bincount(dist[known & open_pl], minlength=len(total))
    ok = (hit >= min_count) & (hit >= min_share * np.maximum(total, 1))
    return np.flatnonzero(ok).astype(np.int64)
