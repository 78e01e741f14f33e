"""From the spool to the broker: publish spooled batches with QoS 1 and delete each only after
its PUBACK. Alarm batches go first whenever alarms and routine telemetry are both waiting (an
alarm must not wait behind the replay of an outage's backlog); each kind goes in sequence
order. Ingest needs no order across batches: each carries its own timestamps.

After a reconnect, everything not yet acknowledged is sent again from the spool (the broker
may see a batch twice; ingest drops the repeat by its (gateway, seq) id), so nothing produced
during an outage is lost.

A batch the broker refuses (a PUBACK with a failure reason code, e.g. not authorised) stays in
the spool and is sent again on its own after a backoff (5 s, doubling to 5 min, reset when a
retried batch is accepted); the batches after it go on meanwhile. It waits for its backoff
across reconnects too (the replay after a reconnect skips it): some brokers drop the
connection after refusing a publish, and it must not come back at reconnect speed.

PUBACKs are only collected in paho's read callback; the forwarder deletes what they
acknowledge in one spool transaction per tick (one fsync for a whole burst, not one each).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from gasguard.backoff import Backoff
from gasguard.mqtt_link import MqttLink
from gateway.spool import Spool

log = logging.getLogger(__name__)


class Forwarder:
    def __init__(
        self,
        spool: Spool,
        link: MqttLink,
        window: int = 200,
        retry: Backoff | None = None,
    ) -> None:
        self.spool = spool
        self.link = link
        self.window = window
        self.sent = 0
        self.acked = 0
        self.refused = 0  # PUBACKs with a failure reason code
        self._retry = retry or Backoff(base=5.0, cap=300.0)
        self._refused: set[int] = set()  # refused seqs waiting for their retry
        self._retry_at: float | None = None  # time.monotonic() of the next retry
        self._retrying: set[int] = set()  # seqs sent again by a retry, not yet answered
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
        self._retrying.clear()  # their answer is lost: sent again with the rest
        self._wake.set()

    def _on_published(self, mid: int, ok: bool) -> None:
        seq = self._inflight.pop(mid, None)
        if seq is None:
            return
        retried = seq in self._retrying
        self._retrying.discard(seq)
        if ok:
            self._acked.append(seq)
            self.acked += 1
            self.last_puback_ms = int(time.time() * 1000)
            if retried:
                log.info("broker accepted batch seq %d on a retry", seq)
                self._retry.reset()
        else:
            self.refused += 1
            self._refused.add(seq)
            if self._retry_at is None:
                delay = self._retry.next()
                self._retry_at = time.monotonic() + delay
                (log.debug if retried else log.error)(
                    "broker refused batch seq %d; it stays in the spool, retried in %.0f s",
                    seq,
                    delay,
                )
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
        return self._hand_refused() + self._hand(alarms=True) + self._hand(alarms=False)

    def _hand_refused(self) -> int:
        """Refused batches again, once their backoff is over (those still in the spool)."""
        due = self._retry_at is not None and time.monotonic() >= self._retry_at
        if not (due and self._refused and self.link.connected):
            return 0
        handed = 0
        for batch in self.spool.batches(sorted(self._refused)):
            mid = self.link.publish(batch.topic, batch.payload, qos=1)
            if mid is None:
                return handed  # lost meanwhile: the next connection sends them again
            self._inflight[mid] = batch.seq
            self._retrying.add(batch.seq)
            self.sent += 1
            handed += 1
        self._refused.clear()
        self._retry_at = None
        return handed

    def _hand(self, alarms: bool) -> int:
        handed = 0
        pending = self.spool.pending_alarms if alarms else self.spool.pending_routine
        while self.link.connected and len(self._inflight) < self.window:
            after = self._alarm_after if alarms else self._after
            batches = pending(after_seq=after, limit=self.window - len(self._inflight))
            if not batches:
                break
            for batch in batches:
                if batch.seq not in self._refused:  # those wait for their retry
                    mid = self.link.publish(batch.topic, batch.payload, qos=1)
                    if mid is None:
                        return handed
                    self._inflight[mid] = batch.seq
                    self.sent += 1
                    handed += 1
                if alarms:
                    self._alarm_after = batch.seq
                else:
                    self._after = batch.seq
        return handed

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            self.pump()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
