"""Per-device detection state: struct-of-arrays indexed by the dense device index.

Carried values that later readings are compared with (last CH4, last volume, the usual peak)
stay float64: rounding them to float32 would make the result depend on where a batch ends.
Counters are int32 (saturating), timestamps int64 epoch ms (``NO_TS``: none), and the open
alarms one uint32 bit mask per device (bit ``1 << rule``; bits 13, 14 and 30 are internal).
"""

from __future__ import annotations

from typing import ClassVar, Self

import numpy as np
import numpy.typing as npt

from .events import BoolArray, Rule, rule_bit
from .runs import NO_TS

I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
U32 = npt.NDArray[np.uint32]

ML_NIGHT_BIT = 1 << 13
"""internal: the micro-leak's night branch holds (MICRO_LEAK is open while either holds)"""
ML_DAYS_BIT = 1 << 14
"""internal: the micro-leak's never-zero branch holds"""
ML_REGISTER_BIT = 1 << 30
"""internal: the micro-leak's register branch holds"""

FieldSpec = tuple[str, type[np.generic], float | int]
REQUIRED = frozenset({"last_ts", "open"})  # what every saved state has
RISE_HISTORY = 4
"""readings before the latest that GAS_RISING's window keeps (its window is at most 5)"""
WIDTH: dict[str, int] = {"rise_x": RISE_HISTORY, "rise_ts": RISE_HISTORY}
"""fields with a row of values per device (the others have one value)"""


def _shape(name: str, capacity: int) -> tuple[int, ...]:
    width = WIDTH.get(name)
    return (capacity,) if width is None else (capacity, width)


class _State:
    """Common machinery: every field is one array of length ``capacity`` (a few are
    ``capacity`` x ``WIDTH``)."""

    FIELDS: ClassVar[tuple[FieldSpec, ...]]
    last_ts: I64
    open: U32

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, not {capacity}")
        for name, dtype, fill in self.FIELDS:
            setattr(self, name, np.full(_shape(name, capacity), fill, dtype))

    @property
    def capacity(self) -> int:
        return len(self.last_ts)

    @property
    def nbytes(self) -> int:
        return sum(int(getattr(self, name).nbytes) for name, _, _ in self.FIELDS)

    def grow(self, new_capacity: int) -> Self:
        """Make room for devices up to ``new_capacity - 1``; existing devices keep their state.
        Returns self (the arrays are replaced)."""
        old = self.capacity
        if new_capacity < old:
            raise ValueError(f"cannot shrink state from {old} to {new_capacity} devices")
        for name, dtype, fill in self.FIELDS:
            arr = np.full(_shape(name, new_capacity), fill, dtype)
            arr[:old] = getattr(self, name)
            setattr(self, name, arr)
        return self

    def is_open(self, rule: Rule) -> BoolArray:
        """Per device: is ``rule``'s alarm open?"""
        return np.asarray((self.open & np.uint32(rule_bit(rule))) != 0, np.bool_)

    def to_arrays(self) -> dict[str, npt.NDArray[np.generic]]:
        """A copy of every field, for ``np.savez`` or a bytea column."""
        return {name: getattr(self, name).copy() for name, _, _ in self.FIELDS}

    @classmethod
    def from_arrays(cls, arrays: dict[str, npt.NDArray[np.generic]]) -> Self:
        """Rebuild from ``to_arrays()`` output (e.g. loaded from an .npz). A field the saved
        state does not have yet (it was saved by an earlier version) starts at its default."""
        names = {name for name, _, _ in cls.FIELDS}
        missing = sorted(REQUIRED - arrays.keys())
        extra = sorted(arrays.keys() - names)
        if missing or extra:
            raise ValueError(f"{cls.__name__} arrays: missing {missing}, unexpected {extra}")
        lengths = {len(np.asarray(a)) for a in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"{cls.__name__} arrays have different lengths: {sorted(lengths)}")
        state = cls(0)
        n = lengths.pop()
        for name, dtype, fill in cls.FIELDS:
            shape = _shape(name, n)
            if name not in arrays:  # a field newer than the saved state: its default
                setattr(state, name, np.full(shape, fill, dtype))
                continue
            arr = np.asarray(arrays[name])
            if arr.shape != shape or not np.can_cast(arr.dtype, dtype, casting="same_kind"):
                raise ValueError(f"{cls.__name__}.{name}: expected {shape} {dtype.__name__}")
            setattr(state, name, np.array(arr, dtype=dtype))
        return state


class DetectorState(_State):
    """What a methane detector's next readings are judged against."""

    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        ("last_ts", np.int64, NO_TS),  # last processed reading (comm_lost included)
        ("norm_ts", np.int64, NO_TS),  # last reading that carried values
        ("last_ch4", np.float64, np.nan),  # its CH4
        ("open", np.uint32, 0),
        ("gl_hi", np.int32, 0),  # run: CH4 >= gas_low
        ("gl_clr", np.int32, 0),  # run: CH4 < gas_low_clear and no alarm flag
        ("gh_clr", np.int32, 0),  # run: CH4 < gas_high_clear
        ("gr_clr", np.int32, 0),  # run: not rising (CH4 low or rate <= 0)
        ("sf_ok", np.int32, 0),  # run: no fault
        ("same_n", np.int32, 0),  # readings in the current stretch of identical CH4
        ("same_ts", np.int64, NO_TS),  # ts of that stretch's first reading
        ("gl_hist", np.int32, 0),  # CH4 >= gas_low on the last readings (bit 0: the latest)
        ("gl_until", np.int64, NO_TS),  # GAS_LOW's latest clear (late readings: late.py)
        ("gh_until", np.int64, NO_TS),  # GAS_HIGH's
        ("cs_ok", np.int32, 0),  # run: a clock within the tolerance
        ("rise_x", np.float32, np.nan),  # CH4 of the last RISE_HISTORY readings (col 0: latest)
        ("rise_ts", np.int64, NO_TS),  # and their ts
        ("gp_start", np.int64, NO_TS),  # start of the current run of CH4 >= present_lel
        ("gp_clr", np.int32, 0),  # run: CH4 < present_clear
    )
    norm_ts: I64
    last_ch4: F64
    gl_hi: I32
    gl_clr: I32
    gh_clr: I32
    gr_clr: I32
    sf_ok: I32
    same_n: I32
    same_ts: I64
    gl_hist: I32
    gl_until: I64
    gh_until: I64
    cs_ok: I32
    rise_x: npt.NDArray[np.float32]
    rise_ts: I64
    gp_start: I64
    gp_clr: I32


class MeterState(_State):
    """What a gas meter's next readings are judged against."""

    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        ("last_ts", np.int64, NO_TS),
        ("norm_ts", np.int64, NO_TS),
        ("last_volume", np.float64, np.nan),
        ("open", np.uint32, 0),
        ("burst_clr", np.int32, 0),  # while open: run of flow < clear ratio x threshold
        ("peak", np.float64, 0.0),  # usual peak flow as of peak_ts (decays from there)
        ("peak_ts", np.int64, NO_TS),
        ("peak_n", np.int32, 0),  # non-zero non-burst readings seen (peak learned at 100)
        ("flow_start", np.int64, NO_TS),  # start of the current run of flow > near zero
        ("night_start", np.int64, NO_TS),  # start of tonight's run of small flow
        ("pl_lo", np.int32, 0),  # run: pressure < low
        ("pl_hi", np.int32, 0),  # run: pressure >= clear
        ("vf_on", np.int32, 0),  # run: flow while valve closed
        ("vf_off", np.int32, 0),
        ("tamper_off", np.int32, 0),
        ("rf_off", np.int32, 0),
        ("sf_ok", np.int32, 0),
        ("ph_hi", np.int32, 0),  # run: pressure > pressure_high
        ("ph_ok", np.int32, 0),  # run: pressure <= pressure_high_clear
        ("burst_until", np.int64, NO_TS),  # latest clears (late readings: late.py): BURST
        ("vf_until", np.int64, NO_TS),  # VALVE_FAULT (gas past a closed valve)
        ("ph_until", np.int64, NO_TS),  # PRESSURE_HIGH
        ("cs_ok", np.int32, 0),
        ("last_flow", np.float64, np.nan),  # flow of the last reading that carried values
        ("reg_move_ts", np.int64, NO_TS),  # last reading where the register went up
        ("reg_run_ts", np.int64, NO_TS),  # where its current stretch without a still gap began
        ("vc_on", np.int32, 0),  # run: valve reported closed
        ("vc_vol", np.float64, np.nan),  # the register when the valve was first seen closed
        ("mm_bad", np.int32, 0),  # run: register and flow disagree
        ("mm_ok", np.int32, 0),  # run: they agree while gas flows
        ("bl_lo", np.int32, 0),  # run: battery below battery_low
        ("bl_ok", np.int32, 0),  # run: battery at or above battery_low_clear
    )
    norm_ts: I64
    last_volume: F64
    last_flow: F64
    reg_move_ts: I64
    reg_run_ts: I64
    vc_on: I32
    vc_vol: F64
    mm_bad: I32
    mm_ok: I32
    bl_lo: I32
    bl_ok: I32
    burst_clr: I32
    peak: F64
    peak_ts: I64
    peak_n: I32
    flow_start: I64
    night_start: I64
    pl_lo: I32
    pl_hi: I32
    vf_on: I32
    vf_off: I32
    tamper_off: I32
    rf_off: I32
    sf_ok: I32
    ph_hi: I32
    ph_ok: I32
    burst_until: I64
    vf_until: I64
    ph_until: I64
    cs_ok: I32
