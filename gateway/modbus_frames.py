"""Modbus TCP framing for the built-in client: requests encoded, answers checked and decoded.

Pure functions over bytes (no sockets), after the Modbus Application Protocol v1.1b3 and the
Modbus Messaging on TCP/IP Implementation Guide v1.0b. An ADU is the 7-byte MBAP header
(transaction id, protocol id 0, length of what follows including the unit id, unit id) and a
PDU (function code, data). The client asks with function codes 1/2/3/4 (read coils, discrete
inputs, holding and input registers) and 5/6/15/16 (write one coil or register, several coils
or registers); a device refuses with the function code + 0x80 and an exception code.

An answer must carry the request's transaction id, unit id (unless the request went to unit 0)
and function code, and exactly the data asked for; anything else is a
:class:`BadAnswerError`, a refusal a :class:`DeviceRefusedError`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from gasguard.profiles import Table
from gateway.modbus_errors import BadAnswerError, DeviceRefusedError

HEADER = struct.Struct(">HHHB")  # transaction id, protocol id, length, unit id
HEADER_SIZE = HEADER.size  # 7
MAX_ADU = 260  # so the length field is at most 254 (unit id + a PDU of up to 253 bytes)

READ_CODES = {Table.COIL: 1, Table.DISCRETE: 2, Table.HOLDING: 3, Table.INPUT: 4}
MAX_READ = {Table.COIL: 2000, Table.DISCRETE: 2000, Table.HOLDING: 125, Table.INPUT: 125}
MAX_WRITE = {Table.COIL: 1968, Table.HOLDING: 123}

_READ = struct.Struct(">HHHBBHH")  # the whole read request: MBAP, function, start, count
_WRITE_ONE = _READ  # the same layout: MBAP, function, address, value
_WRITE_MANY = struct.Struct(">HHHBBHHB")  # MBAP, function, address, quantity, byte count
_REGISTERS = [struct.Struct(f">{n}H") for n in range(MAX_READ[Table.INPUT] + 1)]
_ECHO = struct.Struct(">HH")  # a write's answer: address, value (5, 6) or quantity (15, 16)
_TABLES = {1: "coil", 2: "discrete", 3: "holding", 4: "input", 5: "coil", 6: "holding"}
_TABLES.update({15: "coil", 16: "holding"})


def read_request(tid: int, unit: int, table: Table, start: int, count: int) -> bytes:
    """A read of ``count`` coils, discrete inputs or registers from ``start``."""
    if not 1 <= count <= MAX_READ[table]:
        raise ValueError(f"a {table.value} read takes 1..{MAX_READ[table]} items, not {count}")
    if not 0 <= start <= 0x10000 - count:
        raise ValueError(f"{table.value} {start}+{count} is outside the address space")
    return _READ.pack(tid, 0, 6, unit, READ_CODES[table], start, count)


def write_request(tid: int, unit: int, table: Table, address: int, values: Sequence[int]) -> bytes:
    """A write of one value (function 5 or 6) or several (15 or 16) from ``address``."""
    if table not in MAX_WRITE:
        raise ValueError(f"{table.value} is read-only")
    n = len(values)
    if not 1 <= n <= MAX_WRITE[table] or not 0 <= address <= 0x10000 - n:
        raise ValueError(f"cannot write {n} {table.value} value(s) at {address}")
    if table is Table.COIL:
        if n == 1:
            return _WRITE_ONE.pack(tid, 0, 6, unit, 5, address, 0xFF00 if values[0] else 0)
        packed = sum(1 << i for i, v in enumerate(values) if v).to_bytes((n + 7) // 8, "little")
        return _WRITE_MANY.pack(tid, 0, 7 + len(packed), unit, 15, address, n, len(packed)) + (
            packed
        )
    if not all(0 <= v <= 0xFFFF for v in values):
        raise ValueError(f"holding register values must be 0..65535, got {list(values)}")
    if n == 1:
        return _WRITE_ONE.pack(tid, 0, 6, unit, 6, address, values[0])
    return _WRITE_MANY.pack(tid, 0, 7 + 2 * n, unit, 16, address, n, 2 * n) + _REGISTERS[n].pack(
        *values
    )


def describe(request: bytes) -> str:
    """What a request asks, for error messages: ``unit 1 read input 0+7``."""
    unit, function = request[6], request[7]
    address, n = _ECHO.unpack_from(request, 8)
    table = _TABLES.get(function, f"function {function}")
    if function in (5, 6):
        return f"unit {unit} write {table} {address}={[int(n != 0) if function == 5 else n]}"
    verb = "read" if function in (1, 2, 3, 4) else "write"
    return f"unit {unit} {verb} {table} {address}+{n}"


def frame_size(buffer: bytes | bytearray) -> int:
    """The size of the ADU at the start of ``buffer`` (which holds at least its 7-byte
    header); BadAnswerError when the header cannot start a Modbus TCP answer."""
    protocol: int
    length: int
    _tid, protocol, length, _unit = HEADER.unpack_from(buffer)
    if protocol != 0 or not 3 <= length <= MAX_ADU - 6:
        raise BadAnswerError(
            f"garbled answer: header {bytes(buffer[:HEADER_SIZE]).hex(' ')} "
            f"(protocol id {protocol}, length {length})"
        )
    return 6 + length


def _check(answer: bytes, request: bytes) -> None:
    """The answer is to this request and not a refusal."""
    if len(answer) < 9:
        raise BadAnswerError(f"short answer: {answer.hex(' ')}")
    if answer[:2] != request[:2]:
        raise BadAnswerError(
            f"answer to transaction {int.from_bytes(answer[:2], 'big')}, "
            f"expected {int.from_bytes(request[:2], 'big')}"
        )
    if answer[6] != request[6] and request[6] != 0:
        raise BadAnswerError(f"answer from unit {answer[6]}, expected unit {request[6]}")
    function = request[7]
    if answer[7] == function:
        return
    if answer[7] == function | 0x80 and len(answer) == 9:
        raise DeviceRefusedError(answer[8], "device")
    raise BadAnswerError(f"answer with function code {answer[7]} to a function {function} request")


def decode_read(answer: bytes, request: bytes) -> list[int]:
    """The values a read asked for: registers (0..65535) or bits (0/1), ``count`` of them."""
    _check(answer, request)
    table_bits = request[7] in (1, 2)
    count = int.from_bytes(request[10:12], "big")
    expected = (count + 7) // 8 if table_bits else 2 * count
    if answer[8] != expected or len(answer) != 9 + expected:
        raise BadAnswerError(
            f"answer holds {answer[8]} data bytes ({len(answer) - 9} received), "
            f"expected {expected} for {count} {'bits' if table_bits else 'registers'}"
        )
    if table_bits:
        bits = int.from_bytes(answer[9:], "little")
        return [(bits >> i) & 1 for i in range(count)]
    return list(_REGISTERS[count].unpack_from(answer, 9))


def check_write(answer: bytes, request: bytes) -> None:
    """A write's answer echoes the address and the value (one) or the quantity (several)."""
    _check(answer, request)
    if len(answer) != 12 or answer[8:12] != request[8:12]:
        address, echoed = _ECHO.unpack_from(answer.ljust(12, b"\0"), 8)
        raise BadAnswerError(f"write answer echoes {address}/{echoed}, not the request")


__all__ = [
    "HEADER_SIZE",
    "check_write",
    "decode_read",
    "describe",
    "frame_size",
    "read_request",
    "write_request",
]
