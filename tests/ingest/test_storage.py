"""Migrations, the registry import, partitions and binary COPY on the real PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psycopg
import pytest

from ingest.registry import RegistryError, import_csv, load_registry, parse_csv
from ingest.storage import MigrationError, Partitions, migrate, migrations
from ingest.writer import copy_readings
from tests.ingest.conftest import register, registry_csv

pytestmark = pytest.mark.integration


def query(url: str, sql: str, params: object = None) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def test_migrations_apply_once_on_an_empty_database(empty_database: str) -> None:
    async def run() -> tuple[list[str], list[str]]:
        async with await psycopg.AsyncConnection.connect(empty_database) as conn:
            return await migrate(conn), await migrate(conn)

    first, second = asyncio.run(run())
    assert first == [f"{m.version:04d}_{m.name}" for m in migrations("stock")] and second == []
    tables = {
        r[0]
        for r in query(
            empty_database, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        )
    }
    assert {
        "devices",
        "alarms",
        "alarm_outbox",
        "ingested_batches",
        "dead_letters",
        "meter_hourly",
    } <= tables
    kinds = query(empty_database, "SELECT relkind FROM pg_class WHERE relname = 'meter_readings'")
    assert kinds == [("p",)], "readings are partitioned"
    assert query(
        empty_database, "SELECT DISTINCT variant FROM schema_migrations WHERE variant <> ''"
    ) == [("stock",)]


def test_a_changed_migration_is_refused(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("UPDATE schema_migrations SET checksum = 'x' WHERE version = 1")

    async def run() -> None:
        async with await psycopg.AsyncConnection.connect(database) as conn:
            await migrate(conn)

    with pytest.raises(MigrationError, match="0001_registry changed after it was applied"):
        asyncio.run(run())


def test_registry_import_and_reload(database: str, tmp_path: Path) -> None:
    assert register(database, registry_csv(tmp_path / "r.csv", "GW-1", 3, 2, districts=2)) == 5
    assert (
        register(database, registry_csv(tmp_path / "r.csv", "GW-1", 3, 2, districts=2)) == 5
    )  # idempotent

    async def run() -> object:
        async with await psycopg.AsyncConnection.connect(database) as conn:
            return await load_registry(conn)

    reg = asyncio.run(run())
    assert reg.gateways == {"GW-1"}  # type: ignore[attr-defined]
    m2 = reg.by_id["M-0002"]  # type: ignore[attr-defined]
    assert m2.kind == "meter" and m2.qmax == 4.0 and m2.household_id == "H-0002"
    assert reg.by_id["D-0003"].district == "district-2"  # type: ignore[attr-defined]


BAD_ROWS = [
    (
        "D-1,detector,H-1,d1,addr,,GW-1,detector-generic,G4,60,false",
        "line 2: meter_size: only meters have a size",
    ),
    (
        "M-1,meter,H-1,d1,addr,,GW-1,meter-generic,,60,false",
        "line 2: meter_size: a meter needs its size",
    ),
    (
        "M-1,meter,H-1,d1,addr,,GW-1,meter-generic,G9,60,false",
        "line 2: meter_size: Input should be",
    ),
    (
        "X 1,detector,H-1,d1,addr,,GW-1,detector-generic,,60,false",
        "line 2: device_id: String should match",
    ),
    (
        "D-1,toaster,H-1,d1,addr,,GW-1,detector-generic,,60,false",
        "line 2: kind: Input should be 'detector' or 'meter'",
    ),
    (
        "D-1,detector,H-1,d1,,,GW-1,detector-generic,,60,false",
        "line 2: address: String should have at least 1",
    ),
    (
        "D-1,detector,H-1,d1,addr,,GW-1,detector-generic,,-5,false",
        "line 2: expected_interval_s: Input should be greater than 0",
    ),
    (
        "D-1,detector,H-1,d1,addr,,GW-1,detector-generic,,60,maybe",
        "line 2: test_mode: Input should be a valid boolean",
    ),
    (
        "D-1,detector,H-1,d1,addr,,GW-1,detector-generic,,60,false,extra",
        "line 2: more values than columns",
    ),
]
HEADER = "device_id,kind,household_id,district,address,phone,gateway_id,profile,meter_size,expected_interval_s,test_mode"


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_bad_rows_name_line_and_field_and_nothing_is_imported(
    database: str, tmp_path: Path, row: str, message: str
) -> None:
    good = "D-9,detector,H-9,d1,addr,,GW-1,detector-generic,,60,false"
    path = tmp_path / "bad.csv"
    path.write_text(f"{HEADER}\n{row}\n{good}\n")
    with pytest.raises(RegistryError) as err:
        parse_csv(path.read_text(), str(path))
    assert f"{path}: {message}" in str(err.value)

    async def run() -> None:
        async with await psycopg.AsyncConnection.connect(database) as conn:
            await import_csv(conn, path)

    with pytest.raises(RegistryError):
        asyncio.run(run())
    assert query(database, "SELECT count(*) FROM devices") == [(0,)], "nothing half-imported"


def test_csv_header_and_duplicates(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="line 1: header misses kind"):
        parse_csv("device_id,household_id\n", "f.csv")
    row = "D-1,detector,H-1,d1,addr,,GW-1,detector-generic,,60,false"
    with pytest.raises(RegistryError, match="line 3: device_id: D-1 already on line 2"):
        parse_csv(f"{HEADER}\n{row}\n{row}\n", "f.csv")


def test_binary_copy_stores_readings_with_nulls_for_lost_ones(
    database: str, tmp_path: Path
) -> None:
    register(database, registry_csv(tmp_path / "r.csv", "GW-1", 0, 2))
    t0 = int(datetime(2026, 3, 1, 23, 59, tzinfo=UTC).timestamp() * 1000)

    async def run() -> None:
        async with await psycopg.AsyncConnection.connect(database) as conn:
            parts = Partitions("stock")
            await parts.ensure(conn, "meter_readings", [t0 // 86_400_000, t0 // 86_400_000 + 1])
            async with conn.transaction(), conn.cursor() as cur:
                await copy_readings(
                    cur,
                    "meter",
                    {
                        "ts": np.array([t0, t0 + 120_000, t0 + 240_000], dtype=np.int64),
                        "device_key": np.array([1, 2, 1], dtype=np.int32),
                        "volume_m3": np.array([10.5, 20.25, np.nan]),
                        "flow_m3h": np.array([0.5, 0.0, np.nan]),
                        "valve_closed": np.array([False, True, False]),
                        "comm_lost": np.array([False, False, True]),
                    },
                )

    asyncio.run(run())
    rows = query(
        database,
        "SELECT ts, device_key, volume_m3, flow_m3h, valve_closed, comm_lost, pressure_kpa "
        "FROM meter_readings ORDER BY ts",
    )
    assert [r[1:] for r in rows] == [
        (1, 10.5, 0.5, False, False, None),
        (2, 20.25, 0.0, True, False, None),
        (1, None, None, None, True, None),
    ]
    assert rows[0][0] == datetime(2026, 3, 1, 23, 59, tzinfo=UTC)
    parts = {
        r[0]
        for r in query(
            database, "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        )
    }
    assert {"meter_readings_20260301", "meter_readings_20260302"} <= parts


def test_stock_rollups_have_the_columns_the_timescale_smoke_test_expects(database: str) -> None:
    """The same dashboard queries must work on both storage modes."""
    from tests.ingest.test_timescale_smoke import ROLLUP_COLUMNS

    for table, columns in ROLLUP_COLUMNS.items():
        found = query(
            database,
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = %s ORDER BY ordinal_position",
            (table,),
        )
        assert [tuple(c) for c in found] == columns, table


def test_a_reading_is_stored_once_per_device_and_time_and_repeats_are_reported(
    database: str, tmp_path: Path
) -> None:
    register(database, registry_csv(tmp_path / "r.csv", "GW-1", 0, 2))
    t0 = int(datetime(2026, 3, 1, 12, 0, tzinfo=UTC).timestamp() * 1000)

    def batch(ts: list[int], keys: list[int], flow: list[float]) -> dict[str, np.ndarray]:
        n = len(ts)
        return {"ts": np.array(ts, np.int64), "device_key": np.array(keys, np.int32),
                "volume_m3": np.full(n, 1.0), "flow_m3h": np.array(flow),
                "comm_lost": np.array([np.isnan(f) for f in flow])}  # fmt: skip

    async def run() -> list[list[bool]]:
        out = []
        async with await psycopg.AsyncConnection.connect(database) as conn:
            await Partitions("stock").ensure(conn, "meter_readings", [t0 // 86_400_000])
            for cols in (
                batch([t0, t0 + 60_000, t0 + 120_000], [1, 1, 2], [0.1, 0.2, np.nan]),
                # again, under another batch: two repeats (one lost), one new, one twice in it
                batch(
                    [t0 + 60_000, t0 + 120_000, t0 + 180_000, t0 + 180_000],
                    [1, 2, 1, 1],
                    [0.2, np.nan, 0.3, 0.3],
                ),
                batch([t0 + 240_000], [2], [0.4]),  # no repeat: the plain COPY
            ):
                async with conn.transaction(), conn.cursor() as cur:
                    out.append((await copy_readings(cur, "meter", cols)).tolist())
        return out

    assert asyncio.run(run()) == [[True] * 3, [False, False, True, False], [True]]
    rows = query(database, "SELECT device_key, ts, flow_m3h, comm_lost FROM meter_readings "
                           "ORDER BY device_key, ts")  # fmt: skip
    assert [(k, int(ts.timestamp() * 1000) - t0, f, lost) for k, ts, f, lost in rows] == [
        (1, 0, 0.1, False), (1, 60_000, 0.2, False), (1, 180_000, 0.3, False),
        (2, 120_000, None, True), (2, 240_000, 0.4, False)]  # fmt: skip
