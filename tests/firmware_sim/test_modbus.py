"""The simulator over real Modbus TCP: a pymodbus client reads every point of both profiles
and gets what the simulation holds; writes reach the simulation; misbehaviour is real."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException

from firmware_sim.engine import Simulation
from firmware_sim.errors import PortInUseError
from firmware_sim.modbus import Endpoint, ModbusFleet
from firmware_sim.scenario import FleetSpec, Scenario, parse_event
from gasguard.profiles import Profile, RegisterMap, Table, builtin_profile
from tests.conftest import free_port, free_port_block

pytestmark = pytest.mark.integration


def make_sim(*events: dict[str, object]) -> Simulation:
    scenario = Scenario(
        seed=11,
        fleet=FleetSpec(detectors=3, meters=3, districts=1),
        events=tuple(parse_event(e) for e in events),
    )
    sim = Simulation(scenario, start_ms=1_767_250_000_000)  # mid-morning: households cook
    sim.run_for(600)
    return sim


async def read_all(
    client: AsyncModbusTcpClient, endpoint: Endpoint, profile: Profile
) -> dict[str, float | bool]:
    """What a gateway does: read each table in blocks, decode through the profile."""
    rmap = RegisterMap(profile)
    values: dict[str, float | bool] = {}
    for table in Table:
        for start, count in rmap.read_blocks(table):
            unit = endpoint.unit
            match table:
                case Table.COIL:
                    r = await client.read_coils(start, count=count, device_id=unit)
                case Table.DISCRETE:
                    r = await client.read_discrete_inputs(start, count=count, device_id=unit)
                case Table.INPUT:
                    r = await client.read_input_registers(start, count=count, device_id=unit)
                case Table.HOLDING:
                    r = await client.read_holding_registers(start, count=count, device_id=unit)
            assert not r.isError(), f"{endpoint.device.id} {table} {start}+{count}: {r}"
            raw = [int(b) for b in r.bits[:count]] if table.holds_bits else r.registers
            values.update(rmap.decode(table, start, raw))
    return values


def assert_matches(
    got: Mapping[str, float | bool], held: Mapping[str, float | bool], profile: Profile
) -> None:
    for point in profile.points:
        want = held[point.name]
        if isinstance(want, bool):
            assert got[point.name] is want, point.name
        elif point.type == "f32":
            assert got[point.name] == pytest.approx(want, rel=1e-6, abs=1e-9), point.name
        else:
            assert got[point.name] == pytest.approx(want, abs=abs(point.scale) / 2 + 1e-9), (
                point.name
            )


async def serve(sim: Simulation, **kwargs: object) -> AsyncIterator[ModbusFleet]:
    fleet = ModbusFleet(sim, "127.0.0.1", free_port(), **kwargs)  # type: ignore[arg-type]
    await fleet.start()
    try:
        yield fleet
    finally:
        await fleet.stop()


def client_for(endpoint: Endpoint, timeout: float = 2.0) -> AsyncModbusTcpClient:
    return AsyncModbusTcpClient(endpoint.host, port=endpoint.port, timeout=timeout, retries=0)


def test_every_point_of_both_profiles_reads_what_the_simulation_holds() -> None:
    async def run() -> None:
        sim = make_sim(
            {"device": "D-0002", "type": "gas_leak", "rate_lel_per_min": 4.0},
            {"device": "M-0003", "type": "tamper"},
            {"device": "M-0002", "type": "reverse_flow"},
            {"device": "D-0003", "type": "end_of_life"},
        )
        sim.run_for(300)  # the leak has alarmed by now
        async for fleet in serve(sim):
            assert {e.port for e in fleet.endpoints} == {fleet.endpoints[0].port}  # one port, units
            client = client_for(fleet.endpoints[0])
            await client.connect()
            for endpoint in fleet.endpoints:
                profile = fleet.profiles[endpoint.device.kind]
                got = await read_all(client, endpoint, profile)
                assert_matches(got, sim.values(endpoint.device), profile)
            client.close()
        assert sim.values(sim.device("D-0002"))["alarm"] is True
        assert sim.values(sim.device("M-0003"))["tamper"] is True

    asyncio.run(run())


def _variant(profile: Profile, tmp_path: Path, byte_order: str, word_order: str) -> Profile:
    from gasguard.profiles import load_profile

    text = Path(profile.source).read_text()
    text = text.replace('byte_order = "big"', f'byte_order = "{byte_order}"', 1)
    text = text.replace('word_order = "big"', f'word_order = "{word_order}"')
    path = tmp_path / f"{profile.name}-{byte_order}-{word_order}.toml"
    path.write_text(text)
    return load_profile(path)


@pytest.mark.parametrize("byte_order", ["big", "little"])
@pytest.mark.parametrize("word_order", ["big", "little"])
def test_byte_and_word_orders_are_served_as_the_profile_says(
    tmp_path: Path, byte_order: str, word_order: str
) -> None:
    meter = _variant(builtin_profile("meter-generic"), tmp_path, byte_order, word_order)
    detector = _variant(builtin_profile("detector-generic"), tmp_path, byte_order, word_order)
    assert (
        meter.byte_order == byte_order
        and meter.word_order_of(meter.point("volume_m3")) == word_order
    )

    async def run() -> None:
        sim = make_sim({"device": "M-0001", "type": "continuous_flow", "flow_m3h": 1.234})
        async for fleet in serve(sim, profiles={"meter": meter, "detector": detector}):
            client = client_for(fleet.endpoints[0])
            await client.connect()
            for endpoint in fleet.endpoints:
                profile = fleet.profiles[endpoint.device.kind]
                assert_matches(
                    await read_all(client, endpoint, profile), sim.values(endpoint.device), profile
                )
            # the raw words really are in the configured order
            m1 = fleet.endpoint("M-0001")
            raw = (await client.read_input_registers(0, count=2, device_id=m1.unit)).registers
            volume = round(float(sim.values(sim.device("M-0001"))["volume_m3"]) * 1000)
            data = volume.to_bytes(4, "big")
            words = [data[0:2], data[2:4]] if word_order == "big" else [data[2:4], data[0:2]]
            assert raw == [int.from_bytes(w, byte_order) for w in words]  # type: ignore[arg-type]
            client.close()

    asyncio.run(run())


def test_writing_the_valve_coil_closes_the_valve_in_the_simulation() -> None:
    async def run() -> None:
        sim = make_sim({"device": "M-0001", "type": "continuous_flow", "flow_m3h": 0.5})
        async for fleet in serve(sim):
            m1, d2 = fleet.endpoint("M-0001"), fleet.endpoint("D-0002")
            client = client_for(m1)
            await client.connect()
            assert not (await client.write_coil(0, True, device_id=m1.unit)).isError()
            assert not (await client.write_coil(0, True, device_id=d2.unit)).isError()
            assert (await client.read_coils(0, count=1, device_id=m1.unit)).bits[0] is True
            sim.step()
            assert sim.values(sim.device("M-0001"))["valve_closed"] is True
            assert sim.values(sim.device("M-0001"))["flow_m3h"] == 0.0
            assert sim.values(sim.device("D-0002"))["valve_closed"] is True
            # read-only points refuse writes with ILLEGAL ADDRESS
            r = await client.write_register(0, 5, device_id=m1.unit)
            assert r.isError() and r.exception_code == 2
            client.close()

    asyncio.run(run())


def test_silent_slow_and_failing_devices_misbehave_on_the_wire() -> None:
    async def run() -> None:
        sim = make_sim(
            {"device": "D-0001", "type": "silent"},
            {"device": "M-0001", "type": "slow_response", "delay_ms": 700},
            {"device": "D-0002", "type": "modbus_exception", "code": 6},
        )
        sim.step()
        async for fleet in serve(sim):
            client = client_for(fleet.endpoints[0], timeout=0.5)
            await client.connect()
            with pytest.raises(ModbusIOException):
                await client.read_input_registers(
                    0, count=3, device_id=fleet.endpoint("D-0001").unit
                )
            r = await client.read_input_registers(
                0, count=3, device_id=fleet.endpoint("D-0002").unit
            )
            assert r.isError() and r.exception_code == 6
            client.close()
            slow = client_for(fleet.endpoints[0], timeout=3.0)
            await slow.connect()
            t0 = time.monotonic()
            r = await slow.read_input_registers(0, count=7, device_id=fleet.endpoint("M-0001").unit)
            assert not r.isError() and time.monotonic() - t0 >= 0.65
            # the others answer at once
            t0 = time.monotonic()
            assert not (
                await slow.read_input_registers(0, count=7, device_id=fleet.endpoint("M-0002").unit)
            ).isError()
            assert time.monotonic() - t0 < 0.5
            r = await slow.read_input_registers(0, count=3, device_id=200)  # nobody at that unit
            assert r.isError() and r.exception_code == 0x0B
            slow.close()

    asyncio.run(run())


def test_one_port_per_device() -> None:
    async def run() -> None:
        sim = make_sim()
        base = free_port_block(6)
        fleet = ModbusFleet(sim, "127.0.0.1", base, per_device_ports=True)
        await fleet.start()
        try:
            assert sorted(e.port for e in fleet.endpoints) == list(range(base, base + 6))
            assert {e.unit for e in fleet.endpoints} == {1}
            for endpoint in fleet.endpoints:
                client = client_for(endpoint)
                await client.connect()
                profile = fleet.profiles[endpoint.device.kind]
                assert_matches(
                    await read_all(client, endpoint, profile), sim.values(endpoint.device), profile
                )
                client.close()
        finally:
            await fleet.stop()

    asyncio.run(run())


def test_a_port_in_use_is_a_clear_error() -> None:
    async def run() -> None:
        sim = make_sim()
        first = ModbusFleet(sim, "127.0.0.1", free_port())
        await first.start()
        try:
            second = ModbusFleet(sim, "127.0.0.1", first.endpoints[0].port)
            with pytest.raises(PortInUseError, match=rf"127.0.0.1:{first.endpoints[0].port}"):
                await second.start()
        finally:
            await first.stop()

    asyncio.run(run())
