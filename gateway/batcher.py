"""Readings into wire batches, into the spool.

Routine readings are grouped per device kind (and per set of fields, since devices of one kind
may have different profiles) into batches of up to ``max_readings`` or ``max_delay_ms``. A
detector whose own alarm flag changed is spooled at once as a one-reading batch on the alarm
topic, never held for a batch (and not repeated in the telemetry). Every batch is in the spool,
durably and with its sequence number, before anyone tries to send it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

import numpy as np

from gasguard.fields import COMM_LOST, FIELDS, Kind
from gasguard.wire import WireError, encode_batch, make_batch, topic
from gateway.poller import Reading
from gateway.spool import Spool

log = logging.getLogger(__name__)

_Key = tuple[Kind, tuple[str, ...]]


class Batcher:
    def __init__(
        self,
        gateway_id: str,
        spool: Spool,
        *,
        max_readings: int = 200,
        max_delay_ms: int = 1000,
        on_spooled: Callable[[], None] = lambda: None,
    ) -> None:
        self.gateway_id = gateway_id
        self.spool = spool
        self.max_readings = max_readings
        self.max_delay_s = max_delay_ms / 1000.0
        self.on_spooled = on_spooled
        self._buffers: dict[_Key, list[Reading]] = {}
        self._opened: dict[_Key, float] = {}
        self.readings = 0
        self.batches = 0
        self.alarms = 0
        self.rejected = 0

    def add(self, reading: Reading, urgent: bool = False) -> None:
        self.readings += 1
        fields = tuple(f for f in reading.fields if f != COMM_LOST)
        if urgent:
            self.alarms += 1
            self._spool("alarm", reading.kind, fields, [reading], alarm=True)
            return
        key = (reading.kind, fields)
        buffer = self._buffers.setdefault(key, [])
        if not buffer:
            self._opened[key] = time.monotonic()
        buffer.append(reading)
        if len(buffer) >= self.max_readings:
            self._flush(key)

    def flush_due(self) -> None:
        now = time.monotonic()
        for key in [
            k for k, b in self._buffers.items() if b and now - self._opened[k] >= self.max_delay_s
        ]:
            self._flush(key)

    def flush_all(self) -> None:
        for key in [k for k, b in self._buffers.items() if b]:
            self._flush(key)

    async def run(self, stop: asyncio.Event) -> None:
        tick = max(0.01, self.max_delay_s / 4)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), tick)
            self.flush_due()
        self.flush_all()

    def _flush(self, key: _Key) -> None:
        readings = self._buffers.pop(key)
        self._opened.pop(key, None)
        self._spool("telemetry", key[0], key[1], readings, alarm=False)

    def _spool(
        self,
        channel: str,
        kind: Kind,
        fields: tuple[str, ...],
        readings: list[Reading],
        alarm: bool,
    ) -> None:
        spec = FIELDS[kind]
        lost = np.array([r.values is None for r in readings], dtype=bool)
        columns: dict[str, object] = {}
        for name in fields:
            missing = math.nan if spec[name].type == "float" else False
            columns[name] = [missing if r.values is None else r.values[name] for r in readings]
        columns[COMM_LOST] = lost
        dev = [r.device for r in readings]
        ts = np.array([r.ts_ms for r in readings], dtype=np.int64)

        def encode(seq: int) -> bytes:
            return encode_batch(make_batch(self.gateway_id, seq, kind, dev, ts, columns))  # type: ignore[arg-type]

        try:
            self.spool.put(
                topic(self.gateway_id, channel),
                encode,
                alarm=alarm,
                readings=len(readings),
                created_ms=int(time.time() * 1000),
            )
        except WireError as exc:  # a bug, not bad luck: config and poller validate first
            self.rejected += len(readings)
            log.error(
                "%d %s readings could not be encoded and are dropped: %s", len(readings), kind, exc
            )
            return
        self.batches += 1
        self.on_spooled()
