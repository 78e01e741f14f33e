"""Device profiles: which Modbus point carries which reading field, and how to convert it.

A profile is a TOML file validated here. The gateway reads devices with it and the simulator
serves registers from the same file, so both ends agree by construction. Every problem in a file
is reported as one :class:`ProfileError` line naming the file, the point and the problem.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gasguard.fields import COMM_LOST, FIELDS, Kind

Order = Literal["big", "little"]

_DATA_PACKAGE = "gasguard.profiles"
_DATA_FOLDER = "data"
_SIZE_NAME = re.compile(r"^G\d+(\.\d+)?$")


class Table(StrEnum):
    """The four Modbus data tables."""

    COIL = "coil"
    DISCRETE = "discrete"
    INPUT = "input"
    HOLDING = "holding"

    @property
    def holds_bits(self) -> bool:
        """Coils and discrete inputs hold single bits; the other two hold 16-bit registers."""
        return self in (Table.COIL, Table.DISCRETE)


class PointType(StrEnum):
    """How the raw bits of a point are read."""

    BOOL = "bool"
    U16 = "u16"
    I16 = "i16"
    U32 = "u32"
    I32 = "i32"
    F32 = "f32"
    BITFIELD = "bitfield"


NUMERIC_TYPES = frozenset(
    {PointType.U16, PointType.I16, PointType.U32, PointType.I32, PointType.F32}
)
FLAG_TYPES = frozenset({PointType.BOOL, PointType.BITFIELD})
_WIDE_TYPES = frozenset({PointType.U32, PointType.I32, PointType.F32})


class ProfileError(ValueError):
    """A profile file that cannot be used; one message line per problem."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = tuple(problems)
        super().__init__("\n".join(f"profile {source}: {p}" for p in self.problems))


class Point(BaseModel):
    """One Modbus point carrying one reading field."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    table: Table
    address: int = Field(ge=0, le=65535)
    type: PointType
    bit: int | None = Field(default=None, ge=0, le=15)
    scale: float = Field(default=1.0, allow_inf_nan=False)
    offset: float = Field(default=0.0, allow_inf_nan=False)
    unit: str = ""
    writable: bool = False
    byte_order: Order | None = None
    word_order: Order | None = None
    description: str = ""

    @property
    def register_count(self) -> int:
        """Registers (or bits) the point occupies: 2 for 32-bit types, else 1."""
        return 2 if self.type in _WIDE_TYPES else 1

    @field_validator("scale")
    @classmethod
    def _scale_not_zero(cls, scale: float) -> float:
        if scale == 0:
            raise ValueError("must not be zero")
        return scale

    @model_validator(mode="after")
    def _check_type_and_table(self) -> Point:
        problems: list[str] = []
        kind, table = self.type.value, self.table.value
        if self.type is PointType.BOOL and not self.table.holds_bits:
            problems.append(f"type bool needs a coil or discrete table, not {table}")
        if self.table.holds_bits and self.type is not PointType.BOOL:
            problems.append(f"a {table} holds one bit: type must be bool, not {kind}")
        if self.type is PointType.BITFIELD and self.bit is None:
            problems.append("type bitfield needs 'bit' (0..15)")
        if self.bit is not None and self.type is not PointType.BITFIELD:
            problems.append(f"'bit' is only for type bitfield, not {kind}")
        if self.writable and self.table not in (Table.COIL, Table.HOLDING):
            problems.append(f"writable needs a coil or holding table; {table} is read-only")
        if self.type in FLAG_TYPES and (self.scale != 1.0 or self.offset != 0.0):
            problems.append(f"scale and offset do not apply to type {kind}")
        if self.word_order is not None and self.register_count == 1:
            problems.append(f"word_order applies to 32-bit types only, not {kind}")
        if self.byte_order is not None and self.type is PointType.BOOL:
            problems.append("byte_order does not apply to type bool")
        if problems:
            raise ValueError("\n".join(problems))
        return self


class MeterSize(BaseModel):
    """A meter size class (G1.6, G2.5, G4, ...) and its flow range."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    qmax_m3h: float = Field(gt=0, allow_inf_nan=False)
    qmin_m3h: float = Field(gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _qmin_below_qmax(self) -> MeterSize:
        if self.qmin_m3h >= self.qmax_m3h:
            raise ValueError(f"qmin_m3h {self.qmin_m3h} must be below qmax_m3h {self.qmax_m3h}")
        return self


class Profile(BaseModel):
    """A device's register map: every point it has, byte/word order defaults, meter sizes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    kind: Kind
    description: str = ""
    byte_order: Order = "big"
    word_order: Order = "big"
    points: tuple[Point, ...]
    sizes: dict[str, MeterSize] = Field(default_factory=dict)
    source: str = ""  # the file it was loaded from; set by the loader

    def __hash__(self) -> int:  # ``sizes`` is a dict; hash its items so a profile can key a cache
        sizes = tuple(sorted(self.sizes.items()))
        return hash((self.name, self.kind, self.byte_order, self.word_order, self.points, sizes))

    def point(self, name: str) -> Point:
        """The point carrying field ``name``."""
        for p in self.points:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.points)
        raise KeyError(f"profile {self.name!r} has no point {name!r} (it has: {known})")

    def byte_order_of(self, point: Point) -> Order:
        """Byte order inside each register: the point's own, else the profile's."""
        return point.byte_order or self.byte_order

    def word_order_of(self, point: Point) -> Order:
        """Which register comes first in a 32-bit value: the point's own, else the profile's."""
        return point.word_order or self.word_order

    @property
    def writable_points(self) -> tuple[Point, ...]:
        """Points a gateway may write (valve commands)."""
        return tuple(p for p in self.points if p.writable)

    @model_validator(mode="after")
    def _check_profile(self) -> Profile:
        problems = [*_field_problems(self), *_layout_problems(self), *_size_problems(self)]
        if problems:
            raise ValueError("\n".join(problems))
        return self


def _field_problems(profile: Profile) -> list[str]:
    fields = FIELDS[profile.kind]
    problems: list[str] = []
    seen: set[str] = set()
    for p in profile.points:
        where = f"point {p.name!r}"
        if p.name in seen:
            problems.append(f"{where}: defined twice")
        seen.add(p.name)
        if p.name == COMM_LOST:
            problems.append(f"{where}: set by the gateway when a device is silent, not read")
            continue
        field = fields.get(p.name)
        if field is None:
            known = ", ".join(n for n in fields if n != COMM_LOST)
            problems.append(f"{where}: not a {profile.kind} field (known: {known})")
        elif field.type == "float" and p.type not in NUMERIC_TYPES:
            problems.append(
                f"{where}: is a number; type {p.type.value} cannot carry it "
                "(use u16, i16, u32, i32 or f32)"
            )
        elif field.type == "bool" and p.type not in FLAG_TYPES:
            problems.append(
                f"{where}: is a flag; type {p.type.value} cannot carry it (use bool or bitfield)"
            )
    for field in fields.values():
        if field.required and field.name not in seen:
            problems.append(
                f"point {field.name!r}: missing, and every {profile.kind} profile needs it"
            )
    return problems


def _layout_problems(profile: Profile) -> list[str]:
    """Overlaps within a table; only bitfields may share a register, on distinct bits."""
    problems: list[str] = []
    occupied: dict[tuple[Table, int], list[Point]] = {}
    for p in profile.points:
        table, last = p.table.value, p.address + p.register_count - 1
        if last > 65535:
            problems.append(
                f"point {p.name!r}: type {p.type.value} needs {p.register_count} registers "
                f"but {table} {p.address} is the last address"
            )
            continue
        problem = None
        for address in range(p.address, last + 1):
            for q in occupied.get((p.table, address), []):
                both_bits = p.type is PointType.BITFIELD and q.type is PointType.BITFIELD
                if both_bits and p.bit != q.bit:
                    continue
                if both_bits:
                    problem = f"bit {p.bit} of {table} {address} is already point {q.name!r}"
                elif PointType.BITFIELD in (p.type, q.type):
                    problem = (
                        f"{table} {address} would hold both bitfields and a whole value: "
                        f"it overlaps point {q.name!r}"
                    )
                elif p.register_count > 1:
                    problem = (
                        f"type {p.type.value} needs {p.register_count} registers but "
                        f"{table} {address} overlaps point {q.name!r}"
                    )
                else:
                    problem = f"{table} {address} overlaps point {q.name!r}"
                break
            if problem:
                break
        if problem:
            problems.append(f"point {p.name!r}: {problem}")
        for address in range(p.address, last + 1):
            occupied.setdefault((p.table, address), []).append(p)
    return problems


def _size_problems(profile: Profile) -> list[str]:
    if profile.kind != "meter":
        return ["sizes: only meter profiles have sizes"] if profile.sizes else []
    if not profile.sizes:
        return ['sizes: a meter profile needs at least one size, e.g. [sizes."G1.6"]']
    return [
        f"size {name!r}: name must look like 'G1.6' (G and the size number)"
        for name in profile.sizes
        if not _SIZE_NAME.match(name)
    ]


def _loc_text(loc: Sequence[int | str]) -> str:
    return ".".join(str(part) for part in loc)


def _describe(err: Mapping[str, Any], data: Mapping[str, Any]) -> list[str]:
    """Rephrase one pydantic error: ``points.3.scale`` becomes ``point 'flow_m3h': scale``."""
    loc: tuple[int | str, ...] = tuple(err["loc"])
    where = ""
    if len(loc) >= 2 and loc[0] == "points" and isinstance(loc[1], int):
        raw_points = data.get("points")
        raw = raw_points[loc[1]] if isinstance(raw_points, list) else None
        name = raw.get("name") if isinstance(raw, dict) else None
        where = f"point {name!r}" if isinstance(name, str) else f"point #{loc[1] + 1}"
        loc = loc[2:]
    elif len(loc) >= 2 and loc[0] == "sizes":
        where, loc = f"size {loc[1]!r}", loc[2:]
    prefix = f"{where}: " if where else ""
    if err["type"] == "missing":
        return [f"{prefix}missing key {_loc_text(loc)!r}"]
    if err["type"] == "extra_forbidden":
        return [f"{prefix}unknown key {_loc_text(loc)!r}"]
    error = err.get("ctx", {}).get("error")
    message = str(error) if isinstance(error, ValueError) else str(err["msg"])
    field = f"{_loc_text(loc)}: " if loc else ""
    given = err.get("input")
    got = f" (got {given!r})" if isinstance(given, str | int | float) and field else ""
    # A validator's message may hold several lines, each already naming its point.
    return [
        line if line.startswith(("point ", "size ", "sizes:")) else f"{prefix}{field}{line}{got}"
        for line in message.splitlines()
    ]


ModelT = TypeVar("ModelT", bound=BaseModel)
Describe = Callable[[Any, dict[str, Any]], list[str]]


def validate_toml(text: str, source: str, model: type[ModelT], describe: Describe) -> ModelT:
    """Parse a profile's TOML and validate it with ``model``; every problem in one
    :class:`ProfileError`, each line phrased by ``describe`` (shared by both profile kinds)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(source, [f"TOML syntax error: {exc}"]) from exc
    if "source" in data:
        raise ProfileError(source, ["unknown key 'source' (the loader sets it)"])
    try:
        return model.model_validate({**data, "source": source})
    except ValidationError as exc:
        problems = [line for err in exc.errors() for line in describe(err, data)]
        raise ProfileError(source, problems) from exc


def read_profile_text(path: str | Path) -> str:
    """A profile file's text; :class:`ProfileError` when it cannot be read as UTF-8."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ProfileError(str(path), [f"cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ProfileError(str(path), [f"not UTF-8 text: {exc}"]) from exc


def _profile_from_toml(text: str, source: str) -> Profile:
    return validate_toml(text, source, Profile, _describe)


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile file; raise :class:`ProfileError` naming every problem."""
    return _profile_from_toml(read_profile_text(path), str(path))


MQTT_PREFIX = "mqtt-"  # shipped files named mqtt-*.toml are MQTT device profiles


def shipped_names(mqtt: bool) -> list[str]:
    """Names of the profiles shipped in ``gasguard/profiles/data``: Modbus or MQTT ones."""
    folder = resources.files(_DATA_PACKAGE).joinpath(_DATA_FOLDER)
    names = (e.name.removesuffix(".toml") for e in folder.iterdir() if e.name.endswith(".toml"))
    return sorted(n for n in names if n.startswith(MQTT_PREFIX) == mqtt)


def shipped_text(name: str, mqtt: bool) -> tuple[str, str]:
    """(text, source) of a shipped profile; ProfileError listing the known names."""
    known = shipped_names(mqtt)
    if name not in known:
        what = "MQTT profile" if mqtt else "profile"
        raise ProfileError(name, [f"no built-in {what} of that name (known: {', '.join(known)})"])
    entry = resources.files(_DATA_PACKAGE).joinpath(_DATA_FOLDER, f"{name}.toml")
    return entry.read_text(encoding="utf-8"), str(entry)


def builtin_profile_names() -> list[str]:
    """Names of the Modbus profiles shipped in ``gasguard/profiles/data``."""
    return shipped_names(mqtt=False)


@cache
def builtin_profile(name: str) -> Profile:
    """A shipped profile by name, e.g. ``"detector-generic"`` or ``"meter-generic"``."""
    return _profile_from_toml(*shipped_text(name, mqtt=False))


__all__ = [
    "FLAG_TYPES",
    "NUMERIC_TYPES",
    "MeterSize",
    "Order",
    "Point",
    "PointType",
    "Profile",
    "ProfileError",
    "Table",
    "builtin_profile",
    "builtin_profile_names",
    "load_profile",
]
