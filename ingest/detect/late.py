"""Late readings: a reading older than its device's newest judged one (after an outage, over a
second path, from a spool sent again) is judged too, by the rules a reading decides on its own
or with a few others: gas at the high level, the detector's own alarm flag, gas at the low level
on ``gas_low_samples`` late readings, a burst over Qmax, gas past a closed valve and
over-pressure on as many late readings as the rule needs in time order. (Readings stored before
are not late but repeats: ingest keeps them out of detection, see ``ingest.writer``.)

The run-based rules stay exact over the readings that came in time order; a late reading does
not enter their runs. A late hazard raises its alarm at the reading's own time unless the alarm
is open or the reading is not newer than the rule's latest clear (``until``): it then belongs
to a leak that was alarmed already, and a leak is never alarmed twice. An alarm so raised is
cleared by the next readings in time order that meet the rule's clear condition.
"""

from __future__ import annotations

import numpy as np

from .events import BoolArray, Events, EventSink, FloatArray, IntArray, Rule, rule_bit
from .runs import NO_TS


def late_hits(idx: IntArray, hit: BoolArray, capacity: int, samples: int) -> BoolArray:
    """``hit`` where the device has at least ``samples`` late hits in this batch."""
    if samples <= 1:
        return hit
    return hit & (np.bincount(idx[hit], minlength=capacity)[idx] >= samples)


def raise_late(
    sink: EventSink,
    mask: np.ndarray,
    rule: Rule,
    *,
    rows: tuple[IntArray, IntArray],
    hit: BoolArray,
    value: FloatArray,
    until: IntArray,
) -> None:
    """Raise ``rule`` for the first late reading of each device where ``hit`` holds, the alarm
    is not open and the reading is newer than the rule's latest clear. ``rows`` is (idx, ts)
    of the late readings, sorted by (idx, ts); ``mask`` is the state's open mask (updated)."""
    idx, ts = rows
    if not hit.any():
        return
    bit = np.uint32(rule_bit(rule))
    cleared = until[idx]
    covered = (cleared != NO_TS) & (ts <= cleared)
    cand = np.flatnonzero(hit & ((mask[idx] & bit) == 0) & ~covered)
    if len(cand) == 0:
        return
    first = cand[np.r_[True, idx[cand][1:] != idx[cand][:-1]]]
    sink.add(rule, idx[first], ts[first], np.ones(len(first), np.bool_), value[first])
    mask[idx[first]] |= bit


def track_clears(events: Events, rule: Rule, until: IntArray) -> None:
    """Move each device's latest clear of ``rule`` (``until``, updated in place) to this
    batch's clears."""
    sel = np.flatnonzero((events.rule == int(rule)) & ~events.raised)
    if len(sel):
        np.maximum.at(until, events.idx[sel], events.ts[sel])
