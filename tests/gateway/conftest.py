"""Simulated devices served over real Modbus TCP from a thread of their own, and helpers to run
a gateway against them and a private Mosquitto."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from firmware_sim.engine import Simulation
from firmware_sim.modbus import ModbusFleet
from firmware_sim.scenario import FleetSpec, Scenario, parse_event
from tests.conftest import MOSQUITTO_CONF, Broker, call_in_loop, free_port, free_port_block

T = TypeVar("T")


class SimServer:
    """A simulation whose devices answer on real TCP ports, run by a loop in its own thread.

    The simulation does not advance by itself (values stay put, so what the gateway publishes
    can be compared exactly); a test steps it or injects events through :meth:`call`.
    """

    def __init__(
        self, detectors: int, meters: int, per_device_ports: bool, rtu_framing: bool = False
    ) -> None:
        scenario = Scenario(seed=9, fleet=FleetSpec(detectors=detectors, meters=meters))
        self.sim = Simulation(scenario, start_ms=1_767_250_000_000)
        self.sim.run_for(120)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        port = free_port_block(detectors + meters) if per_device_ports else free_port()
        self.fleet = ModbusFleet(
            self.sim, "127.0.0.1", port, per_device_ports=per_device_ports, rtu_framing=rtu_framing
        )
        asyncio.run_coroutine_threadsafe(self.fleet.start(), self.loop).result(10)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the simulation's thread (the only one that touches it)."""
        return call_in_loop(self.loop, fn)

    def inject(self, event: dict[str, Any]) -> None:
        self.call(lambda: self.sim.inject(parse_event(event)))

    def values(self, device_id: str) -> dict[str, float | bool]:
        return self.call(lambda: self.sim.values(self.sim.device(device_id)))

    def restart(self, down_for: float) -> None:
        """Power-cycle: every port closes, then listens again after ``down_for`` seconds."""
        asyncio.run_coroutine_threadsafe(self.fleet.stop(), self.loop).result(10)
        time.sleep(down_for)
        asyncio.run_coroutine_threadsafe(self.fleet.start(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.fleet.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def sim_server() -> Iterator[Callable[..., SimServer]]:
    servers: list[SimServer] = []

    def make(
        detectors: int = 3,
        meters: int = 3,
        per_device_ports: bool = False,
        rtu_framing: bool = False,
    ) -> SimServer:
        server = SimServer(detectors, meters, per_device_ports, rtu_framing)
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.close()


def gateway_config(
    tmp_path: Path,
    broker: Broker,
    server: SimServer,
    *,
    gateway_id: str = "GW-T",
    interval: float = 0.2,
    timeout: float = 0.3,
    extra: str = "",
    devices: str = "",
    batching: str = "max_readings = 50\nmax_delay_ms = 100",
    transport: str = "tcp",
) -> Path:
    """A config file for every simulated device, polled over Modbus TCP."""
    lines = [
        f'gateway_id = "{gateway_id}"',
        f'state_dir = "{tmp_path / "state"}"',
        f'[broker]\nhost = "{broker.host}"\nport = {broker.port}',
        f"[batching]\n{batching}",
        f"[polling]\ninterval = {interval}\ntimeout = {timeout}\nlost_after = 2\nretry_cap = 1.0",
        extra,
    ]
    for e in server.fleet.endpoints:
        d = e.device
        lines.append(
            f'[[devices]]\nid = "{d.id}"\nkind = "{d.kind}"\nprofile = "{e.profile}"\n'
            f'transport = "{transport}"\nhost = "{e.host}"\nport = {e.port}\nunit = {e.unit}'
        )
    lines.append(devices)
    path = tmp_path / "gateway.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class GatewayThread:
    """A gateway running in its own thread and event loop, as it would in its own process."""

    def __init__(self, config_path: Path) -> None:
        from gateway.app import Gateway
        from gateway.config import load_config

        config, profiles = load_config(config_path)
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        ready = threading.Event()
        self.gateway: Gateway | None = None
        self.error: BaseException | None = None

        async def main() -> None:
            self.stop_event = asyncio.Event()
            self.gateway = Gateway(config, profiles)
            ready.set()
            await self.gateway.run(self.stop_event)

        def run() -> None:
            try:
                self.loop.run_until_complete(main())
            except BaseException as exc:
                self.error = exc
                ready.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10) and self.error is None, self.error

    def call(self, fn: Callable[[], T]) -> T:
        return call_in_loop(self.loop, fn)

    def stop(self) -> None:
        if self.stop_event is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(20)
        assert not self.thread.is_alive(), "gateway did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
def broker_with(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Mosquittos with a listener configured by the test (TLS, ACLs, dynamic security).

    ``make(listener_conf, port=None, start=True)``: ``{folder}`` in the text is the broker's own
    folder; the project's broker tuning follows, as in the ``mosquitto`` fixture.
    """
    brokers: list[Broker] = []

    def make(listener_conf: str, port: int | None = None, start: bool = True) -> Broker:
        port = port or free_port()
        folder = tmp_path / f"broker-{port}"
        folder.mkdir()
        conf = folder / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nuser root\npersistence_location {folder}/\n"
            f"log_dest file {folder}/mosquitto.log\n"
            + listener_conf.replace("{folder}", str(folder))
            + "\n"
            + MOSQUITTO_CONF.read_text()
        )
        broker = Broker("127.0.0.1", port, conf, folder / "mosquitto.log")
        brokers.append(broker)
        if start:
            broker.start()
        return broker

    yield make
    for b in brokers:
        b.stop()


class CuttableProxy:
    """A TCP proxy in front of a broker, run by a loop in its own thread: the test cuts the
    gateway's network (not MQTT) with it. ``swallow`` drops what the gateway sends, so its
    publishes vanish without a PUBACK; ``cut`` closes every connection, and with
    ``refuse=True`` it refuses new ones until ``allow``."""

    def __init__(self, broker: Broker) -> None:
        self.target = (broker.host, broker.port)
        self.port = free_port()
        self.swallow = False
        self._refuse = False
        self._writers: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", self.port), self.loop
        ).result(10)

    @property
    def broker(self) -> Broker:
        """The broker as the gateway's config should name it."""
        return Broker("127.0.0.1", self.port, Path("/dev/null"), Path("/dev/null"))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refuse:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            try:
                while data := await src.read(65536):
                    if not (up and self.swallow):
                        dst.write(data)
                        await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        self._writers -= {writer, up_writer}

    def cut(self, refuse: bool = False) -> None:
        def close_all() -> None:
            self._refuse = refuse
            for w in list(self._writers):
                w.transport.abort()

        self.loop.call_soon_threadsafe(close_all)

    def allow(self) -> None:
        self.loop.call_soon_threadsafe(setattr, self, "_refuse", False)

    def close(self) -> None:
        self.cut(refuse=True)
        self._server.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def proxy() -> Iterator[Callable[[Broker], CuttableProxy]]:
    proxies: list[CuttableProxy] = []

    def make(broker: Broker) -> CuttableProxy:
        p = CuttableProxy(broker)
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.close()
