"""A fresh PostgreSQL database per test (on the machine's server), migrated; and helpers to
register simulated devices."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

ADMIN_URL = os.environ.get("GASGUARD_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _admin(statement: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(statement)  # type: ignore[arg-type]


@contextlib.contextmanager
def new_database(migrated: bool = True) -> Iterator[str]:
    """The URL of a new database (with the GasGuard schema in stock PostgreSQL mode when
    ``migrated``), dropped afterwards."""
    from ingest.storage import migrate

    name = f"gasguard_test_{uuid.uuid4().hex[:12]}"
    try:
        _admin(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL at {ADMIN_URL} is not reachable (scripts/services starts it): {exc}"
        )
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"

    async def run() -> None:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            await migrate(conn, "stock")

    try:
        if migrated:
            asyncio.run(run())
        yield url
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_database() -> Iterator[str]:
    """The URL of a new, empty database, dropped after the test."""
    with new_database(migrated=False) as url:
        yield url


@pytest.fixture
def database() -> Iterator[str]:
    """A new database with the GasGuard schema (stock PostgreSQL mode)."""
    with new_database() as url:
        yield url


def registry_csv(
    path: Path,
    gateway: str,
    detectors: int,
    meters: int,
    districts: int = 1,
    test_mode: bool = False,
    size: str = "G2.5",
) -> Path:
    """Register a simulated building (household H-000i has D-000i and M-000i)."""
    n = max(detectors, meters)
    lines = [
        "device_id,kind,household_id,district,address,phone,gateway_id,profile,meter_size,"
        "expected_interval_s,test_mode"
    ]
    for i in range(1, n + 1):
        district = f"district-{(i - 1) * districts // n + 1}"
        if i <= detectors:
            lines.append(
                f'D-{i:04d},detector,H-{i:04d},{district},"{i} Test St",,{gateway},'
                f"detector-generic,,60,{str(test_mode).lower()}"
            )
        if i <= meters:
            lines.append(
                f'M-{i:04d},meter,H-{i:04d},{district},"{i} Test St",,{gateway},'
                f"meter-generic,{size},60,{str(test_mode).lower()}"
            )
    path.write_text("\n".join(lines) + "\n")
    return path


def register(url: str, csv: Path) -> int:
    from ingest.registry import import_csv

    async def run() -> int:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            return await import_csv(conn, csv)

    return asyncio.run(run())
