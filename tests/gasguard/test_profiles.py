"""Device profiles: shipped files load, the register codec round-trips, bad files are named."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import NamedTuple

import pytest

from gasguard.fields import FIELDS
from gasguard.profiles import (
    Point,
    PointType,
    Profile,
    ProfileError,
    RegisterMap,
    Table,
    builtin_profile,
    builtin_profile_names,
    decode_point,
    encode_point,
    load_profile,
)

ORDERS = ("big", "little")


def make_profile(*points: Point, byte_order: str = "big", word_order: str = "big") -> Profile:
    """A detector profile holding ``points`` plus the required fields where they are missing."""
    names = {p.name for p in points}
    extra = []
    if "ch4_lel" not in names:
        extra.append(Point(name="ch4_lel", table=Table.HOLDING, address=1000, type=PointType.U16))
    if "alarm" not in names:
        extra.append(Point(name="alarm", table=Table.DISCRETE, address=1000, type=PointType.BOOL))
    data = {"name": "t", "kind": "detector", "byte_order": byte_order, "word_order": word_order}
    return Profile.model_validate({**data, "points": [*points, *extra]})


# --- shipped profiles -------------------------------------------------------------------------


def test_builtin_profile_names() -> None:
    assert builtin_profile_names() == ["detector-generic", "meter-generic"]


@pytest.mark.parametrize("name", ["detector-generic", "meter-generic"])
def test_builtin_profile_loads_and_reads_in_one_block_per_table(name: str) -> None:
    profile = builtin_profile(name)
    assert profile.name == name
    assert profile.source.endswith(f"{name}.toml")
    assert {p.name for p in profile.points} <= set(FIELDS[profile.kind])
    register_map = RegisterMap(profile)
    for table in Table:
        points = [p for p in profile.points if p.table is table]
        assert len(register_map.read_blocks(table)) == (1 if points else 0)
    assert [p.name for p in profile.writable_points] == ["valve_closed"]
    assert load_profile(profile.source) == profile
    assert hash(load_profile(profile.source)) == hash(profile)


def test_detector_register_map() -> None:
    profile = builtin_profile("detector-generic")
    layout = {p.name: (p.table, p.address, p.type, p.bit) for p in profile.points}
    assert layout == {
        "ch4_lel": (Table.INPUT, 0, PointType.U16, None),
        "temp_c": (Table.INPUT, 1, PointType.I16, None),
        "alarm": (Table.INPUT, 2, PointType.BITFIELD, 0),
        "fault": (Table.INPUT, 2, PointType.BITFIELD, 1),
        "eol": (Table.INPUT, 2, PointType.BITFIELD, 2),
        "valve_closed": (Table.COIL, 0, PointType.BOOL, None),
    }
    register_map = RegisterMap(profile)
    image = register_map.encode({"ch4_lel": 12.3, "temp_c": -5.5, "alarm": True, "eol": True})
    assert image[Table.INPUT] == {0: 123, 1: 0xFFC9, 2: 0b101}
    assert image[Table.COIL] == {0: 0}
    decoded = register_map.decode(Table.INPUT, 0, [123, 0xFFC9, 0b101])
    assert decoded == {"ch4_lel": 12.3, "temp_c": -5.5, "alarm": True, "fault": False, "eol": True}


def test_meter_register_map_and_sizes() -> None:
    profile = builtin_profile("meter-generic")
    layout = {p.name: (p.table, p.address, p.type) for p in profile.points}
    assert layout == {
        "volume_m3": (Table.INPUT, 0, PointType.U32),
        "flow_m3h": (Table.INPUT, 2, PointType.F32),
        "pressure_kpa": (Table.INPUT, 4, PointType.U16),
        "battery_pct": (Table.INPUT, 5, PointType.U16),
        "tamper": (Table.INPUT, 6, PointType.BITFIELD),
        "reverse_flow": (Table.INPUT, 6, PointType.BITFIELD),
        "valve_closed": (Table.COIL, 0, PointType.BOOL),
    }
    sizes = {name: (s.qmax_m3h, s.qmin_m3h) for name, s in profile.sizes.items()}
    assert sizes == {"G1.6": (2.5, 0.016), "G2.5": (4.0, 0.025), "G4": (6.0, 0.04)}
    values = {"volume_m3": 1234.567, "flow_m3h": 1.25, "pressure_kpa": 2.1, "battery_pct": 87.5,
              "tamper": False, "reverse_flow": True, "valve_closed": True}  # fmt: skip
    register_map = RegisterMap(profile)
    image = register_map.encode(values)
    assert [image[Table.INPUT][a] for a in (0, 1)] == [1234567 >> 16, 1234567 & 0xFFFF]
    inputs = [image[Table.INPUT][a] for a in range(7)]
    decoded = register_map.decode(Table.INPUT, 0, inputs)
    decoded |= register_map.decode(Table.COIL, 0, [image[Table.COIL][0]])
    assert decoded == values


def test_unknown_builtin_profile() -> None:
    with pytest.raises(ProfileError, match="known: detector-generic, meter-generic"):
        builtin_profile("nope")


# --- codec --------------------------------------------------------------------------------------

NUMERIC_CASES = [
    (PointType.U16, 1.0, [0, 1, 65535]),
    (PointType.I16, 0.1, [-3276.8, -0.1, 0.0, 3276.7]),
    (PointType.U32, 0.001, [0.0, 1234.567, 4294967.295]),
    (PointType.I32, 1.0, [-(2**31), -1.0, 2**31 - 1]),
    (PointType.F32, 1.0, [0.0, -2.25, 1.5e30, 3.0517578125e-05]),
    (PointType.F32, 0.5, [7.0, -1024.5]),
]


@pytest.mark.parametrize(("byte_order", "word_order"), list(itertools.product(ORDERS, ORDERS)))
@pytest.mark.parametrize(("kind", "scale", "values"), NUMERIC_CASES)
def test_numeric_round_trip(
    kind: PointType, scale: float, values: list[float], byte_order: str, word_order: str
) -> None:
    point = Point(name="temp_c", table=Table.HOLDING, address=10, type=kind, scale=scale)
    profile = make_profile(point, byte_order=byte_order, word_order=word_order)
    for value in values:
        regs = encode_point(point, value, profile)
        assert len(regs) == point.register_count
        assert all(0 <= r <= 0xFFFF for r in regs)
        assert decode_point(point, regs, profile) == pytest.approx(value, rel=1e-7)


@pytest.mark.parametrize(
    ("byte_order", "word_order", "regs"),
    [
        ("big", "big", [0x1234, 0x5678]),
        ("big", "little", [0x5678, 0x1234]),
        ("little", "big", [0x3412, 0x7856]),
        ("little", "little", [0x7856, 0x3412]),
    ],
)
def test_wire_layout_of_32_bit_orders(byte_order: str, word_order: str, regs: list[int]) -> None:
    # the orders set on the point override the profile defaults
    point = Point(name="temp_c", table=Table.INPUT, address=0, type=PointType.U32,
                  byte_order=byte_order, word_order=word_order)  # fmt: skip
    profile = make_profile(point, byte_order="little", word_order="little")
    assert encode_point(point, 0x12345678, profile) == regs
    assert decode_point(point, regs, profile) == 0x12345678


def test_scale_offset_and_f32_bits() -> None:
    point = Point(name="temp_c", table=Table.INPUT, address=0, type=PointType.I16, scale=0.1,
                  offset=-40.0)  # fmt: skip
    profile = make_profile(point)
    assert encode_point(point, -40.0, profile) == [0]
    assert encode_point(point, 25.0, profile) == [650]
    f32 = Point(name="temp_c", table=Table.INPUT, address=0, type=PointType.F32)
    assert encode_point(f32, 1.0, make_profile(f32)) == [0x3F80, 0x0000]
    nan = decode_point(f32, [0x7FC0, 0], make_profile(f32))
    assert isinstance(nan, float)
    assert math.isnan(nan)


@pytest.mark.parametrize("byte_order", ORDERS)
def test_bitfields_merge_into_one_register(byte_order: str) -> None:
    bits = [
        Point(name=n, table=Table.HOLDING, address=5, type=PointType.BITFIELD, bit=b)
        for n, b in [("alarm", 0), ("fault", 1), ("eol", 9)]
    ]
    valve = Point(name="valve_closed", table=Table.COIL, address=3, type=PointType.BOOL)
    profile = make_profile(*bits, valve, byte_order=byte_order)
    register_map = RegisterMap(profile)
    image = register_map.encode({"alarm": True, "fault": False, "eol": True, "valve_closed": True})
    native = (1 << 9) | 1
    expected = native if byte_order == "big" else int.from_bytes(native.to_bytes(2), "little")
    assert image[Table.HOLDING][5] == expected
    assert image[Table.COIL][3] == 1
    decoded = register_map.decode(Table.HOLDING, 5, [expected])
    assert decoded == {"alarm": True, "fault": False, "eol": True}
    assert encode_point(bits[2], True, profile) == [1]
    assert decode_point(bits[2], [expected], profile) is True
    assert [p.name for p in register_map.point_at(Table.HOLDING, 5)] == ["alarm", "fault", "eol"]


def test_encode_leaves_missing_values_zero_and_rejects_unknown_names() -> None:
    register_map = RegisterMap(builtin_profile("meter-generic"))
    image = register_map.encode({"comm_lost": True})  # a field of the kind without a point
    assert image[Table.INPUT] == dict.fromkeys(range(7), 0)
    with pytest.raises(KeyError, match="ch4_lel"):
        register_map.encode({"ch4_lel": 3.0})


@pytest.mark.parametrize(
    ("kind", "scale", "value", "raw"),
    [
        (PointType.U16, 0.1, -0.1, "-1"),
        (PointType.U16, 0.1, 6553.6, "65536"),
        (PointType.I16, 1.0, 32768, "32768"),
        (PointType.U32, 1.0, 2.0**32, "4294967296"),
        (PointType.I32, 1.0, -(2.0**31) - 1, "-2147483649"),
        (PointType.F32, 1.0, 1e39, "f32"),
        (PointType.U16, 1.0, math.nan, "u16"),
    ],
)
def test_out_of_range_value_raises(kind: PointType, scale: float, value: float, raw: str) -> None:
    point = Point(name="temp_c", table=Table.INPUT, address=0, type=kind, scale=scale)
    with pytest.raises(ValueError, match=f"point 'temp_c': value .*{raw}") as info:
        encode_point(point, value, make_profile(point))
    assert repr(value) in str(info.value)


def test_decode_rejects_wrong_register_count_and_values() -> None:
    point = Point(name="temp_c", table=Table.INPUT, address=0, type=PointType.U32)
    with pytest.raises(ValueError, match="needs 2 registers, got 1"):
        decode_point(point, [1], make_profile(point))
    with pytest.raises(ValueError, match="65536"):
        decode_point(point, [1, 65536], make_profile(point))


def test_decode_takes_only_points_fully_inside_the_block() -> None:
    register_map = RegisterMap(builtin_profile("meter-generic"))
    assert set(register_map.decode(Table.INPUT, 1, [0] * 4)) == {"flow_m3h", "pressure_kpa"}
    assert [p.name for p in register_map.point_at(Table.INPUT, 1)] == ["volume_m3"]
    assert register_map.point_at(Table.INPUT, 7) == []


def test_read_blocks_cover_every_point_within_limits() -> None:
    points = [
        Point(name="temp_c", table=Table.INPUT, address=0, type=PointType.F32),
        Point(name="ch4_lel", table=Table.INPUT, address=5, type=PointType.U16),
        Point(name="alarm", table=Table.INPUT, address=300, type=PointType.BITFIELD, bit=0),
        Point(name="fault", table=Table.INPUT, address=300, type=PointType.BITFIELD, bit=1),
        Point(name="eol", table=Table.INPUT, address=420, type=PointType.BITFIELD, bit=1),
        Point(name="valve_closed", table=Table.COIL, address=0, type=PointType.BOOL),
    ]
    register_map = RegisterMap(make_profile(*points))
    assert register_map.read_blocks(Table.INPUT) == [(0, 6), (300, 1), (420, 1)]
    assert register_map.read_blocks(Table.INPUT, max_gap=2) == [(0, 2), (5, 1), (300, 1), (420, 1)]
    assert register_map.read_blocks(Table.INPUT, max_gap=500) == [(0, 6), (300, 121)]
    assert register_map.read_blocks(Table.INPUT, max_regs=3) == [(0, 2), (5, 1), (300, 1), (420, 1)]
    assert register_map.read_blocks(Table.HOLDING) == []
    for max_regs, max_gap in itertools.product([2, 5, 125], [0, 8, 1000]):
        blocks = register_map.read_blocks(Table.INPUT, max_regs=max_regs, max_gap=max_gap)
        assert all(count <= max_regs for _, count in blocks)
        for p in points[:5]:
            end = p.address + p.register_count
            assert any(s <= p.address and end <= s + c for s, c in blocks), (p.name, blocks)
    with pytest.raises(ValueError, match="'temp_c' needs 2 registers; the limit is 1"):
        register_map.read_blocks(Table.INPUT, max_regs=1)
    coils = [Point(name="valve_closed", table=Table.COIL, address=0, type=PointType.BOOL)]
    coils.append(Point(name="alarm", table=Table.COIL, address=2500, type=PointType.BOOL))
    bit_map = RegisterMap(make_profile(*coils))
    assert bit_map.read_blocks(Table.COIL, max_gap=5000) == [(0, 1), (2500, 1)]
    assert bit_map.read_blocks(Table.COIL, max_bits=3000, max_gap=5000) == [(0, 2501)]


# --- bad profiles: each problem names the file, the point and the problem -----------------------

CH4 = {"name": "ch4_lel", "table": "input", "address": 0, "type": "u16"}
ALARM = {"name": "alarm", "table": "input", "address": 1, "type": "bitfield", "bit": 0}
DET = [CH4, ALARM]
VOL = {"name": "volume_m3", "table": "input", "address": 0, "type": "u32"}
FLOW = {"name": "flow_m3h", "table": "input", "address": 2, "type": "f32"}
SIZES = '[sizes."G4"]\nqmax_m3h = 6.0\nqmin_m3h = 0.04\n'


def temp(**changes: object) -> dict[str, object]:
    return {"name": "temp_c", "table": "input", "address": 9, "type": "i16", **changes}


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return "inf" if value == math.inf else repr(value)


def write_profile(
    path: Path, kind: str, points: list[dict[str, object]], top: str = "", tail: str | None = None
) -> Path:
    lines = ['name = "bad"', f'kind = "{kind}"', top]
    for point in points:
        lines += ["[[points]]", *(f"{k} = {toml_value(v)}" for k, v in point.items())]
    lines.append(SIZES if tail is None and kind == "meter" else tail or "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load_error(path: Path) -> ProfileError:
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    return info.value


def test_minimal_profiles_are_valid(tmp_path: Path) -> None:
    assert load_profile(write_profile(tmp_path / "d.toml", "detector", DET)).kind == "detector"
    assert load_profile(write_profile(tmp_path / "m.toml", "meter", [VOL, FLOW])).kind == "meter"


class Bad(NamedTuple):
    kind: str
    points: list[dict[str, object]]
    top: str
    tail: str | None


def bad(expected: str, *points: dict[str, object], kind: str = "detector", top: str = "",
        tail: str | None = None) -> object:  # fmt: skip
    return pytest.param(Bad(kind, list(points), top, tail), expected, id=expected)


def fault(**changes: object) -> dict[str, object]:
    return {**ALARM, "name": "fault", "bit": 1, **changes}


NO_BIT = {k: v for k, v in ALARM.items() if k != "bit"}
BAD = [
    # keys and values
    bad("point 'temp_c': unknown key 'colour'", *DET, temp(colour="red")),
    bad("unknown key 'vendor'", *DET, top='vendor = "x"'),
    bad("unknown key 'source'", *DET, top='source = "x"'),
    bad("point 'temp_c': missing key 'address'", *DET, {"name": "temp_c", "table": "input"}),
    bad("point #3: missing key 'name'", *DET, {"table": "input", "address": 9, "type": "i16"}),
    bad("point 'temp_c': type: Input should be", *DET, temp(type="u64")),
    bad("point 'temp_c': address: Input should be less than or equal to 65535 (got 65536)",
        *DET, temp(address=65536)),
    bad("point 'temp_c': scale: must not be zero (got 0)", *DET, temp(scale=0)),
    bad("point 'temp_c': scale: Input should be a finite number", *DET, temp(scale=math.inf)),
    bad("kind: Input should be 'detector' or 'meter' (got 'sensor')", *DET, kind="sensor"),
    # names and fields
    bad("point 'co_ppm': not a detector field", *DET, temp(name="co_ppm")),
    bad("point 'comm_lost': set by the gateway", *DET,
        {"name": "comm_lost", "table": "coil", "address": 0, "type": "bool"}),
    bad("point 'ch4_lel': defined twice", *DET, {**CH4, "address": 5}),
    bad("point 'alarm': missing, and every detector profile needs it", CH4),
    bad("point 'flow_m3h': missing, and every meter profile needs it", VOL, kind="meter"),
    bad("point 'ch4_lel': is a number; type bool cannot carry it",
        {**CH4, "table": "coil", "type": "bool"}, ALARM),
    bad("point 'alarm': is a flag; type u16 cannot carry it", CH4, {**NO_BIT, "type": "u16"}),
    # types and tables
    bad("point 'fault': type bool needs a coil or discrete table, not input",
        *DET, fault(type="bool", bit=None)),
    bad("point 'temp_c': a coil holds one bit: type must be bool, not i16",
        *DET, temp(table="coil")),
    bad("point 'fault': a discrete holds one bit: type must be bool, not bitfield",
        *DET, fault(table="discrete")),
    bad("point 'fault': type bitfield needs 'bit' (0..15)", *DET, fault(bit=None, address=4)),
    bad("point 'temp_c': 'bit' is only for type bitfield, not i16", *DET, temp(bit=3)),
    bad("point 'fault': bit: Input should be less than or equal to 15 (got 16)",
        *DET, fault(bit=16)),
    bad("point 'temp_c': writable needs a coil or holding table; input is read-only",
        *DET, temp(writable=True)),
    bad("point 'temp_c': word_order applies to 32-bit types only, not i16",
        *DET, temp(word_order="little")),
    bad("point 'fault': scale and offset do not apply to type bitfield", *DET, fault(scale=2)),
    # layout
    bad("point 'flow_m3h': type f32 needs 2 registers but holding 41 overlaps point "
        "'pressure_kpa'", VOL, {"name": "pressure_kpa", "table": "holding", "address": 41,
        "type": "u16"}, {**FLOW, "table": "holding", "address": 40}, kind="meter"),
    bad("point 'temp_c': input 0 overlaps point 'ch4_lel'", *DET, temp(address=0)),
    bad("point 'fault': input 0 would hold both bitfields and a whole value: it overlaps point "
        "'ch4_lel'", *DET, fault(address=0)),
    bad("point 'temp_c': input 1 would hold both bitfields and a whole value: it overlaps "
        "point 'alarm'", *DET, temp(address=1)),
    bad("point 'fault': bit 0 of input 1 is already point 'alarm'", *DET, fault(bit=0)),
    bad("point 'temp_c': type i32 needs 2 registers but holding 65535 is the last address",
        *DET, temp(table="holding", address=65535, type="i32")),
    # sizes
    bad("sizes: only meter profiles have sizes", *DET, tail=SIZES),
    bad("sizes: a meter profile needs at least one size", VOL, FLOW, kind="meter", tail=""),
    bad("size 'big': name must look like 'G1.6'", VOL, FLOW, kind="meter",
        tail="[sizes.big]\nqmax_m3h = 6.0\nqmin_m3h = 0.04\n"),
    bad("size 'G4': qmin_m3h 6.0 must be below qmax_m3h 6.0", VOL, FLOW, kind="meter",
        tail='[sizes."G4"]\nqmax_m3h = 6.0\nqmin_m3h = 6.0\n'),
    bad("size 'G4': missing key 'qmin_m3h'", VOL, FLOW, kind="meter",
        tail='[sizes."G4"]\nqmax_m3h = 6.0\n'),
]  # fmt: skip


@pytest.mark.parametrize(("case", "expected"), BAD)
def test_bad_profile_names_file_point_and_problem(tmp_path: Path, case: Bad, expected: str) -> None:
    points = [{k: v for k, v in p.items() if v is not None} for p in case.points]
    path = write_profile(tmp_path / "bad.toml", case.kind, points, case.top, case.tail)
    error = load_error(path)
    assert f"profile {path}: {expected}" in str(error)
    assert any(problem.startswith(expected) for problem in error.problems), error.problems


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\nkind = "detector"\n[[points]\nname = "ch4_lel"\n')
    message = str(load_error(path))
    assert message.startswith(f"profile {path}: TOML syntax error")
    assert "line 3" in message


def test_unreadable_file_is_a_profile_error(tmp_path: Path) -> None:
    assert "cannot read" in str(load_error(tmp_path / "missing.toml"))


def test_every_problem_is_reported(tmp_path: Path) -> None:
    points = [CH4, temp(name="co_ppm"), temp(address=0)]
    error = load_error(write_profile(tmp_path / "bad.toml", "detector", points))
    assert len(error.problems) == 3, error.problems
    assert all(
        line.startswith(f"profile {tmp_path / 'bad.toml'}: ") for line in str(error).splitlines()
    )


def test_profile_lookups() -> None:
    profile = builtin_profile("meter-generic")
    assert profile.point("flow_m3h").register_count == 2
    with pytest.raises(KeyError, match="no point 'ch4_lel'"):
        profile.point("ch4_lel")
    volume = profile.point("volume_m3")
    assert (profile.byte_order_of(volume), profile.word_order_of(volume)) == ("big", "big")


@pytest.mark.parametrize("byte_order", ["big", "little"])
@pytest.mark.parametrize("word_order", ["big", "little"])
def test_block_decoder_agrees_with_decode(byte_order: str, word_order: str) -> None:
    """The gateway's fast path gives exactly what the plain decoder gives, on random registers."""
    import random

    rng = random.Random(7)
    for name in ("detector-generic", "meter-generic"):
        profile = builtin_profile(name).model_copy(
            update={"byte_order": byte_order, "word_order": word_order}
        )
        rmap = RegisterMap(profile)
        for table in Table:
            for start, count in rmap.read_blocks(table):
                fast = rmap.block_decoder(table, start, count)
                for _ in range(200):
                    top = 1 if table.holds_bits else 0xFFFF
                    regs = [rng.randint(0, top) for _ in range(count)]
                    slow, quick = rmap.decode(table, start, regs), fast(regs)
                    assert slow.keys() == quick.keys()
                    for k in slow:
                        assert slow[k] == quick[k] or (
                            slow[k] != slow[k] and quick[k] != quick[k]
                        ), k
