"""The gateway's spool: every outgoing MQTT batch is on disk (SQLite, WAL, synchronous=FULL)
before it is sent, and deleted only after the broker's PUBACK. After an outage the forwarder
replays it in seq order with the original payloads. The per-gateway seq lives here, so (gw, seq)
stays unique across restarts; a new spool file starts at ``first_seq`` (the gateway passes the
time in epoch ms, above any seq an earlier spool file of the same gateway handed out).

Bounded by bytes and age: the oldest *routine* telemetry goes first, alarms never; drops are
counted (persisted) and logged once per episode. It also keeps the results of executed
commands by id, so a repeated command is harmless. One connection, one thread: the event loop
calls it directly (a put is one small transaction and one fsync).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Self

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: A drop episode ends (and is summarised) once the spool is back under this share of both
#: bounds. The hysteresis keeps a spool that hovers at its limit to one warning, not one per put.
EPISODE_END = 0.9

_SCHEMA = (
    # One row of running totals, changed in the same transactions as the batches, so that
    # put() never has to SUM over the table.
    """CREATE TABLE meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        next_seq INTEGER NOT NULL, batches INTEGER NOT NULL, bytes INTEGER NOT NULL,
        alarms INTEGER NOT NULL, dropped_batches INTEGER NOT NULL,
        dropped_readings INTEGER NOT NULL)""",
    # payload last: scans of the small columns then never touch its overflow pages.
    """CREATE TABLE batches (
        seq INTEGER PRIMARY KEY, alarm INTEGER NOT NULL, readings INTEGER NOT NULL,
        created_ms INTEGER NOT NULL, bytes INTEGER NOT NULL, topic TEXT NOT NULL,
        payload BLOB NOT NULL)""",
    "CREATE INDEX batches_by_kind ON batches (alarm)",  # (alarm, seq): oldest routine first
    "CREATE INDEX batches_by_kind_age ON batches (alarm, created_ms)",
    """CREATE TABLE command_results (
        id INTEGER PRIMARY KEY, command_id TEXT NOT NULL UNIQUE, result BLOB NOT NULL,
        at_ms INTEGER NOT NULL)""",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
_BATCH_COLUMNS = "seq, topic, payload, alarm, readings, created_ms"
_IN_CHUNK = 500  # seqs per DELETE ... IN (...), well under SQLite's limit on parameters


@dataclass(frozen=True)
class SpooledBatch:
    seq: int
    topic: str
    payload: bytes
    alarm: bool
    readings: int
    created_ms: int


@dataclass(frozen=True)
class SpoolStats:
    batches: int
    bytes: int
    alarms: int
    oldest_ms: int | None
    dropped_batches: int  # totals since the spool file was created (persisted)
    dropped_readings: int
    next_seq: int


class SpoolError(Exception):
    """The spool file cannot be used (not writable, corrupt, another schema); names the path."""


@dataclass
class _Dropped:
    batches: int = 0
    readings: int = 0
    too_old: int = 0  # of the batches, those dropped by max_age (the rest by max_bytes)
    alarms_over: bool = False  # still over max_bytes with nothing but alarms left
    relieved: bool = False  # back under EPISODE_END of both bounds


class Spool:
    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = 256 * 2**20,
        max_age_s: float = 7 * 86400,
        clock: Callable[[], float] = time.time,
        max_command_results: int = 10_000,
        first_seq: int = 1,
    ) -> None:
        """``first_seq``: the first sequence number of a spool file created now (an existing
        file continues its own sequence)."""
        if max_bytes <= 0 or max_age_s <= 0 or max_command_results <= 0:
            raise ValueError("spool bounds must be positive")
        if not 0 <= first_seq < 2**62:
            raise ValueError(f"first_seq must be from 0 to 2**62, got {first_seq}")
        self._first_seq = first_seq
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.max_command_results = max_command_results
        self._clock = clock
        self._episode: _Dropped | None = None  # dropped so far in the current drop episode
        self._alarms_over = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SpoolError(f"spool {self.path}: cannot create its directory: {e}") from e
        with self._guard():
            self._db = sqlite3.connect(self.path, isolation_level=None)
        try:
            self._open()
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> None:
        with self._guard():
            (mode,) = self._db.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode != "wal":
                raise SpoolError(f"spool {self.path}: cannot use WAL mode (got {mode!r})")
            self._db.execute("PRAGMA synchronous = FULL")
        with self._tx() as db:  # a write transaction: also proves the file is writable
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version == 0:
                if db.execute("SELECT 1 FROM sqlite_master").fetchone():
                    raise SpoolError(f"spool {self.path}: an SQLite file, but not a spool")
                for statement in _SCHEMA:
                    db.execute(statement)
                db.execute("INSERT INTO meta VALUES (1, ?, 0, 0, 0, 0, 0)", (self._first_seq,))
            elif version != SCHEMA_VERSION:
                raise SpoolError(
                    f"spool {self.path}: schema version {version}, this gateway reads "
                    f"version {SCHEMA_VERSION}"
                )

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise SpoolError(f"spool {self.path}: {e}") from e

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; SQLite errors become SpoolError, others (encode's) pass."""
        with self._guard():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def put(
        self,
        topic: str,
        encode: Callable[[int], bytes],
        *,
        alarm: bool,
        readings: int,
        created_ms: int,
    ) -> SpooledBatch:
        """Spool one batch under the next seq; ``encode(seq)`` makes its payload.

        Durable when it returns. If ``encode`` raises, nothing is written and the seq is not
        consumed. The bounds are enforced in the same transaction, so a routine batch may be
        dropped at once if it alone is over ``max_bytes``; its later ack then returns False.
        """
        with self._tx() as db:
            (seq,) = db.execute("SELECT next_seq FROM meta").fetchone()
            payload = encode(seq)
            db.execute(
                "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, ?)",
                (seq, alarm, readings, created_ms, len(payload), topic, payload),
            )
            db.execute(
                "UPDATE meta SET next_seq = ?, batches = batches + 1, bytes = bytes + ?,"
                " alarms = alarms + ?",
                (seq + 1, len(payload), int(alarm)),
            )
            dropped = self._enforce(db)
        self._report(dropped)
        return SpooledBatch(seq, topic, payload, alarm, readings, created_ms)

    def batches(self, seqs: Iterable[int]) -> list[SpooledBatch]:
        """The batches of ``seqs`` still in the spool, in ascending seq."""
        wanted = sorted(set(seqs))
        rows = []
        with self._guard():
            for lo in range(0, len(wanted), _IN_CHUNK):
                part = wanted[lo : lo + _IN_CHUNK]
                rows += self._db.execute(
                    f"SELECT {_BATCH_COLUMNS} FROM batches"
                    f" WHERE seq IN ({', '.join('?' * len(part))}) ORDER BY seq",
                    part,
                ).fetchall()
        return [SpooledBatch(s, t, p, bool(a), r, c) for s, t, p, a, r, c in rows]

    def pending(self, after_seq: int = 0, limit: int = 100) -> list[SpooledBatch]:
        """Unacknowledged batches with ``seq > after_seq``, in ascending seq."""
        return self._pending("", after_seq, limit)

    def pending_alarms(self, after_seq: int = 0, limit: int = 100) -> list[SpooledBatch]:
        """Unacknowledged alarm batches with ``seq > after_seq``, in ascending seq."""
        return self._pending("alarm = 1 AND", after_seq, limit)

    def pending_routine(self, after_seq: int = 0, limit: int = 100) -> list[SpooledBatch]:
        """Unacknowledged routine (non-alarm) batches with ``seq > after_seq``, ascending."""
        return self._pending("alarm = 0 AND", after_seq, limit)

    def _pending(self, kind: str, after_seq: int, limit: int) -> list[SpooledBatch]:
        with self._guard():  # with kind: the (alarm, seq) index
            rows = self._db.execute(
                f"SELECT {_BATCH_COLUMNS} FROM batches WHERE {kind} seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [SpooledBatch(s, t, p, bool(a), r, c) for s, t, p, a, r, c in rows]

    def ack(self, seq: int) -> bool:
        """Forget a batch the broker has; False if it was not there (already acked or dropped)."""
        with self._tx() as db:
            row = db.execute(
                "DELETE FROM batches WHERE seq = ? RETURNING bytes, alarm", (seq,)
            ).fetchone()
            if row is not None:
                db.execute(
                    "UPDATE meta SET batches = batches - 1, bytes = bytes - ?, alarms = alarms - ?",
                    row,
                )
        return row is not None

    def ack_many(self, seqs: Iterable[int]) -> int:
        """Forget every batch of ``seqs`` the broker has, in one transaction (one fsync);
        how many were there (the others were already acked or dropped)."""
        wanted = sorted(set(seqs))
        if not wanted:
            return 0
        gone: list[tuple[int, int]] = []
        with self._tx() as db:
            for lo in range(0, len(wanted), _IN_CHUNK):
                part = wanted[lo : lo + _IN_CHUNK]
                gone += db.execute(
                    f"DELETE FROM batches WHERE seq IN ({', '.join('?' * len(part))})"
                    " RETURNING bytes, alarm",
                    part,
                ).fetchall()
            if gone:
                db.execute(
                    "UPDATE meta SET batches = batches - ?, bytes = bytes - ?, alarms = alarms - ?",
                    (len(gone), sum(b for b, _ in gone), sum(a for _, a in gone)),
                )
        return len(gone)

    def stats(self) -> SpoolStats:
        with self._guard():
            row = self._db.execute(  # oldest: one index probe per kind, not a scan
                "SELECT batches, bytes, alarms, (SELECT min(m) FROM ("
                " SELECT min(created_ms) AS m FROM batches WHERE alarm = 0 UNION ALL"
                " SELECT min(created_ms) FROM batches WHERE alarm = 1)),"
                " dropped_batches, dropped_readings, next_seq FROM meta"
            ).fetchone()
        return SpoolStats(*row)

    def enforce_bounds(self) -> int:
        """Drop routine batches over max_age, then the oldest routine ones until the payload
        bytes are within max_bytes. Alarms are never dropped. Returns how many were dropped."""
        with self._tx() as db:
            dropped = self._enforce(db)
        self._report(dropped)
        return dropped.batches

    def _enforce(self, db: sqlite3.Connection) -> _Dropped:
        now_ms = int(self._clock() * 1000)
        max_age_ms = int(self.max_age_s * 1000)
        rows = db.execute(
            "DELETE FROM batches WHERE alarm = 0 AND created_ms < ? RETURNING bytes, readings",
            (now_ms - max_age_ms,),
        ).fetchall()
        too_old = len(rows)
        (size,) = db.execute("SELECT bytes FROM meta").fetchone()
        size -= sum(r[0] for r in rows)
        if size > self.max_bytes:
            excess, last_seq = size - self.max_bytes, None
            oldest_routine = db.execute(
                "SELECT seq, bytes FROM batches WHERE alarm = 0 ORDER BY seq"
            )
            for seq, nbytes in oldest_routine:
                last_seq, excess = seq, excess - nbytes
                if excess <= 0:
                    break
            oldest_routine.close()
            if last_seq is not None:
                more = db.execute(
                    "DELETE FROM batches WHERE alarm = 0 AND seq <= ? RETURNING bytes, readings",
                    (last_seq,),
                ).fetchall()
                size -= sum(r[0] for r in more)
                rows += more
        result = _Dropped(len(rows), sum(r[1] for r in rows), too_old, size > self.max_bytes)
        if rows:
            db.execute(
                "UPDATE meta SET batches = batches - ?, bytes = ?,"
                " dropped_batches = dropped_batches + ?, dropped_readings = dropped_readings + ?",
                (result.batches, size, result.batches, result.readings),
            )
        elif self._episode is not None or self._alarms_over:
            (oldest,) = db.execute("SELECT min(created_ms) FROM batches WHERE alarm = 0").fetchone()
            result.relieved = size <= EPISODE_END * self.max_bytes and (
                oldest is None or now_ms - oldest <= EPISODE_END * max_age_ms
            )
        return result

    def _report(self, dropped: _Dropped) -> None:
        """Log drop episodes once at their start (WARNING) and once at their end (INFO)."""
        if dropped.batches:
            if self._episode is None:
                self._episode = _Dropped()
                log.warning(
                    "spool %s is over its bounds: dropping the oldest routine telemetry, keeping"
                    " alarms (%d batches older than %g s, %d more to stay within %d bytes)",
                    self.path,
                    dropped.too_old,
                    self.max_age_s,
                    dropped.batches - dropped.too_old,
                    self.max_bytes,
                )
            self._episode.batches += dropped.batches
            self._episode.readings += dropped.readings
        elif dropped.relieved and self._episode is not None:
            log.info(
                "spool %s is back within its bounds; dropped %d batches (%d readings) meanwhile",
                self.path,
                self._episode.batches,
                self._episode.readings,
            )
            self._episode = None
        if dropped.alarms_over and not self._alarms_over:
            log.warning(
                "spool %s holds more than %d bytes of alarms alone; alarms are never dropped",
                self.path,
                self.max_bytes,
            )
        self._alarms_over = dropped.alarms_over or (self._alarms_over and not dropped.relieved)

    def command_result(self, command_id: str) -> bytes | None:
        """The saved result of an executed command, or None if it never ran here."""
        with self._guard():
            row = self._db.execute(
                "SELECT result FROM command_results WHERE command_id = ?", (command_id,)
            ).fetchone()
        return None if row is None else bytes(row[0])

    def save_command_result(self, command_id: str, result: bytes, at_ms: int) -> None:
        """Remember a command's result; keeps the last ``max_command_results`` commands."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO command_results (command_id, result, at_ms) VALUES (?, ?, ?)"
                " ON CONFLICT (command_id) DO UPDATE SET result = excluded.result,"
                " at_ms = excluded.at_ms",
                (command_id, result, at_ms),
            )
            # Ids are dense: rows are only ever deleted from the oldest end.
            db.execute(
                "DELETE FROM command_results WHERE id <= (SELECT max(id) FROM command_results) - ?",
                (self.max_command_results,),
            )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
