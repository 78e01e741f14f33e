"""The hotline API on a real PostgreSQL: roles, the ticket life cycle, calls, silences, bad
input, the audit log and the live feed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import psycopg
import pytest

from tests.alerting.harness import Hotline, running_hotline
from tests.alerting.helpers import query, raise_alarm
from tests.ingest.conftest import register, registry_csv
from tests.ingest.harness import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def hotline(database: str, tmp_path: Path) -> Iterator[Hotline]:
    register(database, registry_csv(tmp_path / "r.csv", "GW-1", 6, 6))
    with running_hotline(database) as service:
        yield service


def ticket_of(hotline: Hotline, household: str, cause: str) -> dict:  # type: ignore[type-arg]
    """Wait for the hotline to open the ticket, and return it."""
    found: list[dict] = []  # type: ignore[type-arg]

    def opened() -> bool:
        queue = hotline.client("dispatcher").get("/api/tickets", params={"include_held": True})
        found[:] = [
            t for t in queue.json() if (t["household_id"], t["cause"]) == (household, cause)
        ]
        return bool(found)

    wait_for(opened, 10, f"a {cause} ticket for {household}")
    return found[0]


def test_anonymous_requests_get_401(hotline: Hotline) -> None:
    anonymous = hotline.client(None)
    for method, path in [("GET", "/api/tickets"), ("GET", "/api/tickets/1"), ("POST", "/api/tickets/1/acknowledge"),
                         ("GET", "/api/households?q=Test"), ("GET", "/api/reports/today"), ("GET", "/api/events"),
                         ("GET", "/api/users"), ("GET", "/api/auth/me"),
                         ("GET", "/api/tickets/actions")]:  # fmt: skip
        assert anonymous.request(method, path).status_code == 401, (method, path)
    wrong = httpx.post(
        f"{hotline.url}/api/auth/login", json={"username": "dispatcher", "password": "nope-nope"}
    )
    assert wrong.status_code == 401
    assert query(
        hotline.settings.database_url,
        "SELECT count(*) FROM audit_log WHERE action = 'login.failed'",
    ) == [(1,)]
    forged = httpx.get(f"{hotline.url}/api/tickets", headers={"Authorization": "Bearer forged"})
    assert forged.status_code == 401


def test_each_role_can_do_what_it_should_and_nothing_more(hotline: Hotline, database: str) -> None:
    created = hotline.client("call-taker").post("/api/tickets", json={
        "category": "complaint", "summary": "crew left a mess", "household_id": "H-0001"})  # fmt: skip
    assert created.status_code == 201, created.text
    own = created.json()["id"]
    raise_alarm(database, "D-0002", "gas_low", "major")
    alarm_ticket = ticket_of(hotline, "H-0002", "gas_leak")["id"]
    cases = [  # (user, method, path, body, expected status)
        ("engineer", "GET", "/api/tickets", None, 200),
        ("engineer", "GET", "/api/reports/today", None, 200),
        ("engineer", "POST", "/api/tickets", {"category": "enquiry", "summary": "x"}, 403),
        ("engineer", "POST", f"/api/tickets/{alarm_ticket}/acknowledge", None, 403),
        ("technician", "POST", f"/api/tickets/{alarm_ticket}/cancel", {"reason": "mine"}, 403),
        (
            "technician",
            "POST",
            f"/api/tickets/{alarm_ticket}/dispatch",
            {"department": "repair"},
            403,
        ),
        ("call-taker", "POST", f"/api/tickets/{alarm_ticket}/acknowledge", None, 403),  # not theirs
        (
            "call-taker",
            "POST",
            f"/api/tickets/{alarm_ticket}/dispatch",
            {"department": "repair"},
            403,
        ),
        ("call-taker", "POST", f"/api/tickets/{own}/acknowledge", None, 200),  # their own
        ("dispatcher", "GET", "/api/users", None, 403),
        ("dispatcher", "POST", "/api/silences", {"household_id": "H-0003", "reason": "test"}, 403),
        ("dispatcher", "POST", f"/api/tickets/{alarm_ticket}/valve", {"action": "open_valve"}, 403),
        ("technician", "POST", "/api/silences", {"household_id": "H-0003", "reason": "test"}, 201),
        ("admin", "GET", "/api/users", None, 200),
        ("admin", "GET", "/api/audit", None, 200),
        ("dispatcher", "GET", "/api/audit", None, 403),
        ("dispatcher", "POST", f"/api/tickets/{alarm_ticket}/acknowledge", None, 200),
        (
            "dispatcher",
            "POST",
            f"/api/tickets/{alarm_ticket}/cancel",
            {"reason": "duplicate of a call"},
            200,
        ),
    ]
    for user, method, path, body, expected in cases:
        response = hotline.client(user).request(method, path, json=body)
        assert response.status_code == expected, (user, method, path, response.text)
    audit = query(
        database,
        "SELECT actor, action, target FROM audit_log WHERE action NOT LIKE 'login%%' ORDER BY id",
    )
    assert ("call-taker", "ticket.create", f"ticket:{own}") in audit
    assert ("technician", "silence.add", "silence:1") in audit
    assert ("dispatcher", "ticket.cancel", f"ticket:{alarm_ticket}") in audit
    assert not [a for a in audit if a[0] in ("engineer",)], "refused requests change nothing"


def test_an_alarm_ticket_goes_through_its_life_cycle(hotline: Hotline, database: str) -> None:
    raise_alarm(database, "D-0001", "gas_high", "critical")
    ticket = ticket_of(hotline, "H-0001", "gas_leak")
    assert (ticket["category"], ticket["priority"], ticket["status"], ticket["owner"]) == (
        "emergency_repair", "critical", "new", "system:alarms")  # fmt: skip
    assert ticket["address"] == "1 Test St" and ticket["on_site_due"] is not None
    tid = ticket["id"]
    dispatcher, technician = hotline.client("dispatcher"), hotline.client("technician")
    assert dispatcher.post(f"/api/tickets/{tid}/acknowledge").json()["owner"] == "dispatcher"
    no_department = dispatcher.post(f"/api/tickets/{tid}/dispatch", json={})
    assert no_department.status_code == 422 and "department" in no_department.text
    too_early = dispatcher.post(f"/api/tickets/{tid}/resolve", json={"note": "fixed?"})
    assert too_early.status_code == 409 and "on site" in too_early.json()["detail"]
    sent = dispatcher.post(
        f"/api/tickets/{tid}/dispatch", json={"department": "emergency repair", "crew": "crew 3"}
    )
    assert (sent.json()["status"], sent.json()["crew"]) == ("dispatched", "crew 3")
    assert technician.post(f"/api/tickets/{tid}/on-site").json()["status"] == "on_site"
    assert (
        technician.post(f"/api/tickets/{tid}/resolve", json={"note": "hose replaced"}).json()[
            "status"
        ]
        == "resolved"
    )
    assert dispatcher.post(f"/api/tickets/{tid}/close").json()["status"] == "closed"
    again = dispatcher.post(f"/api/tickets/{tid}/cancel", json={"reason": "late"})
    assert again.status_code == 409 and "closed" in again.json()["detail"]
    detail = dispatcher.get(f"/api/tickets/{tid}").json()
    kinds = [e["kind"] for e in detail["events"]]
    assert kinds == [
        "opened",
        "valve_requested",
        "acknowledge",
        "dispatch",
        "on_site",
        "resolve",
        "close",
    ], kinds
    assert [e["actor"] for e in detail["events"]][2:] == [
        "dispatcher",
        "dispatcher",
        "technician",
        "technician",
        "dispatcher",
    ]
    assert detail["events"][5]["detail"]["note"] == "hose replaced"
    assert not dispatcher.get("/api/tickets").json(), "a closed ticket leaves the queue"
    assert [
        t["id"] for t in dispatcher.get("/api/tickets", params={"include_closed": True}).json()
    ] == [tid]


def test_a_caller_is_found_and_a_neighbour_joins_the_open_ticket(
    hotline: Hotline, database: str
) -> None:
    query(
        database,
        "UPDATE households SET phone = '+86 21 5555-0102' WHERE id = 'H-0002' RETURNING id",
    )
    taker = hotline.client("call-taker")
    by_address = taker.get("/api/households", params={"q": "2 Test"}).json()
    assert [h["id"] for h in by_address] == ["H-0002"]
    assert [
        h["id"] for h in taker.get("/api/households", params={"q": "8621 55550102"}).json()
    ] == ["H-0002"]
    by_meter = taker.get("/api/households", params={"q": "M-0002"}).json()
    assert [h["id"] for h in by_meter] == ["H-0002"] and not by_meter[0]["open_tickets"]
    first = taker.post("/api/tickets", json={"category": "emergency_repair", "cause": "gas_leak", "household_id": "H-0002",
                                             "summary": "smell of gas in the kitchen", "caller_phone": "5555-0102"})  # fmt: skip
    assert first.status_code == 201 and not first.json()["joined"]
    ticket = first.json()["ticket"]
    assert (ticket["owner"], ticket["priority"], ticket["source"]) == (
        "call-taker",
        "critical",
        "call",
    )
    seen = taker.get("/api/households", params={"q": "M-0002"}).json()[0]["open_tickets"]
    assert [t["id"] for t in seen] == [ticket["id"]], "the open ticket is shown first"
    neighbour = taker.post("/api/tickets", json={"category": "emergency_repair", "cause": "gas_leak", "household_id": "H-0002",
                                                 "summary": "neighbour smells gas on the stairs", "caller_name": "Li"})  # fmt: skip
    assert neighbour.status_code == 201 and neighbour.json()["joined"]
    assert neighbour.json()["id"] == ticket["id"] and neighbour.json()["ticket"]["repeats"] == 1
    # an alarm from the same household for the same cause appends to the caller's ticket
    raise_alarm(database, "D-0002", "gas_low", "major")
    wait_for(
        lambda: (
            query(database, "SELECT count(*) FROM alarm_outbox WHERE done_at IS NULL") == [(0,)]
        ),
        10,
        "outbox",
    )
    assert query(database, "SELECT count(*), max(repeats) FROM tickets") == [(1, 2)]
    enquiry = taker.post(
        "/api/tickets", json={"category": "enquiry", "summary": "price of a new meter"}
    ).json()
    assert enquiry["ticket"]["on_site_due"] is None
    assert taker.post(f"/api/tickets/{enquiry['id']}/acknowledge").status_code == 200
    assert (
        taker.post(f"/api/tickets/{enquiry['id']}/resolve", json={"note": "answered"}).json()[
            "status"
        ]
        == "resolved"
    )


def test_a_real_leak_after_test_mode_ran_out_opens_a_real_ticket_and_closes_the_valve(
    hotline: Hotline, database: str
) -> None:
    """Test mode is a window: the household leaked while in test mode (a test ticket), the
    silence ran out by itself; a real leak then is never a repeat on the test ticket."""
    technician, dispatcher = hotline.client("technician"), hotline.client("dispatcher")
    silence = technician.post("/api/silences", json={"household_id": "H-0005",
                                                     "reason": "selftest", "minutes": 30})  # fmt: skip
    assert silence.status_code == 201
    raise_alarm(database, "D-0005", "gas_low", "major")
    test_ticket = ticket_of(hotline, "H-0005", "gas_leak")
    assert test_ticket["test_mode"]
    # the silence runs out by itself: nobody lifts it
    query(
        database,
        "UPDATE silences SET starts_at = now() - interval '31 minutes', "
        "ends_at = now() - interval '1 minute' WHERE id = %s RETURNING id",
        (silence.json()["id"],),
    )
    raise_alarm(database, "D-0005", "gas_high", "critical")

    def real_ticket() -> list[dict]:  # type: ignore[type-arg]
        queue = dispatcher.get("/api/tickets", params={"include_held": True}).json()
        return [t for t in queue if t["household_id"] == "H-0005" and not t["test_mode"]]

    wait_for(lambda: bool(real_ticket()), 10, "a real ticket for H-0005")
    real = real_ticket()[0]
    assert (real["cause"], real["priority"]) == ("gas_leak", "critical")
    assert query(database, "SELECT status FROM tickets WHERE id = %s",
                 (test_ticket["id"],)) == [("cancelled",)]  # fmt: skip
    assert query(database, "SELECT count(*) FROM valve_commands WHERE ticket_id = %s",
                 (real["id"],)) == [(1,)], "the valve policy of a real leak"  # fmt: skip
    dispatched = dispatcher.post(f"/api/tickets/{real['id']}/dispatch",
                                 json={"department": "emergency repair"})  # fmt: skip
    assert dispatched.status_code == 200, dispatched.text


def test_a_silenced_household_gets_test_tickets_that_are_never_dispatched(
    hotline: Hotline, database: str
) -> None:
    technician, dispatcher = hotline.client("technician"), hotline.client("dispatcher")
    silence = technician.post(
        "/api/silences",
        json={"household_id": "H-0003", "reason": "detector commissioning", "minutes": 30},
    )
    assert silence.status_code == 201
    raise_alarm(database, "D-0003", "gas_high", "critical")
    ticket = ticket_of(hotline, "H-0003", "gas_leak")
    assert ticket["test_mode"]
    refused = dispatcher.post(
        f"/api/tickets/{ticket['id']}/dispatch", json={"department": "emergency repair"}
    )
    assert refused.status_code == 409 and "test ticket" in refused.json()["detail"]
    assert query(database, "SELECT count(*) FROM valve_commands") == [(0,)], (
        "a test never closes a valve"
    )
    # lifted: the test ticket ends with it (nothing of the test left in the live queue) and
    # the next household alarm is real again
    assert technician.delete(f"/api/silences/{silence.json()['id']}").status_code == 200
    assert query(database, "SELECT status, cancel_reason FROM tickets WHERE id = %s",
                 (ticket["id"],)) == [("cancelled", "test mode ended")]  # fmt: skip
    queue = dispatcher.get("/api/tickets", params={"include_held": True}).json()
    assert not [t for t in queue if t["test_mode"]]
    raise_alarm(database, "M-0003", "burst", "critical")
    assert not ticket_of(hotline, "H-0003", "burst")["test_mode"]
    # a device in test mode in the registry, or a simulated test, is a test too
    raise_alarm(database, "D-0004", "gas_high", "critical", test=True)
    assert ticket_of(hotline, "H-0004", "gas_leak")["test_mode"]


def test_bad_input_gets_a_clear_4xx(hotline: Hotline) -> None:
    taker = hotline.client("call-taker")
    cases = [
        ({"category": "pizza", "summary": "x"}, 422, "category"),
        ({"category": "enquiry"}, 422, "summary"),
        ({"category": "enquiry", "summary": "a\x00b"}, 422, "summary"),
        ({"category": "enquiry", "summary": "x", "household_id": "H-9999"}, 422, "H-9999"),
        (
            {
                "category": "enquiry",
                "summary": "x",
                "household_id": "H-0001",
                "device_id": "M-0002",
            },
            422,
            "M-0002",
        ),
        ({"category": "enquiry", "summary": "x", "colour": "red"}, 422, "colour"),
    ]
    for body, status, named in cases:
        response = taker.post("/api/tickets", json=body)
        assert response.status_code == status and named in response.text, (body, response.text)
    dispatcher = hotline.client("dispatcher")
    assert dispatcher.get("/api/tickets/999").status_code == 404
    assert dispatcher.get("/api/tickets/0").status_code == 422
    assert dispatcher.post("/api/tickets/1/cancel", json={}).status_code == 404
    assert hotline.client("admin").post("/api/users", json={"username": "x y", "display_name": "X", "role": "admin",
                                                            "password": "long-enough"}).status_code == 422  # fmt: skip
    assert query(hotline.settings.database_url, "SELECT count(*) FROM tickets") == [(0,)]


def test_the_live_feed_announces_ticket_events(hotline: Hotline, database: str) -> None:
    received: list[dict] = []  # type: ignore[type-arg]
    ready = threading.Event()

    def listen() -> None:
        headers = {"Authorization": f"Bearer {hotline.token('engineer')}"}
        with httpx.stream(
            "GET", f"{hotline.url}/api/events", headers=headers, timeout=15
        ) as stream:
            event = ""
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                    ready.set()
                elif line.startswith("data: ") and event == "ticket":
                    received.append(orjson.loads(line[6:]))
                    if len(received) >= 2:
                        return

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert ready.wait(10), "the feed said hello"
    started = time.monotonic()
    raise_alarm(database, "M-0005", "burst", "critical")
    thread.join(10)
    assert len(received) >= 2, received
    assert (
        received[0]["event"]["kind"] == "opened"
        and received[0]["ticket"]["household_id"] == "H-0005"
    )
    assert received[0]["ticket"]["priority"] == "critical"
    assert time.monotonic() - started < 5


def test_a_change_is_committed_before_the_answer(hotline: Hotline, database: str) -> None:
    """Regression: the request's transaction committed only after the response had gone out,
    so a client could read its own change as missing (seen under load)."""
    taker = hotline.client("call-taker")
    ticket = taker.post("/api/tickets", json={"category": "enquiry", "summary": "x"}).json()["id"]
    missing: list[str] = []

    def client(n: int) -> None:
        own = hotline.client("call-taker")
        with psycopg.connect(database, autocommit=True) as conn:
            for i in range(40):
                text = f"note {n}-{i}"
                assert (
                    own.post(f"/api/tickets/{ticket}/notes", json={"text": text}).status_code == 200
                )
                found = conn.execute(
                    "SELECT count(*) FROM ticket_events WHERE detail->>'text' = %s", (text,)
                ).fetchone()
                if found != (1,):
                    missing.append(text)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not missing, f"answered but not yet committed: {missing[:5]} ({len(missing)} in all)"


def test_the_action_rules_are_the_ones_the_server_enforces(hotline: Hotline) -> None:
    from alerting.tickets import TRANSITIONS

    rules = hotline.client("technician").get("/api/tickets/actions")
    assert rules.status_code == 200
    assert rules.json() == {
        action: {"starts": list(starts), "leads_to": target}
        for action, (starts, target, _) in TRANSITIONS.items()
    }
    assert rules.json()["acknowledge"] == {"starts": ["new"], "leads_to": "acknowledged"}


def test_valves_follow_the_ticket(hotline: Hotline, database: str) -> None:
    """A manual close is refused on closed, cancelled and test tickets with the reason; a valve
    is never reopened remotely, an admin's request included; the audit log names the ticket,
    the user and the reason of every command."""
    dispatcher, admin = hotline.client("dispatcher"), hotline.client("admin")
    technician = hotline.client("technician")
    raise_alarm(database, "D-0006", "gas_low", "major")
    live = ticket_of(hotline, "H-0006", "gas_leak")
    closed = dispatcher.post(f"/api/tickets/{live['id']}/valve",
                             json={"action": "close_valve", "reason": "caller smells gas"})  # fmt: skip
    assert closed.status_code == 202, closed.text
    audit = query(database, "SELECT actor, target, detail->>'reason' FROM audit_log "
                            "WHERE action = 'valve.close_valve'")  # fmt: skip
    assert audit == [("dispatcher", f"ticket:{live['id']}", "caller smells gas")]
    refused = admin.post(f"/api/tickets/{live['id']}/valve", json={"action": "open_valve"})
    assert refused.status_code == 403 and "on site" in refused.json()["detail"]
    cancelled = dispatcher.post(f"/api/tickets/{live['id']}/cancel", json={"reason": "duplicate"})
    assert cancelled.status_code == 200, cancelled.text
    again = dispatcher.post(f"/api/tickets/{live['id']}/valve", json={"action": "close_valve"})
    assert again.status_code == 409 and "cancelled" in again.json()["detail"]
    silence = technician.post("/api/silences", json={"household_id": "H-0005",
                                                     "reason": "selftest", "minutes": 30})  # fmt: skip
    assert silence.status_code == 201
    raise_alarm(database, "D-0005", "gas_low", "major")
    test = ticket_of(hotline, "H-0005", "gas_leak")
    assert test["test_mode"]
    refused = dispatcher.post(f"/api/tickets/{test['id']}/valve", json={"action": "close_valve"})
    assert refused.status_code == 409 and "test" in refused.json()["detail"]
    assert query(database, "SELECT count(*) FROM valve_commands WHERE ticket_id = %s",
                 (test["id"],)) == [(0,)]  # fmt: skip


def test_a_caller_confirms_the_alarm_and_is_never_a_test(hotline: Hotline, database: str) -> None:
    taker, technician = hotline.client("call-taker"), hotline.client("technician")
    raise_alarm(database, "D-0003", "gas_low", "major")
    alarm = ticket_of(hotline, "H-0003", "gas_leak")
    assert (alarm["priority"], alarm["confidence"]) == ("high", "normal")
    call = taker.post("/api/tickets", json={"category": "emergency_repair", "cause": "gas_leak",
                                            "household_id": "H-0003", "summary": "smell of gas"})  # fmt: skip
    assert call.status_code == 201 and call.json()["joined"], call.text
    joined = call.json()["ticket"]
    assert (joined["id"], joined["priority"], joined["confidence"]) == (
        alarm["id"], "critical", "high")  # fmt: skip
    # a household in test mode: its test ticket ends and the caller's ticket is real
    assert technician.post("/api/silences", json={"household_id": "H-0004", "reason": "selftest",
                                                  "minutes": 30}).status_code == 201  # fmt: skip
    raise_alarm(database, "D-0004", "gas_low", "major")
    test = ticket_of(hotline, "H-0004", "gas_leak")
    assert test["test_mode"]
    call = taker.post("/api/tickets", json={"category": "emergency_repair", "cause": "gas_leak",
                                            "household_id": "H-0004", "summary": "gas, really"})  # fmt: skip
    assert call.status_code == 201 and not call.json()["joined"], call.text
    real = call.json()["ticket"]
    assert not real["test_mode"] and real["priority"] == "critical"
    assert query(database, "SELECT status FROM tickets WHERE id = %s",
                 (test["id"],)) == [("cancelled",)]  # fmt: skip
