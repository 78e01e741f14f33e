"""From the spool to the broker: publish spooled batches with QoS 1 and delete each only after
its PUBACK. Alarm batches go first whenever alarms and routine telemetry are both waiting (an
alarm must not wait behind the replay of an outage's backlog); each kind goes in sequence
order. Ingest needs no order across batches: each carries its own timestamps.

After a reconnect, everything not yet acknowledged is sent again from the spool (the broker
may see a batch twice; ingest drops the repeat by its (gateway, seq) id), so nothing produced
during an outage is lost.

PUBACKs are only collected in paho's read callback; the forwarder deletes what they
acknowledge in one spool transaction per tick (one fsync for a whole burst, not one each).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from gasguard.mqtt_link import MqttLink
from gateway.spool import Spool

log = logging.getLogger(__name__)


class Forwarder:
    def __init__(self, spool: Spool, link: MqttLink, window: int = 200) -> None:
        self.spool = spool
        self.link = link
        self.window = window
        self.sent = 0
        self.acked = 0
        self.refused = 0
        self.last_puback_ms: int | None = None
        self._inflight: dict[int, int] = {}  # mid -> seq
        self._acked: list[int] = []  # PUBACKed seqs not yet deleted from the spool
        self._after = 0  # highest routine seq handed to the current connection
        self._alarm_after = 0  # highest alarm seq handed to the current connection
        self._wake = asyncio.Event()
        link.on_connected = self._on_connected
        link.on_published = self._on_published

    def wake(self) -> None:
        self._wake.set()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def _on_connected(self) -> None:
        self._inflight.clear()  # a new connection: whatever was in flight is sent again
        self._after = 0
        self._alarm_after = 0
        self._wake.set()

    def _on_published(self, mid: int, ok: bool) -> None:
        seq = self._inflight.pop(mid, None)
        if seq is None:
            return
        if ok:
            self._acked.append(seq)
            self.acked += 1
            self.last_puback_ms = int(time.time() * 1000)
        else:
            self.refused += (
                1  # e.g. not authorised: kept in the spool, tried on the next connection
            )
            log.error("broker refused batch seq %d; it stays in the spool", seq)
        self._wake.set()

    def commit_acks(self) -> int:
        """Delete the PUBACKed batches from the spool, in one transaction."""
        if not self._acked:
            return 0
        deleted = self.spool.ack_many(self._acked)
        self._acked.clear()
        return deleted

    def pump(self) -> int:
        """Delete what was acknowledged, then hand the next spooled batches to the link, up to
        the in-flight window: the waiting alarms first, then routine telemetry."""
        self.commit_acks()  # first: a reconnect replays the spool, PUBACKed ones must be gone
        return self._hand(alarms=True) + self._hand(alarms=False)

    def _hand(self, alarms: bool) -> int:
        handed = 0
        pending = self.spool.pending_alarms if alarms else self.spool.pending_routine
        while self.link.connected and len(self._inflight) < self.window:
            after = self._alarm_after if alarms else self._after
            batches = pending(after_seq=after, limit=self.window - len(self._inflight))
            if not batches:
                break
            for batch in batches:
                mid = self.link.publish(batch.topic, batch.payload, qos=1)
                if mid is None:
                    return handed
                self._inflight[mid] = batch.seq
                if alarms:
                    self._alarm_after = batch.seq
                else:
                    self._after = batch.seq
                self.sent += 1
                handed += 1
        return handed

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            self.pump()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
