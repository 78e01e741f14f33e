"""Polling one Modbus device on its own schedule.

Each device has its own timer, timeout and backoff. A device that stops answering is reported
as lost (a ``comm_lost`` reading), never as its last values with a new timestamp; it is tried
again with a growing delay and reported recovered when it answers. Its failures are logged
once at ERROR and then quietly, so one dead meter cannot flood the log.

A lost device is probed with a short timeout (at most ``PROBE_TIMEOUT_S``): devices that share
its link (a serial bus, one TCP gateway port) wait for its lock only briefly. A live device
answers well within it; the link still drops the connection after any timeout, so a late
answer is never taken for the next request's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from gasguard.backoff import Backoff
from gasguard.fields import COMM_LOST, Kind
from gasguard.profiles import (
    FLAG_TYPES,
    Point,
    PointType,
    Profile,
    RegisterMap,
    Table,
    encode_point,
)
from gateway.links import LinkError, ModbusLink

log = logging.getLogger(__name__)

Value = float | bool
PROBE_TIMEOUT_S = 0.25
State = Literal["unknown", "ok", "lost"]


@dataclass(frozen=True)
class Reading:
    """One device's values at one instant; ``values`` is None when the device was lost."""

    device: str
    kind: Kind
    ts_ms: int
    fields: tuple[str, ...]
    values: Mapping[str, Value] | None


@dataclass
class PollStats:
    polls: int = 0
    failures: int = 0
    reports: int = 0
    last_ok_ms: int | None = None
    last_error: str = ""
    last_latency_s: float = 0.0


@dataclass(frozen=True)
class PollSettings:
    interval: float
    timeout: float
    report: Literal["every_poll", "on_change"] = "every_poll"
    heartbeat: float = 300.0
    lost_after: int = 2
    retry_cap: float = 60.0


Sink = Callable[[Reading, bool], None]  # (reading, urgent)


@dataclass
class DevicePoller:
    device_id: str
    kind: Kind
    unit: int
    profile: Profile
    link: ModbusLink
    settings: PollSettings
    sink: Sink
    clock: Callable[[], float] = time.time
    state: State = "unknown"
    stats: PollStats = field(default_factory=PollStats)

    def __post_init__(self) -> None:
        self._map = RegisterMap(self.profile)
        self._blocks = [
            (t, s, c, self._map.block_decoder(t, s, c))
            for t in Table
            for s, c in self._map.read_blocks(t)
        ]
        self._fields = tuple(p.name for p in self.profile.points)
        self._may_be_nonfinite = tuple(p.name for p in self.profile.points if _may_be_nonfinite(p))
        self._failures_in_row = 0
        self._backoff = Backoff(
            base=max(self.settings.interval, 0.5),
            cap=max(self.settings.retry_cap, self.settings.interval),
        )
        self._last_values: Mapping[str, Value] | None = None
        self._last_report = -math.inf
        self._last_alarm: bool | None = None
        self._bug_logged = False

    async def read(self) -> dict[str, Value]:
        """Read every point once; LinkError when the device does not answer usably."""
        values: dict[str, Value] = {}
        timeout = self.settings.timeout
        if self.state == "lost":
            timeout = min(timeout, PROBE_TIMEOUT_S)
        for table, start, count, decode in self._blocks:
            regs = await self.link.read(self.unit, table, start, count, timeout)
            values.update(decode(regs))
        bad = [k for k in self._may_be_nonfinite if not math.isfinite(values[k])]
        if bad:
            raise LinkError(f"{self.device_id}: non-finite value in {', '.join(bad)}")
        return values

    async def write(self, point_name: str, value: Value) -> None:
        """Write a writable point through the device's link (serialised with polling)."""
        point = self.profile.point(point_name)
        regs = encode_point(point, value, self.profile)
        await self.link.write(self.unit, point.table, point.address, regs, self.settings.timeout)

    async def poll_once(self) -> None:
        started = time.monotonic()
        self.stats.polls += 1
        try:
            values = await self.read()
        except LinkError as exc:
            self._failed(str(exc))
            return
        except Exception as exc:  # e.g. a short answer: IndexError, struct.error
            # Whatever the device (or a decoder) did, it is this device's failed poll: the
            # poller must go on. The traceback is logged once until the device answers again.
            if not self._bug_logged:
                self._bug_logged = True
                log.exception("%s: unusable answer", self.device_id)
            self._failed(f"{type(exc).__name__}: {exc}")
            return
        finally:
            self.stats.last_latency_s = time.monotonic() - started
        self._answered(values)

    def next_delay(self) -> float:
        if self._failures_in_row >= self.settings.lost_after:
            return max(self.settings.interval, self._backoff.next())
        return self.settings.interval

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not stop.is_set():
            await self.poll_once()
            delay = self.next_delay()
            due = (
                max(due + delay, loop.time())
                if delay == self.settings.interval
                else loop.time() + delay
            )
            wait = due - loop.time()
            if wait <= 0:
                await asyncio.sleep(0)  # let the others run
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await stop.wait()

    # ------------------------------------------------------------------ outcomes

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _failed(self, error: str) -> None:
        self.stats.failures += 1
        self.stats.last_error = error
        self._failures_in_row += 1
        if self.state != "lost" and self._failures_in_row >= self.settings.lost_after:
            log.error("%s lost: %s", self.device_id, error)
            self.state = "lost"
            self._last_values = None
            self._emit(None, urgent=False)
        elif self.state == "lost":
            log.debug("%s still lost: %s", self.device_id, error)
            if self.clock() - self._last_report >= self.settings.heartbeat:
                self._emit(None, urgent=False)

    def _answered(self, values: dict[str, Value]) -> None:
        if self.state == "lost":
            log.warning("%s recovered after %d failed polls", self.device_id, self._failures_in_row)
        self.state = "ok"
        self._failures_in_row = 0
        self._bug_logged = False
        self._backoff.reset()
        self.stats.last_ok_ms = self._now_ms()
        alarm = values.get("alarm")
        urgent = (
            self.kind == "detector"
            and isinstance(alarm, bool)
            and alarm != bool(self._last_alarm)
            and (self._last_alarm is not None or alarm)
        )
        if isinstance(alarm, bool):
            self._last_alarm = alarm
        changed = values != self._last_values
        self._last_values = values
        if (
            urgent
            or self.settings.report == "every_poll"
            or changed
            or self.clock() - self._last_report >= self.settings.heartbeat
        ):
            self._emit(values, urgent)

    def _emit(self, values: Mapping[str, Value] | None, urgent: bool) -> None:
        self._last_report = self.clock()
        self.stats.reports += 1
        self.sink(Reading(self.device_id, self.kind, self._now_ms(), self._fields, values), urgent)


def _may_be_nonfinite(point: Point) -> bool:
    """An f32 may hold NaN or infinity; a scaled integer only with an absurd scale."""
    if point.type is PointType.F32:
        return True
    if point.type in FLAG_TYPES:
        return False
    return not math.isfinite(abs(point.scale) * 2.0**32 + abs(point.offset))


def lost_values(reading: Reading) -> dict[str, Value]:
    """The columns of a comm_lost reading: no measured values (NaN numbers, false flags)."""
    from gasguard.fields import FIELDS

    spec = FIELDS[reading.kind]
    return {
        f: (math.nan if spec[f].type == "float" else False)
        for f in reading.fields
        if f != COMM_LOST
    }
