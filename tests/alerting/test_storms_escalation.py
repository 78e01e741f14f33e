"""Storms become one district incident; unacknowledged critical tickets and breached
promises escalate; the same-day report lists complaints, breaches and escalations."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.alerting.harness import running_hotline
from tests.alerting.helpers import query, raise_alarm
from tests.ingest.conftest import register, registry_csv
from tests.ingest.harness import wait_for

pytestmark = pytest.mark.integration


def outbox_drained(database: str) -> bool:
    return query(database, "SELECT count(*) FROM alarm_outbox WHERE done_at IS NULL") == [(0,)]


def test_a_storm_becomes_one_incident_holding_what_can_wait(database: str, tmp_path: Path) -> None:
    # district-1 holds H-0001..H-0008, district-2 H-0009..H-0016
    register(database, registry_csv(tmp_path / "r.csv", "GW-1", 16, 16, districts=2))
    with running_hotline(database, hotline_storm_tickets=4, hotline_storm_window_s=300) as hotline:
        dispatcher = hotline.client("dispatcher")
        for i in range(1, 7):  # six meters of district-1 lose supply pressure within seconds
            raise_alarm(database, f"M-{i:04d}", "pressure_low", "major", district="district-1")
        raise_alarm(database, "M-0009", "pressure_low", "major", district="district-2")
        wait_for(lambda: outbox_drained(database), 10, "outbox taken")
        queue = dispatcher.get("/api/tickets").json()
        incidents = [t for t in queue if t["is_incident"]]
        assert len(incidents) == 1, queue
        incident = incidents[0]
        assert (incident["district"], incident["cause"], incident["households_under"]) == (
            "district-1",
            "supply_pressure",
            6,
        )
        households = sorted(t["household_id"] for t in queue if not t["is_incident"])
        assert households == ["H-0009"], "district-1's pressure tickets are held under the incident"
        held = dispatcher.get("/api/tickets", params={"include_held": True}).json()
        assert len([t for t in held if t["inhibited"]]) == 6
        # the crew fixes the district: its households are resolved with the incident
        tid = incident["id"]
        for action, body in [("acknowledge", None), ("dispatch", {"department": "network"}), ("on-site", None),
                             ("resolve", {"note": "regulator repaired"})]:  # fmt: skip
            response = dispatcher.post(f"/api/tickets/{tid}/{action}", json=body)
            assert response.status_code == 200, response.text
        statuses = query(database, "SELECT household_id, status FROM tickets WHERE incident_id IS NOT NULL "
                                   "AND NOT is_incident ORDER BY household_id")  # fmt: skip
        assert statuses == [(f"H-{i:04d}", "resolved") for i in range(1, 7)]
        assert query(database, "SELECT count(*) FROM incidents WHERE closed_at IS NULL") == [(0,)]
        events = query(
            database, "SELECT kind, count(*) FROM ticket_events GROUP BY kind ORDER BY kind"
        )
        assert ("grouped", 6) in events and ("resolved_with_incident", 6) in events


def test_gas_in_homes_is_never_held_by_a_storm(database: str, tmp_path: Path) -> None:
    """Six homes of one district at 12-18 %LEL within a minute (gas_low: high, not critical):
    one incident for the overview, and every household ticket stays in the queue with its own
    promise, dispatchable; resolving the incident resolves none of them."""
    register(database, registry_csv(tmp_path / "r.csv", "GW-1", 16, 16, districts=2))
    with running_hotline(database, hotline_storm_tickets=4, hotline_storm_window_s=300) as hotline:
        dispatcher = hotline.client("dispatcher")
        for i in range(1, 7):
            raise_alarm(database, f"D-{i:04d}", "gas_low", "major", district="district-1")
        raise_alarm(database, "M-0007", "burst", "critical", district="district-1")
        wait_for(lambda: outbox_drained(database), 10, "outbox taken")
        queue = dispatcher.get("/api/tickets").json()
        incidents = [t for t in queue if t["is_incident"]]
        assert [(t["district"], t["cause"]) for t in incidents] == [("district-1", "gas_leak")]
        homes = [t for t in queue if not t["is_incident"]]
        assert sorted(t["household_id"] for t in homes) == [f"H-{i:04d}" for i in range(1, 8)]
        assert not any(t["inhibited"] for t in homes)
        gas = [t for t in homes if t["cause"] == "gas_leak"]
        assert all(t["incident_id"] == incidents[0]["incident_id"] for t in gas)
        first = gas[0]["id"]
        response = dispatcher.post(f"/api/tickets/{first}/dispatch", json={"department": "repair"})
        assert response.status_code == 200, response.text
        tid = incidents[0]["id"]
        for action, body in [("acknowledge", None), ("dispatch", {"department": "network"}),
                             ("on-site", None), ("resolve", {"note": "checked"})]:  # fmt: skip
            assert dispatcher.post(f"/api/tickets/{tid}/{action}", json=body).status_code == 200
        still = query(database, "SELECT count(*) FROM tickets WHERE cause = 'gas_leak' "
                                "AND NOT is_incident AND status <> 'resolved'")  # fmt: skip
        assert still == [(6,)], "each home keeps its own ticket until its own crew resolves it"


def test_escalation_and_the_same_day_report(database: str, tmp_path: Path) -> None:
    register(database, registry_csv(tmp_path / "r.csv", "GW-1", 4, 4))
    # escalate after 0.6 s without acknowledgement (minutes in production)
    with running_hotline(database, hotline_ack_minutes=0.01) as hotline:
        dispatcher = hotline.client("dispatcher")
        raise_alarm(database, "D-0001", "gas_high", "critical")
        raise_alarm(database, "M-0002", "continuous_flow", "major")  # not critical: no re-notify

        def escalated_twice() -> bool:
            rows = query(
                database, "SELECT escalation_level FROM tickets WHERE household_id = 'H-0001'"
            )
            return bool(rows) and rows[0][0] >= 2

        wait_for(escalated_twice, 10, "the critical ticket re-notified and escalated twice")
        dispatcher.post("/api/tickets/1/acknowledge")
        level = query(database, "SELECT escalation_level FROM tickets WHERE id = 1")[0][0]
        # a promise passes: on site within 30 minutes was not kept
        query(
            database,
            "UPDATE tickets SET on_site_due = now() - interval '1 minute' WHERE id = 1 RETURNING id",
        )
        wait_for(
            lambda: (
                query(database, "SELECT on_site_breached FROM tickets WHERE id = 1") == [(True,)]
            ),
            10,
            "breach",
        )
        assert (
            query(database, "SELECT escalation_level FROM tickets WHERE id = 1")[0][0] == level + 1
        )
        complaint = hotline.client("call-taker").post("/api/tickets", json={
            "category": "complaint", "summary": "no one came", "household_id": "H-0003"}).json()  # fmt: skip
        report = hotline.client("engineer").get("/api/reports/today").json()
        assert [c["id"] for c in report["open_complaints"]] == [complaint["id"]]
        assert [(b["ticket_id"], b["detail"]["promise"]) for b in report["breaches"]] == [
            (1, "on_site")
        ]
        assert {e["ticket_id"] for e in report["escalations"]} == {1}, (
            "only the critical one re-notifies"
        )
        figures = {f["category"]: f for f in report["by_category"]}
        assert figures["emergency_repair"]["breached"] == 1 and figures["complaint"]["open"] == 1
        yesterday = (
            hotline.client("engineer")
            .get("/api/reports/today", params={"day": "2020-01-01"})
            .json()
        )
        assert yesterday["breaches"] == [] and yesterday["escalations"] == []
        assert (
            hotline.client("engineer")
            .get("/api/reports/today", params={"day": "yesterday"})
            .status_code
            == 422
        )
