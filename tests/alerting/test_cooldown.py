"""The cool-down after a ticket is resolved: the same leak dying away is recorded on the
resolved ticket, which is reopened (never a second ticket with a new promise, never hidden);
a new rise (more severe, a higher value, a value that cannot be compared, a cancelled ticket,
the cool-down over) opens a ticket as before. The database tests run
``take_outbox`` against the real PostgreSQL and set ``resolved_at`` themselves: no sleeping."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from alerting.cooldown import COOLDOWN_CAUSES, SEVERITY_ORDER, Cooldown, Resolved, new_rise
from alerting.outbox import RULES, Policy, Taken, take_outbox
from tests.alerting.helpers import query
from tests.ingest.conftest import register, registry_csv

integration = pytest.mark.integration
MISSING = object()  # a payload without a value at all
POLICY = Policy(valve_rules=())


def alarm(database: str, household: int, rule: str, severity: str, value: Any = MISSING, *,
          meter: bool = False, test: bool = False, raise_value: float | None = None) -> tuple[int, int]:  # fmt: skip
    """What ingest writes for a raise (the device's open alarm of that rule cleared first): the
    alarm (``raise_value`` as given, else the payload's value when it is a number) and its
    outbox row; (alarm id, outbox id)."""
    device = f"{'M' if meter else 'D'}-{household:04d}"
    if raise_value is None and isinstance(value, int | float):
        raise_value = float(value)
    payload: dict[str, Any] = {"alarm_id": None, "device": device, "household": f"H-{household:04d}",
                               "district": "district-1", "rule": rule, "severity": severity,
                               "test": test, "at": 1_700_000_000_000}  # fmt: skip
    if value is not MISSING:
        payload["value"] = value
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("UPDATE alarms SET cleared_at = now() WHERE device_id = %s AND rule = %s "
                     "AND cleared_at IS NULL", (device, rule))  # fmt: skip
        row = conn.execute(
            "INSERT INTO alarms (device_key, device_id, household_id, district, rule, severity, "
            "test_mode, raised_at, raise_value) SELECT key, id, household_id, 'district-1', %s, "
            "%s, %s, now(), %s FROM devices WHERE id = %s RETURNING id",
            (rule, severity, test, raise_value, device),
        ).fetchone()
        assert row is not None
        payload["alarm_id"] = row[0]
        out = conn.execute(
            "INSERT INTO alarm_outbox (alarm_id, event, payload) VALUES (%s, 'raised', %s) "
            "RETURNING id",
            (row[0], Jsonb(payload)),
        ).fetchone()
        assert out is not None
        return int(row[0]), int(out[0])


def take(database: str, policy: Policy = POLICY) -> Taken:
    """Take the outbox until it is empty; the sum of what was taken."""

    async def run() -> Taken:
        total = Taken()
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            while (taken := await take_outbox(conn, 100, policy)).rows:
                total.rows += taken.rows
                total.opened += taken.opened
                total.appended += taken.appended - taken.cooled  # (a cooled row opens none)
                total.cooled += taken.cooled
                total.failed += taken.failed
        return total

    return asyncio.run(run())


def tickets(database: str, household: int) -> list[tuple[Any, ...]]:
    """(id, cause, status, priority, test_mode) of a household's tickets, oldest first."""
    return query(database, "SELECT id, cause, status, priority, test_mode FROM tickets "
                 "WHERE household_id = %s ORDER BY id", (f"H-{household:04d}",))  # fmt: skip


def resolve(database: str, ticket_id: int, minutes_ago: float, status: str = "resolved") -> None:
    """A dispatcher's work, done ``minutes_ago``: resolved (and perhaps closed) or cancelled."""
    with psycopg.connect(database, autocommit=True) as conn:
        if status == "cancelled":
            conn.execute("UPDATE tickets SET status = 'cancelled', cancel_reason = 'false alarm' "
                         "WHERE id = %s", (ticket_id,))  # fmt: skip
            return
        conn.execute(
            "UPDATE tickets SET status = %s, on_site_at = now() - make_interval(mins => 60), "
            "resolved_at = now() - make_interval(secs => %s), "
            "closed_at = CASE WHEN %s = 'closed' THEN now() END WHERE id = %s",
            (status, minutes_ago * 60, status, ticket_id),
        )


def resolved_leak(database: str, household: int, *, rule: str = "gas_high",
                  severity: str = "critical", value: float = 40.0, minutes_ago: float = 5,
                  status: str = "resolved", meter: bool = False) -> int:  # fmt: skip
    """A household's leak ticketed from an alarm and then resolved; the ticket id."""
    alarm(database, household, rule, severity, value, meter=meter)
    assert take(database).opened == 1
    ticket_id = int(tickets(database, household)[-1][0])
    resolve(database, ticket_id, minutes_ago, status)
    return ticket_id


def events(database: str, ticket_id: int) -> list[tuple[Any, ...]]:
    """(kind, alarm id, outbox id, detail) of a ticket's events, in order."""
    return query(database, "SELECT kind, alarm_id, outbox_id, detail FROM ticket_events "
                 "WHERE ticket_id = %s ORDER BY id", (ticket_id,))  # fmt: skip


@pytest.fixture
def homes(database: str, tmp_path: Path) -> str:
    """Households H-0001..H-0012, each with a detector and a meter."""
    register(database, registry_csv(tmp_path / "r.csv", "GW-1", 12, 12))
    return database


# ---------------------------------------------------------------- the decision, without a database

LEAK = Resolved(ticket_id=1, resolved_at=datetime(2026, 1, 1, tzinfo=UTC),
                worst_severity="critical", highest_value=40.0)  # fmt: skip


@pytest.mark.parametrize(
    ("severity", "value", "same_leak"),
    [
        ("major", 12.0, True),  # gas_low while the gas falls
        ("critical", 26.0, True),  # gas_high again, lower than the ticket's
        ("critical", 44.0, True),  # within the 10 % margin
        ("critical", 44.5, False),  # above it
        ("critical", 100, False),
        ("major", None, False),  # ingest writes null for a value that is not finite
        ("major", math.nan, False),
        ("major", math.inf, False),
        ("major", "12", False),
        ("major", True, False),
        (None, 12.0, False),
        ("severe", 12.0, False),
    ],
)
def test_an_alarm_is_the_same_leak_only_when_no_worse_and_comparable(
    severity: Any, value: Any, same_leak: bool
) -> None:
    assert (new_rise(severity, value, LEAK, 0.1) is None) == same_leak


def test_a_more_severe_alarm_is_a_new_rise_whatever_its_value() -> None:
    gas_low_ticket = Resolved(1, LEAK.resolved_at, "major", 40.0)
    assert new_rise("critical", 30.0, gas_low_ticket, 0.1) == (
        "severity critical above the resolved ticket's major"
    )
    assert new_rise("major", 30.0, gas_low_ticket, 0.1) is None


def test_a_resolved_ticket_without_a_value_or_severity_makes_every_alarm_a_new_rise() -> None:
    assert new_rise("minor", 1.0, Resolved(1, LEAK.resolved_at, "major", None), 0.1)
    assert new_rise("minor", 1.0, Resolved(1, LEAK.resolved_at, "major", math.nan), 0.1)
    assert new_rise("minor", 1.0, Resolved(1, LEAK.resolved_at, None, 40.0), 0.1)


def test_severities_are_ingests_in_order_and_cooldown_causes_are_routed() -> None:
    from ingest.detect import Severity

    assert [s.name.lower() for s in sorted(Severity)] == list(SEVERITY_ORDER)
    assert {cause for cause, *_ in RULES.values()} >= COOLDOWN_CAUSES


# ---------------------------------------------------------------- against the real PostgreSQL


@integration
def test_a_decaying_re_raise_within_the_cooldown_is_recorded_on_the_resolved_ticket(
    homes: str,
) -> None:
    ticket_id = resolved_leak(homes, 1, rule="gas_high", severity="critical", value=40.0)
    first = alarm(homes, 1, "gas_low", "major", 12.0)  # the detector clearing and re-raising
    second = alarm(homes, 1, "gas_rising", "major", 8.5)  # a second rule on the falling gas
    taken = take(homes)
    assert (taken.rows, taken.opened, taken.cooled, taken.appended) == (2, 0, 1, 1)
    assert not taken.failed
    # reopened, not hidden: the crew goes back under the ticket's first promise
    assert tickets(homes, 1) == [(ticket_id, "gas_leak", "new", "critical", False)]
    history = events(homes, ticket_id)
    assert [e[:3] for e in history[-2:]] == [
        ("alarm_during_cooldown", *first),
        ("repeat", *second),  # on the reopened ticket
    ]
    detail = history[-2][3]
    assert (detail["rule"], detail["value"], detail["household"]) == ("gas_low", 12.0, "H-0001")
    assert "no new ticket" in detail["cooldown_note"] and detail["cooldown_until"]
    assert query(homes, "SELECT count(*) FROM alarm_outbox WHERE done_at IS NULL") == [(0,)]


@integration
def test_a_ticket_resolved_and_closed_keeps_its_cooldown(homes: str) -> None:
    ticket_id = resolved_leak(homes, 2, minutes_ago=10, status="closed")
    alarm(homes, 2, "gas_low", "major", 11.0)
    assert take(homes).cooled == 1
    assert tickets(homes, 2) == [(ticket_id, "gas_leak", "new", "critical", False)]


@integration
def test_the_same_alarm_after_the_cooldown_opens_a_ticket(homes: str) -> None:
    ticket_id = resolved_leak(homes, 3, minutes_ago=31)
    alarm(homes, 3, "gas_low", "major", 12.0)
    taken = take(homes)
    assert (taken.opened, taken.cooled) == (1, 0)
    assert [t[2] for t in tickets(homes, 3)] == ["resolved", "new"]
    assert [e[0] for e in events(homes, ticket_id)] == ["opened"]


@integration
def test_the_cooldown_is_its_setting(homes: str) -> None:
    resolved_leak(homes, 4, minutes_ago=50)
    alarm(homes, 4, "gas_low", "major", 12.0)
    assert take(homes, Policy(valve_rules=(), cooldown=Cooldown(minutes=60))).cooled == 1
    resolved_leak(homes, 5, minutes_ago=1)
    alarm(homes, 5, "gas_low", "major", 12.0)
    assert take(homes, Policy(valve_rules=(), cooldown=Cooldown(minutes=0))).opened == 1


@integration
def test_a_higher_value_opens_a_ticket_that_names_the_resolved_one(homes: str) -> None:
    ticket_id = resolved_leak(homes, 6, rule="gas_low", severity="major", value=12.0)
    alarm(homes, 6, "gas_low", "major", 13.5)  # more than 10 % above 12
    assert take(homes).opened == 1
    new = tickets(homes, 6)[-1]
    assert new[2:] == ("new", "high", False)
    opened = events(homes, new[0])[0]
    assert opened[0] == "opened" and opened[3]["value"] == 13.5
    assert opened[3]["cooldown_ticket"] == ticket_id
    assert "value 13.5 above" in opened[3]["cooldown_note"]


@integration
def test_values_on_the_resolved_ticket_are_those_it_had_while_open(homes: str) -> None:
    """A repeat while open counts; alarms recorded during the cool-down do not, so a slow
    climb in steps under the margin still becomes a new rise."""
    alarm(homes, 7, "gas_low", "major", 12.0)
    alarm(homes, 7, "gas_low", "major", 20.0)  # a repeat while the ticket is open
    assert take(homes).opened == 1
    ticket_id = int(tickets(homes, 7)[0][0])
    resolve(homes, ticket_id, 2)
    alarm(homes, 7, "gas_low", "major", 21.5)  # within 10 % of the repeat's 20
    assert take(homes).cooled == 1
    # the ticket is open again: the next alarm is a repeat on it, never a second ticket
    alarm(homes, 7, "gas_low", "major", 23.0)
    taken = take(homes)
    assert (taken.opened, taken.appended) == (0, 1)
    kinds = [e[0] for e in events(homes, ticket_id)]
    assert kinds == ["opened", "repeat", "alarm_during_cooldown", "repeat"]


@integration
def test_a_more_severe_alarm_opens_a_critical_ticket(homes: str) -> None:
    resolved_leak(homes, 8, rule="gas_low", severity="major", value=30.0)
    alarm(homes, 8, "gas_high", "critical", 26.0)  # lower value, but critical after a major
    assert take(homes).opened == 1
    assert tickets(homes, 8)[-1][2:] == ("new", "critical", False)


@integration
def test_a_cancelled_ticket_has_no_cooldown(homes: str) -> None:
    resolved_leak(homes, 9, status="cancelled")
    alarm(homes, 9, "gas_low", "major", 12.0)
    assert take(homes).opened == 1
    assert [t[2] for t in tickets(homes, 9)] == ["cancelled", "new"]


@integration
@pytest.mark.parametrize("value", [None, MISSING, "NaN"], ids=["null", "missing", "text"])
def test_an_alarm_without_a_comparable_value_opens_a_ticket(homes: str, value: Any) -> None:
    resolved_leak(homes, 10)
    alarm(homes, 10, "gas_low", "major", value)
    taken = take(homes)
    assert (taken.opened, taken.cooled, taken.failed) == (1, 0, [])


@integration
def test_a_resolved_ticket_whose_alarms_hold_no_value_has_nothing_to_compare(homes: str) -> None:
    ticket_id = resolved_leak(homes, 11)
    with psycopg.connect(homes, autocommit=True) as conn:
        conn.execute("UPDATE alarms SET raise_value = 'NaN' WHERE household_id = 'H-0011'")
    alarm(homes, 11, "gas_low", "major", 1.0, raise_value=1.0)
    assert take(homes).opened == 1
    assert len(tickets(homes, 11)) == 2 and ticket_id


@integration
def test_an_open_ticket_still_gets_the_alarm_as_a_repeat(homes: str) -> None:
    old = resolved_leak(homes, 12, minutes_ago=1)
    alarm(homes, 12, "gas_high", "critical", 50.0)  # a new rise: a new ticket
    alarm(homes, 12, "gas_low", "major", 5.0)  # decaying, but that ticket is open
    taken = take(homes)
    assert (taken.opened, taken.cooled) == (1, 0)
    new = tickets(homes, 12)[-1][0]
    assert [e[0] for e in events(homes, new)] == ["opened", "repeat"]
    assert [e[0] for e in events(homes, old)] == ["opened"]


@integration
def test_test_mode_alarms_open_test_tickets_as_before(homes: str) -> None:
    resolved_leak(homes, 1)
    alarm(homes, 1, "gas_low", "major", 12.0, test=True)
    assert take(homes).opened == 1
    assert tickets(homes, 1)[-1][2:] == ("new", "high", True)


@integration
def test_a_test_ticket_gives_no_cooldown(homes: str) -> None:
    alarm(homes, 2, "gas_high", "critical", 40.0, test=True)
    take(homes)
    resolve(homes, int(tickets(homes, 2)[0][0]), 1)
    alarm(homes, 2, "gas_low", "major", 12.0)
    assert take(homes).opened == 1
    assert [t[4] for t in tickets(homes, 2)] == [True, False]


@integration
def test_flow_causes_cool_down_too_and_supply_pressure_does_not(homes: str) -> None:
    burst = resolved_leak(homes, 3, rule="burst", severity="critical", value=9.0, meter=True)
    flow = resolved_leak(homes, 4, rule="continuous_flow", severity="major", value=0.2, meter=True)
    resolved_leak(homes, 5, rule="pressure_low", severity="major", value=1.0, meter=True)
    alarm(homes, 3, "burst", "critical", 7.5, meter=True)  # the flow falling back
    alarm(homes, 4, "micro_leak", "minor", 0.05, meter=True)  # the other rule of that cause
    alarm(homes, 5, "pressure_low", "major", 0.9, meter=True)  # lower pressure: worse
    taken = take(homes)
    assert (taken.cooled, taken.opened) == (2, 1)
    assert events(homes, burst)[-1][0] == events(homes, flow)[-1][0] == "alarm_during_cooldown"
    assert len(tickets(homes, 5)) == 2
