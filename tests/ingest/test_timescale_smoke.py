"""Smoke test of the TimescaleDB path (hypertables, policies, continuous aggregates).

No TimescaleDB server is installable here, so the test serves the one build that is reachable:
an npm WebAssembly PostgreSQL 17 with TimescaleDB 2.23-dev (``tests/timescale``), installed
by npm into ``var/timescale-smoke`` and spoken to over the wire protocol by psycopg. It runs
the real migrations in "timescale" mode and checks the hypertables, the policies (each run
once with ``CALL run_job``: that build has no background scheduler) and the rollups against
readings inserted with plain INSERTs (that build has no COPY).

Skipped, with the reason in the summary, when Node.js or npm is missing or the npm registry is
unreachable. Anything else that goes wrong, above all our SQL, fails the test.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import random
import re
import shutil
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from ingest.storage import migrate, migrations
from tests.conftest import ROOT, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SOURCE = ROOT / "tests" / "timescale"
CACHE = ROOT / "var" / "timescale-smoke"  # git-ignored; node_modules is kept between runs
PACKAGE_FILES = ("package.json", "package-lock.json")
STAMP = CACHE / "node_modules" / ".gasguard-package-sha256"  # npm ci wipes it with node_modules
INSTALL_TIMEOUT_S = 150
READY_TIMEOUT_S = 90
SKIP = "TimescaleDB smoke test skipped"
# npm's words for "the registry cannot be reached" (as opposed to a wrong pin or a bad lock)
REGISTRY_UNREACHABLE = re.compile(
    r"ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ESOCKETTIMEDOUT|ENETUNREACH|"
    r"EHOSTUNREACH|E502|E503|E504|socket hang up|network|proxy|UNABLE_TO_GET_ISSUER|"
    r"SELF_SIGNED_CERT|CERT_HAS_EXPIRED",
    re.IGNORECASE,
)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _require_node() -> None:
    if shutil.which("node") is None:
        pytest.skip(f"{SKIP}: Node.js not installed")
    if shutil.which("npm") is None:
        pytest.skip(f"{SKIP}: npm not installed")
    version = subprocess.run(
        ["node", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    major = re.match(r"v(\d+)\.", version)
    if major is None or int(major.group(1)) < 20:
        pytest.skip(f"{SKIP}: Node.js {version or '(unknown version)'} is older than 20")


def _install() -> None:
    """Copy tests/timescale into the cache folder and install its two packages there, unless
    node_modules already holds what this package.json and lock ask for."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two pytest runs at once share the folder
        shutil.copyfile(SOURCE / "server.mjs", CACHE / "server.mjs")
        digest = hashlib.sha256()
        for name in PACKAGE_FILES:
            source, target = SOURCE / name, CACHE / name
            if source.exists():
                digest.update(name.encode() + b"\0" + source.read_bytes() + b"\0")
                shutil.copyfile(source, target)
            else:
                target.unlink(missing_ok=True)
        if STAMP.exists() and STAMP.read_text() == digest.hexdigest():
            return
        locked = (CACHE / "package-lock.json").exists()
        command = [
            "npm",
            "ci" if locked else "install",
            "--legacy-peer-deps",  # pglite-socket names @electric-sql/pglite as a peer
            "--no-audit",
            "--no-fund",
            "--prefer-offline",
            "--fetch-retries=1",
            "--fetch-timeout=60000",
        ]
        try:
            done = subprocess.run(
                command,
                cwd=CACHE,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT_S,
                check=False,
                env={**os.environ, "npm_config_update_notifier": "false"},
            )
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout
            pytest.skip(
                f"{SKIP}: `{' '.join(command)}` did not finish in {INSTALL_TIMEOUT_S} s "
                f"(npm registry unreachable or too slow):\n{_tail(out or '')}"
            )
        output = done.stdout + done.stderr
        if done.returncode != 0:
            message = f"`{' '.join(command)}` failed (exit {done.returncode}):\n{_tail(output)}"
            if REGISTRY_UNREACHABLE.search(output):
                pytest.skip(f"{SKIP}: npm registry unreachable: {message}")
            pytest.fail(message)  # a wrong pin, a stale lock...: ours to fix
        STAMP.write_text(digest.hexdigest())


@dataclass
class Server:
    port: int

    @property
    def url(self) -> str:
        # pglite-socket serves one database ("template1") as "postgres", whatever the startup
        # message names, but libpq insists on sending some password.
        return f"postgresql://postgres:postgres@127.0.0.1:{self.port}/template1?sslmode=disable"


@pytest.fixture(scope="module")
def timescale(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A fresh in-memory PostgreSQL + TimescaleDB (WebAssembly) on a free port."""
    _require_node()
    started = time.monotonic()
    _install()
    installed = time.monotonic()
    port = free_port()
    log = tmp_path_factory.mktemp("timescale") / f"server-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["node", "server.mjs", str(port)], cwd=CACHE, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not re.search(r"^READY ", log.read_text(errors="replace"), re.MULTILINE):
            if process.poll() is not None:
                pytest.fail(
                    f"server.mjs exited with {process.returncode}:\n{_tail(log.read_text())}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"server.mjs not READY after {READY_TIMEOUT_S} s:\n{_tail(log.read_text())}"
                )
            time.sleep(0.1)
        print(
            f"timescale smoke: npm {installed - started:.1f} s, "
            f"server ready {time.monotonic() - installed:.1f} s: {log.read_text().strip()}"
        )
        yield Server(port)
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, f"server.mjs did not stop cleanly:\n{_tail(log.read_text())}"


# --- the readings, and what the rollups must say about them ---------------------------------

HOUR = timedelta(hours=1)
CHUNK_COLUMNS = "chunk_name, range_start, range_end, is_compressed"
ROLLUP_COLUMNS = {  # the same names and types as the stock tables (0004_rollups.stock.sql)
    "meter_hourly": [
        ("bucket", "timestamp with time zone"),
        ("device_key", "integer"),
        ("min_volume_m3", "double precision"),
        ("max_volume_m3", "double precision"),
        ("consumption_m3", "double precision"),
        ("max_flow_m3h", "real"),
        ("min_flow_m3h", "real"),
        ("min_pressure_kpa", "real"),
        ("readings", "integer"),
    ],
    "detector_hourly": [
        ("bucket", "timestamp with time zone"),
        ("device_key", "integer"),
        ("max_ch4_lel", "real"),
        ("readings", "integer"),
    ],
    "district_daily": [
        ("day", "timestamp with time zone"),
        ("district", "text"),
        ("consumption_m3", "double precision"),
        ("meters", "bigint"),
    ],
}
METER_INSERT = (
    "INSERT INTO meter_readings (ts, device_key, volume_m3, flow_m3h, pressure_kpa, comm_lost) "
    "VALUES (%s, %s, %s, %s, %s, %s)"
)
DETECTOR_INSERT = (
    "INSERT INTO detector_readings (ts, device_key, ch4_lel, temp_c, comm_lost) "
    "VALUES (%s, %s, %s, %s, %s)"
)
MeterRow = tuple[datetime, int, float, float, float, bool]
DetectorRow = tuple[datetime, int, float, float, bool]


def meter_rows(key: int, start: datetime, minutes: int, rng: random.Random) -> list[MeterRow]:
    """One reading a minute; every 37th is a comm-lost one with absurd values that the
    rollups must leave out."""
    rows: list[MeterRow] = []
    volume = rng.uniform(100, 5000)
    for minute in range(minutes):
        ts = start + timedelta(minutes=minute)
        if minute % 37 == 36:
            rows.append((ts, key, 1e9, 99.0, 0.0, True))
            continue
        flow = round(rng.choice([0.0, 0.0, rng.uniform(0.02, 2.5)]), 3)
        volume += flow / 60
        rows.append((ts, key, volume, flow, round(rng.uniform(1.8, 2.3), 3), False))
    return rows


def detector_rows(key: int, start: datetime, minutes: int, rng: random.Random) -> list[DetectorRow]:
    rows: list[DetectorRow] = []
    for minute in range(minutes):
        ts = start + timedelta(minutes=minute)
        if minute % 37 == 36:
            rows.append((ts, key, 100.0, 20.0, True))
        else:
            spike = minute % 60 == 17 and rng.random() < 0.7
            ch4 = rng.uniform(12, 40) if spike else rng.uniform(0, 4)
            rows.append((ts, key, round(ch4, 2), round(rng.uniform(15, 25), 1), False))
    return rows


def hour_of(ts: datetime) -> datetime:
    return ts.replace(minute=0, second=0, microsecond=0)


def expected_meter_hourly(rows: list[MeterRow]) -> dict[tuple[int, datetime], tuple[Any, ...]]:
    groups: dict[tuple[int, datetime], list[MeterRow]] = defaultdict(list)
    for row in rows:
        if not row[5]:
            groups[(row[1], hour_of(row[0]))].append(row)
    return {
        k: (
            min(r[2] for r in g),
            max(r[2] for r in g),
            max(r[2] for r in g) - min(r[2] for r in g),
            max(r[3] for r in g),
            min(r[3] for r in g),
            min(r[4] for r in g),
            len(g),
        )
        for k, g in groups.items()
    }


def expected_detector_hourly(
    rows: list[DetectorRow],
) -> dict[tuple[int, datetime], tuple[Any, ...]]:
    groups: dict[tuple[int, datetime], list[DetectorRow]] = defaultdict(list)
    for row in rows:
        if not row[4]:
            groups[(row[1], hour_of(row[0]))].append(row)
    return {k: (max(r[2] for r in g), len(g)) for k, g in groups.items()}


async def fetch(
    conn: psycopg.AsyncConnection[Any], query: str, params: Any = None
) -> list[tuple[Any, ...]]:
    cur = await conn.execute(query.encode(), params)
    return await cur.fetchall()


async def rollup(conn: psycopg.AsyncConnection[Any], view: str) -> dict[Any, tuple[Any, ...]]:
    rows = await fetch(conn, f"SELECT * FROM {view}")
    return {(r[1], r[0]): tuple(r[2:]) for r in rows}


def assert_rollup(
    actual: dict[Any, tuple[Any, ...]], expected: dict[Any, tuple[Any, ...]], name: str
) -> None:
    assert sorted(actual) == sorted(expected), f"{name}: other (device, hour) rows than inserted"
    for key, want in expected.items():
        assert actual[key] == pytest.approx(want, rel=1e-6, abs=1e-9), f"{name} {key}"


async def chunks(conn: psycopg.AsyncConnection[Any], table: str) -> list[tuple[Any, ...]]:
    return await fetch(
        conn,
        f"SELECT {CHUNK_COLUMNS} FROM timescaledb_information.chunks "
        "WHERE hypertable_name = %s ORDER BY range_start",
        (table,),
    )


# --- the test -----------------------------------------------------------------------------


async def smoke(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("SET TIME ZONE 'UTC'")
        expected_names = [f"{m.version:04d}_{m.name}" for m in migrations("timescale")]
        assert {m.variant for m in migrations("timescale")} == {"", "timescale"}

        # 1. the migrations, in timescale mode, on an empty database
        assert await migrate(conn, "timescale") == expected_names
        assert await fetch(
            conn, "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
        )
        hypertables = await fetch(
            conn,
            "SELECT hypertable_name, compression_enabled FROM timescaledb_information.hypertables "
            "WHERE hypertable_schema = 'public' ORDER BY 1",
        )
        assert hypertables == [("detector_readings", True), ("meter_readings", True)]
        caggs = await fetch(
            conn, "SELECT view_name FROM timescaledb_information.continuous_aggregates ORDER BY 1"
        )
        assert caggs == [("detector_hourly",), ("meter_hourly",)]
        for view, columns in ROLLUP_COLUMNS.items():
            found = await fetch(
                conn,
                "SELECT column_name::text, data_type::text FROM information_schema.columns "
                "WHERE table_schema = 'public' AND table_name = %s ORDER BY ordinal_position",
                (view,),
            )
            assert found == columns, f"{view} differs from the stock rollup"
        jobs = await fetch(
            conn,
            "SELECT job_id, proc_name::text, hypertable_name::text, scheduled "
            "FROM timescaledb_information.jobs WHERE proc_name IN ('policy_compression', "
            "'policy_retention', 'policy_refresh_continuous_aggregate') ORDER BY 2, 3",
        )
        assert [j[1:] for j in jobs] == [
            ("policy_compression", "detector_readings", True),
            ("policy_compression", "meter_readings", True),
            ("policy_refresh_continuous_aggregate", "detector_hourly", True),
            ("policy_refresh_continuous_aggregate", "meter_hourly", True),
            ("policy_retention", "detector_readings", True),
            ("policy_retention", "meter_readings", True),
        ]

        # 2. a registry of two households, each with a meter and a detector, in two districts
        await conn.execute("INSERT INTO gateways (id) VALUES ('gw-smoke')")
        await conn.execute(
            "INSERT INTO households (id, district, address) VALUES "
            "('H-1', 'north', '1 Smoke St'), ('H-2', 'south', '2 Smoke St')"
        )
        keys = dict(
            await fetch(
                conn,
                "INSERT INTO devices (id, kind, household_id, gateway_id, profile, meter_size) "
                "VALUES ('M-1', 'meter', 'H-1', 'gw-smoke', 'meter-generic', 'G4'), "
                "('M-2', 'meter', 'H-2', 'gw-smoke', 'meter-generic', 'G2.5'), "
                "('D-1', 'detector', 'H-1', 'gw-smoke', 'detector-generic', NULL), "
                "('D-2', 'detector', 'H-2', 'gw-smoke', 'detector-generic', NULL) "
                "RETURNING id, key",
            )
        )
        district = {keys["M-1"]: "north", keys["M-2"]: "south"}

        # 3. three hours of readings, one a minute per device (720 rows), ending an hour ago;
        #    the first two hours now, refreshed by hand
        rng = random.Random(4)
        now = datetime.now(UTC)
        start = hour_of(now) - 4 * HOUR
        meters = [r for m in ("M-1", "M-2") for r in meter_rows(keys[m], start, 180, rng)]
        detectors = [r for d in ("D-1", "D-2") for r in detector_rows(keys[d], start, 180, rng)]
        first = [r for r in meters if r[0] < start + 2 * HOUR]
        first_d = [r for r in detectors if r[0] < start + 2 * HOUR]
        async with conn.cursor() as cur:
            await cur.executemany(METER_INSERT, first)
            await cur.executemany(DETECTOR_INSERT, first_d)
        await conn.execute("CALL refresh_continuous_aggregate('meter_hourly', NULL, NULL)")
        await conn.execute("CALL refresh_continuous_aggregate('detector_hourly', NULL, NULL)")
        assert_rollup(await rollup(conn, "meter_hourly"), expected_meter_hourly(first), "meter")
        assert_rollup(
            await rollup(conn, "detector_hourly"), expected_detector_hourly(first_d), "detector"
        )

        # 4. the third hour, a late reading into each already-materialised first hour, and old
        #    readings for the compression (10 days old) and retention (500 days old) policies
        late_m: MeterRow = (
            start + timedelta(seconds=90),
            keys["M-1"],
            meters[1][2],
            3.9,
            1.7,
            False,
        )
        late_d: DetectorRow = (start + timedelta(seconds=90), keys["D-1"], 31.5, 20.0, False)
        old_m = [
            (now - timedelta(days=days, minutes=i), keys["M-1"], 10.0 + i, 0.5, 2.0, False)
            for days in (10, 500)
            for i in range(10)
        ]
        old_d = [
            (now - timedelta(days=days, minutes=i), keys["D-1"], 1.0, 20.0, False)
            for days in (10, 500)
            for i in range(10)
        ]
        rest = [r for r in meters if r[0] >= start + 2 * HOUR]
        rest_d = [r for r in detectors if r[0] >= start + 2 * HOUR]
        async with conn.cursor() as cur:
            await cur.executemany(METER_INSERT, [*rest, late_m, *old_m])
            await cur.executemany(DETECTOR_INSERT, [*rest_d, late_d, *old_d])
        before = {t: await chunks(conn, t) for t in ("meter_readings", "detector_readings")}
        assert all(len(c) >= 3 for c in before.values()), before

        # 5. every policy once, by hand (no background scheduler in this build): CALL raises
        #    if the job fails
        for job_id, proc, target, _ in jobs:
            try:
                await conn.execute("CALL run_job(%s)", (job_id,))
            except psycopg.Error as exc:
                pytest.fail(f"job {job_id} ({proc} on {target}) failed: {exc}")
        assert not await fetch(
            conn,
            "SELECT job_id, err_message FROM timescaledb_information.job_errors "
            "WHERE job_id = ANY(%s)",
            ([j[0] for j in jobs],),
        )

        # 6. compression and retention did their work
        for table, old_chunks in before.items():
            after = await chunks(conn, table)
            for name, _, range_end, _ in old_chunks:
                if range_end <= now - timedelta(days=400):
                    assert name not in [c[0] for c in after], f"{table}: {name} not dropped"
            for name, range_start, range_end, compressed in after:
                assert range_start > now - timedelta(days=400), f"{table}: {name} kept"
                should = range_end <= now - timedelta(days=7)
                assert compressed == should, (
                    f"{table} {name} {range_start}: compressed={compressed}"
                )
        assert await fetch(
            conn,
            "SELECT count(*) FROM meter_readings WHERE ts < %s",
            (now - timedelta(days=400),),
        ) == [(0,)]
        # a late batch still goes into a compressed chunk
        await conn.execute(
            METER_INSERT, (now - timedelta(days=10, seconds=30), keys["M-1"], 9.5, 0.4, 2.0, False)
        )
        assert await fetch(
            conn,
            "SELECT count(*), min(volume_m3) FROM meter_readings WHERE ts BETWEEN %s AND %s",
            (now - timedelta(days=11), now - timedelta(days=9)),
        ) == [(11, 9.5)]

        # 7. the refresh policies picked up the third hour and the late readings; the old
        #    readings lie outside their window (3 days) and stay out of the rollups
        all_m = [*meters, late_m]
        all_d = [*detectors, late_d]
        meter_want = expected_meter_hourly(all_m)
        assert_rollup(await rollup(conn, "meter_hourly"), meter_want, "meter")
        assert_rollup(
            await rollup(conn, "detector_hourly"), expected_detector_hourly(all_d), "detector"
        )
        assert meter_want[(keys["M-1"], start)][3] == pytest.approx(3.9)  # the late one counts
        # a day's use counts each hour from the previous hour's last reading (meter_usage)
        daily: dict[tuple[str, datetime], list[Any]] = defaultdict(lambda: [0.0, set()])
        previous_max: dict[int, float] = {}
        for (key, bucket), values in sorted(meter_want.items()):
            day = daily[(district[key], bucket.replace(hour=0))]
            day[0] += values[1] - previous_max.get(key, values[0])
            previous_max[key] = values[1]
            day[1].add(key)
        found = await fetch(
            conn, "SELECT district, day, consumption_m3, meters FROM district_daily"
        )
        assert sorted((d, t) for d, t, _, _ in found) == sorted(daily)
        for d, t, consumption, count in found:
            assert (consumption, count) == (pytest.approx(daily[(d, t)][0]), len(daily[(d, t)][1]))

        # 8. a second run applies nothing
        assert await migrate(conn, "timescale") == []
        ledger = await fetch(conn, "SELECT version, variant FROM schema_migrations ORDER BY 1")
        assert ledger == [(m.version, m.variant) for m in migrations("timescale")]
        assert {v for _, v in ledger} == {"", "timescale"}


def test_timescale_migrations_policies_and_rollups(timescale: Server) -> None:
    started = time.monotonic()
    asyncio.run(smoke(timescale.url))
    print(f"timescale smoke: test body {time.monotonic() - started:.1f} s")
