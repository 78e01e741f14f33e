"""One filled database per test module (filling it takes a few seconds: a day of readings)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from tests.grafana.fill import DISTRICTS, GATEWAY, HOUSEHOLDS, Filled, fill
from tests.ingest.conftest import ADMIN_URL, _admin, register, registry_csv


@pytest.fixture(scope="module")
def filled_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Filled]:
    """A new database with the GasGuard schema (stock PostgreSQL mode), the demo building
    registered, and a day of its simulated life stored through the real ingest path."""
    from ingest.storage import migrate

    name = f"gasguard_test_{uuid.uuid4().hex[:12]}"
    try:
        _admin(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL at {ADMIN_URL} is not reachable (scripts/services starts it): {exc}"
        )
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:

        async def schema() -> None:
            async with await psycopg.AsyncConnection.connect(url) as conn:
                await migrate(conn, "stock")

        asyncio.run(schema())
        csv = tmp_path_factory.mktemp("registry") / "registry.csv"
        register(url, registry_csv(csv, GATEWAY, HOUSEHOLDS, HOUSEHOLDS, districts=DISTRICTS))
        yield fill(url)
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
