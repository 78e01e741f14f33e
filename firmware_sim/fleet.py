"""The simulated households and their devices.

Household ``H-0007`` has detector ``D-0007`` and meter ``M-0007`` (when the fleet has that
many of each kind). Every array in the simulation is indexed by the household's position, so
a device's index is its household's index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from firmware_sim.errors import UnknownDeviceError
from firmware_sim.scenario import FleetSpec
from gasguard.fields import Kind

METER_SIZES = ("G1.6", "G2.5", "G4")
_SIZE_WEIGHTS = (0.5, 0.35, 0.15)


@dataclass(frozen=True)
class Device:
    """One simulated device."""

    id: str
    kind: Kind
    index: int
    household: str
    district: str
    meter_size: str | None = None


@dataclass(frozen=True)
class Fleet:
    spec: FleetSpec
    households: tuple[str, ...]
    districts: tuple[str, ...]
    district_of: np.ndarray  # int index into districts, per household
    meter_size_of: tuple[str, ...]  # per household
    detectors: tuple[Device, ...]
    meters: tuple[Device, ...]

    @property
    def size(self) -> int:
        return len(self.households)

    def devices(self) -> tuple[Device, ...]:
        return self.detectors + self.meters

    def of_kind(self, kind: Kind) -> tuple[Device, ...]:
        return self.detectors if kind == "detector" else self.meters

    def device(self, device_id: str) -> Device:
        found = self._by_id().get(device_id)
        if found is None:
            raise UnknownDeviceError(
                f"unknown device {device_id!r}: this simulation has "
                f"{_span(self.detectors)} and {_span(self.meters)}"
            )
        return found

    def household_index(self, household: str) -> int:
        try:
            return self.households.index(household)
        except ValueError:
            raise UnknownDeviceError(
                f"unknown household {household!r}: this simulation has "
                f"{self.households[0]} .. {self.households[-1]}"
            ) from None

    def district_members(self, district: str) -> np.ndarray:
        if district not in self.districts:
            raise UnknownDeviceError(
                f"unknown district {district!r}: known districts are {', '.join(self.districts)}"
            )
        return np.flatnonzero(self.district_of == self.districts.index(district))

    def _by_id(self) -> dict[str, Device]:
        cached: dict[str, Device] | None = self.__dict__.get("_index")
        if cached is None:
            cached = {d.id: d for d in self.devices()}
            object.__setattr__(self, "_index", cached)
        return cached


def _span(devices: tuple[Device, ...]) -> str:
    if not devices:
        return "no " + ("detectors" if not devices else devices[0].kind + "s")
    return f"{devices[0].id} .. {devices[-1].id}"


def build_fleet(spec: FleetSpec, seed: int) -> Fleet:
    """Lay out households over districts and pick meter sizes, reproducibly from the seed."""
    size = max(spec.detectors, spec.meters)
    width = max(4, len(str(size)))
    households = tuple(f"H-{i + 1:0{width}d}" for i in range(size))
    districts = tuple(f"district-{i + 1}" for i in range(spec.districts))
    district_of = (np.arange(size) * spec.districts) // max(size, 1)
    rng = np.random.default_rng([seed, 0xF1EE7])
    if spec.meter_size == "mixed":
        picks = rng.choice(len(METER_SIZES), size=size, p=_SIZE_WEIGHTS)
        sizes = tuple(METER_SIZES[int(p)] for p in picks)
    else:
        sizes = (spec.meter_size,) * size

    def make(kind: Kind, prefix: str, count: int) -> tuple[Device, ...]:
        return tuple(
            Device(
                id=f"{prefix}-{i + 1:0{width}d}",
                kind=kind,
                index=i,
                household=households[i],
                district=districts[int(district_of[i])],
                meter_size=sizes[i] if kind == "meter" else None,
            )
            for i in range(count)
        )

    return Fleet(
        spec=spec,
        households=households,
        districts=districts,
        district_of=district_of,
        meter_size_of=sizes,
        detectors=make("detector", "D", spec.detectors),
        meters=make("meter", "M", spec.meters),
    )
