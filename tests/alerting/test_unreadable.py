"""An alarm outbox row that cannot be applied as designed never stops the rows after it and
never sits unseen: it is marked failed with its error and a person gets a ticket holding its
raw payload. Run against the real PostgreSQL (and the real hotline where it says so)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from alerting import outbox as outbox_module
from alerting.outbox import Policy, take_outbox
from gasguard.wire import encode_batch, make_batch, topic
from tests.alerting.harness import running_hotline
from tests.alerting.helpers import query, raise_alarm
from tests.conftest import Broker
from tests.ingest.conftest import register, registry_csv
from tests.ingest.harness import IngestThread, publish_all, settings_for, wait_for

pytestmark = pytest.mark.integration


def outbox_row(database: str, payload: Any, *, event: str = "raised", alarm: int | None = None,
               device: str = "D-0001") -> tuple[int, int]:  # fmt: skip
    """An outbox row with this payload (a JSON text is stored as written); (outbox id, alarm)."""
    with psycopg.connect(database, autocommit=True) as conn:
        if alarm is None:
            row = conn.execute(
                "INSERT INTO alarms (device_key, device_id, household_id, district, rule, "
                "severity, raised_at, cleared_at) SELECT key, id, household_id, 'district-1', "
                "'gas_high', 'critical', now(), now() FROM devices WHERE id = %s RETURNING id",
                (device,),
            ).fetchone()
            assert row is not None
            alarm = int(row[0])
        row = conn.execute(
            "INSERT INTO alarm_outbox (alarm_id, event, payload) VALUES (%s, %s, %s::jsonb) "
            "RETURNING id",
            (alarm, event, payload if isinstance(payload, str) else Jsonb(payload)),
        ).fetchone()
        assert row is not None
        return int(row[0]), alarm


def gas(household: int, rule: str = "gas_low", severity: str = "major", **extra: Any) -> dict[str, Any]:  # fmt: skip
    return {"device": f"D-{household:04d}", "household": f"H-{household:04d}",
            "district": "district-1", "rule": rule, "severity": severity, "test": False} | extra  # fmt: skip


def take_all(database: str) -> list[int]:
    """Take the outbox until it is empty; the ids of the rows that failed."""

    async def run() -> list[int]:
        failed: list[int] = []
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            while (taken := await take_outbox(conn, 100, Policy(valve_rules=()))).rows:
                failed += taken.failed
        return failed

    return asyncio.run(run())


def ticket_of(database: str, outbox_id: int) -> dict[str, Any]:
    rows = query(
        database,
        "SELECT t.id, t.category, t.priority, t.cause, t.household_id, t.test_mode, t.inhibited, "
        "e.kind, e.detail FROM ticket_events e JOIN tickets t ON t.id = e.ticket_id "
        "WHERE e.outbox_id = %s",
        (outbox_id,),
    )
    assert len(rows) == 1, f"outbox row {outbox_id} is on {len(rows)} tickets"
    names = ("id", "category", "priority", "cause", "household", "test", "held", "kind", "detail")
    return dict(zip(names, rows[0], strict=True))


def test_rows_that_cannot_be_applied_are_ticketed_and_the_rows_after_them_flow(
    database: str, tmp_path: Path
) -> None:
    register(database, registry_csv(tmp_path / "r.csv", "GW-1", 8, 8))
    huge = (
        '{"device": "D-0001", "household": "H-0001", "district": "district-1", "rule": '
        '"gas_high", "severity": "critical", "test": false, "value": 1e300}'
    )
    applied_huge, _ = outbox_row(database, huge)
    unknown, unknown_alarm = outbox_row(database, gas(2, "gas_explosion_v9", "critical"))
    array, _ = outbox_row(database, [1, 2, 3])
    wrong_type, _ = outbox_row(database, gas(3) | {"household": 3})
    gone, _ = outbox_row(database, gas(4, "burst", "critical") | {"household": "H-9999"})
    string_test, _ = outbox_row(database, gas(5) | {"test": "false"})
    later, _ = outbox_row(database, gas(6))
    unknown_clear, _ = outbox_row(database, gas(2, "gas_explosion_v9", "critical"),
                                  event="cleared", alarm=unknown_alarm)  # fmt: skip

    failed = take_all(database)

    assert sorted(failed) == sorted([unknown, array, wrong_type, gone, unknown_clear])
    assert query(database, "SELECT count(*) FROM alarm_outbox WHERE done_at IS NULL") == [(0,)]
    errors = dict(query(database, "SELECT id, error FROM alarm_outbox WHERE failed_at IS NOT NULL"))
    assert "UnknownRuleError" in errors[unknown] and "gas_explosion_v9" in errors[unknown]
    assert "not an object" in errors[array]
    assert "ForeignKeyViolation" in errors[gone]
    # the reading of 1e300 is a readable gas ticket, its number kept exactly
    t = ticket_of(database, applied_huge)
    assert (t["kind"], t["cause"], t["priority"], t["household"]) == (
        "opened", "gas_leak", "critical", "H-0001")  # fmt: skip
    assert t["detail"]["value"] == 10**300
    # a rule nobody knows: an emergency repair that a person reads, never a low "other" ticket
    t = ticket_of(database, unknown)
    assert (t["kind"], t["category"], t["priority"], t["cause"], t["household"]) == (
        "opened", "emergency_repair", "critical", "unreadable_alarm", "H-0002")  # fmt: skip
    assert t["detail"]["unreadable"] is True and "gas_explosion_v9" in t["detail"]["raw"]
    assert not t["test"] and not t["held"]
    clear = ticket_of(database, unknown_clear)  # its clear lands on the same ticket
    assert (clear["id"], clear["kind"]) == (t["id"], "alarm_unreadable")
    t = ticket_of(database, array)
    assert (t["category"], t["priority"], t["household"]) == ("emergency_repair", "high", None)
    assert t["detail"]["raw"] == "[1, 2, 3]"
    t = ticket_of(database, wrong_type)  # a known gas rule: the gas route, as an emergency
    assert (t["category"], t["cause"], t["household"]) == ("emergency_repair", "gas_leak", None)
    assert t["detail"]["household"] == 3
    t = ticket_of(database, gone)  # a household deleted since: named in the evidence
    assert (t["category"], t["priority"], t["cause"]) == ("emergency_repair", "critical", "burst")
    assert (t["household"], t["detail"]["household"]) == (None, "H-9999")
    # "test": "false" is not a test: a real, dispatchable ticket
    t = ticket_of(database, string_test)
    assert (t["kind"], t["household"], t["test"]) == ("opened", "H-0005", False)
    assert ticket_of(database, later)["kind"] == "opened"


def test_a_row_that_cannot_even_be_ticketed_is_marked_failed_and_never_blocks(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(database, registry_csv(tmp_path / "r.csv", "GW-1", 3, 0))

    async def broken(*_args: Any, **_kw: Any) -> int:
        raise RuntimeError("the ticket could not be written")

    monkeypatch.setattr(outbox_module, "ticket_unreadable", broken)
    bad, _ = outbox_row(database, gas(1, "no_such_rule"))
    good, _ = outbox_row(database, gas(2))
    assert take_all(database) == [bad]
    (error,) = query(database, "SELECT error FROM alarm_outbox WHERE id = %s", (bad,))[0]
    assert "UnknownRuleError" in error and "no ticket: RuntimeError" in error
    assert ticket_of(database, good)["kind"] == "opened"


def test_the_hotline_shows_failed_rows_and_keeps_turning_alarms_into_tickets(
    database: str, tmp_path: Path
) -> None:
    register(database, registry_csv(tmp_path / "r.csv", "GW-1", 4, 0))
    with running_hotline(database) as hotline:
        bad, _ = outbox_row(database, gas(1, "from_a_newer_ingest", "critical"))
        raise_alarm(database, "D-0002", "gas_low", "major")
        wait_for(lambda: query(database, "SELECT count(*) FROM tickets") == [(2,)], 10,
                 "both ticketed")  # fmt: skip
        health = hotline.client(None).get("/health")
        assert health.status_code == 200, health.text
        assert health.json()["failed_outbox_rows"] == [bad]
        listed = hotline.client("dispatcher").get("/api/alarms/failed").json()
        assert [(r["id"], r["ticket_status"]) for r in listed] == [(bad, "new")]
        ticket = hotline.client("dispatcher").get(f"/api/tickets/{listed[0]['ticket_id']}").json()
        assert ticket["category"] == "emergency_repair" and ticket["priority"] == "critical"
        assert "from_a_newer_ingest" in ticket["events"][0]["detail"]["raw"]
        metrics = hotline.client(None).get("/metrics").text
        assert "gasguard_hotline_outbox_rows_failed_total 1.0" in metrics


def test_a_reading_of_1e300_ends_as_a_readable_fault_ticket_and_the_leaks_after_it_flow(
    database: str, mosquitto: Broker, tmp_path: Path
) -> None:
    """Through the chain: a gateway publishes the absurd reading, then a real leak next door."""
    register(database, registry_csv(tmp_path / "r.csv", "GW-A", 3, 0))
    now = int(time.time() * 1000)

    def reading(seq: int, device: str, lel: float, at: int) -> tuple[str, bytes]:
        b = make_batch(
            "GW-A", seq, "detector", [device], [at], {"ch4_lel": [lel], "alarm": [False]}
        )
        return topic("GW-A", "telemetry"), encode_batch(b)

    ingest = IngestThread(settings_for(database, mosquitto))
    try:
        with running_hotline(database) as hotline:
            publish_all(mosquitto, [reading(1, "D-0001", 1e300, now)])
            wait_for(lambda: query(database, "SELECT count(*) FROM tickets WHERE household_id "
                                   "= 'H-0001' AND cause = 'device_fault'") == [(1,)], 15,
                     "a device-fault ticket for the absurd reading")  # fmt: skip
            publish_all(mosquitto, [reading(2, "D-0002", 30.0, now + 1000)])
            wait_for(lambda: query(database, "SELECT priority FROM tickets WHERE household_id = "
                                   "'H-0002' AND cause = 'gas_leak'") == [("critical",)], 15,
                     "the real leak's ticket")  # fmt: skip
            dispatcher = hotline.client("dispatcher")
            (first,) = query(database, "SELECT id FROM tickets WHERE household_id = 'H-0001'")[0]
            page = dispatcher.get(f"/api/tickets/{first}")
            assert page.status_code == 200, page.text
            assert page.json()["events"], "its evidence is on the ticket"
            assert dispatcher.get("/api/tickets").status_code == 200
            health = hotline.client(None).get("/health")
            assert health.status_code == 200 and health.json()["stopped_tasks"] == []
    finally:
        ingest.stop()
    # a sensor fault with the raw value as evidence, never a gas alarm; never +Infinity stored
    assert query(database, "SELECT rule, raise_value FROM alarms WHERE device_id = 'D-0001'") == [
        ("sensor_fault", 1e300)
    ]
    assert query(database, "SELECT count(*) FROM tickets WHERE household_id = 'H-0001'") == [(1,)]
    stored = query(database, "SELECT ch4_lel::text FROM detector_readings r JOIN devices d "
                             "ON d.key = r.device_key WHERE d.id = 'D-0001'")  # fmt: skip
    assert stored == [("NaN",)]
    wait_for(lambda: query(database, "SELECT count(*) FROM detector_hourly") != [(0,)], 10,
             "the hourly rollup folded")  # fmt: skip
    rollup = "SELECT h.max_ch4_lel FROM detector_hourly h JOIN devices d ON d.key = h.device_key "
    assert query(database, rollup + "WHERE d.id = 'D-0001'") == [(None,)]
