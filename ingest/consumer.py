"""The ingest consumer: MQTT (QoS 1, persistent session, manual acknowledgement) ->
micro-batches -> numpy columns -> detection -> one PostgreSQL transaction -> acknowledge.

A message is acknowledged only after the transaction holding its readings has committed. If
the database is down, nothing is acknowledged: the micro-batch is retried with backoff, and
the broker keeps everything else queued for this consumer's session. A crash loses nothing:
unacknowledged messages are redelivered, and batch ids make the repeats no-ops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import psycopg

from gasguard.backoff import Backoff
from gasguard.fields import FIELDS, KINDS, Kind
from gasguard.mqtt_link import MqttLink
from gasguard.wire import Batch, WireError, decode_batch
from ingest.detection import Detection, Thresholds
from ingest.health import Health
from ingest.registry import Registry, load_registry
from ingest.settings import IngestSettings
from ingest.storage import Partitions, choose_mode
from ingest.writer import (
    DeadLetter,
    claim_batches,
    copy_readings,
    fold_rollups,
    load_state,
    save_state,
    stage_rollups,
    write_alarms,
    write_dead_letters,
)

log = logging.getLogger(__name__)
DAY_MS = 86_400_000


def shard_of(gateway_id: str, shards: int) -> int:
    """The consumer shard that owns a gateway (stable across processes and restarts)."""
    return zlib.crc32(gateway_id.encode()) % shards


def shard_gateways(settings: IngestSettings, registry: Registry) -> set[str] | None:
    """The gateways of this consumer's shard; None when there is one shard (every gateway)."""
    if settings.ingest_shards == 1:
        return None
    return {
        g for g in registry.gateways if shard_of(g, settings.ingest_shards) == settings.ingest_shard
    }


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int  # which MQTT connection it came on (acks only make sense on that one)


@dataclass
class Accepted:
    message: Message
    batch: Batch
    keys: np.ndarray  # device key per reading


class Ingest:
    def __init__(self, settings: IngestSettings) -> None:
        self.settings = settings
        self.health = Health(settings)
        self.registry = Registry()
        thresholds = (
            Thresholds.load(settings.ingest_thresholds_file)
            if settings.ingest_thresholds_file
            else None
        )
        self.detection = Detection(
            settings.ingest_utc_offset_hours, thresholds, settings.ingest_clock_tolerance_ms
        )
        self.partitions = Partitions("stock")
        self.mode = "stock"
        self._conn: psycopg.AsyncConnection[Any] | None = None  # setup and periodic jobs
        # micro-batches in flight, each on its own connection (see _transaction)
        self._writers: list[psycopg.AsyncConnection[Any] | None] = [None] * max(
            settings.ingest_pipeline, 1
        )
        self._db_backoff = Backoff(base=0.5, cap=15.0)
        self._inbox: list[Message] = []
        self._keys: dict[tuple[str, str, tuple[str, ...]], np.ndarray] = {}
        self._db_lock = asyncio.Lock()  # the jobs' connection: one job at a time
        # detection, alarms and commits one micro-batch at a time, in order (and the silence
        # scan between them): detection state and alarms follow the readings' order
        self._order_lock = asyncio.Lock()
        self._stored = 0  # micro-batches handed to _store so far (picks the connection)
        self._inflight_ids: dict[int, set[tuple[str, int]]] = {}  # batch ids in flight
        self._sync_lock = asyncio.Lock()  # one subscription sync at a time
        self._wake = asyncio.Event()
        self._last_state_save = 0.0
        s = settings
        self.link = MqttLink(
            s.mqtt_options(
                client_id=f"{s.ingest_client_id}-{s.ingest_shard}",
                clean_start=False,
                session_expiry_s=7 * 86400,
                manual_ack=True,
                receive_maximum=s.ingest_receive_maximum,
                subscriptions=(),
            )
        )
        self.link.on_message = self._on_message

    # ------------------------------------------------------------------ MQTT side

    def _subscriptions(self) -> tuple[tuple[str, int], ...]:
        mine = shard_gateways(self.settings, self.registry)
        if mine is None:
            return (("gasguard/v1/+/telemetry", 1), ("gasguard/v1/+/alarm", 1))
        return tuple(
            (f"gasguard/v1/{g}/{ch}", 1) for g in sorted(mine) for ch in ("telemetry", "alarm")
        )

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        self._inbox.append(
            Message(msg.topic, bytes(msg.payload), msg.mid, msg.qos, self.link.connects)
        )
        if len(self._inbox) >= self.settings.ingest_max_messages or len(self._inbox) == 1:
            self._wake.set()

    def _ack(self, messages: Sequence[Message]) -> None:
        generation = self.link.connects
        for m in messages:
            if m.generation == generation and m.qos > 0:
                self.link.ack(m.mid, m.qos)

    # ------------------------------------------------------------------ database side

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        """A connection, waiting with backoff while the database is away."""
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.settings.database_url, connect_timeout=5, autocommit=True
                )
                break
            except psycopg.OperationalError as exc:
                delay = self._db_backoff.next()
                log.error(
                    "database unavailable (%s); retrying in %.1f s",
                    str(exc).strip().splitlines()[0],
                    delay,
                )
                self.health.db_errors.inc()
                await asyncio.sleep(delay)
        self._db_backoff.reset()
        return conn

    async def connect_db(self) -> psycopg.AsyncConnection[Any]:
        conn = await self._connect()
        self.mode = await choose_mode(conn)
        cur = await conn.execute("SELECT to_regclass('meter_readings') IS NOT NULL")
        row = await cur.fetchone()
        if not row or not row[0]:
            raise RuntimeError(
                "the database has no GasGuard schema: run 'gasguard db migrate' first"
            )
        self.partitions = Partitions(self.mode)
        await self.partitions.load(conn)
        await self.partitions.ensure_ahead(conn)
        self.registry = await load_registry(conn)
        log.info("database ready: %s storage, %d devices", self.mode, len(self.registry.by_id))
        self._conn = conn
        return conn

    async def _db(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = None
            return await self.connect_db()
        return self._conn

    async def _writer(self, slot: int) -> psycopg.AsyncConnection[Any]:
        conn = self._writers[slot]
        if conn is None or conn.closed:
            if self._conn is None or self._conn.closed:
                await self._db()  # storage mode and partitions first
            conn = self._writers[slot] = await self._connect()
        return conn

    async def _drop_writer(self, slot: int) -> None:
        conn, self._writers[slot] = self._writers[slot], None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    # ------------------------------------------------------------------ one micro-batch

    def accept(self, messages: Sequence[Message]) -> tuple[list[Accepted], list[DeadLetter]]:
        """Decode and check each message; what fails goes to dead letters with the reason."""
        accepted, dead = [], []
        for m in messages:
            try:
                outcome = self._accept_one(m)
            except Exception as exc:  # a decoder surprise: this message only, with the reason
                log.exception("message on %s could not be decoded", m.topic)
                reason = f"ingest could not decode this batch: {type(exc).__name__}: {exc}"
                outcome = DeadLetter(m.topic, m.payload, None, reason[:1000])
            if isinstance(outcome, DeadLetter):
                dead.append(outcome)
            else:
                accepted.append(outcome)
        return accepted, dead

    def _accept_one(self, m: Message) -> Accepted | DeadLetter:
        parts = m.topic.split("/")
        topic_gw = parts[2] if len(parts) == 4 else None
        try:
            # a clock ahead is judged at arrival (Detection.run), not refused: only a day off is
            batch = decode_batch(m.payload, max_future_ms=self.settings.ingest_max_future_ms)
        except WireError as exc:
            return DeadLetter(m.topic, m.payload, exc.field, exc.reason)
        if batch.gw != topic_gw:
            reason = f"payload is from {batch.gw!r}, topic from {topic_gw!r}"
            return DeadLetter(m.topic, m.payload, "gw", reason)
        oldest, keep_days = int(batch.ts.min()), self.settings.ingest_retention_days
        if oldest < time.time() * 1000 - keep_days * DAY_MS:
            reason = f"timestamp {oldest} ms is older than the {keep_days}-day retention"
            return DeadLetter(m.topic, m.payload, "ts", reason)
        if batch.gw not in self.registry.gateways:
            return DeadLetter(m.topic, m.payload, "gw", f"unknown gateway {batch.gw!r}")
        cache_key = (batch.gw, batch.kind, tuple(batch.dev.tolist()))
        cached = self._keys.get(cache_key)
        if cached is not None:  # gateways send the same device lists again and again
            return Accepted(m, batch, cached)
        keys = np.empty(len(batch), dtype=np.int64)
        for i, dev in enumerate(cache_key[2]):
            info = self.registry.by_id.get(dev)
            if info is None or info.gateway_id != batch.gw:
                problem = f"device {dev!r} is not registered to gateway {batch.gw!r}"
                return DeadLetter(m.topic, m.payload, "dev", problem)
            if info.kind != batch.kind:
                problem = f"device {dev!r} is a {info.kind}, the batch says {batch.kind}"
                return DeadLetter(m.topic, m.payload, "dev", problem)
            keys[i] = info.key
        if len(self._keys) > 100_000:
            self._keys.clear()
        self._keys[cache_key] = keys
        return Accepted(m, batch, keys)

    async def process(self, messages: Sequence[Message]) -> None:
        """Store a micro-batch in one transaction (retrying while the database is away)."""
        started = time.monotonic()
        accepted, dead = self.accept(messages)
        await self._store(messages, accepted, dead, started)

    async def _store(
        self,
        messages: Sequence[Message],
        accepted: list[Accepted],
        dead: list[DeadLetter],
        started: float,
        previous: asyncio.Future[None] | None = None,
    ) -> None:
        """Commit one micro-batch (after ``previous``, the micro-batch before it, has
        committed), then acknowledge its messages. Retries while the database is away."""
        token = self._stored
        slot = token % len(self._writers)
        self._stored += 1
        # A batch id that an earlier micro-batch in flight also holds is that one's to store:
        # claiming it here too could wait on that one's row lock while that one waits for this
        # one (their claims can reach the database in either order), a deadlock no database
        # sees. The earlier one commits first, or neither does.
        ids = {(a.batch.gw, a.batch.seq) for a in accepted}
        theirs = {i for i in ids if any(i in other for other in self._inflight_ids.values())}
        self._inflight_ids[token] = ids
        try:
            try:
                readings = await self._retrying(
                    slot, lambda: self._transaction(slot, accepted, dead, previous, theirs)
                )
            except Exception as exc:  # a surprise in this micro-batch: never stops the consumer
                readings = await self._one_by_one(
                    slot, accepted, dead, previous=previous, theirs=theirs, error=exc
                )
        finally:
            del self._inflight_ids[token]
        self._db_backoff.reset()
        self._ack(messages)
        self.health.readings.inc(readings)
        self.health.batch_done(
            messages=len(messages),
            dead=len(dead),
            latency_s=time.monotonic() - started,
            newest_ms=max((int(a.batch.ts.max()) for a in accepted), default=None),
        )

    async def _retrying(self, slot: int, attempt: Callable[[], Awaitable[int]]) -> int:
        """``attempt()`` until it gets through, while the database is away (backoff)."""
        while True:
            try:
                return await attempt()
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self.health.db_errors.inc()
                delay = self._db_backoff.next()
                log.error(
                    "database write failed (%s); nothing acknowledged, retrying in %.1f s",
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                    delay,
                )
                await self._drop_writer(slot)
                await asyncio.sleep(delay)

    async def _one_by_one(
        self,
        slot: int,
        accepted: list[Accepted],
        dead: list[DeadLetter],
        *,
        previous: asyncio.Future[None] | None,
        theirs: set[tuple[str, int]],
        error: Exception,
    ) -> int:
        """A micro-batch failed for a reason no retry mends (a bug, a value nobody foresaw):
        each of its messages is stored alone, and one that fails again alone goes to the dead
        letters with the reason. The others are stored as usual; nothing is lost unsaid."""
        log.error("micro-batch of %d message(s) failed (%s: %s); storing them one by one",
                  len(accepted), type(error).__name__, error, exc_info=error)  # fmt: skip
        await self._drop_writer(slot)  # a fresh connection, whatever state the error left
        stored = 0
        for a in accepted:
            try:
                alone = partial(self._transaction, slot, [a], [], previous, theirs)
                stored += await self._retrying(slot, alone)
            except Exception as exc:
                await self._drop_writer(slot)
                reason = f"ingest could not store this batch: {type(exc).__name__}: {exc}"
                dead.append(DeadLetter(a.message.topic, a.message.payload, None, reason[:1000]))
                self.health.batch_errors.inc()
        await self._retrying(slot, lambda: self._dead_letters(slot, dead))
        return stored

    async def _dead_letters(self, slot: int, dead: list[DeadLetter]) -> int:
        conn = await self._writer(slot)
        async with conn.transaction(), conn.cursor() as cur:
            await write_dead_letters(cur, dead)
        self.health.dead_letters.inc(len(dead))
        for d in dead:
            log.warning("dead letter from %s: %s", d.topic, d.reason)
        return 0

    async def _transaction(
        self,
        slot: int,
        accepted: list[Accepted],
        dead: list[DeadLetter],
        previous: asyncio.Future[None] | None,
        theirs: set[tuple[str, int]],
    ) -> int:
        """One micro-batch in one transaction; returns the readings stored.

        Two phases, so that micro-batches overlap on their own connections: the readings
        (batch ids, COPY, staged rollups) go in while the micro-batch before is still being
        written; detection, alarms and the commit wait until that one has committed, and run
        one micro-batch at a time. A batch id that an earlier micro-batch in flight holds
        (``theirs``) is left to it; one that another consumer has claimed but not committed
        waits on its row lock and then counts as a duplicate."""
        conn = await self._writer(slot)
        unique: dict[tuple[str, int], Accepted] = {}
        for a in accepted:  # a batch and its redelivery can share one micro-batch
            if (a.batch.gw, a.batch.seq) not in theirs:
                unique.setdefault((a.batch.gw, a.batch.seq), a)
        self.health.duplicates.inc(len(accepted) - len(unique))
        accepted = list(unique.values())
        ids = [(a.batch.gw, a.batch.seq, len(a.batch)) for a in accepted]
        # day partitions first, in their own short transactions
        for kind in KINDS:
            days = {
                int(d)
                for a in accepted
                if a.batch.kind == kind
                for d in np.unique(a.batch.ts // DAY_MS)
            }
            await self.partitions.ensure(conn, f"{kind}_readings", sorted(days))
        stored, locked = 0, False
        checkpoint = None
        try:
            async with conn.transaction(), conn.cursor() as cur:
                fresh = await claim_batches(cur, ids)
                new = [a for a in accepted if (a.batch.gw, a.batch.seq) in fresh]
                by_kind: dict[Kind, list[Accepted]] = {}
                for a in new:
                    by_kind.setdefault(a.batch.kind, []).append(a)
                repeats: dict[int, np.ndarray] = {}  # id(Accepted) -> its readings stored before
                for kind in KINDS:
                    mine = by_kind.get(kind, [])
                    groups: dict[frozenset[str], list[Accepted]] = {}
                    for a in mine:
                        groups.setdefault(frozenset(a.batch.fields), []).append(a)
                    for group in groups.values():  # one COPY per set of columns
                        columns = _concat(group)
                        first_time = await copy_readings(cur, kind, columns)
                        stored += int(first_time.sum())
                        if not first_time.all():  # repeats: not judged again, not counted again
                            bounds = np.cumsum([0, *(len(a.batch) for a in group)])
                            for a, lo, hi in zip(group, bounds[:-1], bounds[1:], strict=True):
                                repeats[id(a)] = ~first_time[lo:hi]
                            columns = {k: v[first_time] for k, v in columns.items()}
                        if self.mode == "stock":
                            await stage_rollups(cur, kind, columns)
                if previous is not None:
                    await previous  # it retries until it commits (or this consumer stops)
                await self._order_lock.acquire()
                locked = True
                touched = (
                    np.unique(np.concatenate([a.keys for a in new]))
                    if new
                    else np.empty(0, np.int64)
                )
                checkpoint = self.detection.checkpoint(touched)
                changes = []
                for kind in KINDS:
                    if kind in by_kind:
                        columns = _concat(by_kind[kind], fill=True)
                        if repeats:
                            again = np.concatenate([
                                repeats.get(id(a), np.zeros(len(a.batch), np.bool_))
                                for a in by_kind[kind]
                            ])  # fmt: skip
                            columns = {k: v[~again] for k, v in columns.items()}
                            self.health.repeated_readings.inc(int(again.sum()))
                        changes += self.detection.run(kind, columns, self.registry)
                changes.sort(key=lambda c: c.ts_ms)  # as they happened, across kinds
                outcome = await write_alarms(cur, changes)
                await write_dead_letters(cur, dead)
                now = time.monotonic()
                if now - self._last_state_save >= self.settings.ingest_state_every_s:
                    for kind in KINDS:
                        await save_state(
                            cur, self.settings.shard_name, kind, self.detection.arrays(kind)
                        )
                    self._last_state_save = now
            # committed
        except BaseException:
            if checkpoint is not None:
                self.detection.restore(checkpoint)
            raise
        finally:
            if locked:
                self._order_lock.release()
        self.health.duplicates.inc(len(accepted) - len(new))
        self.health.alarms_raised.inc(outcome.alarms_raised)
        self.health.alarms_flapping.inc(outcome.flapping)
        self.health.dead_letters.inc(len(dead))
        for d in dead:
            log.warning(
                "dead letter from %s: %s%s", d.topic, f"{d.field}: " if d.field else "", d.reason
            )
        return stored

    # ------------------------------------------------------------------ periodic jobs

    async def silence_scan(self) -> None:
        async with self._order_lock, self._db_lock:  # between micro-batches' detection
            now = int(time.time() * 1000)
            mine = shard_gateways(self.settings, self.registry)
            changes = self.detection.silence(now, self.registry, mine)
            if not changes:
                return
            conn = await self._db()
            async with conn.transaction(), conn.cursor() as cur:
                outcome = await write_alarms(cur, changes)
        self.health.alarms_raised.inc(outcome.alarms_raised)
        self.health.alarms_flapping.inc(outcome.flapping)

    async def housekeeping(self) -> None:
        async with self._db_lock:
            conn = await self._db()
            await self.partitions.ensure_ahead(conn)
            await self.partitions.drop_older_than(conn, self.settings.ingest_retention_days)

    async def fold_rollups(self) -> None:
        """Merge the staged rollup deltas into the hourly rollups (stock PostgreSQL)."""
        if self.mode != "stock":
            return
        async with self._db_lock:
            conn = await self._db()
            await fold_rollups(conn)

    async def refresh_registry(self) -> None:
        async with self._db_lock:
            conn = await self._db()
            registry = await load_registry(conn)
        self.registry = registry
        self._keys.clear()
        await self.sync_subscriptions()

    async def sync_subscriptions(self) -> None:
        """Subscribe to this shard's topics and record them once the broker granted them;
        let go of filters an earlier layout left in the persistent session once the gateways
        they cover are recorded by their new owner (until then this consumer keeps storing
        their batches: every reading still once, by batch id, and none unheard)."""
        async with self._sync_lock:
            wanted = self._subscriptions()
            self.link.update_subscriptions(wanted)
            topics = {t for t, _ in wanted}
            deadline = time.monotonic() + 10
            while not topics <= self.link.granted:
                if time.monotonic() > deadline or not self.link.connected:
                    return  # the next registry refresh tries again
                await asyncio.sleep(0.02)
            me, s = self.link.options.client_id, self.settings
            async with self._db_lock:
                conn = await self._db()
                async with conn.transaction(), conn.cursor() as cur:
                    await cur.execute(
                        "INSERT INTO ingest_subscriptions "
                        "(client_id, topic, gateway_id, shards, shard) "
                        "SELECT %s, t, nullif(split_part(t, '/', 3), '+'), %s, %s "
                        "FROM unnest(%s::text[]) AS t "
                        "ON CONFLICT (client_id, topic) DO UPDATE "
                        "SET shards = excluded.shards, shard = excluded.shard "
                        "WHERE (ingest_subscriptions.shards, ingest_subscriptions.shard) "
                        "IS DISTINCT FROM (excluded.shards, excluded.shard) "
                        "RETURNING topic",
                        (me, s.ingest_shards, s.ingest_shard, sorted(topics)),
                    )
                    if await cur.fetchall():  # others may now let go of these gateways
                        await cur.execute("NOTIFY gasguard_ingest_subscriptions")
                    await cur.execute(
                        "SELECT topic FROM ingest_subscriptions "
                        "WHERE client_id = %s AND NOT topic = ANY(%s)",
                        (me, sorted(topics)),
                    )
                    stale = [str(t) for (t,) in await cur.fetchall()]
                    await cur.execute(
                        "SELECT topic FROM ingest_subscriptions WHERE client_id <> %s "
                        "AND shards = %s AND gateway_id IS NOT NULL",
                        (me, s.ingest_shards),
                    )
                    elsewhere = {str(t) for (t,) in await cur.fetchall()}
            heard = topics | elsewhere
            release = []
            for t in stale:
                _, _, gw, channel = t.split("/")
                # a gateway gone from the registry is not consumed by anyone any more
                covers = self.registry.gateways if gw == "+" else {gw} & self.registry.gateways
                if all(
                    f"gasguard/v1/+/{channel}" in topics or f"gasguard/v1/{g}/{channel}" in heard
                    for g in covers
                ):
                    release.append(t)
            if release:
                self.link.unsubscribe(release)
                async with self._db_lock:
                    conn = await self._db()
                    await conn.execute(
                        "DELETE FROM ingest_subscriptions WHERE client_id = %s AND topic = ANY(%s)",
                        (me, release),
                    )
                log.info("let go of %d filter(s) of an earlier shard layout", len(release))
            if len(stale) > len(release):
                log.warning(
                    "keeping %d filter(s) of an earlier shard layout until the consumers "
                    "that now own their gateways subscribe",
                    len(stale) - len(release),
                )

    async def _listen(self) -> None:
        """Registry changes (``gasguard devices import``) and other consumers' subscriptions,
        at once: a new gateway is subscribed before it is switched on, and a gateway that
        moved shard is let go of as soon as its new owner listens."""
        backoff = Backoff(base=1.0, cap=30.0)
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.settings.database_url, connect_timeout=5, autocommit=True
                ) as conn:
                    await conn.execute("LISTEN gasguard_registry")
                    await conn.execute("LISTEN gasguard_ingest_subscriptions")
                    backoff.reset()
                    await self.link.wait_connected()
                    await self.refresh_registry()  # what changed while nobody listened
                    async for note in conn.notifies():
                        if note.channel == "gasguard_registry":
                            await self.refresh_registry()
                        else:
                            await self.sync_subscriptions()
            except (psycopg.Error, OSError) as exc:
                delay = backoff.next()
                log.warning("registry listener: %s; again in %.0f s", exc, delay)
                await asyncio.sleep(delay)

    # ------------------------------------------------------------------ main loop

    async def run(self, stop: asyncio.Event) -> None:
        conn = await self.connect_db()
        for kind in KINDS:
            arrays = await load_state(conn, self.settings.shard_name, kind)
            if arrays is not None:
                self.detection.load(kind, arrays)
                log.info("restored %s detection state", kind)
        self.link.update_subscriptions(self._subscriptions())
        self.health.start()
        link_task = asyncio.create_task(self.link.run(), name="mqtt")
        jobs = [
            asyncio.create_task(self._listen(), name="registry listener"),
            asyncio.create_task(
                self._every(self.settings.ingest_silence_every_s, self.silence_scan, stop)
            ),
            asyncio.create_task(
                self._every(self.settings.ingest_rollup_every_s, self.housekeeping, stop)
            ),
            asyncio.create_task(
                self._every(self.settings.ingest_registry_every_s, self.refresh_registry, stop)
            ),
            asyncio.create_task(
                self._every(self.settings.ingest_fold_every_s, self.fold_rollups, stop)
            ),
            asyncio.create_task(
                self._every(self.settings.ingest_health_every_s, self._write_health, stop)
            ),
        ]
        log.info(
            "ingest shard %s consuming from %s:%d",
            self.settings.shard_name,
            self.settings.mqtt_host,
            self.settings.mqtt_port,
        )
        # micro-batches in flight: the newer ones decode and COPY while the oldest commits
        inflight: deque[asyncio.Task[None]] = deque()
        depth = len(self._writers)
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await self._wake.wait()
                self._wake.clear()
                while inflight and inflight[0].done():
                    await inflight.popleft()  # raises what a micro-batch could not handle
                if not self._inbox:
                    continue
                if len(inflight) >= depth:  # meanwhile the inbox fills the next micro-batch
                    await inflight.popleft()
                urgent = any(m.topic.endswith("/alarm") for m in self._inbox)
                if len(self._inbox) < self.settings.ingest_max_messages and not urgent:
                    await asyncio.sleep(self.settings.ingest_max_wait_ms / 1000)
                batch, self._inbox = (
                    self._inbox[: self.settings.ingest_max_messages],
                    self._inbox[self.settings.ingest_max_messages :],
                )
                if self._inbox:
                    self._wake.set()
                started = time.monotonic()
                accepted, dead = self.accept(batch)  # overlaps the micro-batches in flight
                previous = inflight[-1] if inflight else None
                inflight.append(
                    asyncio.create_task(self._store(batch, accepted, dead, started, previous))
                )
        finally:
            if inflight:
                _, late = await asyncio.wait(inflight, timeout=10)
                for task in late:  # the database is away: unacknowledged, redelivered later
                    task.cancel()
                await asyncio.gather(*inflight, return_exceptions=True)
            for slot in range(depth):
                await self._drop_writer(slot)
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            await self.link.stop(send_offline=False)
            link_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await link_task
            if self._conn is not None and not self._conn.closed:
                with contextlib.suppress(psycopg.Error):
                    async with self._conn.transaction(), self._conn.cursor() as cur:
                        for kind in KINDS:
                            await save_state(
                                cur, self.settings.shard_name, kind, self.detection.arrays(kind)
                            )
                    if self.mode == "stock":  # the rollups catch up before we go
                        await fold_rollups(self._conn)
                await self._conn.close()
            self.health.stop()

    async def _write_health(self) -> None:
        async with self._db_lock:
            conn = await self._db()
            await self.health.write(conn, self.settings.shard_name, len(self._inbox))

    async def _every(self, seconds: float, job: object, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await stop.wait()
            if stop.is_set():
                return
            try:
                await job()  # type: ignore[operator]
            except (psycopg.Error, OSError) as exc:
                log.warning("%s failed: %s", getattr(job, "__name__", "job"), exc)
                if self._conn is not None and self._conn.closed:
                    self._conn = None
            except Exception:  # a bug in a periodic job: it runs again next time
                self.health.batch_errors.inc()
                log.exception("%s failed", getattr(job, "__name__", "job"))


def _concat(accepted: list[Accepted], fill: bool = False) -> dict[str, np.ndarray]:
    """Readings of one kind as columns: the fields every batch has or, with ``fill``, every
    field any batch has (missing numbers NaN, missing flags false)."""
    field_sets = [set(a.batch.fields) for a in accepted]
    names = set.union(*field_sets) if fill else set.intersection(*field_sets)
    out: dict[str, np.ndarray] = {
        "ts": np.concatenate([a.batch.ts for a in accepted]),
        "device_key": np.concatenate([a.keys for a in accepted]).astype(np.int32),
    }
    for name in sorted(names):
        parts = []
        for a in accepted:
            column = a.batch.fields.get(name)
            if column is None:
                spec = FIELDS[a.batch.kind][name]
                column = (
                    np.full(len(a.batch), np.nan)
                    if spec.type == "float"
                    else np.zeros(len(a.batch), bool)
                )
            parts.append(column)
        out[name] = np.concatenate(parts)
    return out
