"""The reading fields of each device kind: the one list that the wire format, the device
profiles, the simulator and (later) the database columns all agree on.

A field is either a number (``float``, engineering units named in the field) or a flag
(``bool``). ``comm_lost`` is set by the gateway when a device stopped answering: such a
reading carries no measured values (numbers are null on the wire, NaN in arrays).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["detector", "meter"]
KINDS: tuple[Kind, ...] = ("detector", "meter")

FieldType = Literal["float", "bool"]


@dataclass(frozen=True)
class Field:
    """One column of a reading batch."""

    name: str
    type: FieldType
    required: bool
    description: str


COMM_LOST = "comm_lost"

_DETECTOR = (
    Field("ch4_lel", "float", True, "methane concentration, % of the lower explosive limit"),
    Field("alarm", "bool", True, "the detector's own alarm output"),
    Field("fault", "bool", False, "the detector reports a sensor fault"),
    Field("valve_closed", "bool", False, "the detector's shut-off valve output is closed"),
    Field("eol", "bool", False, "sensor has reached its end of life"),
    Field("temp_c", "float", False, "temperature, degrees Celsius"),
    Field(COMM_LOST, "bool", False, "the gateway could not read the device"),
)

_METER = (
    Field("volume_m3", "float", True, "cumulative volume through the meter, m3"),
    Field("flow_m3h", "float", True, "flow, m3/h"),
    Field("pressure_kpa", "float", False, "supply pressure at the meter, kPa"),
    Field("valve_closed", "bool", False, "the meter's built-in valve is closed"),
    Field("battery_pct", "float", False, "battery charge, %"),
    Field("tamper", "bool", False, "tamper (case opened, magnet) flag"),
    Field("reverse_flow", "bool", False, "flow through the meter in the reverse direction"),
    Field(COMM_LOST, "bool", False, "the gateway could not read the device"),
)

FIELDS: dict[Kind, dict[str, Field]] = {
    "detector": {f.name: f for f in _DETECTOR},
    "meter": {f.name: f for f in _METER},
}
