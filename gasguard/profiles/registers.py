"""The register codec: engineering values <-> raw Modbus registers, by profile.

``engineering = raw * scale + offset``. Byte order is the order of the two bytes inside each
16-bit register ("big" is normal Modbus); word order is which register comes first in a 32-bit
value ("big" = high word first). A value that does not fit its type raises ``ValueError``:
nothing is clamped silently.

Bits: ``encode_point`` gives a bool or bitfield point's state as ``[0]`` or ``[1]``;
``decode_point`` takes, for a bitfield, the whole 16-bit register and picks the point's bit.
:meth:`RegisterMap.encode` places bitfields into their shared register (OR-merged).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping, Sequence

from gasguard.fields import FIELDS
from gasguard.profiles.model import Order, Point, PointType, Profile, Table

# struct format (big-endian bytes), lowest raw value, highest raw value
_INT_FORMATS: dict[PointType, tuple[str, int, int]] = {
    PointType.U16: (">H", 0, 0xFFFF),
    PointType.I16: (">h", -0x8000, 0x7FFF),
    PointType.U32: (">I", 0, 0xFFFF_FFFF),
    PointType.I32: (">i", -0x8000_0000, 0x7FFF_FFFF),
}


def _inverse_scale(scale: float) -> int | None:
    """``1/scale`` when it is a whole number (0.1 -> 10): dividing by it rounds exactly."""
    inverse = 1.0 / scale
    whole = round(inverse)
    return whole if whole != 0 and abs(inverse - whole) <= 1e-9 * abs(inverse) else None


def _to_engineering(point: Point, raw: float) -> float:
    inverse = _inverse_scale(point.scale)
    value = raw / inverse if inverse is not None else raw * point.scale
    return value + point.offset


def _to_raw(point: Point, value: float) -> float:
    inverse = _inverse_scale(point.scale)
    shifted = value - point.offset
    return shifted * inverse if inverse is not None else shifted / point.scale


def _words_to_regs(data: bytes, byte_order: Order, word_order: Order) -> list[int]:
    words = [data[i : i + 2] for i in range(0, len(data), 2)]
    if word_order == "little":
        words.reverse()
    return [int.from_bytes(word, byte_order) for word in words]


def _regs_to_words(regs: Sequence[int], byte_order: Order, word_order: Order) -> bytes:
    words = [reg.to_bytes(2, byte_order) for reg in regs]
    if word_order == "little":
        words.reverse()
    return b"".join(words)


def bit_mask(point: Point, profile: Profile) -> int:
    """The register value with only this bitfield point's bit set, as it travels on the wire."""
    if point.bit is None:
        raise ValueError(f"point {point.name!r}: type {point.type.value} has no bit")
    return int.from_bytes((1 << point.bit).to_bytes(2, "big"), profile.byte_order_of(point))


def encode_point(point: Point, value: float | bool, profile: Profile) -> list[int]:
    """Engineering value -> raw registers (each 0..65535); bool and bitfield give ``[0|1]``."""
    if point.type in (PointType.BOOL, PointType.BITFIELD):
        return [1 if value else 0]
    raw = _to_raw(point, float(value))
    if point.type is PointType.F32:
        try:
            data = struct.pack(">f", raw)
        except OverflowError:
            raise ValueError(
                f"point {point.name!r}: value {value!r} is outside the f32 range"
            ) from None
    else:
        fmt, lowest, highest = _INT_FORMATS[point.type]
        if not math.isfinite(raw):
            raise ValueError(
                f"point {point.name!r}: value {value!r} cannot be encoded as {point.type.value}"
            )
        whole = round(raw)
        if not lowest <= whole <= highest:
            raise ValueError(
                f"point {point.name!r}: value {value!r} is raw {whole}, outside the "
                f"{point.type.value} range {lowest}..{highest}"
            )
        data = struct.pack(fmt, whole)
    return _words_to_regs(data, profile.byte_order_of(point), profile.word_order_of(point))


def decode_point(point: Point, regs: Sequence[int], profile: Profile) -> float | bool:
    """Raw registers -> engineering value; for a bitfield ``regs`` is its whole register."""
    if len(regs) != point.register_count:
        raise ValueError(
            f"point {point.name!r}: type {point.type.value} needs {point.register_count} "
            f"registers, got {len(regs)}"
        )
    for reg in regs:
        if not 0 <= reg <= 0xFFFF:
            raise ValueError(f"point {point.name!r}: register value {reg!r} is not 0..65535")
    if point.type is PointType.BOOL:
        return bool(regs[0])
    byte_order = profile.byte_order_of(point)
    if point.type is PointType.BITFIELD:
        native = int.from_bytes(int(regs[0]).to_bytes(2, byte_order), "big")
        return bool(native >> (point.bit or 0) & 1)
    data = _regs_to_words([int(r) for r in regs], byte_order, profile.word_order_of(point))
    fmt = ">f" if point.type is PointType.F32 else _INT_FORMATS[point.type][0]
    raw: float = struct.unpack(fmt, data)[0]
    return _to_engineering(point, raw)


class RegisterMap:
    """The precomputed layout of a profile: what to read, how to image and decode it."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self._points: dict[Table, tuple[Point, ...]] = {
            table: tuple(
                sorted(
                    (p for p in profile.points if p.table is table),
                    key=lambda p: (p.address, p.bit or 0),
                )
            )
            for table in Table
        }
        self._at: dict[tuple[Table, int], list[Point]] = {}
        for p in profile.points:
            for address in range(p.address, p.address + p.register_count):
                self._at.setdefault((p.table, address), []).append(p)

    def points_of(self, table: Table) -> tuple[Point, ...]:
        """The points in one table, by address."""
        return self._points[table]

    def read_blocks(
        self, table: Table, max_regs: int = 125, max_bits: int = 2000, max_gap: int = 8
    ) -> list[tuple[int, int]]:
        """``(start, count)`` reads covering every point of ``table``, merging small gaps.

        A block never exceeds ``max_bits`` (coil, discrete) or ``max_regs`` (input, holding);
        two points join one block when at most ``max_gap`` unused addresses lie between them.
        """
        limit = max_bits if table.holds_bits else max_regs
        if max_gap < 0:
            raise ValueError(f"max_gap must be >= 0, got {max_gap}")
        blocks: list[tuple[int, int]] = []  # (start, end) with end exclusive
        for p in self._points[table]:
            start, end = p.address, p.address + p.register_count
            if end - start > limit:
                raise ValueError(
                    f"point {p.name!r} needs {end - start} registers; the limit is {limit}"
                )
            if blocks:
                block_start, block_end = blocks[-1]
                merged_end = max(block_end, end)
                if start - block_end <= max_gap and merged_end - block_start <= limit:
                    blocks[-1] = (block_start, merged_end)
                    continue
            blocks.append((start, end))
        return [(start, end - start) for start, end in blocks]

    def encode(self, values: Mapping[str, float | bool]) -> dict[Table, dict[int, int]]:
        """The whole register image: table -> {address: register (0/1 for bit tables)}.

        Every address a point covers is present; points without a value hold raw 0. Bitfields
        sharing a register are OR-merged. Fields of the profile's kind that it has no point
        for are ignored; names that are no field of the kind raise ``KeyError``.
        """
        fields = FIELDS[self.profile.kind]
        unknown = sorted(name for name in values if name not in fields)
        if unknown:
            raise KeyError(f"profile {self.profile.name!r}: no {self.profile.kind} field {unknown}")
        image: dict[Table, dict[int, int]] = {table: {} for table in Table}
        for table, address in self._at:
            image[table][address] = 0
        for p in self.profile.points:
            if p.name not in values:
                continue
            if p.type is PointType.BITFIELD:
                if values[p.name]:
                    image[p.table][p.address] |= bit_mask(p, self.profile)
                continue
            for i, reg in enumerate(encode_point(p, values[p.name], self.profile)):
                image[p.table][p.address + i] = reg
        return image

    def decode(self, table: Table, start: int, regs: Sequence[int]) -> dict[str, float | bool]:
        """Every point of ``table`` lying fully inside ``[start, start + len(regs))``."""
        regs = list(regs)
        end = start + len(regs)
        values: dict[str, float | bool] = {}
        for p in self._points[table]:
            first = p.address - start
            if p.address >= start and p.address + p.register_count <= end:
                values[p.name] = decode_point(
                    p, regs[first : first + p.register_count], self.profile
                )
        return values

    def block_decoder(
        self, table: Table, start: int, count: int
    ) -> Callable[[Sequence[int]], dict[str, float | bool]]:
        """A fast decoder for one read block (the gateway's hot path): the same values as
        :meth:`decode`, with the per-point work (orders, masks, scales) done once here.
        Registers must come from a Modbus answer (each 0..65535, ``count`` of them)."""
        parts: list[tuple[str, Callable[[Sequence[int]], float | bool]]] = []
        for p in self._points[table]:
            if p.address >= start and p.address + p.register_count <= start + count:
                parts.append((p.name, self._point_decoder(p, p.address - start)))

        def decode(regs: Sequence[int]) -> dict[str, float | bool]:
            return {name: fn(regs) for name, fn in parts}

        return decode

    def _point_decoder(self, p: Point, i: int) -> Callable[[Sequence[int]], float | bool]:
        if p.type is PointType.BOOL:
            return lambda regs: bool(regs[i])
        if p.type is PointType.BITFIELD:
            mask = bit_mask(p, self.profile)
            return lambda regs: bool(regs[i] & mask)
        inverse, scale, offset = _inverse_scale(p.scale), p.scale, p.offset
        byte_order, word_order = self.profile.byte_order_of(p), self.profile.word_order_of(p)
        if p.type is PointType.U16 and byte_order == "big":
            if inverse is not None:
                return lambda regs: regs[i] / inverse + offset
            return lambda regs: regs[i] * scale + offset
        n = p.register_count
        fmt = ">f" if p.type is PointType.F32 else _INT_FORMATS[p.type][0]
        unpack = struct.Struct(fmt).unpack

        def generic(regs: Sequence[int]) -> float:
            raw: float = unpack(_regs_to_words(regs[i : i + n], byte_order, word_order))[0]
            return (raw / inverse if inverse is not None else raw * scale) + offset

        return generic

    def point_at(self, table: Table, address: int) -> list[Point]:
        """The points covering ``address`` of ``table`` (several bitfields may share one)."""
        return list(self._at.get((table, address), []))


__all__ = ["RegisterMap", "bit_mask", "decode_point", "encode_point"]
