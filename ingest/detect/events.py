"""Rules, their severities, and the events (alarm raised / cleared) a kernel returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import numpy.typing as npt

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


class Rule(IntEnum):
    """Detection rules. The value is stored (events, database); never renumber."""

    GAS_LOW = 1
    GAS_HIGH = 2
    GAS_RISING = 3
    SENSOR_FAULT = 4
    SILENT = 5
    BURST = 6
    CONTINUOUS_FLOW = 7
    MICRO_LEAK = 8
    PRESSURE_LOW = 9
    VALVE_FAULT = 10
    TAMPER = 11
    REVERSE_FLOW = 12
    # 13 and 14 are the micro-leak's internal bits in the open mask (state.py)
    PRESSURE_HIGH = 15
    CLOCK_SKEW = 16
    METER_MISMATCH = 17
    BATTERY_LOW = 18
    NEVER_REPORTED = 19
    GAS_PRESENT = 20


class Severity(IntEnum):
    MINOR = 1
    MAJOR = 2
    CRITICAL = 3


SEVERITY: dict[Rule, Severity] = {
    Rule.GAS_LOW: Severity.MAJOR,
    Rule.GAS_HIGH: Severity.CRITICAL,
    Rule.GAS_RISING: Severity.MAJOR,
    Rule.SENSOR_FAULT: Severity.MINOR,
    Rule.SILENT: Severity.MINOR,
    Rule.BURST: Severity.CRITICAL,
    Rule.CONTINUOUS_FLOW: Severity.MAJOR,
    Rule.MICRO_LEAK: Severity.MINOR,
    Rule.PRESSURE_LOW: Severity.MAJOR,
    Rule.VALVE_FAULT: Severity.CRITICAL,  # gas passing a closed valve
    Rule.TAMPER: Severity.MINOR,
    Rule.REVERSE_FLOW: Severity.MINOR,
    Rule.PRESSURE_HIGH: Severity.MAJOR,
    Rule.CLOCK_SKEW: Severity.MINOR,
    Rule.METER_MISMATCH: Severity.MINOR,
    Rule.BATTERY_LOW: Severity.MAJOR,  # the valve may soon be unable to close
    Rule.NEVER_REPORTED: Severity.MINOR,
    Rule.GAS_PRESENT: Severity.MAJOR,
}

DETECTOR_RULES: tuple[Rule, ...] = (
    Rule.GAS_LOW,
    Rule.GAS_HIGH,
    Rule.GAS_RISING,
    Rule.GAS_PRESENT,
    Rule.SENSOR_FAULT,
    Rule.SILENT,
    Rule.CLOCK_SKEW,
    Rule.NEVER_REPORTED,
)
METER_RULES: tuple[Rule, ...] = (
    Rule.SILENT,
    Rule.BURST,
    Rule.CONTINUOUS_FLOW,
    Rule.MICRO_LEAK,
    Rule.PRESSURE_LOW,
    Rule.VALVE_FAULT,
    Rule.TAMPER,
    Rule.REVERSE_FLOW,
    Rule.SENSOR_FAULT,
    Rule.PRESSURE_HIGH,
    Rule.CLOCK_SKEW,
    Rule.METER_MISMATCH,
    Rule.BATTERY_LOW,
    Rule.NEVER_REPORTED,
)
MASK = np.uint32
"""dtype of a device's open-alarm mask (bit ``1 << rule``)"""

_SEVERITY_LUT = np.zeros(max(Rule) + 1, dtype=np.int8)
for _rule, _sev in SEVERITY.items():
    _SEVERITY_LUT[_rule] = _sev


def severity_of(rule: npt.ArrayLike) -> npt.NDArray[np.int8]:
    """Severity (as ``Severity`` values) of an array of rule ids."""
    return _SEVERITY_LUT[np.asarray(rule, dtype=np.int64)]


def rule_bit(rule: int) -> int:
    """The bit of a rule in a state's ``open`` mask."""
    return 1 << int(rule)


@dataclass(frozen=True, eq=False)
class Events:
    """Alarms raised and cleared by one kernel call (or several, see ``concat``).

    One row per transition, ordered by (ts, idx, rule). ``ts`` is the timestamp of the
    reading that caused it (for ``scan_silence``: the scan time); ``value`` is the evidence at
    that reading (CH4 %LEL for gas and detector faults, flow m3/h for meter rules, pressure kPa
    for PRESSURE_LOW, seconds since the last reading for a silence scan, NaN for SILENT raised
    or cleared by a reading). ``stale`` counts readings ignored as replays (ts not newer than
    the device's last processed reading). Device indexes are per device kind: do not mix the
    events of detectors and meters in one ``concat``.
    """

    idx: IntArray
    ts: IntArray
    rule: npt.NDArray[np.int16]
    raised: BoolArray
    value: FloatArray
    stale: int = field(default=0)

    def __len__(self) -> int:
        return len(self.idx)

    @classmethod
    def empty(cls, stale: int = 0) -> Events:
        return cls(
            idx=np.empty(0, np.int64),
            ts=np.empty(0, np.int64),
            rule=np.empty(0, np.int16),
            raised=np.empty(0, np.bool_),
            value=np.empty(0, np.float64),
            stale=stale,
        )

    @classmethod
    def concat(cls, parts: Sequence[Events]) -> Events:
        """All events of ``parts`` in one object, ordered by (ts, idx, rule); stale summed."""
        stale = sum(p.stale for p in parts)
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty(stale)
        idx = np.concatenate([p.idx for p in parts])
        ts = np.concatenate([p.ts for p in parts])
        rule = np.concatenate([p.rule for p in parts])
        order = np.lexsort((rule, idx, ts))
        return cls(
            idx=idx[order],
            ts=ts[order],
            rule=rule[order],
            raised=np.concatenate([p.raised for p in parts])[order],
            value=np.concatenate([p.value for p in parts])[order],
            stale=stale,
        )

    @property
    def severity(self) -> npt.NDArray[np.int8]:
        return severity_of(self.rule)

    def rows(self) -> list[tuple[int, int, Rule, bool, float]]:
        """The events as plain tuples (idx, ts, rule, raised, value): for tests and logs."""
        return [
            (int(i), int(t), Rule(int(r)), bool(up), float(v))
            for i, t, r, up, v in zip(
                self.idx, self.ts, self.rule, self.raised, self.value, strict=True
            )
        ]


class EventSink:
    """Collects the transitions of one kernel call, rule by rule."""

    def __init__(self) -> None:
        self._parts: list[Events] = []

    def add(
        self, rule: Rule, idx: IntArray, ts: IntArray, raised: BoolArray, value: FloatArray
    ) -> None:
        if len(idx) == 0:
            return
        self._parts.append(
            Events(
                idx=idx.astype(np.int64, copy=False),
                ts=ts.astype(np.int64, copy=False),
                rule=np.full(len(idx), int(rule), np.int16),
                raised=raised.astype(np.bool_, copy=False),
                value=value.astype(np.float64, copy=False),
            )
        )

    def build(self, stale: int) -> Events:
        return Events.concat([*self._parts, Events.empty(stale)])
