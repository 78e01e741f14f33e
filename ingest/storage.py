"""The database side of ingest: migrations, the storage mode (TimescaleDB or stock
PostgreSQL, chosen at start-up and logged), day partitions, retention and rollups.

Migrations are plain versioned SQL files in ``ingest/migrations``: ``NNNN_name.sql`` for
both modes, ``NNNN_name.stock.sql`` / ``NNNN_name.timescale.sql`` where they differ. Each is
applied once, in its own transaction, and recorded with its checksum.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, Literal

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

Mode = Literal["timescale", "stock"]
READING_TABLES = ("detector_readings", "meter_readings")
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+?)(?:\.(stock|timescale))?\.sql$")
DAY_MS = 86_400_000


class MigrationError(RuntimeError):
    """A migration file is missing, changed after it was applied, or failed."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    variant: str  # "", "stock" or "timescale"
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def migrations(mode: Mode) -> list[Migration]:
    """The migrations for one storage mode, in version order."""
    found: dict[int, Migration] = {}
    folder = resources.files("ingest").joinpath("migrations")
    for entry in folder.iterdir():
        m = _NAME.match(entry.name)
        if m is None:
            continue
        version, name, variant = int(m.group(1)), m.group(2), m.group(3) or ""
        if variant and variant != mode:
            continue
        if version in found:
            raise MigrationError(f"two migrations with version {version:04d}")
        found[version] = Migration(version, name, variant, entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def timescale_available(conn: psycopg.AsyncConnection[Any]) -> bool:
    cur = await conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")
    return await cur.fetchone() is not None


async def choose_mode(conn: psycopg.AsyncConnection[Any]) -> Mode:
    """TimescaleDB when the server has it, stock PostgreSQL otherwise (or what the schema
    was created with, once it exists)."""
    await _ensure_ledger(conn)
    cur = await conn.execute("SELECT variant FROM schema_migrations WHERE variant <> '' LIMIT 1")
    row = await cur.fetchone()
    if row is not None:
        return "timescale" if row[0] == "timescale" else "stock"
    return "timescale" if await timescale_available(conn) else "stock"


async def _ensure_ledger(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
        "name text NOT NULL, variant text NOT NULL, checksum text NOT NULL, "
        "applied_at timestamptz NOT NULL DEFAULT now())"
    )


async def migrate(conn: psycopg.AsyncConnection[Any], mode: Mode | None = None) -> list[str]:
    """Apply what is missing; returns the names applied. Refuses changed applied files."""
    await conn.commit()
    await conn.set_autocommit(True)
    mode = mode or await choose_mode(conn)
    await _ensure_ledger(conn)
    if mode == "timescale":
        await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    cur = await conn.execute("SELECT version, name, checksum FROM schema_migrations")
    applied = {int(v): (str(n), str(c)) for v, n, c in await cur.fetchall()}
    done = []
    for m in migrations(mode):
        if m.version in applied:
            _, checksum = applied[m.version]
            if checksum != m.checksum:
                raise MigrationError(
                    f"migration {m.version:04d}_{m.name} changed after it was applied "
                    f"(checksum {checksum}, file {m.checksum}); add a new migration instead"
                )
            continue
        try:
            async with conn.transaction():
                await conn.execute(m.text.encode())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, variant, checksum) "
                    "VALUES (%s, %s, %s, %s)",
                    (m.version, m.name, m.variant, m.checksum),
                )
        except psycopg.Error as exc:
            raise MigrationError(f"migration {m.version:04d}_{m.name} failed: {exc}") from exc
        log.info(
            "applied migration %04d_%s%s", m.version, m.name, f" ({m.variant})" if m.variant else ""
        )
        done.append(f"{m.version:04d}_{m.name}")
    return done


def partition_name(table: str, day: int) -> str:
    return f"{table}_{datetime.fromtimestamp(day * 86400, UTC):%Y%m%d}"


class Partitions:
    """Day partitions of the reading tables on stock PostgreSQL (TimescaleDB makes chunks)."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self._known: set[tuple[str, int]] = set()

    async def load(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self.mode != "stock":
            return
        cur = await conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = ANY(%s)",
            (list(READING_TABLES),),
        )
        for (name,) in await cur.fetchall():
            table, _, day = str(name).rpartition("_")
            epoch = datetime.strptime(day, "%Y%m%d").replace(tzinfo=UTC).timestamp()
            self._known.add((table, int(epoch // 86400)))

    async def ensure(self, conn: psycopg.AsyncConnection[Any], table: str, days: list[int]) -> None:
        """Create the day partitions the readings need (idempotent, safe with other consumers)."""
        if self.mode != "stock":
            return
        for day in days:
            if (table, day) in self._known:
                continue
            start = datetime.fromtimestamp(day * 86400, UTC)
            stmt = sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})"
            ).format(
                sql.Identifier(partition_name(table, day)),
                sql.Identifier(table),
                sql.Literal(start),
                sql.Literal(start + timedelta(days=1)),
            )
            try:
                async with conn.transaction():
                    await conn.execute(stmt)
            except (psycopg.errors.DuplicateTable, psycopg.errors.UniqueViolation):
                pass  # another consumer made it a moment ago
            self._known.add((table, day))
            log.info("created partition %s", partition_name(table, day))

    async def ensure_ahead(self, conn: psycopg.AsyncConnection[Any], days_ahead: int = 3) -> None:
        today = int(datetime.now(UTC).timestamp() // 86400)
        for table in READING_TABLES:
            await self.ensure(conn, table, list(range(today - 1, today + days_ahead + 1)))

    async def drop_older_than(
        self, conn: psycopg.AsyncConnection[Any], keep_days: int
    ) -> list[str]:
        """The retention job on stock PostgreSQL: drop whole day partitions past retention."""
        if self.mode != "stock":
            return []
        cutoff = int(datetime.now(UTC).timestamp() // 86400) - keep_days
        dropped = []
        for table, day in sorted(self._known):
            if day < cutoff:
                name = partition_name(table, day)
                async with conn.transaction():
                    await conn.execute(
                        sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name))
                    )
                self._known.discard((table, day))
                dropped.append(name)
                log.info("retention: dropped partition %s", name)
        return dropped
