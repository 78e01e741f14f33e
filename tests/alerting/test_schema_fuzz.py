"""Schemathesis against the hotline's own OpenAPI spec, on the real service and database:
whatever the generated requests hold, no answer is a server error. The SSE stream (it never
ends) and logout (it would revoke the fuzzer's own token) are left out."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.alerting.harness import Hotline, running_hotline
from tests.alerting.helpers import raise_alarm
from tests.ingest.conftest import ADMIN_URL, register, registry_csv

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def fuzzed_hotline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hotline]:
    from ingest.storage import migrate

    name = f"gasguard_fuzz_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"

    async def schema() -> None:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            await migrate(conn, "stock")

    asyncio.run(schema())
    register(url, registry_csv(Path(tmp_path_factory.mktemp("fuzz")) / "r.csv", "GW-1", 3, 3))
    try:
        with running_hotline(url) as hotline:
            raise_alarm(url, "D-0001", "gas_high", "critical")  # some tickets to act on
            raise_alarm(url, "M-0002", "burst", "critical")
            yield hotline
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


SKIPPED = {"/api/events", "/api/auth/logout"}


def test_no_request_makes_a_server_error(fuzzed_hotline: Hotline) -> None:
    # operation by operation with hypothesis (schemathesis' own pytest loader does not run
    # under pytest 9 yet)
    schema = schemathesis.openapi.from_url(f"{fuzzed_hotline.url}/openapi.json")
    headers = {"Authorization": f"Bearer {fuzzed_hotline.token('admin')}"}
    tried = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in SKIPPED:
            continue
        tried.append(f"{operation.method.upper()} {operation.path}")

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
        def call(case: Any) -> None:
            case.call_and_validate(headers=headers, checks=[not_a_server_error])

        call()
    assert len(tried) >= 20, tried  # every route of the API was fuzzed
