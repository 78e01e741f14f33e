"""Writing what ingest writes (alarms and their outbox rows), and waiting for the hotline."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.types.json import Jsonb


def raise_alarm(
    database: str,
    device: str,
    rule: str,
    severity: str,
    *,
    district: str = "district-1",
    event: str = "raised",
    test: bool = False,
) -> int:
    """An alarm (raised or cleared) and its outbox row, as ingest commits them."""
    with psycopg.connect(database, autocommit=True) as conn:
        key, household = conn.execute(
            "SELECT key, household_id FROM devices WHERE id = %s", (device,)
        ).fetchone()  # type: ignore[misc]
        if event == "raised":
            row = conn.execute(
                "INSERT INTO alarms (device_key, device_id, household_id, district, rule, severity, "
                "raised_at) VALUES (%s, %s, %s, %s, %s, %s, now()) RETURNING id",
                (key, device, household, district, rule, severity),
            ).fetchone()
        else:
            row = conn.execute(
                "UPDATE alarms SET cleared_at = now() WHERE device_key = %s AND rule = %s "
                "AND cleared_at IS NULL RETURNING id",
                (key, rule),
            ).fetchone()
        assert row is not None
        payload: dict[str, Any] = {"device": device, "household": household, "district": district,
                                   "rule": rule, "severity": severity, "test": test}  # fmt: skip
        conn.execute(
            "INSERT INTO alarm_outbox (alarm_id, event, payload) VALUES (%s, %s, %s)",
            (row[0], event, Jsonb(payload)),
        )
        return int(row[0])


def query(database: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(database) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]
