"""The built-in Modbus TCP client against a scripted device on loopback: answers split across
TCP segments, stray and garbled answers, refusals, timeouts, reconnects, serialised requests."""

from __future__ import annotations

import asyncio
import itertools
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import pytest

from gasguard.profiles import Table, builtin_profile
from gateway.links import PymodbusLink, TcpClient, tcp_link
from gateway.modbus_errors import BadAnswerError, DeviceRefusedError, NoAnswerError
from gateway.modbus_tcp import TcpLink
from gateway.poller import DevicePoller, PollSettings
from tests.conftest import free_port
from tests.gateway.conftest import SimServer

Script = Callable[[bytes], "list[bytes] | Literal['close'] | None"]


def answer_to(request: bytes, *, tid: int | None = None) -> bytes:
    """A correct answer: register ``a`` holds ``a``, coil ``a`` is on when ``a`` is odd."""
    function = request[7]
    address, count = struct.unpack(">HH", request[8:12])
    if function in (1, 2):
        bits = sum(1 << i for i in range(count) if (address + i) % 2)
        data = bits.to_bytes((count + 7) // 8, "little")
        pdu = bytes([function, len(data)]) + data
    elif function in (3, 4):
        data = b"".join(((address + i) & 0xFFFF).to_bytes(2, "big") for i in range(count))
        pdu = bytes([function, len(data)]) + data
    else:
        pdu = request[7:12]
    head = request[:2] if tid is None else tid.to_bytes(2, "big")
    return head + b"\0\0" + (len(pdu) + 1).to_bytes(2, "big") + request[6:7] + pdu


class Device:
    """A Modbus TCP server whose answers the test scripts; each request is answered after
    ``delay`` s as the segments the script returns (10 ms apart), or not at all (None), or
    by closing the connection ("close")."""

    def __init__(self, script: Script | None = None, delay: float = 0.0) -> None:
        self.script: Script = script or (lambda r: [answer_to(r)])
        self.delay = delay
        self.requests: list[bytes] = []
        self.connections = 0
        self.outstanding = 0
        self.most_outstanding = 0
        self.port = free_port()
        self.open: set[asyncio.Transport] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _DeviceConnection(self), port=self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for transport in self.open:
            transport.close()


class _DeviceConnection(asyncio.Protocol):
    def __init__(self, device: Device) -> None:
        self.device = device
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.device.connections += 1
        self.device.open.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.device.open.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        d = self.device
        self.buffer += data
        while len(self.buffer) >= 6 and len(self.buffer) >= 6 + self.buffer[5]:
            size = 6 + self.buffer[5]
            request, self.buffer = self.buffer[:size], self.buffer[size:]
            d.requests.append(request)
            d.outstanding += 1
            d.most_outstanding = max(d.most_outstanding, d.outstanding)
            asyncio.get_running_loop().call_later(d.delay, self._answer, request)

    def _answer(self, request: bytes) -> None:
        self.device.outstanding -= 1
        answer = self.device.script(request)
        if answer == "close":
            self.transport.close()
            return
        loop = asyncio.get_running_loop()
        for i, segment in enumerate(answer or ()):
            loop.call_later(i * 0.01, self.transport.write, segment)


def run(device: Device, test: Callable[[TcpLink], Awaitable[None]]) -> None:
    async def main() -> None:
        await device.start()
        link = TcpLink("127.0.0.1", device.port)
        try:
            await test(link)
        finally:
            await link.close()
            await device.stop()

    asyncio.run(main())


def test_reads_return_what_the_device_answered_over_one_connection() -> None:
    device = Device()

    async def test(link: TcpLink) -> None:
        assert await link.read(1, Table.INPUT, 0, 7, 1.0) == [0, 1, 2, 3, 4, 5, 6]
        assert await link.read(1, Table.HOLDING, 65533, 3, 1.0) == [65533, 65534, 65535]
        assert await link.read(1, Table.COIL, 0, 10, 1.0) == [0, 1] * 5
        assert await link.read(1, Table.DISCRETE, 7, 1, 1.0) == [1]

    run(device, test)
    assert device.connections == 1
    assert [r[:2] for r in device.requests] == [b"\0\1", b"\0\2", b"\0\3", b"\0\4"]


@pytest.mark.parametrize("cuts", [[1], [3, 9], list(range(1, 23))], ids=["1+", "3+6+", "bytes"])
def test_an_answer_split_across_tcp_segments_is_reassembled(cuts: list[int]) -> None:
    def script(request: bytes) -> list[bytes]:
        answer = answer_to(request)
        edges = [0, *cuts, len(answer)]
        return [answer[a:b] for a, b in itertools.pairwise(edges) if a < b]

    async def test(link: TcpLink) -> None:
        assert await link.read(1, Table.INPUT, 0, 7, 1.0) == list(range(7))
        assert await link.read(1, Table.INPUT, 100, 7, 1.0) == list(range(100, 107))

    run(Device(script), test)


def test_an_answer_to_another_transaction_fails_and_the_next_request_reconnects() -> None:
    device = Device(lambda r: [answer_to(r, tid=int.from_bytes(r[:2], "big") + 1)])

    async def test(link: TcpLink) -> None:
        with pytest.raises(BadAnswerError, match="transaction 2, expected 1"):
            await link.read(1, Table.INPUT, 0, 3, 1.0)
        device.script = lambda r: [answer_to(r)]
        assert await link.read(1, Table.INPUT, 0, 3, 1.0) == [0, 1, 2]

    run(device, test)
    assert device.connections == 2


def test_a_refusal_names_the_request_and_keeps_the_connection() -> None:
    device = Device(lambda r: [r[:4] + b"\0\3" + r[6:7] + bytes([r[7] | 0x80, 2])])

    async def test(link: TcpLink) -> None:
        with pytest.raises(DeviceRefusedError) as refused:
            await link.read(4, Table.INPUT, 9, 2, 1.0)
        assert refused.value.code == 2
        assert str(refused.value) == f"{link.name}: unit 4 read input 9+2: Modbus exception 2"
        device.script = lambda r: [answer_to(r)]
        assert await link.read(4, Table.INPUT, 9, 2, 1.0) == [9, 10]
        assert link.failures == 0

    run(device, test)
    assert device.connections == 1


def test_a_garbled_answer_is_a_clear_error_and_the_next_request_reconnects() -> None:
    device = Device(lambda r: [b"HTTP/1.1 400 Bad Request\r\n\r\n"])

    async def test(link: TcpLink) -> None:
        with pytest.raises(BadAnswerError, match=r"unit 1 read input 0\+3: garbled answer"):
            await link.read(1, Table.INPUT, 0, 3, 1.0)
        device.script = lambda r: [answer_to(r)]
        assert await link.read(1, Table.INPUT, 0, 3, 1.0) == [0, 1, 2]

    run(device, test)
    assert device.connections == 2


def test_a_short_answer_then_silence_times_out_saying_what_arrived() -> None:
    device = Device(lambda r: [answer_to(r)[:5]])

    async def test(link: TcpLink) -> None:
        started = time.monotonic()
        with pytest.raises(NoAnswerError, match=r"within 0\.2 s \(5 bytes of an answer received"):
            await link.read(1, Table.INPUT, 0, 3, 0.2)
        assert 0.2 <= time.monotonic() - started < 0.4

    run(device, test)


def test_a_late_answer_is_never_taken_for_the_next_request() -> None:
    device = Device(delay=0.3)

    async def test(link: TcpLink) -> None:
        with pytest.raises(NoAnswerError, match=r"no answer within 0\.1 s"):
            await link.read(1, Table.INPUT, 0, 3, 0.1)
        device.delay = 0.0
        assert await link.read(1, Table.INPUT, 50, 3, 1.0) == [50, 51, 52]
        await asyncio.sleep(0.3)  # the late answer arrives, on the dropped connection
        assert await link.read(1, Table.INPUT, 60, 3, 1.0) == [60, 61, 62]
        assert (link.requests, link.failures) == (3, 1)

    run(device, test)
    assert device.connections == 2


def test_an_answer_to_no_request_fails_the_next_one_then_the_link_reconnects() -> None:
    device = Device(lambda r: [answer_to(r), answer_to(r)])  # the second one unasked

    async def test(link: TcpLink) -> None:
        assert await link.read(1, Table.INPUT, 0, 3, 1.0) == [0, 1, 2]
        await asyncio.sleep(0.1)
        with pytest.raises(BadAnswerError, match="an answer to no request"):
            await link.read(1, Table.INPUT, 0, 3, 1.0)
        device.script = lambda r: [answer_to(r)]
        assert await link.read(1, Table.INPUT, 0, 3, 1.0) == [0, 1, 2]

    run(device, test)


def test_a_device_that_closes_the_connection_mid_request() -> None:
    device = Device(lambda r: "close")

    async def test(link: TcpLink) -> None:
        with pytest.raises(NoAnswerError, match="connection closed"):
            await link.read(1, Table.INPUT, 0, 3, 1.0)
        device.script = lambda r: [answer_to(r)]
        assert await link.read(1, Table.INPUT, 0, 3, 1.0) == [0, 1, 2]

    run(device, test)
    assert device.connections == 2


def test_a_device_that_is_away_is_reached_on_the_first_request_after_it_is_back() -> None:
    device = Device()

    async def main() -> None:
        link = TcpLink("127.0.0.1", device.port)
        with pytest.raises(NoAnswerError, match="cannot connect"):
            await link.read(1, Table.INPUT, 0, 3, 1.0)
        await device.start()
        assert await link.read(1, Table.INPUT, 0, 3, 1.0) == [0, 1, 2]
        await device.stop()
        await asyncio.sleep(0.05)
        with pytest.raises(NoAnswerError):
            await link.read(1, Table.INPUT, 0, 3, 1.0)
        await device.start()
        assert await link.read(1, Table.INPUT, 0, 3, 1.0) == [0, 1, 2]
        await link.close()
        await device.stop()

    asyncio.run(main())


def test_requests_on_one_link_take_turns() -> None:
    device = Device(delay=0.005)

    async def test(link: TcpLink) -> None:
        got = await asyncio.gather(*(link.read(1, Table.INPUT, i, 2, 2.0) for i in range(20)))
        assert got == [[i, i + 1] for i in range(20)]

    run(device, test)
    assert device.most_outstanding == 1 and len(device.requests) == 20


def test_a_cancelled_request_drops_the_connection() -> None:
    device = Device(delay=0.2)

    async def test(link: TcpLink) -> None:
        task = asyncio.create_task(link.read(1, Table.INPUT, 0, 3, 1.0))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        device.delay = 0.0
        await asyncio.sleep(0.3)
        assert await link.read(1, Table.INPUT, 7, 3, 1.0) == [7, 8, 9]

    run(device, test)
    assert device.connections == 2


def test_writes_are_answered_by_their_echo() -> None:
    device = Device()

    async def test(link: TcpLink) -> None:
        await link.write(1, Table.COIL, 0, [1], 1.0)
        await link.write(1, Table.HOLDING, 10, [7, 8], 1.0)
        with pytest.raises(DeviceRefusedError, match="input is read-only") as refused:
            await link.write(1, Table.INPUT, 0, [1], 1.0)
        assert refused.value.code == 1

    run(device, test)
    assert [r.hex(" ") for r in device.requests] == [
        "00 01 00 00 00 06 01 05 00 00 ff 00",
        "00 02 00 00 00 0b 01 10 00 0a 00 02 04 00 07 00 08",
    ]


def test_a_write_answered_with_another_value_is_a_bad_answer() -> None:
    device = Device(lambda r: [r[:10] + b"\0\0"])

    async def test(link: TcpLink) -> None:
        with pytest.raises(BadAnswerError, match=r"write coil 3=\[1\]: write answer echoes 3/0"):
            await link.write(1, Table.COIL, 3, [1], 1.0)

    run(device, test)


def test_tcp_links_use_the_builtin_client_unless_told_or_rtu_framed() -> None:
    assert isinstance(tcp_link("127.0.0.1", 502, 1.0), TcpLink)
    assert isinstance(tcp_link("127.0.0.1", 502, 1.0, client="pymodbus"), PymodbusLink)
    rtu = tcp_link("127.0.0.1", 502, 1.0, rtu_framing=True, frame_gap_s=0.005)
    assert isinstance(rtu, PymodbusLink) and rtu.name == "rtu-over-tcp://127.0.0.1:502"


@pytest.mark.parametrize(("client", "kind"), [(None, TcpLink), ("pymodbus", PymodbusLink)])
def test_the_config_chooses_the_tcp_client(client: str | None, kind: type) -> None:
    from gateway.app import build_links
    from gateway.config import GatewayConfig

    polling = {"tcp_client": client} if client else {}
    device = {"kind": "meter", "profile": "meter-generic", "host": "127.0.0.1"}
    config = GatewayConfig.model_validate(
        {
            "gateway_id": "GW-T",
            "polling": polling,
            "devices": [
                {"id": "M-1", "transport": "tcp", "port": 1502, **device},
                {"id": "M-2", "transport": "rtu-over-tcp", "port": 1503, **device},
            ],
        }
    )
    links = build_links(config)
    assert isinstance(links["tcp://127.0.0.1:1502"], kind)
    assert isinstance(links["rtu-over-tcp://127.0.0.1:1503"], PymodbusLink)


@pytest.mark.integration
def test_both_tcp_clients_read_the_same_values_from_the_simulated_devices(
    sim_server: Callable[..., SimServer],
) -> None:
    server = sim_server(3, 3)  # six units behind one port

    async def read_all(client: TcpClient) -> dict[str, dict[str, float | bool]]:
        link = tcp_link("127.0.0.1", server.fleet.endpoints[0].port, 2.0, client=client)
        got = {}
        for e in server.fleet.endpoints:
            profile = builtin_profile(e.profile)
            settings = PollSettings(interval=1.0, timeout=1.0)
            poller = DevicePoller(
                e.device.id, e.device.kind, e.unit, profile, link, settings, lambda r, u: None
            )
            got[e.device.id] = await poller.read()
        await link.close()
        return got

    builtin = asyncio.run(read_all("builtin"))
    assert builtin == asyncio.run(read_all("pymodbus"))
    assert builtin["M-0002"]["volume_m3"] == pytest.approx(
        server.values("M-0002")["volume_m3"], abs=0.001
    )
