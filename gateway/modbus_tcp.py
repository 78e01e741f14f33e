"""The built-in Modbus TCP client: one asyncio Protocol per connection, one request at a time.

Why not pymodbus here (STYLE.md prefers libraries): its per-request overhead was the gateway's
bottleneck. Polling 1,000 simulated devices (``bench/gateway_polls.py``, two requests a poll,
this 2-core machine), pymodbus 3.16's async client used 250-300 ms of CPU per 1,000 polls,
which held the gateway's one asyncio thread under ~3,900 polls/s; this client uses ~135 ms
in the same runs (6,500-7,200 polls/s on an otherwise idle machine), and most of that is
asyncio's own cost per wake-up. Modbus TCP is a small, well-specified protocol: the framing
is ~150 lines (:mod:`gateway.modbus_frames`), pinned by tests to pymodbus's own encoding of
the same requests and answers. pymodbus stays for RTU (serial buses and rtu-over-tcp
converters) and is the ``[polling] tcp_client = "pymodbus"`` fallback.

The link behaves like :class:`gateway.links.PymodbusLink`: requests are serialised by a lock,
each has its own timeout, a link (re)connects on the next request after a failure (the
poller's :class:`gasguard.backoff.Backoff` paces the attempts), and any failure but a Modbus
exception drops the connection, so a late or stray answer is never taken for the next
request's. Framing and checks are in :mod:`gateway.modbus_frames`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from collections.abc import Callable, Sequence
from typing import TypeVar, cast

from gasguard.profiles import Table
from gateway.modbus_errors import BadAnswerError, DeviceRefusedError, LinkError, NoAnswerError
from gateway.modbus_frames import (
    HEADER_SIZE,
    check_write,
    decode_read,
    describe,
    frame_size,
    read_request,
    write_request,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

TICK_S = 0.01  # request deadlines are rounded up to this


class _Deadlines:
    """Request timeouts for every connection of one event loop, in buckets of ``TICK_S``
    with one loop timer per bucket instead of one per request (a timer per request cost
    more than a tenth of the client's CPU)."""

    def __init__(self) -> None:
        self._buckets: dict[int, set[_Connection]] = {}

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Deadlines:
        deadlines = _DEADLINES.get(loop)
        if deadlines is None:
            deadlines = _DEADLINES[loop] = cls()
        return deadlines

    def add(
        self, loop: asyncio.AbstractEventLoop, conn: _Connection, timeout: float
    ) -> set[_Connection]:
        """Time out ``conn``'s request after ``timeout`` (up to a tick later); the bucket
        returned is where the connection takes itself out when the answer comes."""
        tick = math.ceil((loop.time() + timeout) / TICK_S)
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = set()
            loop.call_at(tick * TICK_S, self._expire, tick)
        bucket.add(conn)
        return bucket

    def _expire(self, tick: int) -> None:
        for conn in self._buckets.pop(tick, ()):
            conn.timed_out()


_DEADLINES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Deadlines] = (
    weakref.WeakKeyDictionary()
)


class _Connection(asyncio.Protocol):
    """One TCP connection to a Modbus server: reassembles answers split across (or packed
    into) TCP segments and hands each to the request waiting for it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.stray: BadAnswerError | None = None  # what arrived while nothing was asked
        self._buffer = bytearray()
        self._waiter: asyncio.Future[bytes] | None = None
        self._bucket: set[_Connection] | None = None
        self._loop = asyncio.get_running_loop()
        self._deadlines = _Deadlines.of(self._loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        why = f": {exc}" if exc else ""
        self._fail(NoAnswerError(f"connection closed{why}{self.partial()}"))

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        if not buffer and len(data) >= HEADER_SIZE:  # the usual case: one whole answer
            try:
                if frame_size(data) == len(data):
                    self._deliver(data)
                    return
            except BadAnswerError as exc:
                self._garbled(exc)
                return
        buffer += data
        while len(buffer) >= HEADER_SIZE:
            try:
                size = frame_size(buffer)
            except BadAnswerError as exc:
                self._garbled(exc)
                return
            if len(buffer) < size:
                return
            frame = bytes(buffer[:size])
            del buffer[:size]
            self._deliver(frame)

    def send(self, request: bytes, timeout: float) -> asyncio.Future[bytes]:
        """Send a request; the future gets its answer frame, or TimeoutError after
        ``timeout``, or the connection's failure."""
        assert self.transport is not None and self._waiter is None
        waiter: asyncio.Future[bytes] = self._loop.create_future()
        self._waiter = waiter
        self._bucket = self._deadlines.add(self._loop, self, timeout)
        self.transport.write(request)
        return waiter

    def timed_out(self) -> None:
        self._bucket = None
        self._fail(TimeoutError())

    def close(self) -> None:
        self._waiter = None
        self._forget_deadline()
        if self.transport is not None:
            self.transport.close()

    def partial(self) -> str:
        return f" ({len(self._buffer)} bytes of an answer received)" if self._buffer else ""

    def _forget_deadline(self) -> None:
        if self._bucket is not None:
            self._bucket.discard(self)
            self._bucket = None

    def _deliver(self, frame: bytes) -> None:
        waiter, self._waiter = self._waiter, None
        self._forget_deadline()
        if waiter is None or waiter.done():
            self._garbled(BadAnswerError(f"an answer to no request: {frame[:16].hex(' ')}"))
        else:
            waiter.set_result(frame)

    def _garbled(self, error: BadAnswerError) -> None:
        """The byte stream cannot be trusted any more: fail the request, or keep the error
        for the next one, and close the connection."""
        if not self._fail(error):
            self.stray = error
        self.lost = True
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, error: Exception) -> bool:
        waiter, self._waiter = self._waiter, None
        self._forget_deadline()
        if waiter is None or waiter.done():
            return False
        waiter.set_exception(error)
        return True


class TcpLink:
    """A Modbus TCP connection behind a lock (a device's own port, or a TCP gateway's)."""

    def __init__(self, host: str, port: int) -> None:
        self.name = f"tcp://{host}:{port}"
        self._host, self._port = host, port
        self._conn: _Connection | None = None
        self._lock = asyncio.Lock()
        self._tid = 0
        self.requests = 0
        self.failures = 0

    def _next_tid(self) -> int:
        self._tid = self._tid % 0xFFFF + 1  # 1..65535, then around
        return self._tid

    async def read(
        self, unit: int, table: Table, start: int, count: int, timeout: float
    ) -> list[int]:
        request = read_request(self._next_tid(), unit, table, start, count)
        return await self._exchange(request, timeout, decode_read)

    async def write(
        self, unit: int, table: Table, address: int, values: Sequence[int], timeout: float
    ) -> None:
        try:
            request = write_request(self._next_tid(), unit, table, address, values)
        except ValueError as exc:
            what = f"unit {unit} write {table.value} {address}={list(values)}"
            raise DeviceRefusedError(1, f"{self.name}: {what}: {exc}") from None
        await self._exchange(request, timeout, check_write)

    async def close(self) -> None:
        async with self._lock:
            self._drop()

    async def _exchange(
        self, request: bytes, timeout: float, decode: Callable[[bytes, bytes], T]
    ) -> T:
        async with self._lock:
            self.requests += 1
            conn = self._conn
            try:
                if conn is None or conn.lost:
                    conn = await self._connect(timeout)
                answer = await conn.send(request, timeout)
                return decode(answer, request)
            except DeviceRefusedError as exc:  # the device is there and said no
                raise DeviceRefusedError(exc.code, f"{self.name}: {describe(request)}") from None
            except TimeoutError:
                partial = conn.partial() if conn is not None else ""
                error: LinkError = NoAnswerError(f"no answer within {timeout:g} s{partial}")
            except OSError as exc:
                error = NoAnswerError(f"cannot connect: {exc.strerror or exc}")
            except LinkError as exc:
                error = exc
            except BaseException:  # cancelled: the answer may still come, on a closed socket
                self._drop()
                raise
            self.failures += 1
            self._drop()
            raise type(error)(f"{self.name}: {describe(request)}: {error}") from None

    async def _connect(self, timeout: float) -> _Connection:
        old, self._conn = self._conn, None
        if old is not None:
            old.close()
            if old.stray is not None:  # what it sent unasked fails this request
                raise old.stray
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(_Connection, self._host, self._port)
        except TimeoutError:
            raise NoAnswerError(f"cannot connect within {timeout:g} s") from None
        self._conn = conn
        log.debug("%s: connected", self.name)
        return conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


__all__ = ["TcpLink"]
