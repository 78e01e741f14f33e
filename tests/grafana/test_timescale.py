"""The dashboards' SQL on TimescaleDB: the same queries over hypertables and continuous
aggregates (the rollups' names and columns are the same in both storage modes).

No TimescaleDB server is installable here, so this uses the WebAssembly PostgreSQL 17 +
TimescaleDB build that the ingest smoke test serves (its ``timescale`` fixture; skipped, with
the reason, when Node.js or the npm registry is missing). That build has no COPY, so a small
registry and three hours of readings go in with plain INSERTs. Every query must run and return
its panel's columns; that each returns rows is checked on stock PostgreSQL
(test_dashboards.py), with a whole simulated day.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.grafana.grafana_sql import TimeRange
from tests.grafana.panels import dashboards, run_dashboard
from tests.ingest.test_timescale_smoke import Server, timescale

pytestmark = [pytest.mark.integration, pytest.mark.slow]
__all__ = ["timescale"]  # the server fixture, started for this module

DATA = [
    "INSERT INTO gateways (id) VALUES ('GW-TS')",
    """
    INSERT INTO households (id, district, address) VALUES
        ('H-0003', 'district-1', '3 Test St'), ('H-0004', 'district-2', '4 Test St')
    """,
    """
    INSERT INTO devices (id, kind, household_id, gateway_id, profile, meter_size)
    SELECT kind_prefix || substr(h, 2), kind, h, 'GW-TS', kind || '-generic',
           CASE kind WHEN 'meter' THEN 'G2.5' END
    FROM (VALUES ('D', 'detector'), ('M', 'meter')) k(kind_prefix, kind),
         unnest(ARRAY['H-0003', 'H-0004']) h
    """,
    """
    INSERT INTO detector_readings (ts, device_key, ch4_lel, alarm, fault, valve_closed, eol, temp_c)
    SELECT ts, d.key, 0.5 + random(), false, false, false, false, 20
    FROM devices d, generate_series(now() - interval '3 hours', now(), interval '1 minute') ts
    WHERE d.kind = 'detector'
    """,
    """
    INSERT INTO meter_readings (ts, device_key, volume_m3, flow_m3h, pressure_kpa, valve_closed,
                                battery_pct, tamper, reverse_flow)
    SELECT ts, d.key, 100 + extract(epoch FROM ts - now()) / 36000.0, 0.1, 2.0, false, 90, false,
           false
    FROM devices d, generate_series(now() - interval '3 hours', now(), interval '1 minute') ts
    WHERE d.kind = 'meter'
    """,
    "CALL refresh_continuous_aggregate('meter_hourly', NULL, NULL)",
    "CALL refresh_continuous_aggregate('detector_hourly', NULL, NULL)",
    """
    INSERT INTO alarms (device_key, device_id, household_id, district, rule, severity, raised_at)
    SELECT key, id, household_id, 'district-1', 'gas_low', 'major', now() - interval '1 hour'
    FROM devices WHERE id = 'D-0003'
    """,
    """
    INSERT INTO tickets (category, priority, household_id, cause, source, owner, resolve_due,
                         district, opened_at, acknowledged_at)
    VALUES ('emergency_repair', 'high', 'H-0003', 'gas_leak', 'alarm', 'system:alarms',
            now() + interval '3 hours', 'district-1', now() - interval '1 hour',
            now() - interval '55 minutes')
    """,
    """
    INSERT INTO ingest_health (at, consumer, readings_per_s, lag_s, batch_latency_ms,
                               readings_total, dead_letters, alarms_raised)
    VALUES (now() - interval '1 minute', '0/1', 500, 0.5, 20, 1000, 1, 1)
    """,
    """
    INSERT INTO dead_letters (topic, payload, field, reason)
    VALUES ('gasguard/v1/GW-TS/telemetry', '\\x7b', NULL, 'not valid JSON')
    """,
    "INSERT INTO ingested_batches (gw, seq, readings) VALUES ('GW-TS', 1, 4)",
]


def connect(url: str) -> psycopg.Connection[Any]:
    """That server takes one session at a time and notices a closed one a moment late."""
    deadline = time.monotonic() + 15
    while True:
        try:
            return psycopg.connect(url, autocommit=True)
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="module")
def timescale_database(timescale: Server) -> str:
    from ingest.storage import migrate

    async def schema() -> None:
        async with await psycopg.AsyncConnection.connect(timescale.url) as conn:
            await migrate(conn, "timescale")

    asyncio.run(schema())
    with connect(timescale.url) as conn:
        for statement in DATA:
            conn.execute(statement.encode())
    return timescale.url


@pytest.mark.parametrize("path", dashboards(), ids=[p.stem for p in dashboards()])
def test_every_panel_query_runs_on_timescaledb(timescale_database: str, path: Path) -> None:
    end = datetime.now(UTC)
    span = TimeRange(end - timedelta(hours=4), end)
    with connect(timescale_database) as conn:
        failures = run_dashboard(conn, path, span, everything=True, need_rows=False)
    assert not failures, f"{path.name} on TimescaleDB:\n" + "\n".join(failures)
