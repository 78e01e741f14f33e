"""The dispatcher console and the report page in a real browser (Debian's chromium, driven by
Playwright): live queue, actions, the detail pane and the API's reasons, against the real
hotline on a fresh database."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from playwright.sync_api import expect

from ingest.storage import Partitions
from tests.alerting.browser import (
    BROWSER_TEST,
    LIVE,
    Console,
    console,
    eventually,
    off_loop,
    ticket_of,
)
from tests.alerting.harness import Hotline, running_hotline
from tests.alerting.helpers import query, raise_alarm
from tests.ingest.conftest import register, registry_csv

__all__ = ["console"]  # the fixture, from tests/alerting/browser.py
pytestmark = BROWSER_TEST
# we run as root (no sandbox); the rest keeps chromium off the (closed) network


@pytest.fixture
def hotline(database: str, tmp_path: Path) -> Iterator[Hotline]:
    """The hotline on a fresh database with four registered households (H-0001 has detector
    D-0001 and meter M-0001, ...)."""
    register(database, registry_csv(tmp_path / "r.csv", "GW-1", 4, 4))
    with running_hotline(database) as hotline:
        yield hotline


def test_a_new_alarm_reaches_the_open_console_live_and_acknowledging_it_takes_the_ticket(
    console: Console, database: str
) -> None:
    page = console.sign_in("dispatcher")
    expect(page.get_by_test_id("queue-empty")).to_have_text("No open tickets.")
    queue_loads: list[str] = []
    page.on("request", lambda r: queue_loads.append(r.url) if r.url.endswith("/api/tickets") else None)  # fmt: skip
    page.evaluate("window.notReloaded = true")

    raise_alarm(database, "D-0001", "gas_high", "critical")
    rows = page.locator('[data-testid^="ticket-row-"]')
    expect(rows).to_have_count(1, timeout=LIVE)
    ticket = ticket_of(database, "H-0001")
    row = page.get_by_test_id(f"ticket-row-{ticket}")
    expect(row).to_have_class(re.compile(r"\bcritical\b"))
    expect(row).to_contain_text("1 Test St")
    expect(page.get_by_test_id(f"ticket-priority-{ticket}")).to_have_text("critical")
    expect(page.get_by_test_id(f"ticket-status-{ticket}")).to_have_text("new")
    expect(page.get_by_test_id(f"ticket-due-{ticket}")).to_have_text(re.compile(r"^on site in \d"))
    assert page.evaluate("window.notReloaded") is True, "the page was reloaded"
    assert queue_loads == [], "the row came from the live feed, not from reloading the queue"
    assert page.evaluate("document.body.dataset.alerts") == "1", "a new critical ticket sounds"

    page.get_by_test_id(f"ack-{ticket}").click()
    expect(page.get_by_test_id(f"ticket-status-{ticket}")).to_have_text("acknowledged")
    expect(page.get_by_test_id(f"ticket-owner-{ticket}")).to_have_text("dispatcher")
    expect(page.get_by_test_id(f"ack-{ticket}")).to_be_disabled()
    sql = "SELECT status, owner FROM tickets WHERE id = %s AND status = 'acknowledged'"
    assert eventually(lambda: query(database, sql, (ticket,))) == [("acknowledged", "dispatcher")]


async def _day_partitions(database: str) -> None:
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await Partitions("stock").ensure_ahead(conn, days_ahead=0)  # yesterday and today


def test_the_detail_pane_charts_the_stored_readings_and_follows_the_history_live(
    console: Console, hotline: Hotline, database: str
) -> None:
    off_loop(asyncio.run, _day_partitions(database))
    readings = [(20, 3.0, False), (15, 6.5, False), (10, 12.0, False), (7, None, True),
                (4, 27.0, False), (1, 31.0, False)]  # fmt: skip
    with psycopg.connect(database, autocommit=True) as conn:
        for minutes_ago, lel, lost in readings:
            conn.execute(
                "INSERT INTO detector_readings (ts, device_key, ch4_lel, comm_lost) "
                "SELECT now() - make_interval(mins => %s), key, %s, %s FROM devices WHERE id = %s",
                (minutes_ago, lel, lost, "D-0001"),
            )
    raise_alarm(database, "D-0001", "gas_high", "critical")
    ticket = ticket_of(database, "H-0001")
    page = console.sign_in("dispatcher")
    page.get_by_test_id(f"open-{ticket}").click()

    chart = page.get_by_test_id("detail-chart")
    expect(chart).to_have_attribute("data-points", "5")
    assert chart.locator("polyline").count() == 2, "the silent reading splits the line"
    expect(chart).to_have_attribute("aria-label", re.compile(r"latest 31 %LEL"))
    expect(page.get_by_test_id("detail-household")).to_have_text("H-0001, 1 Test St")
    expect(page.get_by_test_id("detail-device")).to_have_text("D-0001")
    expect(page.get_by_test_id("detail-on-site-due")).to_have_text(re.compile(r"^in \d"))
    history = page.get_by_test_id("detail-history")
    expect(history.locator('[data-kind="opened"]')).to_have_count(1)
    # a gas_high alarm closes the valve by policy: the command is on the ticket
    expect(history.locator('[data-kind="valve_requested"]')).to_have_count(1)
    expect(page.get_by_test_id(f"valve-command-T{ticket}-1")).to_contain_text("close valve")

    # a change made elsewhere (another dispatcher, through the API) reaches the open pane
    with hotline.client("dispatcher") as other:
        other.post(f"/api/tickets/{ticket}/notes",
                   json={"text": "caller smells gas in the kitchen"}).raise_for_status()  # fmt: skip
    expect(history.locator('[data-kind="note"]')).to_contain_text(
        "caller smells gas in the kitchen", timeout=LIVE
    )


def test_a_refused_step_shows_the_reason_and_the_dialogs_dispatch_and_cancel(
    console: Console, database: str
) -> None:
    raise_alarm(database, "D-0001", "gas_high", "critical")
    raise_alarm(database, "D-0002", "gas_low", "major")
    critical, high = ticket_of(database, "H-0001"), ticket_of(database, "H-0002")
    page = console.sign_in("dispatcher")
    rows = page.locator('[data-testid^="ticket-row-"]')
    expect(rows).to_have_count(2, timeout=LIVE)
    expect(rows.nth(0)).to_have_attribute("data-testid", f"ticket-row-{critical}")
    expect(rows.nth(1)).to_have_attribute("data-testid", f"ticket-row-{high}")

    page.get_by_test_id(f"ack-{critical}").click()
    expect(page.get_by_test_id(f"ticket-status-{critical}")).to_have_text("acknowledged")
    page.get_by_test_id(f"resolve-{critical}").click()
    message = page.get_by_test_id("message")
    expect(message).to_contain_text("resolved only after a crew was on site")
    expect(message).to_have_attribute("data-kind", "error")
    expect(page.get_by_test_id(f"ticket-status-{critical}")).to_have_text("acknowledged")

    page.get_by_test_id(f"dispatch-{critical}").click()
    dialog = page.get_by_test_id("action-dialog")
    expect(dialog).to_be_visible()
    expect(page.get_by_test_id("dialog-department")).to_have_value("emergency repair")
    page.get_by_test_id("dialog-crew").fill("crew 3")
    page.get_by_test_id("dialog-submit").click()
    expect(page.get_by_test_id(f"ticket-status-{critical}")).to_have_text("dispatched")
    assert query(database, "SELECT department, crew FROM tickets WHERE id = %s", (critical,)) == [
        ("emergency repair", "crew 3")
    ]

    page.get_by_test_id(f"cancel-{high}").click()
    page.get_by_test_id("dialog-submit").click()  # no reason: the form refuses it
    expect(dialog).to_be_visible()
    page.get_by_test_id("dialog-reason").fill("the caller's own test of the detector")
    page.get_by_test_id("dialog-submit").click()
    expect(page.get_by_test_id(f"ticket-row-{high}")).to_have_count(0)  # it left the queue
    assert query(database, "SELECT status, cancel_reason FROM tickets WHERE id = %s", (high,)) == [
        ("cancelled", "the caller's own test of the detector")
    ]


def test_the_report_page_signs_in_through_the_console_and_shows_the_days_figures(
    console: Console, hotline: Hotline, database: str
) -> None:
    raise_alarm(database, "D-0001", "gas_high", "critical")
    ticket_of(database, "H-0001")
    page = console.page
    page.goto(f"{hotline.url}/report")
    expect(page.get_by_test_id("login-form")).to_be_visible()  # sent to sign in first
    console.fill_login("engineer")
    expect(page).to_have_url(f"{hotline.url}/report")
    figures = page.get_by_test_id("report-category-emergency_repair").locator("td")
    expect(figures).to_have_text(["emergency repair", "1", "0", "1", "0"])
    expect(page.get_by_test_id("report-complaints-none")).to_be_visible()


def test_an_alarm_that_could_not_be_read_is_named_on_the_console_with_its_ticket(
    console: Console, database: str
) -> None:
    from tests.alerting.test_unreadable import gas, outbox_row

    page = console.sign_in("dispatcher")
    expect(page.get_by_test_id("queue-empty")).to_have_text("No open tickets.")
    expect(page.get_by_test_id("failed-rows")).to_be_hidden()
    outbox_row(database, gas(2, "rule_of_a_newer_ingest", "critical"))
    banner = page.get_by_test_id("failed-rows")
    expect(banner).to_contain_text("1 alarm(s) could not be read fully", timeout=LIVE)
    ticket = ticket_of(database, "H-0002")
    expect(page.get_by_test_id(f"ticket-priority-{ticket}")).to_have_text("critical")
    page.get_by_test_id(f"failed-ticket-{ticket}").click()
    detail = page.get_by_test_id("detail")
    expect(detail).to_contain_text("could not be read fully")
    expect(detail).to_contain_text("rule_of_a_newer_ingest")
