"""Scenario files: timed events per device, household or district.

A scenario is a TOML file::

    seed = 7
    [fleet]
    detectors = 20
    meters = 20
    districts = 2

    [[events]]
    at = "10m"            # offset from the start of the simulation
    device = "D-0003"     # or household = "H-0003", or district = "district-1"
    type = "gas_leak"
    rate_lel_per_min = 6.0
    duration = "30m"      # optional: without it the effect lasts until cleared

Every event type and its parameters are the classes below; a bad file is refused with a
message naming the file, the event and the field.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from firmware_sim.errors import ScenarioError
from gasguard.durations import Duration


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    at: Duration = 0.0
    duration: Duration | None = None
    device: str | None = None
    household: str | None = None
    district: str | None = None

    @model_validator(mode="after")
    def _one_target(self) -> _Event:
        given = [n for n in ("device", "household", "district") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                "name exactly one target: device, household or district"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    @property
    def target(self) -> str:
        return self.device or self.household or self.district or ""


class GasLeak(_Event):
    """Gas escapes indoors: CH4 ramps up at the detector, a little extra flow at the meter."""

    type: Literal["gas_leak"]
    rate_lel_per_min: float = Field(5.0, gt=0, le=1000)
    peak_lel: float = Field(60.0, gt=0, le=100)
    flow_m3h: float = Field(0.05, ge=0, le=100)


class Burst(_Event):
    """A burst pipe or a disconnected hose: flow far above the meter's Qmax."""

    type: Literal["burst"]
    flow_m3h: float | None = Field(None, gt=0, le=1000, description="default 1.5 x Qmax")
    rate_lel_per_min: float = Field(30.0, ge=0, le=1000)


class ContinuousFlow(_Event):
    """Flow that never returns to zero (a leak behind the meter, an appliance left on)."""

    type: Literal["continuous_flow"]
    flow_m3h: float = Field(0.3, gt=0, le=100)


class MicroLeak(_Event):
    """A small steady flow, day and night."""

    type: Literal["micro_leak"]
    flow_m3h: float = Field(0.01, gt=0, le=1)


class PressureDrop(_Event):
    """Supply pressure falls (usually a whole district)."""

    type: Literal["pressure_drop"]
    to_kpa: float = Field(0.8, ge=0, le=100)


class SensorFault(_Event):
    """The detector reports a sensor fault and reads zero."""

    type: Literal["sensor_fault"]


class Stuck(_Event):
    """The device keeps answering with the values it had when the event started."""

    type: Literal["stuck"]


class Silent(_Event):
    """The device stops answering altogether."""

    type: Literal["silent"]


class Tamper(_Event):
    """The meter's tamper flag is set (case opened, magnet)."""

    type: Literal["tamper"]


class ReverseFlow(_Event):
    """Gas flows backwards through the meter."""

    type: Literal["reverse_flow"]
    flow_m3h: float = Field(0.2, gt=0, le=100)


class SlowResponse(_Event):
    """The device answers Modbus requests late."""

    type: Literal["slow_response"]
    delay_ms: float = Field(1500.0, ge=0, le=60_000)


class ModbusException(_Event):
    """The device answers every Modbus request with an exception code."""

    type: Literal["modbus_exception"]
    code: Literal[1, 2, 3, 4, 5, 6, 10, 11] = 4


class EndOfLife(_Event):
    """The detector's sensor has reached its end of life."""

    type: Literal["end_of_life"]


class Valve(_Event):
    """Someone closes or opens a valve by hand (meter's, or detector's output)."""

    type: Literal["valve"]
    closed: bool = True


class Clear(_Event):
    """Ends every active event on the target now. Gas already in the home then clears by
    ventilation (minutes); ``vent`` airs the target's homes at once instead (a technician ending
    a test, so that the next test or the hotline's silence is not kept waiting)."""

    type: Literal["clear"]
    vent: bool = False


EVENT_CLASSES = (
    GasLeak, Burst, ContinuousFlow, MicroLeak, PressureDrop, SensorFault, Stuck, Silent,
    Tamper, ReverseFlow, SlowResponse, ModbusException, EndOfLife, Valve, Clear,
)  # fmt: skip
Event = Annotated[
    GasLeak
    | Burst
    | ContinuousFlow
    | MicroLeak
    | PressureDrop
    | SensorFault
    | Stuck
    | Silent
    | Tamper
    | ReverseFlow
    | SlowResponse
    | ModbusException
    | EndOfLife
    | Valve
    | Clear,
    Field(discriminator="type"),
]
EVENT_TYPES: tuple[str, ...] = tuple(
    get_args(cls.model_fields["type"].annotation)[0] for cls in EVENT_CLASSES
)


class FleetSpec(BaseModel):
    """How many devices of each kind, spread over how many districts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    detectors: int = Field(10, ge=0, le=100_000)
    meters: int = Field(10, ge=0, le=100_000)
    districts: int = Field(1, ge=1, le=1000)
    meter_size: Literal["G1.6", "G2.5", "G4", "mixed"] = "mixed"
    detector_closes_valve_on_alarm: bool = False

    @model_validator(mode="after")
    def _some_devices(self) -> FleetSpec:
        if self.detectors + self.meters == 0:
            raise ValueError("a fleet needs at least one detector or meter")
        return self


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "unnamed"
    description: str = ""
    seed: int = 1
    fleet: FleetSpec = FleetSpec()
    events: tuple[Event, ...] = ()


class _EventHolder(BaseModel):
    event: Event


def parse_event(data: dict[str, object]) -> Event:
    """Validate one event (e.g. from ``gasguard sim inject``)."""
    try:
        return _EventHolder.model_validate({"event": data}).event
    except ValidationError as exc:
        raise ScenarioError(_explain(exc, "event", data)) from None


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScenarioError(f"scenario {path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"scenario {path}: not valid TOML: {exc}") from None
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(f"scenario {path}: {_explain(exc, 'scenario', data)}") from None


def _explain(exc: ValidationError, what: str, data: object) -> str:
    """Turn pydantic's errors into lines a technician can act on."""
    lines = []
    for err in exc.errors():
        loc = list(err["loc"])
        where = what
        if len(loc) >= 2 and loc[0] == "events" and isinstance(loc[1], int):
            events = data.get("events", []) if isinstance(data, dict) else []
            kind = events[loc[1]].get("type", "?") if loc[1] < len(events) else "?"
            where = f"event {loc[1] + 1} ({kind})"
            loc = loc[3:]  # drop 'events', index and the discriminator tag
        elif loc and loc[0] == "event":
            loc = loc[2:]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "union_tag_invalid":
            msg = f"unknown event type; known types: {', '.join(EVENT_TYPES)}"
        elif err["type"] == "union_tag_not_found":
            msg = "missing 'type'"
        field = ".".join(str(p) for p in loc)
        lines.append(f"{where}: {field + ': ' if field else ''}{msg}")
    return "; ".join(lines)
