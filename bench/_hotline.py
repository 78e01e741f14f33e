"""The pieces of bench/alarm_latency.py that run in processes of their own: the bench database
(migrated, the fleet registered, a user to sign in with), the hotline service served by
uvicorn, and the background load (what ingest commits for a fleet's alarms and clears, with
ingest's own ``write_alarms``); and the CPU accounting of a phase.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import random
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Any

import psycopg

ADMIN_URL = os.environ.get(
    "GASGUARD_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
USER, PASSWORD = "bench", "password-bench"
HOUSEHOLDS_PER_GATEWAY = 200
PROBE_PREFIX = "P-"  # probe households; the background's are "H-"

# background alarms: (rule, severity, weight) per device kind; no gas alarms, so that the
# probes' cause (gas_leak) stays theirs, and no pressure_low (a network incident of its own)
RULES = {
    "detector": (("sensor_fault", "minor", 3), ("silent", "minor", 2)),
    "meter": (
        ("continuous_flow", "major", 2),
        ("micro_leak", "minor", 3),
        ("silent", "minor", 2),
        ("reverse_flow", "minor", 1),
    ),
}

# slots of the shared int64 array the load process reports through
LOAD_READY, LOAD_ROWS, LOAD_RAISED, LOAD_CLEARED, LOAD_COMMITS, LOAD_LATE, LOAD_ERROR = range(7)
LOAD_MAX_COMMIT_US = 7
LOAD_SLOTS = 8


def db_url(name: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def admin(statement: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(statement.encode())


def execute(url: str, statement: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement.encode())


def scalar(url: str, sql: str) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql.encode()).fetchone()
        return None if row is None else row[0]


# ------------------------------------------------------------------------------ database


def district(i: int, districts: int) -> str:
    return f"district-{i % districts + 1:02d}"


def fleet_rows(households: int, probes: int, districts: int) -> list[Any]:
    """Households with a detector and a meter each: the background's ``H-``, then the probes'
    ``P-`` (in the same districts, on gateways of their own)."""
    from ingest.registry import DeviceRow

    sizes = ("G1.6", "G2.5", "G4")
    rows = []
    for prefix, count in (("H-", households), (PROBE_PREFIX, probes)):
        for i in range(count):
            household = f"{prefix}{i:05d}"
            common = {
                "household_id": household,
                "district": district(i, districts),
                "address": f"{i + 1} {'Probe' if prefix == PROBE_PREFIX else 'Bench'} Street",
                "gateway_id": f"GW-{prefix[0]}{i // HOUSEHOLDS_PER_GATEWAY:03d}",
                "expected_interval_s": 60,
            }
            rows.append(
                DeviceRow(
                    device_id=f"D{household}", kind="detector", profile="detector-generic", **common
                )
            )
            rows.append(
                DeviceRow(
                    device_id=f"M{household}",
                    kind="meter",
                    profile="meter-generic",
                    meter_size=sizes[i % 3],
                    **common,
                )
            )
    return rows


async def prepare_database(url: str, households: int, probes: int, districts: int) -> int:
    """Migrate, register the fleet, add the bench's user; returns the devices registered."""
    from alerting.auth import add_user
    from ingest.registry import import_rows
    from ingest.storage import migrate

    async with await psycopg.AsyncConnection.connect(url) as conn:
        await migrate(conn, "stock")
        devices = await import_rows(conn, fleet_rows(households, probes, districts))
        async with conn.transaction(), conn.cursor() as cur:
            await add_user(cur, USER, "Bench", "engineer", PASSWORD)
        await conn.execute("ANALYZE")
    return devices


# ------------------------------------------------------------------------------ hotline


def hotline_main(values: dict[str, Any]) -> None:
    """The hotline service as deployed: ``create_app`` served by uvicorn (until SIGTERM)."""
    import uvicorn

    from alerting.app import create_app
    from alerting.settings import HotlineSettings

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us (uvicorn: SIGTERM)
    logging.basicConfig(
        level=logging.WARNING, format="    [hotline] %(levelname)s %(name)s: %(message)s"
    )
    settings = HotlineSettings(_env_file=None, **values)
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=settings.hotline_port,
        log_level="warning",
        lifespan="on",
    )
    uvicorn.Server(config).run()


# ------------------------------------------------------------------------------ background load


@dataclass(frozen=True)
class Load:
    rate: float  # outbox rows per second (raised and cleared together)
    commit_s: float  # one transaction this often, as ingest commits a micro-batch
    hold_s: float  # mean time an alarm stays raised before its clear
    seed: int


def load_main(url: str, load: Load, stats: Any, stop: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(_load(url, load, stats, stop))
    except BaseException:
        traceback.print_exc()
        stats[LOAD_ERROR] = 1
        raise


async def _load(url: str, load: Load, stats: Any, stop: Any) -> None:
    """Alarms raised on random idle background devices and cleared after a random hold, at a
    fixed rate of outbox rows, one transaction per ``commit_s`` as ingest's consumer writes
    them (``write_alarms``)."""
    from ingest.writer import AlarmChange, write_alarms

    rng = random.Random(load.seed)
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            "SELECT d.key, d.id, d.kind, d.household_id, h.district FROM devices d "
            "JOIN households h ON h.id = d.household_id WHERE d.household_id LIKE 'H-%' "
            "ORDER BY d.key"
        )
        devices = await cur.fetchall()
        await conn.commit()
        weights = {kind: [w for _, _, w in rules] for kind, rules in RULES.items()}
        raised: dict[int, tuple[str, str]] = {}  # device index -> (rule, severity)
        clears: list[tuple[float, int]] = []  # (when, device index)
        carry = 0.0
        stats[LOAD_READY] = 1
        next_tick = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if now < next_tick:
                await asyncio.sleep(next_tick - now)
                now = time.monotonic()
            due = load.rate * load.commit_s + carry
            n = int(due)
            carry = due - n
            changes: list[tuple[int, str, str, bool]] = []
            while clears and clears[0][0] <= now and len(changes) < n:
                _, i = heapq.heappop(clears)
                rule, severity = raised.pop(i)
                changes.append((i, rule, severity, False))
            while len(changes) < n and len(raised) < len(devices):
                i = rng.randrange(len(devices))
                if i in raised:
                    continue
                kind = devices[i][2]
                rule, severity, _ = rng.choices(RULES[kind], weights[kind])[0]
                raised[i] = (rule, severity)
                heapq.heappush(clears, (now + rng.expovariate(1 / load.hold_s), i))
                changes.append((i, rule, severity, True))
            ms = time.time_ns() // 1_000_000
            batch = [
                AlarmChange(
                    device_key=int(devices[i][0]),
                    device_id=str(devices[i][1]),
                    household_id=str(devices[i][3]),
                    district=str(devices[i][4]),
                    rule=rule,
                    severity=severity,
                    raised=up,
                    ts_ms=ms,
                    value=1.0,
                    test_mode=False,
                )
                for i, rule, severity, up in changes
            ]
            started = time.perf_counter()
            async with conn.transaction(), conn.cursor() as c:
                outcome = await write_alarms(c, batch)
            us = int((time.perf_counter() - started) * 1e6)
            stats[LOAD_MAX_COMMIT_US] = max(stats[LOAD_MAX_COMMIT_US], us)
            stats[LOAD_ROWS] += outcome.outbox_rows
            stats[LOAD_RAISED] += outcome.alarms_raised
            stats[LOAD_CLEARED] += outcome.alarms_cleared
            stats[LOAD_COMMITS] += 1
            next_tick += load.commit_s
            if time.monotonic() > next_tick + 1.0:  # more than a second behind: say so, go on
                stats[LOAD_LATE] += 1
                next_tick = time.monotonic()
