"""Modbus links: one per physical connection (a TCP socket, a serial bus), each serialising its
own requests. Devices on different links are polled concurrently; devices on one link take
turns, and a serial bus leaves a gap between frames.

Modbus TCP goes through the built-in client (:mod:`gateway.modbus_tcp`); RTU (a serial bus,
or RTU frames through a TCP converter) through pymodbus, which is also the TCP fallback
(``tcp_client="pymodbus"``).

A link (re)connects itself on the next request after a failure, however long the other end
was gone: pymodbus's own reconnect is switched off so there is one policy, here. A timed-out
request drops the connection, so a late answer can never be taken for the next request's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerType
from pymodbus.pdu import ExceptionResponse

from gasguard.profiles import Table
from gateway.modbus_errors import BadAnswerError, DeviceRefusedError, LinkError, NoAnswerError
from gateway.modbus_tcp import TcpLink

log = logging.getLogger(__name__)

TcpClient = Literal["builtin", "pymodbus"]


class ModbusLink(Protocol):
    name: str

    async def read(
        self, unit: int, table: Table, start: int, count: int, timeout: float
    ) -> list[int]: ...

    async def write(
        self, unit: int, table: Table, address: int, values: Sequence[int], timeout: float
    ) -> None: ...

    async def close(self) -> None: ...


class PymodbusLink:
    """A pymodbus client behind a lock, with an optional pause between frames."""

    def __init__(self, name: str, client_factory: Any, frame_gap_s: float = 0.0) -> None:
        self.name = name
        self._factory = client_factory
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None
        self._lock = asyncio.Lock()
        self._gap = frame_gap_s
        self._last_frame = 0.0
        self.requests = 0
        self.failures = 0

    async def _connected(self, timeout: float) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        if self._client is not None and self._client.connected:
            return self._client
        await self._drop()
        client: AsyncModbusTcpClient | AsyncModbusSerialClient = self._factory()
        try:
            async with asyncio.timeout(timeout):
                ok = await client.connect()
        except (TimeoutError, OSError, ModbusException):
            ok = False
        if not ok:
            client.close()
            raise NoAnswerError(f"{self.name}: cannot connect")
        self._client = client
        log.debug("%s: connected", self.name)
        return client

    async def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def _call(self, what: str, timeout: float, request: Any) -> Any:
        async with self._lock:
            if self._gap:
                wait = self._last_frame + self._gap - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            self.requests += 1
            try:
                client = await self._connected(timeout)
                async with asyncio.timeout(timeout):  # cheaper than wait_for: no extra task
                    response = await request(client)
            except (TimeoutError, ModbusException, OSError, NoAnswerError) as exc:
                self.failures += 1
                await self._drop()
                raise NoAnswerError(
                    f"{self.name}: {what}: {str(exc) or type(exc).__name__}"
                ) from None
            finally:
                self._last_frame = time.monotonic()
        if isinstance(response, ExceptionResponse) or response.isError():
            raise DeviceRefusedError(
                int(getattr(response, "exception_code", 0)), f"{self.name}: {what}"
            )
        return response

    async def read(
        self, unit: int, table: Table, start: int, count: int, timeout: float
    ) -> list[int]:
        what = f"unit {unit} read {table.value} {start}+{count}"

        async def request(c: Any) -> Any:
            match table:
                case Table.COIL:
                    return await c.read_coils(start, count=count, device_id=unit)
                case Table.DISCRETE:
                    return await c.read_discrete_inputs(start, count=count, device_id=unit)
                case Table.INPUT:
                    return await c.read_input_registers(start, count=count, device_id=unit)
                case Table.HOLDING:
                    return await c.read_holding_registers(start, count=count, device_id=unit)

        response = await self._call(what, timeout, request)
        if table.holds_bits:
            return [int(b) for b in response.bits[:count]]
        return list(response.registers)

    async def write(
        self, unit: int, table: Table, address: int, values: Sequence[int], timeout: float
    ) -> None:
        what = f"unit {unit} write {table.value} {address}={list(values)}"
        if table not in (Table.COIL, Table.HOLDING):
            raise DeviceRefusedError(1, f"{self.name}: {what}: {table.value} is read-only")

        async def request(c: Any) -> Any:
            if table is Table.COIL:
                if len(values) == 1:
                    return await c.write_coil(address, bool(values[0]), device_id=unit)
                return await c.write_coils(address, [bool(v) for v in values], device_id=unit)
            if len(values) == 1:
                return await c.write_register(address, values[0], device_id=unit)
            return await c.write_registers(address, list(values), device_id=unit)

        await self._call(what, timeout, request)

    async def close(self) -> None:
        async with self._lock:
            await self._drop()


def tcp_link(
    host: str,
    port: int,
    timeout: float,
    rtu_framing: bool = False,
    frame_gap_s: float = 0.0,
    *,
    client: TcpClient = "builtin",
) -> ModbusLink:
    """A Modbus TCP link (RTU frames over TCP with ``rtu_framing``: always pymodbus).

    ``timeout``: the longest any device on this link may take, pymodbus's own transaction
    timeout (each request has its own, which the built-in client alone goes by);
    ``frame_gap_s``: a pause between frames (an RTU bus behind the converter).
    """
    if client == "builtin" and not rtu_framing and not frame_gap_s:
        return TcpLink(host, port)
    framer = FramerType.RTU if rtu_framing else FramerType.SOCKET

    def factory() -> AsyncModbusTcpClient:
        return AsyncModbusTcpClient(
            host,
            port=port,
            framer=framer,
            timeout=timeout,
            retries=0,
            reconnect_delay=0,
            reconnect_delay_max=0,
        )

    scheme = "rtu-over-tcp" if rtu_framing else "tcp"
    return PymodbusLink(f"{scheme}://{host}:{port}", factory, frame_gap_s)


def serial_link(
    port: str, *, baudrate: int, parity: str, stopbits: int, timeout: float, frame_gap_s: float
) -> PymodbusLink:
    def factory() -> AsyncModbusSerialClient:
        return AsyncModbusSerialClient(
            port,
            framer=FramerType.RTU,
            baudrate=baudrate,
            parity=parity,
            stopbits=stopbits,
            timeout=timeout,
            retries=0,
            reconnect_delay=0,
            reconnect_delay_max=0,
        )

    return PymodbusLink(f"rtu://{port}", factory, frame_gap_s)


__all__ = [
    "BadAnswerError",
    "DeviceRefusedError",
    "LinkError",
    "ModbusLink",
    "NoAnswerError",
    "PymodbusLink",
    "TcpClient",
    "serial_link",
    "tcp_link",
]
