"""Segmented helpers over readings sorted by (device, ts).

A batch, once sorted, is a sequence of *segments*: the readings of one device, oldest first.
Every rule is expressed with three tools over those segments, each a handful of whole-array
numpy passes (no Python loop over readings or devices):

- ``run_lengths`` / ``run_began``: for a condition per reading, the length of the current run
  of True at each reading, continuing the run carried in from the device's state (and the row
  where that run began);
- ``Segments.shift_f`` / ``shift_i``: the previous reading's value within the device, or the
  carried one;
- ``latch``: a hysteresis switch (raise trigger sets it, clear trigger resets it, otherwise it
  keeps its value), started from the carried open flag, evaluated only on the readings that
  can change it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from .events import BoolArray, FloatArray, IntArray

_T = TypeVar("_T", bound=np.generic)

NO_TS = np.iinfo(np.int64).min
"""Timestamp sentinel: never (no reading yet, no run in progress)."""

_INT32_MAX = np.iinfo(np.int32).max


def order_fresh(idx: IntArray, ts: IntArray, last_ts: IntArray) -> tuple[IntArray, IntArray, int]:
    """Row order that sorts a batch by (idx, ts), stable, keeping only fresh readings; and the
    late ones apart.

    A reading is stale when its ts is not newer than the device's last processed reading:
    older than or equal to ``last_ts[idx]`` or equal to the previous reading of the same
    device in this batch. Of those, the *late* ones are strictly older than ``last_ts[idx]``
    and not a repeat of the reading before them in the batch: they arrived after a newer
    reading (an outage, a second path, a replayed spool) and are judged by the rules a single
    reading decides. Returns (fresh rows, late rows, number of stale readings), rows in
    (idx, ts) order.
    """
    n = len(idx)
    if n == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), 0
    tmin = int(ts.min())
    span = int(ts.max()) - tmin
    shift_bits = max(span.bit_length(), 1)
    if shift_bits < 62 and int(idx.max()) < (1 << (62 - shift_bits)):
        key = (idx << shift_bits) | (ts - tmin)
        if bool(np.all(key[1:] >= key[:-1])):
            order = np.arange(n, dtype=np.int64)
        else:
            order = np.argsort(key, kind="stable")
    else:  # a span of ts too wide to pack with idx into one key
        order = np.lexsort((ts, idx)).astype(np.int64, copy=False)
    idx_s = idx[order]
    ts_s = ts[order]
    stale = ts_s <= last_ts[idx_s]
    repeat = np.zeros(n, np.bool_)
    repeat[1:] = (idx_s[1:] == idx_s[:-1]) & (ts_s[1:] == ts_s[:-1])
    late = (ts_s < last_ts[idx_s]) & ~repeat
    stale |= repeat
    n_stale = int(np.count_nonzero(stale))
    if n_stale:
        return order[~stale], order[late], n_stale
    return order, np.empty(0, np.int64), 0


_ROOM = 1 << 32
"""virtual positions between segments: room for any carried run (int32) before a segment"""


@dataclass(frozen=True, eq=False)
class Segments:
    """Readings grouped by device, sorted by (device, ts): one segment per device."""

    dev: IntArray
    """device index of each segment"""
    first: IntArray
    """row of each segment's first reading"""
    last: IntArray
    """row of each segment's last reading"""
    lengths: IntArray
    """readings in each segment"""
    pos: IntArray
    """0..n-1"""
    vpos: IntArray
    """virtual position of each row: row + segment x 2**32 (see ``run_lengths``)"""

    @property
    def n(self) -> int:
        return len(self.pos)

    @classmethod
    def of(cls, idx: IntArray) -> Segments:
        n = len(idx)
        is_start = np.ones(n, np.bool_)
        is_start[1:] = idx[1:] != idx[:-1]
        first = np.flatnonzero(is_start)
        last = np.empty_like(first)
        last[:-1] = first[1:] - 1
        last[-1:] = n - 1
        lengths = last - first + 1
        pos = np.arange(n, dtype=np.int64)
        vpos = np.repeat(np.arange(len(first), dtype=np.int64) * _ROOM, lengths)
        vpos += pos
        return cls(dev=idx[first], first=first, last=last, lengths=lengths, pos=pos, vpos=vpos)

    @cached_property
    def start(self) -> IntArray:
        """first row of each row's segment"""
        return self.rows(self.first)

    def rows(self, per_segment: npt.NDArray[_T]) -> npt.NDArray[_T]:
        """A per-segment array broadcast to the rows."""
        return np.repeat(per_segment, self.lengths)

    def seg_of(self, rows: IntArray) -> IntArray:
        """Segment of each of ``rows`` (meant for a few rows)."""
        return np.searchsorted(self.first, rows, side="right") - 1

    def shift_f(self, x: FloatArray, carry: FloatArray) -> FloatArray:
        """The previous reading's ``x`` within each device; ``carry`` (per segment) for the
        first."""
        out = np.empty_like(x)
        out[1:] = x[:-1]
        out[self.first] = carry
        return out

    def shift_i(self, x: IntArray, carry: IntArray) -> IntArray:
        out = np.empty_like(x)
        out[1:] = x[:-1]
        out[self.first] = carry
        return out


def run_lengths(
    sg: Segments,
    cond: BoolArray,
    carry: npt.NDArray[np.int32] | IntArray,
    restart: BoolArray | None = None,
) -> IntArray:
    """Length of the run of True ending at each reading (0 where ``cond`` is False).

    ``carry`` (per segment) is the run carried in from the device's state: a run True at the
    segment's first reading continues it. ``restart`` marks readings that cannot continue the
    previous reading's run (a new run starts there if ``cond``); on a segment's first reading:
    "do not continue the carried run".

    How: the run at a row is its distance from the last break at or before it, found by one
    ``maximum.accumulate``. Breaks are the False rows; a segment whose first row is True gets
    a virtual break ``carry + 1`` positions before it. Positions are virtual (``vpos``: each
    segment 2**32 after the previous) so that a carried run never reaches into the segment
    before.
    """
    vpos = sg.vpos
    a = np.where(cond, np.iinfo(np.int64).min, vpos)
    if restart is not None:
        again = cond & restart
        a[again] = vpos[again] - 1
    f = sg.first
    carry = np.minimum(carry, _INT32_MAX).astype(np.int64)
    if restart is not None:
        carry[restart[f]] = 0
    a[f] = np.where(cond[f], vpos[f] - 1 - carry, vpos[f])
    np.maximum.accumulate(a, out=a)
    np.subtract(vpos, a, out=a)
    return a


def run_began(
    sg: Segments,
    cond: BoolArray,
    carry: npt.NDArray[np.int32] | IntArray,
    restart: BoolArray | None = None,
) -> tuple[IntArray, IntArray]:
    """As ``run_lengths``, and the row where each run began: -1 when it began before this
    batch (the caller takes its start from the state); meaningless where ``cond`` is False."""
    run = run_lengths(sg, cond, carry, restart)
    began = sg.pos - run + 1
    began[began < sg.start] = -1
    return run, began


def sat32(x: IntArray) -> npt.NDArray[np.int32]:
    """A run length for the int32 state (saturating: a run of 2**31 readings stays long)."""
    return np.minimum(x, _INT32_MAX).astype(np.int32)


@dataclass(frozen=True, eq=False)
class Switch:
    """One hysteresis rule over a batch: its triggers and its carried open flag."""

    raise_t: BoolArray
    clear_t: BoolArray
    open0: BoolArray
    """per segment: the flag carried in from the state"""


@dataclass(frozen=True, eq=False)
class Latched:
    rows: IntArray
    """rows where the (combined) flag changed"""
    raised: BoolArray
    """the flag after each of those rows"""
    final: list[BoolArray]
    """per switch, per segment: the flag after the segment's last reading"""


def latch(sg: Segments, switches: list[Switch]) -> Latched:
    """Evaluate hysteresis switches; the reported flag is the OR of them (one alarm fed by
    several branches). A switch's raise and clear triggers must never both hold on one row.

    Only rows that can change the flag are visited: trigger rows in segments that start open or
    raise somewhere. Each switch's value on those rows is the last trigger before it within
    the segment (forward fill by ``maximum.accumulate``), else the carried flag.
    """
    cand = np.zeros(len(sg.first), np.bool_)
    for s in switches:
        cand |= s.open0
        cand[sg.seg_of(np.flatnonzero(s.raise_t))] = True
    if not cand.any():
        return Latched(np.empty(0, np.int64), np.empty(0, np.bool_), [s.open0 for s in switches])
    any_t = switches[0].raise_t | switches[0].clear_t
    for s in switches[1:]:
        any_t |= s.raise_t | s.clear_t
    rows = np.flatnonzero(any_t & sg.rows(cand))
    m = len(rows)
    segs = sg.seg_of(rows)
    new = np.ones(m, np.bool_)
    new[1:] = segs[1:] != segs[:-1]
    j = np.arange(m, dtype=np.int64)
    start = np.maximum.accumulate(np.where(new, j, 0))
    last = np.ones(m, np.bool_)
    last[:-1] = new[1:]
    after = np.zeros(m, np.bool_)
    before = np.zeros(m, np.bool_)
    finals: list[BoolArray] = []
    for s in switches:
        r_t = s.raise_t[rows]
        trig = r_t | s.clear_t[rows]
        a = np.where(trig, j, -1)
        a[new & ~trig] = (j - 1)[new & ~trig]
        b = np.maximum.accumulate(a)
        val = np.where(b < start, s.open0[segs], r_t[b])
        prev = np.empty(m, np.bool_)
        prev[1:] = val[:-1]
        prev[new] = s.open0[segs[new]]
        after |= val
        before |= prev
        fin = s.open0.copy()
        fin[segs[last]] = val[last]
        finals.append(fin)
    changed = after != before
    return Latched(rows[changed], after[changed], finals)
