"""The virtual clock: simulated time advances in fixed ticks, either paced by the wall clock
(a technician watching in real time, optionally sped up) or as fast as the CPU allows
(tests and benchmarks producing days of readings in seconds). The tick sequence is the
same either way, so the same seed gives the same readings.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class SimClock:
    """Simulated time: ``tick`` steps of ``dt`` seconds after ``start_ms`` (epoch ms)."""

    start_ms: int
    dt: float = 1.0
    tick: int = 0

    def __post_init__(self) -> None:
        if not self.dt > 0:
            raise ValueError(f"tick length dt must be positive, got {self.dt}")

    @property
    def seconds(self) -> float:
        """Simulated seconds since the start."""
        return self.tick * self.dt

    @property
    def now_ms(self) -> int:
        return self.start_ms + round(self.tick * self.dt * 1000.0)

    def ticks_for(self, seconds: float) -> int:
        return round(seconds / self.dt)


async def pace(
    clock: SimClock, step: Callable[[], None], stop: asyncio.Event, speed: float = 1.0
) -> None:
    """Call ``step`` so that simulated time keeps up with wall time x ``speed``.

    If the machine falls behind, the missing ticks are run back to back (nothing skipped).
    """
    if speed <= 0:
        raise ValueError(f"speed must be positive, got {speed}")
    loop = asyncio.get_running_loop()
    wall0, tick0 = loop.time(), clock.tick
    while not stop.is_set():
        due = tick0 + int((loop.time() - wall0) * speed / clock.dt)
        while clock.tick < due and not stop.is_set():
            step()
        next_wall = wall0 + (clock.tick + 1 - tick0) * clock.dt / speed
        delay = max(0.0, next_wall - loop.time())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
