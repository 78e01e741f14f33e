"""The simulation: every household's detector and meter as numpy arrays, advanced tick by tick.

Physics per tick (``dt`` seconds):

- the meter's flow is the household's demand (see :mod:`firmware_sim.consumption`) plus any
  scenario flow (burst, continuous flow, micro-leak, a leak's gas), or zero while the meter's
  valve or the detector's shut-off valve is closed; the volume register integrates it (forward
  flow only: during a reverse flow the meter shows the negative flow and its register stands);
- the detector reads a low noisy background plus the leak's indoor concentration, which ramps
  up while a leak is active and gas is supplied, and decays (ventilation) once it is not;
- the detector's own alarm output switches on at 10 %LEL and off below 5 %LEL (hysteresis);
- supply pressure is the district's nominal pressure with a little noise, or the scenario's.

Random draws happen in the same order every tick whatever the scenario does, so the same seed
and the same events give the same readings, in real time or fast-forwarded.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from firmware_sim.clock import SimClock
from firmware_sim.errors import SimError
from firmware_sim.fleet import Device, Fleet, build_fleet
from firmware_sim.scenario import Clear, Event, FleetSpec, Scenario
from firmware_sim.scenario import Valve as ValveEvent
from gasguard.fields import FIELDS, Kind

ALARM_ON_LEL = 10.0
ALARM_OFF_LEL = 5.0
NOMINAL_KPA = 2.0  # household low-pressure supply
VENTILATION_TAU_S = 180.0
QMAX_BY_SIZE = {"G1.6": 2.5, "G2.5": 4.0, "G4": 6.0}

log = logging.getLogger(__name__)

Value = float | bool


@dataclass
class _Active:
    event: Event
    households: np.ndarray
    kinds: tuple[Kind, ...]
    until: float | None


@dataclass
class _Effects:
    """Per-household arrays derived from the active events (rebuilt when they change)."""

    leak_rate: np.ndarray
    leak_peak: np.ndarray
    leak_flow: np.ndarray
    extra_flow: np.ndarray
    reverse_flow: np.ndarray
    pressure_to: np.ndarray
    flags: dict[Kind, dict[str, np.ndarray]] = field(default_factory=dict)
    delay_ms: dict[Kind, np.ndarray] = field(default_factory=dict)
    exception: dict[Kind, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Behaviour:
    """How a device answers on the bus right now."""

    silent: bool
    delay_s: float
    exception_code: int


_DEVICE_FLAGS = {
    "sensor_fault": "fault",
    "stuck": "stuck",
    "silent": "silent",
    "tamper": "tamper",
    "end_of_life": "eol",
}


class Simulation:
    """Households with a methane detector and a smart meter, driven by a scenario."""

    def __init__(
        self,
        scenario: Scenario | None = None,
        *,
        fleet: FleetSpec | None = None,
        seed: int | None = None,
        dt: float = 1.0,
        start_ms: int = 1_767_225_600_000,  # 2026-01-01T00:00Z
        utc_offset_hours: float = 8.0,
    ) -> None:
        from firmware_sim.consumption import ConsumptionPattern

        self.scenario = scenario or Scenario()
        self.seed = self.scenario.seed if seed is None else seed
        self.fleet: Fleet = build_fleet(fleet or self.scenario.fleet, self.seed)
        self.clock = SimClock(start_ms=start_ms, dt=dt)
        n = self.fleet.size
        self._qmax = np.array([QMAX_BY_SIZE[s] for s in self.fleet.meter_size_of], dtype=float)
        self._pattern = ConsumptionPattern(self.seed, self._qmax, utc_offset_hours)
        self._offset_s = utc_offset_hours * 3600.0
        self._rng = np.random.default_rng([self.seed, 0x51])
        init = np.random.default_rng([self.seed, 0x1417])
        self.volume = init.uniform(50.0, 5000.0, n).round(3)
        self.battery = init.uniform(70.0, 100.0, n)
        self._nominal_kpa = NOMINAL_KPA + init.uniform(-0.15, 0.15, len(self.fleet.districts))
        self.leak_conc = np.zeros(n)
        self.meter_valve_closed = np.zeros(n, dtype=bool)
        self.detector_valve_closed = np.zeros(n, dtype=bool)
        self.alarm = np.zeros(n, dtype=bool)
        self._decay = math.exp(-dt / VENTILATION_TAU_S)
        self._pending: list[tuple[float, int, Event]] = []
        self._order = 0
        for ev in self.scenario.events:
            self._schedule(ev, ev.at)
        self._active: list[_Active] = []
        self._fx = self._build_effects()
        self.reported: dict[Kind, dict[str, np.ndarray]] = {}
        self.version = 0  # changes whenever what the devices show changes
        self._ids: dict[Kind, np.ndarray] = {
            kind: np.array([d.id for d in self.fleet.of_kind(kind)], dtype=object)
            for kind in ("detector", "meter")
        }
        self._compute(np.zeros((3, n)), base=np.zeros(n))

    # ---------------------------------------------------------------- time

    @property
    def now_ms(self) -> int:
        return self.clock.now_ms

    def step(self) -> None:
        """Advance one tick."""
        self.clock.tick += 1
        self.version += 1
        self._activate_due(self.clock.seconds)
        noise = self._rng.standard_normal((3, self.fleet.size))
        base = self._pattern.demand(self.clock.now_ms / 1000.0)
        self._compute(noise, base)

    def run_for(self, seconds: float) -> None:
        for _ in range(self.clock.ticks_for(seconds)):
            self.step()

    # ---------------------------------------------------------------- events

    def inject(self, event: Event) -> None:
        """Start an event now (its ``at`` counts from now); unknown targets are refused."""
        self._targets(event)
        self._schedule(event, self.clock.seconds + event.at)
        self._activate_due(self.clock.seconds)

    def _schedule(self, event: Event, at: float) -> None:
        self._order += 1
        self._pending.append((at, self._order, event))
        self._pending.sort(key=lambda p: (p[0], p[1]))

    def _targets(self, event: Event) -> tuple[np.ndarray, tuple[Kind, ...]]:
        kinds: tuple[Kind, ...] = ("detector", "meter")
        if event.device is not None:
            dev = self.fleet.device(event.device)
            return np.array([dev.index]), (dev.kind,)
        if event.household is not None:
            return np.array([self.fleet.household_index(event.household)]), kinds
        return self.fleet.district_members(event.district or ""), kinds

    def _activate_due(self, now: float) -> None:
        changed = False
        while self._pending and self._pending[0][0] <= now + 1e-9:
            at, _, event = self._pending.pop(0)
            households, kinds = self._targets(event)
            changed = True
            log.info(
                "%s on %s%s", event.type, event.target,
                f" for {event.duration:g} s" if event.duration is not None else "",
            )  # fmt: skip
            if isinstance(event, Clear):
                self._active = [a for a in self._active if not _overlaps(a, households, kinds)]
                if event.vent:
                    self.leak_conc[households] = 0.0
            elif isinstance(event, ValveEvent):
                for kind in kinds:
                    self._set_valve(kind, households, event.closed)
            else:
                until = None if event.duration is None else at + event.duration
                self._active.append(_Active(event, households, kinds, until))
        before = len(self._active)
        self._active = [a for a in self._active if a.until is None or a.until > now + 1e-9]
        if changed or len(self._active) != before:
            self._fx = self._build_effects()

    def active_events(self) -> list[tuple[Event, float | None]]:
        return [(a.event, a.until) for a in self._active]

    def _build_effects(self) -> _Effects:
        n = self.fleet.size
        fx = _Effects(
            leak_rate=np.zeros(n),
            leak_peak=np.zeros(n),
            leak_flow=np.zeros(n),
            extra_flow=np.zeros(n),
            reverse_flow=np.zeros(n),
            pressure_to=np.full(n, np.nan),
        )
        for kind in ("detector", "meter"):
            fx.flags[kind] = {f: np.zeros(n, dtype=bool) for f in _DEVICE_FLAGS.values()}
            fx.delay_ms[kind] = np.zeros(n)
            fx.exception[kind] = np.zeros(n, dtype=np.int64)
        for a in self._active:
            ev, idx = a.event, a.households
            match ev.type:
                case "gas_leak" | "burst":
                    fx.leak_rate[idx] = np.maximum(fx.leak_rate[idx], ev.rate_lel_per_min)
                    fx.leak_peak[idx] = np.maximum(
                        fx.leak_peak[idx], getattr(ev, "peak_lel", 100.0)
                    )
                    flow = ev.flow_m3h if ev.flow_m3h is not None else 1.5 * self._qmax[idx]
                    target = fx.leak_flow if ev.type == "gas_leak" else fx.extra_flow
                    target[idx] += flow
                case "continuous_flow" | "micro_leak":
                    fx.extra_flow[idx] += ev.flow_m3h
                case "reverse_flow":
                    fx.reverse_flow[idx] = ev.flow_m3h
                case "pressure_drop":
                    fx.pressure_to[idx] = np.fmin(fx.pressure_to[idx], ev.to_kpa)
                case "slow_response":
                    for kind in a.kinds:
                        fx.delay_ms[kind][idx] = ev.delay_ms
                case "modbus_exception":
                    for kind in a.kinds:
                        fx.exception[kind][idx] = ev.code
                case _:
                    for kind in a.kinds:
                        fx.flags[kind][_DEVICE_FLAGS[ev.type]][idx] = True
        return fx

    # ---------------------------------------------------------------- physics

    def _compute(self, noise: np.ndarray, base: np.ndarray) -> None:
        fx, dt = self._fx, self.clock.dt
        supply = ~(self.meter_valve_closed | self.detector_valve_closed)
        leaking = fx.leak_rate > 0
        target = np.where(
            leaking & supply, np.minimum(self.leak_conc + fx.leak_rate * dt / 60, fx.leak_peak), 0.0
        )
        decayed = self.leak_conc * self._decay
        self.leak_conc = np.where(self.leak_conc < target, target, np.maximum(decayed, target))

        flow = np.where(supply, base + fx.extra_flow + np.where(leaking, fx.leak_flow, 0.0), 0.0)
        reversing = (fx.reverse_flow > 0) & supply
        flow = np.where(reversing, -fx.reverse_flow, flow)
        # The register counts forward flow only: while gas runs backwards it stands still (the
        # meter flags reverse_flow instead of counting the household's demand as well).
        self.volume = self.volume + np.clip(flow, 0.0, None) * dt / 3600.0
        pressure = self._nominal_kpa[self.fleet.district_of] + 0.02 * noise[2]
        pressure = np.where(np.isnan(fx.pressure_to), pressure, fx.pressure_to + 0.01 * noise[2])
        self.battery = np.maximum(self.battery - dt * 3e-7, 0.0)

        det_flags, met_flags = fx.flags["detector"], fx.flags["meter"]
        ch4 = np.clip(np.clip(0.4 + 0.25 * noise[0], 0.0, None) + self.leak_conc, 0.0, 100.0)
        ch4 = np.where(det_flags["fault"], 0.0, ch4)
        self.alarm = np.where(self.alarm, ch4 >= ALARM_OFF_LEL, ch4 >= ALARM_ON_LEL)
        if self.fleet.spec.detector_closes_valve_on_alarm:
            self.detector_valve_closed |= self.alarm
        tod = (self.clock.now_ms / 1000.0 + self._offset_s) % 86400.0
        temp = 20.0 + 2.0 * math.sin(2 * math.pi * (tod / 3600.0 - 9.0) / 24.0) + 0.1 * noise[1]

        self._report(
            "detector",
            {
                "ch4_lel": ch4,
                "alarm": self.alarm.copy(),
                "fault": det_flags["fault"].copy(),
                "valve_closed": self.detector_valve_closed.copy(),
                "eol": det_flags["eol"].copy(),
                "temp_c": temp,
            },
        )
        self._report(
            "meter",
            {
                "volume_m3": self.volume.copy(),
                "flow_m3h": flow,
                "pressure_kpa": np.clip(pressure, 0.0, None),
                "valve_closed": self.meter_valve_closed.copy(),
                "battery_pct": self.battery.copy(),
                "tamper": met_flags["tamper"].copy(),
                "reverse_flow": reversing,
            },
        )

    def _report(self, kind: Kind, fresh: dict[str, np.ndarray]) -> None:
        """What the devices show: a stuck device keeps showing its old numbers."""
        old = self.reported.get(kind)
        stuck = self._fx.flags[kind]["stuck"]
        if old is not None and stuck.any():
            for name, spec in FIELDS[kind].items():
                if spec.type == "float" and name in fresh:
                    fresh[name] = np.where(stuck, old[name], fresh[name])
        self.reported[kind] = fresh

    # ---------------------------------------------------------------- devices

    def device(self, device_id: str) -> Device:
        return self.fleet.device(device_id)

    def values(self, device: Device) -> dict[str, Value]:
        """The point values a device shows now, by field name."""
        out: dict[str, Value] = {}
        for name, column in self.reported[device.kind].items():
            v = column[device.index]
            out[name] = bool(v) if column.dtype == bool else float(v)
        return out

    def behaviour(self, device: Device) -> Behaviour:
        fx = self._fx
        return Behaviour(
            silent=bool(fx.flags[device.kind]["silent"][device.index]),
            delay_s=float(fx.delay_ms[device.kind][device.index]) / 1000.0,
            exception_code=int(fx.exception[device.kind][device.index]),
        )

    def write_point(self, device: Device, name: str, value: Value) -> None:
        """A write from the bus; only the valves are writable."""
        if name != "valve_closed":
            raise SimError(f"{device.id}: point {name!r} is not writable")
        self._set_valve(device.kind, np.array([device.index]), bool(value))

    def _set_valve(self, kind: Kind, households: np.ndarray, closed: bool) -> None:
        valves = self.meter_valve_closed if kind == "meter" else self.detector_valve_closed
        valves[households] = closed
        self.version += 1
        self.reported[kind]["valve_closed"] = valves.copy()

    def device_ids(self, kind: Kind) -> np.ndarray:
        return self._ids[kind]

    def answering(self, kind: Kind) -> np.ndarray:
        """Which devices of a kind answer now (not silenced by a scenario)."""
        return ~self._fx.flags[kind]["silent"][: len(self._ids[kind])]

    def readings(self, kind: Kind) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(device ids, field columns) of every device of a kind that is answering now."""
        ids = self._ids[kind]
        answering = self.answering(kind)
        cols = {k: v[: len(ids)][answering] for k, v in self.reported[kind].items()}
        return ids[answering], cols


def _overlaps(active: _Active, households: np.ndarray, kinds: tuple[Kind, ...]) -> bool:
    return bool(np.isin(active.households, households).any()) and bool(
        set(active.kinds) & set(kinds)
    )
