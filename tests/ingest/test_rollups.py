"""Staged rollups: each micro-batch's per-hour figures are appended in its own transaction
and folded into the hourly rollups later, exactly once, one folder at a time."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg
import pytest

from ingest.writer import FOLD_LOCK, fold_rollups, stage_rollups
from tests.ingest.conftest import register, registry_csv

pytestmark = pytest.mark.integration
HOUR = 3_600_000
T0 = 1_790_000_000_000 // HOUR * HOUR


def meters(
    keys: list[int], ts: list[int], volume: list[float], flow: list[float]
) -> dict[str, np.ndarray]:
    return {"device_key": np.array(keys, np.int32), "ts": np.array(ts, np.int64),
            "volume_m3": np.array(volume), "flow_m3h": np.array(flow, np.float32),
            "pressure_kpa": np.full(len(keys), 2.0, np.float32),
            "comm_lost": np.zeros(len(keys), bool)}  # fmt: skip


async def device_keys(conn: psycopg.AsyncConnection[object]) -> list[int]:
    cur = await conn.execute("SELECT key FROM devices ORDER BY id")
    return [int(r[0]) for r in await cur.fetchall()]


def test_staged_figures_fold_into_the_hourly_rollups_once(database: str, tmp_path: Path) -> None:
    register(database, registry_csv(tmp_path / "r.csv", "GW-1", 0, 2))

    async def run() -> tuple[list[tuple[object, ...]], bool, int]:
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            key1, key2 = await device_keys(conn)
            for batch in (  # three micro-batches, the second spanning two hours
                meters([key1, key2], [T0 + 1000, T0 + 2000], [10.0, 50.0], [0.5, 1.0]),
                meters([key1, key1], [T0 + 3000, T0 + HOUR + 10], [10.4, 11.0], [0.9, 0.2]),
                meters([key2], [T0 + 4000], [50.2], [np.nan]),
            ):
                async with conn.transaction(), conn.cursor() as cur:
                    await stage_rollups(cur, "meter", batch)
                if batch is not None and len(batch["ts"]) == 2 and batch["ts"][1] > T0 + HOUR:
                    assert await fold_rollups(conn)  # a fold between micro-batches
            # another consumer folding right now: this one leaves the rows to it
            async with (
                await psycopg.AsyncConnection.connect(database) as other,
                other.transaction(),
            ):
                await other.execute("SELECT pg_advisory_xact_lock(%s)", (FOLD_LOCK,))
                busy = await fold_rollups(conn)
            assert await fold_rollups(conn)
            assert await fold_rollups(conn), "an empty fold is harmless"
            rows = await (await conn.execute(
                "SELECT device_key, extract(epoch FROM bucket)::bigint * 1000 - %s, min_volume_m3, max_volume_m3, "
                "consumption_m3, max_flow_m3h, readings FROM meter_hourly ORDER BY 1, 2", (T0,))).fetchall()  # fmt: skip
            left = await (await conn.execute("SELECT count(*) FROM meter_hourly_delta")).fetchone()
            assert left is not None
            return rows, busy, int(left[0])

    rows, busy, left = asyncio.run(run())
    assert not busy and left == 0
    k1, k2 = rows[0][0], rows[2][0]
    assert rows == [
        (k1, 0, 10.0, 10.4, pytest.approx(0.4), pytest.approx(0.9), 2),
        (k1, HOUR, 11.0, 11.0, 0.0, pytest.approx(0.2), 1),
        (k2, 0, 50.0, 50.2, pytest.approx(0.2), 1.0, 2),  # a missing flow does not count as one
    ]


def test_usage_counts_what_flows_between_hours_also_for_a_meter_reporting_hourly(
    database: str, tmp_path: Path
) -> None:
    """meter_usage: an hour's use runs from the previous hour's last reading (within the
    lookback), so a meter with one reading an hour shows its use, not zero; and the days of
    district_daily add up the same way."""
    register(database, registry_csv(tmp_path / "r.csv", "GW-1", 0, 2))

    async def run() -> tuple[list[tuple[object, ...]], list[tuple[object, ...]], object]:
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            key1, key2 = await device_keys(conn)
            hourly = [T0 + h * HOUR + 60_000 for h in range(4)]  # one reading an hour
            async with conn.transaction(), conn.cursor() as cur:
                await stage_rollups(cur, "meter", meters(
                    [key1] * 4 + [key2] * 3,
                    [*hourly, T0 + 1000, T0 + 2000, T0 + 3 * HOUR],  # key2: a 3-hour gap
                    [100.0, 100.5, 101.5, 101.6, 7.0, 7.25, 8.0],
                    [0.0] * 7,
                ))  # fmt: skip
            assert await fold_rollups(conn)
            start = datetime.fromtimestamp(T0 / 1000, UTC)
            usage = await (await conn.execute(
                "SELECT device_key, extract(epoch FROM bucket)::bigint * 1000 - %s, "
                "consumption_m3 FROM meter_usage(%s, %s) ORDER BY 1, 2",
                (T0, start, start + timedelta(hours=5)),
            )).fetchall()  # fmt: skip
            later = await (await conn.execute(
                "SELECT device_key, consumption_m3 FROM meter_usage(%s, %s) ORDER BY 1",
                (start + timedelta(hours=2), start + timedelta(hours=5)),
            )).fetchall()  # fmt: skip
            daily = await (await conn.execute(
                "SELECT sum(consumption_m3) FROM district_daily")).fetchone()  # fmt: skip
            return usage, later, daily[0] if daily else None

    usage, later, daily = asyncio.run(run())
    k1, k2 = usage[0][0], usage[-1][0]
    assert usage == [
        (k1, 0, 0.0),  # no earlier reading: within the hour only
        (k1, HOUR, pytest.approx(0.5)),
        (k1, 2 * HOUR, pytest.approx(1.0)),
        (k1, 3 * HOUR, pytest.approx(0.1)),
        (k2, 0, pytest.approx(0.25)),
        (k2, 3 * HOUR, pytest.approx(0.75)),  # the gap's use lands on the next reading's hour
    ]
    # a range that starts later still looks back for the reading before it
    assert later == [(k1, pytest.approx(1.0)), (k1, pytest.approx(0.1)), (k2, pytest.approx(0.75))]
    assert daily == pytest.approx(1.6 + 1.0)
