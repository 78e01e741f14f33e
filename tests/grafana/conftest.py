"""One filled database per test module (filling it takes a few seconds: a day of readings)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.grafana.fill import DISTRICTS, GATEWAY, HOUSEHOLDS, Filled, fill
from tests.ingest.conftest import new_database, register, registry_csv


@pytest.fixture(scope="module")
def filled_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Filled]:
    """A new database with the GasGuard schema (stock PostgreSQL mode), the demo building
    registered, and a day of its simulated life stored through the real ingest path."""
    with new_database() as url:
        csv = tmp_path_factory.mktemp("registry") / "registry.csv"
        register(url, registry_csv(csv, GATEWAY, HOUSEHOLDS, HOUSEHOLDS, districts=DISTRICTS))
        yield fill(url)
