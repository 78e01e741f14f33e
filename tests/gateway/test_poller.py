"""The poller's check of decoded values, without a network: a fake link answers."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence

import pytest

from gasguard.profiles import Table, builtin_profile
from gateway.links import LinkError
from gateway.poller import DevicePoller, PollSettings, Reading


class Answers:
    """A link that answers every read from fixed tables (registers by address)."""

    name = "fake"

    def __init__(self, tables: dict[Table, list[int]]) -> None:
        self.tables = tables

    async def read(
        self, unit: int, table: Table, start: int, count: int, timeout: float
    ) -> list[int]:
        return self.tables[table][start : start + count]

    async def write(
        self, unit: int, table: Table, address: int, values: Sequence[int], timeout: float
    ) -> None:
        raise AssertionError("no writes here")

    async def close(self) -> None:
        pass


def meter(flow: float, scale: float = 0.001) -> DevicePoller:
    profile = builtin_profile("meter-generic")
    if scale != 0.001:
        points = [
            p.model_copy(update={"scale": scale}) if p.name == "volume_m3" else p
            for p in profile.points
        ]
        profile = profile.model_copy(update={"points": tuple(points)})
    flow_words = list(struct.unpack(">HH", struct.pack(">f", flow)))
    link = Answers({Table.INPUT: [0, 12345, *flow_words, 201, 870, 0], Table.COIL: [0]})
    readings: list[Reading] = []
    return DevicePoller(
        "M-1", "meter", 1, profile, link, PollSettings(interval=1.0, timeout=1.0), readings.append
    )


def test_finite_values_make_a_reading() -> None:
    values = asyncio.run(meter(0.35).read())
    assert values["volume_m3"] == 12.345
    assert values["flow_m3h"] == pytest.approx(0.35)
    assert values["valve_closed"] is False


@pytest.mark.parametrize("flow", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_f32_is_a_failed_poll_not_a_reading(flow: float) -> None:
    with pytest.raises(LinkError, match="non-finite value in flow_m3h"):
        asyncio.run(meter(flow).read())


def test_a_scaled_integer_that_overflows_is_caught_too() -> None:
    with pytest.raises(LinkError, match="non-finite value in volume_m3"):
        asyncio.run(meter(0.35, scale=1e305).read())
