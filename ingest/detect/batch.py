"""One kernel call's fresh readings, sorted, with the helpers every rule uses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .events import BoolArray, EventSink, FloatArray, IntArray, Rule, rule_bit
from .params import per_device
from .runs import NO_TS, Latched, Segments, Switch, latch, run_began, run_lengths, sat32

U32 = npt.NDArray[np.uint32]


@dataclass(frozen=True, eq=False)
class Batch:
    """Readings sorted by (device, ts) with their segments, the state's open-alarm mask (updated
    in place) and the sink that collects events."""

    sg: Segments
    idx: IntArray
    ts: IntArray
    mask: U32
    sink: EventSink

    @classmethod
    def of(cls, idx: IntArray, ts: IntArray, mask: U32, sink: EventSink) -> Batch:
        return cls(Segments.of(idx), idx, ts, mask, sink)

    @property
    def dev(self) -> IntArray:
        """device of each segment"""
        return self.sg.dev

    @property
    def last(self) -> IntArray:
        """last row of each segment"""
        return self.sg.last

    def param(self, override: FloatArray | None, default: float) -> FloatArray:
        """A parameter per row (its device's override, else the default); 0-d if no override."""
        if override is None:
            return np.array(default, np.float64)
        return self.sg.rows(per_device(override, default, self.sg.dev))

    def carried(self, bit: int) -> BoolArray:
        """Per segment: is ``bit`` set in the device's carried mask?"""
        return np.asarray((self.mask[self.sg.dev] & np.uint32(bit)) != 0, np.bool_)

    def put(self, bit: int, value: BoolArray) -> None:
        """Per segment: set ``bit`` of the device's mask to ``value``."""
        dev = self.sg.dev
        m = self.mask[dev]
        self.mask[dev] = np.where(value, m | np.uint32(bit), m & np.uint32(~bit & 0xFFFFFFFF))

    def emit(self, rule: Rule, lt: Latched, value: FloatArray) -> None:
        """Hand a latch's transitions to the sink; ``value`` per row (or 0-d)."""
        r = lt.rows
        v = value[r] if value.ndim else np.full(len(r), value)
        self.sink.add(rule, self.idx[r], self.ts[r], lt.raised, v)

    def switch(self, rule: Rule, raise_t: BoolArray, clear_t: BoolArray, value: FloatArray) -> None:
        """One hysteresis rule: latch, emit its transitions, store its open flag."""
        bit = rule_bit(rule)
        lt = latch(self.sg, [Switch(raise_t, clear_t, self.carried(bit))])
        self.emit(rule, lt, value)
        self.put(bit, lt.final[0])


def counted_switch(
    b: Batch,
    rule: Rule,
    on: tuple[BoolArray, int, npt.NDArray[np.int32]],
    off: tuple[BoolArray, int, npt.NDArray[np.int32]],
    value: FloatArray,
) -> None:
    """A rule raised by ``on[1]`` readings in a row meeting ``on[0]`` and cleared by ``off[1]``
    in a row meeting ``off[0]`` (the two never hold at once); ``on[2]``/``off[2]`` are the runs
    carried in the state (per device), moved on to the batch's last readings."""
    dev, last = b.dev, b.last
    on_run = run_lengths(b.sg, on[0], on[2][dev])
    off_run = run_lengths(b.sg, off[0], off[2][dev])
    b.switch(rule, on_run >= on[1], off_run >= off[1], value)
    on[2][dev] = sat32(on_run[last])
    off[2][dev] = sat32(off_run[last])


def run_start(
    b: Batch, cond: BoolArray, carried: IntArray, restart: BoolArray | None = None
) -> IntArray:
    """ts where the current run of ``cond`` began (carried from the state when it began
    before this batch); meaningless where ``cond`` is False."""
    carry = (carried[b.dev] != NO_TS).astype(np.int64)
    _, began = run_began(b.sg, cond, carry, restart)
    out = b.ts[np.clip(began, 0, b.sg.n - 1)]
    from_state = np.flatnonzero(began < 0)
    out[from_state] = carried[b.idx[from_state]]
    return out


def within(x: FloatArray, lo: float | FloatArray, hi: float | FloatArray) -> FloatArray:
    """``x`` where it lies in [lo, hi], NaN elsewhere (a value no sensor could report)."""
    return np.where((x >= lo) & (x <= hi), x, np.nan)


def flag(col: npt.ArrayLike | None, order: IntArray) -> BoolArray:
    """An optional flag column in the batch's order: absent means False throughout."""
    if col is None:
        return np.zeros(len(order), np.bool_)
    return np.asarray(col, np.bool_)[order]


def floats(col: npt.ArrayLike | None, order: IntArray) -> FloatArray:
    """An optional number column in the batch's order: absent means NaN throughout."""
    if col is None:
        return np.full(len(order), np.nan)
    return np.asarray(col, np.float64)[order]


def check_batch(idx: IntArray, capacity: int, lengths: dict[str, int]) -> None:
    """Reject a malformed batch before any state changes."""
    n = len(idx)
    bad = {k: v for k, v in lengths.items() if v != n}
    if bad:
        raise ValueError(f"columns differ in length from idx ({n}): {bad}")
    if n and (int(idx.min()) < 0 or int(idx.max()) >= capacity):
        raise IndexError(
            f"device index out of range [0, {capacity}): {int(idx.min())}..{int(idx.max())}"
            " (grow the state first)"
        )
