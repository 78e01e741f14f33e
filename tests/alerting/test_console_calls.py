"""The call-taker's side of the console in a real browser: finding the caller's household by
address, phone or meter number with its open tickets first, a neighbour's call joining the open
leak, a call without a household, and who may take calls at all."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from playwright.sync_api import Page, expect

from tests.alerting.browser import BROWSER_TEST, LIVE, Console, console, ticket_of
from tests.alerting.harness import Hotline, running_hotline
from tests.alerting.helpers import query, raise_alarm
from tests.ingest.conftest import register, registry_csv

__all__ = ["console"]  # the fixture, from tests/alerting/browser.py
pytestmark = BROWSER_TEST
PHONE = "0571-8765 4321"  # H-0002's, as the registry may hold it


@pytest.fixture
def hotline(database: str, tmp_path: Path) -> Iterator[Hotline]:
    """The hotline on a fresh database with four households (H-0002 at "2 Test St" has
    detector D-0002, meter M-0002 and a phone)."""
    register(database, registry_csv(tmp_path / "r.csv", "GW-1", 4, 4))
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("UPDATE households SET phone = %s WHERE id = 'H-0002'", (PHONE,))
    with running_hotline(database) as hotline:
        yield hotline


def search(page: Page, text: str) -> None:
    page.get_by_test_id("call-search").fill(text)


def test_the_call_taker_finds_the_household_by_address_phone_or_meter_number(
    console: Console,
) -> None:
    page = console.sign_in("call-taker")
    page.keyboard.press("n")  # the keyboard opens the panel, with the search box focused
    expect(page.get_by_test_id("call-panel")).to_be_visible()
    expect(page.get_by_test_id("call-search")).to_be_focused()
    results = page.locator('[data-testid^="call-result-"]')

    search(page, "2")
    expect(page.get_by_test_id("call-search-hint")).to_have_text("Type at least 2 characters.")
    expect(results).to_have_count(0)

    for text in ("2 Test", "0571 8765 4321", "M-0002"):
        search(page, text)
        expect(results).to_have_count(1)
        found = page.get_by_test_id("call-result-H-0002")
        expect(found).to_contain_text("2 Test St")
        expect(found).to_contain_text(PHONE)
        expect(found).to_contain_text("M-0002 (G2.5)")

    search(page, "99 Nowhere Lane")
    expect(page.get_by_test_id("call-search-hint")).to_contain_text("No household matches")
    expect(results).to_have_count(0)

    page.keyboard.press("Escape")  # closes the panel, back on the button that opened it
    expect(page.get_by_test_id("call-panel")).to_be_hidden()
    expect(page.get_by_test_id("new-call")).to_be_focused()


def test_a_neighbours_call_about_an_open_leak_joins_its_ticket(
    console: Console, database: str
) -> None:
    raise_alarm(database, "D-0002", "gas_high", "critical")
    ticket = ticket_of(database, "H-0002")
    page = console.sign_in("call-taker")
    page.get_by_test_id("new-call").click()
    search(page, "0571 8765 4321")

    found = page.get_by_test_id("call-result-H-0002")
    first = found.locator(":scope > *").first  # the open ticket comes before the address
    open_ticket = first.get_by_test_id(f"call-open-ticket-{ticket}")
    expect(open_ticket).to_be_visible()
    expect(open_ticket).to_contain_text(f"#{ticket} new · emergency repair: gas leak")

    page.get_by_test_id("call-choose-H-0002").click()
    expect(page.get_by_test_id("call-household")).to_have_text("H-0002, 2 Test St (district-1)")
    expect(page.get_by_test_id("call-household-note")).to_contain_text(f"#{ticket} gas leak")
    expect(page.get_by_test_id("call-caller-phone")).to_have_value(PHONE)  # found by it
    page.get_by_test_id("call-category").select_option("emergency_repair")
    expect(page.get_by_test_id("call-cause")).to_have_value("gas_leak")
    page.get_by_test_id("call-summary").fill("neighbour smells gas on the landing")
    page.get_by_test_id("call-caller-name").fill("Li Wei")
    page.get_by_test_id("call-caller-phone").fill("0571 1234 5678")
    page.get_by_test_id("call-submit").click()

    expect(page.get_by_test_id("call-outcome")).to_have_text(
        f"Joined ticket #{ticket} (already open for this household)."
    )
    expect(page.get_by_test_id("detail-title")).to_contain_text(f"#{ticket} emergency repair")
    expect(page.get_by_test_id("detail-history").locator('[data-kind="joined"]')).to_contain_text(
        "by call-taker", timeout=LIVE
    )
    expect(page.get_by_test_id("call-search")).to_have_value("")  # ready for the next call
    open_leaks = query(
        database,
        "SELECT id, repeats FROM tickets WHERE household_id = 'H-0002' AND cause = 'gas_leak' "
        "AND status IN ('new', 'acknowledged', 'dispatched', 'on_site')",
    )
    assert open_leaks == [(ticket, 1)]
    joined = query(
        database,
        "SELECT actor, detail->>'caller_name', detail->>'caller_phone' FROM ticket_events "
        "WHERE ticket_id = %s AND kind = 'joined'",
        (ticket,),
    )
    assert joined == [("call-taker", "Li Wei", "0571 1234 5678")]


def test_an_enquiry_without_a_household_opens_a_ticket_owned_by_the_call_taker(
    console: Console, database: str
) -> None:
    page = console.sign_in("call-taker")
    page.get_by_test_id("new-call").click()
    expect(page.get_by_test_id("call-household")).to_contain_text("none")
    page.get_by_test_id("call-category").select_option("enquiry")
    expect(page.get_by_test_id("call-cause")).to_have_value("")  # the category's own
    page.get_by_test_id("call-summary").fill("when does the odorisation campaign start?")
    page.get_by_test_id("call-submit").click()

    outcome = page.get_by_test_id("call-outcome")
    expect(outcome).to_have_text(re.compile(r"^Ticket #\d+ opened\.$"))
    ticket = int(re.findall(r"\d+", outcome.inner_text())[0])
    expect(page.get_by_test_id("detail-title")).to_contain_text(f"#{ticket} enquiry")
    expect(page.get_by_test_id(f"ticket-row-{ticket}")).to_contain_text("no household")
    rows = query(
        database,
        "SELECT category, cause, household_id, owner, source, priority FROM tickets WHERE id = %s",
        (ticket,),
    )
    assert rows == [("enquiry", "enquiry", None, "call-taker", "call", "normal")]


def test_only_the_roles_that_take_calls_see_new_call_and_a_refusal_is_shown(
    console: Console, database: str
) -> None:
    page = console.sign_in("engineer")
    expect(page.get_by_test_id("whoami")).to_contain_text("engineer")
    expect(page.get_by_test_id("new-call")).to_be_hidden()
    page.keyboard.press("n")
    expect(page.get_by_test_id("call-panel")).to_be_hidden()
    page.get_by_test_id("logout").click()

    console.fill_login("call-taker")
    expect(page.get_by_test_id("new-call")).to_be_visible()
    page.get_by_test_id("new-call").click()
    # the role changes while the console is open: the hotline refuses, and the page says why
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("UPDATE users SET role = 'engineer' WHERE username = 'call-taker'")
    page.get_by_test_id("call-category").select_option("complaint")
    page.get_by_test_id("call-summary").fill("the crew left the gate open")
    page.get_by_test_id("call-submit").click()
    message = page.get_by_test_id("message")
    expect(message).to_have_attribute("data-kind", "error")
    expect(message).to_contain_text("The call was not saved: a engineer may not do this")
    expect(page.get_by_test_id("call-summary")).to_have_value("the crew left the gate open")
    assert query(database, "SELECT count(*) FROM tickets") == [(0,)]
