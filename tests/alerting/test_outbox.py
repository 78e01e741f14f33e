"""Alarms become tickets exactly once, with several service instances taking the outbox."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from alerting.outbox import Policy, take_outbox
from tests.ingest.conftest import register, registry_csv

pytestmark = pytest.mark.integration


def alarm(conn: psycopg.Connection[tuple[object, ...]], device: str, household: str, rule: str, severity: str,
          event: str = "raised") -> None:  # fmt: skip
    """What ingest writes: an alarm and its outbox row."""
    key = conn.execute("SELECT key FROM devices WHERE id = %s", (device,)).fetchone()[0]  # type: ignore[index]
    alarm_id = conn.execute(
        "INSERT INTO alarms (device_key, device_id, household_id, district, rule, severity, raised_at) "
        "VALUES (%s, %s, %s, 'district-1', %s, %s, now()) RETURNING id",
        (key, device, household, rule, severity),
    ).fetchone()[0]  # type: ignore[index]
    conn.execute(
        "INSERT INTO alarm_outbox (alarm_id, event, payload) VALUES (%s, %s, %s)",
        (alarm_id, event, psycopg.types.json.Jsonb({"device": device, "household": household, "rule": rule,
                                                     "severity": severity, "test": False})),
    )  # fmt: skip


def test_each_outbox_row_has_its_effect_once_with_two_instances(
    database: str, tmp_path: Path
) -> None:
    register(database, registry_csv(tmp_path / "r.csv", "GW-1", 40, 40))
    with psycopg.connect(database, autocommit=True) as conn:
        for i in range(1, 41):
            alarm(conn, f"D-{i:04d}", f"H-{i:04d}", "gas_high", "critical")
            alarm(conn, f"M-{i:04d}", f"H-{i:04d}", "burst", "critical")
            conn.execute(
                "UPDATE alarms SET cleared_at = now() WHERE device_id = %s", (f"D-{i:04d}",)
            )
            alarm(conn, f"D-{i:04d}", f"H-{i:04d}", "gas_low", "major")  # the same leak again

    async def worker() -> int:
        total = 0
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            while True:
                taken = await take_outbox(conn, limit=7, policy=Policy(valve_rules=()))
                if not taken.rows:
                    return total
                total += taken.rows

    async def both() -> list[int]:
        return list(await asyncio.gather(worker(), worker()))

    counts = asyncio.run(both())
    assert sum(counts) == 120 and all(counts), counts  # both instances worked, nothing twice
    with psycopg.connect(database) as conn:
        tickets = conn.execute("SELECT cause, category, priority, repeats, on_site_due IS NOT NULL, "
                               "resolve_due - opened_at FROM tickets ORDER BY household_id, cause").fetchall()  # fmt: skip
        events = conn.execute(
            "SELECT count(*), count(DISTINCT outbox_id) FROM ticket_events"
        ).fetchone()
        pending = conn.execute("SELECT count(*) FROM alarm_outbox WHERE done_at IS NULL").fetchone()
    assert len(tickets) == 80, "one ticket per household and cause"
    gas = [t for t in tickets if t[0] == "gas_leak"]
    assert all(t[1:5] == ("emergency_repair", "critical", 1, True) for t in gas), gas[:2]
    assert events == (120, 120) and pending == (0,)
    assert str(gas[0][5]) == "4:00:00", "promise from the published service-time table"


def test_an_alarms_clear_is_never_applied_before_its_raise_by_another_instance(
    database: str, tmp_path: Path
) -> None:
    register(database, registry_csv(tmp_path / "r.csv", "GW-1", 30, 0))
    with psycopg.connect(database, autocommit=True) as conn:
        for i in range(1, 31):  # each alarm's clear right behind its raise
            alarm(conn, f"D-{i:04d}", f"H-{i:04d}", "gas_low", "major")
            alarm_id, payload = conn.execute(
                "SELECT alarm_id, payload FROM alarm_outbox ORDER BY id DESC LIMIT 1"
            ).fetchone()  # type: ignore[misc]
            conn.execute("INSERT INTO alarm_outbox (alarm_id, event, payload) VALUES (%s, 'cleared', %s)",
                         (alarm_id, psycopg.types.json.Jsonb(payload)))  # fmt: skip

    async def worker() -> int:
        total = 0
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            idle = 0
            while idle < 20:  # the other instance may still hold the raise a clear waits for
                taken = await take_outbox(conn, limit=1, policy=Policy(valve_rules=()))
                total += taken.rows
                idle = 0 if taken.rows else idle + 1
                await asyncio.sleep(0 if taken.rows else 0.01)
        return total

    async def both() -> list[int]:
        return list(await asyncio.gather(worker(), worker()))

    assert sum(asyncio.run(both())) == 60
    with psycopg.connect(database) as conn:
        kinds = conn.execute(
            "SELECT t.household_id, array_agg(e.kind ORDER BY e.id) FROM tickets t "
            "JOIN ticket_events e ON e.ticket_id = t.id GROUP BY t.household_id"
        ).fetchall()
    assert len(kinds) == 30
    assert all(k == ["opened", "alarm_cleared"] for _, k in kinds), [
        k for k in kinds if k[1] != ["opened", "alarm_cleared"]
    ]


def test_every_detection_rule_has_a_route_to_a_ticket() -> None:
    """A rule ingest can raise but the hotline cannot route would end as an unreadable alarm."""
    from alerting.outbox import RULES
    from ingest.detect import Rule

    assert {r.name.lower() for r in Rule} <= set(RULES), "add the new rule to alerting RULES"
