"""The built-in client's framing, pinned to pymodbus's encoding of the same requests and
answers (an independent implementation of the same specification)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.framer import FramerSocket
from pymodbus.pdu import DecodePDU, ExceptionResponse
from pymodbus.pdu.bit_message import (
    ReadCoilsRequest,
    ReadCoilsResponse,
    ReadDiscreteInputsRequest,
    ReadDiscreteInputsResponse,
    WriteMultipleCoilsRequest,
    WriteMultipleCoilsResponse,
    WriteSingleCoilRequest,
    WriteSingleCoilResponse,
)
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadHoldingRegistersResponse,
    ReadInputRegistersRequest,
    ReadInputRegistersResponse,
    WriteMultipleRegistersRequest,
    WriteMultipleRegistersResponse,
    WriteSingleRegisterRequest,
    WriteSingleRegisterResponse,
)

from gasguard.profiles import Table
from gateway.modbus_errors import BadAnswerError, DeviceRefusedError
from gateway.modbus_frames import (
    check_write,
    decode_read,
    describe,
    frame_size,
    read_request,
    write_request,
)

FRAMER = FramerSocket(DecodePDU(is_server=False))
READS = {
    Table.COIL: (ReadCoilsRequest, ReadCoilsResponse),
    Table.DISCRETE: (ReadDiscreteInputsRequest, ReadDiscreteInputsResponse),
    Table.HOLDING: (ReadHoldingRegistersRequest, ReadHoldingRegistersResponse),
    Table.INPUT: (ReadInputRegistersRequest, ReadInputRegistersResponse),
}
tids = st.integers(1, 0xFFFF)
units = st.integers(0, 255)


def frame(pdu: object) -> bytes:
    return bytes(FRAMER.buildFrame(pdu))


@st.composite
def reads(draw: st.DrawFn) -> tuple[Table, int, int]:
    table = draw(st.sampled_from(list(Table)))
    count = draw(st.integers(1, 2000 if table.holds_bits else 125))
    return table, draw(st.integers(0, 0x10000 - count)), count


@given(tids, units, reads())
def test_read_requests_are_framed_as_pymodbus_frames_them(
    tid: int, unit: int, read: tuple[Table, int, int]
) -> None:
    table, start, count = read
    expected = READS[table][0](address=start, count=count, dev_id=unit, transaction_id=tid)
    assert read_request(tid, unit, table, start, count) == frame(expected)


@given(tids, st.integers(1, 255), reads(), st.data())
def test_answers_framed_by_pymodbus_decode_to_their_values(
    tid: int, unit: int, read: tuple[Table, int, int], data: st.DataObject
) -> None:
    table, start, count = read
    request = read_request(tid, unit, table, start, count)
    if table.holds_bits:
        values = data.draw(st.lists(st.integers(0, 1), min_size=count, max_size=count))
        padded = [bool(v) for v in values] + [False] * (-count % 8)
        answer = READS[table][1](bits=padded, dev_id=unit, transaction_id=tid)
    else:
        values = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=count, max_size=count))
        answer = READS[table][1](registers=values, dev_id=unit, transaction_id=tid)
    assert decode_read(frame(answer), request) == values


@given(tids, units, st.integers(0, 0xFFFF), st.booleans())
def test_a_single_coil_write_and_its_echo(tid: int, unit: int, address: int, on: bool) -> None:
    request = write_request(tid, unit, Table.COIL, address, [int(on)])
    pdu = {"address": address, "bits": [on], "dev_id": unit, "transaction_id": tid}
    assert request == frame(WriteSingleCoilRequest(**pdu))
    check_write(frame(WriteSingleCoilResponse(**pdu)), request)


@given(tids, units, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_a_single_register_write_and_its_echo(tid: int, unit: int, address: int, v: int) -> None:
    request = write_request(tid, unit, Table.HOLDING, address, [v])
    pdu = {"address": address, "registers": [v], "dev_id": unit, "transaction_id": tid}
    assert request == frame(WriteSingleRegisterRequest(**pdu))
    check_write(frame(WriteSingleRegisterResponse(**pdu)), request)


@given(tids, units, st.lists(st.booleans(), min_size=2, max_size=1968), st.data())
def test_a_multiple_coil_write_and_its_answer(
    tid: int, unit: int, bits: list[bool], data: st.DataObject
) -> None:
    address = data.draw(st.integers(0, 0x10000 - len(bits)))
    request = write_request(tid, unit, Table.COIL, address, [int(b) for b in bits])
    pdu = {"address": address, "dev_id": unit, "transaction_id": tid}
    assert request == frame(WriteMultipleCoilsRequest(bits=bits, **pdu))
    check_write(frame(WriteMultipleCoilsResponse(count=len(bits), **pdu)), request)


@given(tids, units, st.lists(st.integers(0, 0xFFFF), min_size=2, max_size=123), st.data())
def test_a_multiple_register_write_and_its_answer(
    tid: int, unit: int, values: list[int], data: st.DataObject
) -> None:
    address = data.draw(st.integers(0, 0x10000 - len(values)))
    request = write_request(tid, unit, Table.HOLDING, address, values)
    pdu = {"address": address, "dev_id": unit, "transaction_id": tid}
    assert request == frame(WriteMultipleRegistersRequest(registers=values, **pdu))
    check_write(frame(WriteMultipleRegistersResponse(count=len(values), **pdu)), request)


@pytest.mark.parametrize("code", [1, 2, 3, 4, 6, 11])
def test_an_exception_answer_is_a_refusal_with_its_code(code: int) -> None:
    request = read_request(7, 3, Table.INPUT, 0, 7)
    answer = frame(ExceptionResponse(4, code, device_id=3, transaction=7))
    with pytest.raises(DeviceRefusedError) as refused:
        decode_read(answer, request)
    assert refused.value.code == code
    write = write_request(8, 3, Table.COIL, 0, [1])
    with pytest.raises(DeviceRefusedError):
        check_write(frame(ExceptionResponse(5, code, device_id=3, transaction=8)), write)


def test_an_answer_to_another_transaction_is_refused_naming_both() -> None:
    request = read_request(7, 1, Table.INPUT, 0, 3)
    answer = frame(ReadInputRegistersResponse(registers=[1, 2, 3], dev_id=1, transaction_id=6))
    with pytest.raises(BadAnswerError, match="transaction 6, expected 7"):
        decode_read(answer, request)


def test_an_answer_from_another_unit_is_refused_unless_unit_0_was_asked() -> None:
    answer = frame(ReadInputRegistersResponse(registers=[1, 2, 3], dev_id=2, transaction_id=7))
    with pytest.raises(BadAnswerError, match="unit 2, expected unit 1"):
        decode_read(answer, read_request(7, 1, Table.INPUT, 0, 3))
    assert decode_read(answer, read_request(7, 0, Table.INPUT, 0, 3)) == [1, 2, 3]


def test_an_answer_with_another_function_code_is_refused() -> None:
    answer = frame(ReadHoldingRegistersResponse(registers=[1, 2, 3], dev_id=1, transaction_id=7))
    with pytest.raises(BadAnswerError, match="function code 3 to a function 4 request"):
        decode_read(answer, read_request(7, 1, Table.INPUT, 0, 3))


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("00 07 00 00 00 02 01 04", "short answer"),  # no byte count
        ("00 07 00 00 00 03 01 04 06", "holds 6 data bytes .0 received."),
        ("00 07 00 00 00 05 01 04 04 00 01", "holds 4 data bytes .2 received., expected 6"),
        ("00 07 00 00 00 09 01 04 06 00 01 00 02 00 03 00", "expected 6 for 3 registers"),
        ("00 07 00 00 00 05 01 04 02 00 01", "holds 2 data bytes"),  # fewer registers
    ],
)
def test_a_short_or_inconsistent_answer_is_a_clear_error(answer: str, reason: str) -> None:
    with pytest.raises(BadAnswerError, match=reason):
        decode_read(bytes.fromhex(answer), read_request(7, 1, Table.INPUT, 0, 3))


def test_a_write_answer_that_does_not_echo_the_request_is_refused() -> None:
    request = write_request(9, 1, Table.COIL, 4, [1])
    answer = frame(WriteSingleCoilResponse(address=4, bits=[False], dev_id=1, transaction_id=9))
    with pytest.raises(BadAnswerError, match="echoes 4/0"):
        check_write(answer, request)


@pytest.mark.parametrize(
    ("header", "size"),
    [("00 01 00 00 00 06 01", 12), ("ff ff 00 00 00 fe 01", 260), ("00 01 00 00 00 03 01", 9)],
)
def test_frame_size_comes_from_the_header(header: str, size: int) -> None:
    assert frame_size(bytes.fromhex(header)) == size


@pytest.mark.parametrize(
    "header",
    ["00 01 00 01 00 06 01", "00 01 00 00 00 02 01", "00 01 00 00 00 ff 01", "48 54 54 50 2f 31"],
)
def test_a_header_that_cannot_start_an_answer_is_garbled(header: str) -> None:
    with pytest.raises(BadAnswerError, match="garbled answer"):
        frame_size(bytes.fromhex(header).ljust(7, b"\0"))


@pytest.mark.parametrize(
    ("table", "start", "count"),
    [(Table.INPUT, 0, 0), (Table.INPUT, 0, 126), (Table.COIL, 0, 2001), (Table.HOLDING, 65530, 7)],
)
def test_reads_outside_the_limits_are_refused_before_sending(
    table: Table, start: int, count: int
) -> None:
    with pytest.raises(ValueError, match=table.value):
        read_request(1, 1, table, start, count)


def test_writes_outside_the_limits_are_refused_before_sending() -> None:
    with pytest.raises(ValueError, match="read-only"):
        write_request(1, 1, Table.INPUT, 0, [1])
    with pytest.raises(ValueError, match=r"0\.\.65535"):
        write_request(1, 1, Table.HOLDING, 0, [70000])
    with pytest.raises(ValueError, match="cannot write 124"):
        write_request(1, 1, Table.HOLDING, 0, [0] * 124)


def test_describe_says_what_a_request_asked() -> None:
    assert describe(read_request(1, 2, Table.INPUT, 0, 7)) == "unit 2 read input 0+7"
    assert describe(write_request(1, 2, Table.COIL, 3, [1])) == "unit 2 write coil 3=[1]"
    assert describe(write_request(1, 2, Table.HOLDING, 3, [5, 6])) == "unit 2 write holding 3+2"
