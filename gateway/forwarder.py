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

Messages that are not spooled (command results) are kept in memory until their PUBACK: sent
before the batches, and again after a reconnect if their PUBACK never came.

PUBACKs are only collected in paho's read callback; the forwarder deletes what they
acknowledge in one spool transaction per tick (one fsync for a whole burst, not one each).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

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
        self.kept_acked = 0  # kept (not spooled) messages acknowledged
        self._kept: deque[tuple[str, bytes]] = deque()  # (topic, payload) waiting to be sent
        self._kept_inflight: dict[int, tuple[str, bytes]] = {}  # mid -> (topic, payload)
        self._kept_refused: list[tuple[str, bytes]] = []  # waiting for the retry
        self._wake = asyncio.Event()
        link.on_connected = self._on_connected
        link.on_published = self._on_published

    def wake(self) -> None:
        self._wake.set()

    def forward(self, topic: str, payload: bytes) -> None:
        """Send a message that is not spooled (a command result) with QoS 1; it is kept in
        memory until its PUBACK, and sent again after a reconnect."""
        self._kept.append((topic, payload))
        self._wake.set()

    @property
    def inflight(self) -> int:
        """Messages handed to the broker and not yet acknowledged."""
        return len(self._inflight) + len(self._kept_inflight)

    @property
    def kept(self) -> int:
        """Kept (not spooled) messages not yet acknowledged."""
        return len(self._kept) + len(self._kept_inflight) + len(self._kept_refused)

    def _on_connected(self) -> None:
        self._inflight.clear()  # a new connection: whatever was in flight is sent again
        self._kept.extendleft(reversed(self._kept_inflight.values()))  # in their order
        self._kept_inflight.clear()
        self._after = 0
        self._alarm_after = 0
        self._retrying.clear()  # their answer is lost: sent again with the rest
        self._wake.set()

    def _on_published(self, mid: int, ok: bool) -> None:
        self._wake.set()
        kept = self._kept_inflight.pop(mid, None)
        if kept is not None:
            if ok:
                self.kept_acked += 1
            else:
                self.refused += 1
                self._kept_refused.append(kept)
                self._schedule_retry(f"a message on {kept[0]}", retried=False)
            return
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
            self._schedule_retry(f"batch seq {seq}", retried)

    def _schedule_retry(self, what: str, retried: bool) -> None:
        """One retry time for everything refused meanwhile; the first refusal is an error."""
        if self._retry_at is not None:
            return
        delay = self._retry.next()
        self._retry_at = time.monotonic() + delay
        (log.debug if retried else log.error)(
            "broker refused %s; it is kept and sent again in %.0f s", what, delay
        )

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
        handed = self._hand_refused() + self._hand_kept()
        return handed + self._hand(alarms=True) + self._hand(alarms=False)

    def _hand_kept(self) -> int:
        handed = 0
        while self._kept and self.link.connected:
            topic, payload = self._kept[0]
            mid = self.link.publish(topic, payload, qos=1)
            if mid is None:
                break
            self._kept_inflight[mid] = self._kept.popleft()
            handed += 1
        return handed

    def _hand_refused(self) -> int:
        """Refused messages again, once their backoff is over (batches still in the spool)."""
        due = self._retry_at is not None and time.monotonic() >= self._retry_at
        if not (due and self.link.connected):
            return 0
        self._retry_at = None
        self._kept.extend(self._kept_refused)  # sent by _hand_kept
        self._kept_refused.clear()
        handed = 0
        for batch in self.spool.batches(sorted(self._refused)):
            mid = self.link.publish(batch.topic, batch.payload, qos=1)
            if mid is None:  # lost meanwhile: the rest go first on the next connection
                self._retry_at = time.monotonic()
                break
            self._refused.discard(batch.seq)
            self._inflight[mid] = batch.seq
            self._retrying.add(batch.seq)
            self.sent += 1
            handed += 1
        else:
            self._refused.clear()  # those no longer in the spool (dropped by its bounds)
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
