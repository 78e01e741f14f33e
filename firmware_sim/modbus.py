"""Serve the simulated devices as real Modbus TCP servers (pymodbus).

Registers are not copied into pymodbus's datastore: every request is answered from what the
simulation holds at that moment, encoded through the device's profile (the same file the
gateway reads with). A device can be made silent (no answer), slow, or answer with a Modbus
exception by a scenario event.

Two layouts: all devices behind one port, addressed by unit id (a building's Modbus TCP
gateway; 247 units a port, more devices spill onto the next port), or one port per device.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.framer import FramerType
from pymodbus.server import ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import DataType, SimData, SimDevice

from firmware_sim.engine import Simulation
from firmware_sim.errors import PortInUseError
from firmware_sim.fleet import Device
from gasguard.fields import Kind
from gasguard.profiles import (
    Profile,
    RegisterMap,
    Table,
    builtin_profile,
    decode_point,
    load_profile,
)

log = logging.getLogger(__name__)

UNITS_PER_PORT = 247
DEFAULT_PROFILES: dict[Kind, str] = {"detector": "detector-generic", "meter": "meter-generic"}

# Function code -> table. Write requests read back what they wrote, with their own code.
_READ_TABLE = {1: Table.COIL, 5: Table.COIL, 15: Table.COIL, 2: Table.DISCRETE, 4: Table.INPUT}
_READ_TABLE.update((fc, Table.HOLDING) for fc in (3, 6, 16, 22, 23))
_WRITE_TABLE = {
    5: Table.COIL,
    15: Table.COIL,
    6: Table.HOLDING,
    16: Table.HOLDING,
    23: Table.HOLDING,
}


@dataclass(frozen=True)
class Endpoint:
    """Where a technician (or the gateway) finds a simulated device."""

    device: Device
    host: str
    port: int
    unit: int
    profile: str


class SimModbusStore:
    """pymodbus datastore protocol (``async_getValues``/``async_setValues``/``device_ids``)
    answered live from the simulation."""

    def __init__(self, sim: Simulation, units: dict[int, Device], profiles: dict[Kind, Profile]):
        self._sim = sim
        self._units = units
        self._profiles = profiles
        self._maps = {kind: RegisterMap(p) for kind, p in profiles.items()}
        self._cache: dict[str, tuple[int, dict[Table, dict[int, int]]]] = {}

    def device_ids(self) -> list[int]:
        return list(self._units)

    async def _answerable(self, unit: int) -> Device | ExcCodes:
        device = self._units.get(unit)
        if device is None:
            return ExcCodes.GATEWAY_NO_RESPONSE
        how = self._sim.behaviour(device)
        if how.silent:
            raise NoSuchIdException(f"{device.id} is silent")  # pymodbus then sends nothing
        if how.delay_s > 0:
            await asyncio.sleep(how.delay_s)
        if how.exception_code:
            return ExcCodes(how.exception_code)
        return device

    def _image(self, device: Device) -> dict[Table, dict[int, int]]:
        version = self._sim.version
        cached = self._cache.get(device.id)
        if cached is None or cached[0] != version:
            image = self._maps[device.kind].encode(self._sim.values(device))
            cached = self._cache[device.id] = (version, image)
        return cached[1]

    async def async_getValues(  # noqa: N802 - pymodbus's datastore protocol
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        device = await self._answerable(device_id)
        if isinstance(device, ExcCodes):
            return device
        table = _READ_TABLE.get(func_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        registers = self._image(device).get(table, {})
        try:
            values = [registers[a] for a in range(address, address + count)]
        except KeyError:
            return ExcCodes.ILLEGAL_ADDRESS
        if table in (Table.COIL, Table.DISCRETE):
            return [bool(v) for v in values]
        return values

    async def async_setValues(  # noqa: N802 - pymodbus's datastore protocol
        self, device_id: int, func_code: int, address: int, values: Sequence[int] | Sequence[bool]
    ) -> ExcCodes | None:
        device = await self._answerable(device_id)
        if isinstance(device, ExcCodes):
            return device
        table = _WRITE_TABLE.get(func_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        rmap, profile = self._maps[device.kind], self._profiles[device.kind]
        written = dict(
            zip(range(address, address + len(values)), (int(v) for v in values), strict=True)
        )
        points = {p.name: p for a in written for p in rmap.point_at(table, a)}
        if len(points) == 0 or not all(p.writable for p in points.values()):
            return ExcCodes.ILLEGAL_ADDRESS
        current = self._image(device).get(table, {})
        for point in points.values():
            regs = [
                written.get(a, current.get(a, 0))
                for a in range(point.address, point.address + point.register_count)
            ]
            self._sim.write_point(device, point.name, decode_point(point, regs, profile))
        log.info("%s: %s written by a Modbus client", device.id, ", ".join(points))
        return None


def _placeholder() -> SimDevice:
    return SimDevice(0, simdata=SimData(0, values=0, datatype=DataType.REGISTERS))


_ANSWERING: set[asyncio.Task[None]] = set()  # answers being made (a task needs a reference)


class _RequestHandler(ServerRequestHandler):
    """pymodbus's request handler, answering in a task of its own loop. pymodbus 3.16 starts
    each answer with ``run_coroutine_threadsafe`` (made for a loop in another thread): a
    wake-up through the loop's self-pipe per request, ~30 % of the simulator's CPU per
    request when 1,000 devices are polled as fast as they answer (bench/gateway_polls.py)."""

    def handle_later(self) -> None:
        task = self.loop.create_task(self.handle_request())  # type: ignore[no-untyped-call]
        _ANSWERING.add(task)
        task.add_done_callback(_ANSWERING.discard)


class _SimServer(ModbusTcpServer):
    """A pymodbus TCP server whose datastore is the live simulation."""

    def __init__(self, store: SimModbusStore, host: str, port: int, rtu_framing: bool) -> None:
        super().__init__(
            _placeholder(),
            address=(host, port),
            ignore_missing_devices=True,
            framer=FramerType.RTU if rtu_framing else FramerType.SOCKET,
        )
        # pymodbus 3.16 calls only async_getValues/async_setValues/device_ids on its context.
        self.context = store  # type: ignore[assignment]

    def callback_new_connection(self) -> _RequestHandler:
        return _RequestHandler(  # type: ignore[no-untyped-call]
            self, self.trace_packet, self.trace_pdu, self.trace_connect
        )


def resolve_profile(profile: str | Path | Profile) -> Profile:
    """A profile object, a path to a profile file, or the name of a shipped profile."""
    if isinstance(profile, Profile):
        return profile
    if isinstance(profile, Path) or profile.endswith(".toml"):
        return load_profile(profile)
    return builtin_profile(profile)


def layout(
    sim: Simulation, host: str, port: int, per_device_ports: bool, profiles: dict[Kind, str]
) -> list[Endpoint]:
    """Assign every device a (port, unit): household by household, detector then meter."""
    devices = sorted(sim.fleet.devices(), key=lambda d: (d.index, d.kind))
    out = []
    for i, device in enumerate(devices):
        if per_device_ports:
            p, unit = port + i, 1
        else:
            p, unit = port + i // UNITS_PER_PORT, i % UNITS_PER_PORT + 1
        out.append(Endpoint(device, host, p, unit, profiles[device.kind]))
    return out


class ModbusFleet:
    """All Modbus TCP servers of one simulation."""

    def __init__(
        self,
        sim: Simulation,
        host: str = "127.0.0.1",
        port: int = 5020,
        *,
        per_device_ports: bool = False,
        rtu_framing: bool = False,
        profiles: Mapping[Kind, str | Path | Profile] | None = None,
    ) -> None:
        """``rtu_framing``: RTU frames over TCP, like a serial bus behind a transparent
        TCP converter (the gateway's ``rtu-over-tcp`` transport)."""
        chosen = {**DEFAULT_PROFILES, **(profiles or {})}
        self.sim = sim
        self.profiles = {kind: resolve_profile(p) for kind, p in chosen.items()}
        names = {kind: p.name for kind, p in self.profiles.items()}
        self.endpoints = layout(sim, host, port, per_device_ports, names)
        self._servers: list[_SimServer] = []
        self._rtu = rtu_framing

    def endpoint(self, device_id: str) -> Endpoint:
        device = self.sim.device(device_id)
        return next(e for e in self.endpoints if e.device == device)

    async def start(self) -> None:
        by_port: dict[tuple[str, int], dict[int, Device]] = {}
        for e in self.endpoints:
            by_port.setdefault((e.host, e.port), {})[e.unit] = e.device
        try:
            for (host, port), units in by_port.items():
                server = _SimServer(
                    SimModbusStore(self.sim, units, self.profiles), host, port, self._rtu
                )
                try:
                    await server.serve_forever(background=True)
                except RuntimeError:
                    raise PortInUseError(
                        f"cannot listen on {host}:{port} (in use, or not an address of this "
                        "machine); choose another with --port"
                    ) from None
                self._servers.append(server)
        except BaseException:
            await self.stop()
            raise
        log.info("serving %d devices on %d Modbus TCP port(s)", len(self.endpoints), len(by_port))

    async def stop(self) -> None:
        for server in self._servers:
            await server.shutdown()  # type: ignore[no-untyped-call]
        self._servers.clear()
