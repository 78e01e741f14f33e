"""The Grafana expansion helper gives what Grafana's PostgreSQL datasource gives (the expected
strings are Grafana's output for the same input), and refuses what it does not know."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.grafana.grafana_sql import (
    Expander,
    ExpansionError,
    TimeRange,
    Variable,
    calculate_interval,
    format_interval,
    go_float,
    parse_interval,
    rfc3339,
)

END = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
START = END - timedelta(days=1)
TIME = TimeRange(START, END, interval_ms=120_000)
FROM_S, TO_S = int(START.timestamp()), int(END.timestamp())
DISTRICT = Variable("district", ("north", "o'hara"), multi=True, include_all=True)
HOUSEHOLD = Variable("household", ("H-0003",))


def expand(sql: str, *variables: Variable) -> str:
    return Expander(TIME, {v.name: v for v in variables}).expand(sql)


@pytest.mark.parametrize(
    ("sql", "grafana"),
    [
        ("$__timeFilter(ts)", "ts BETWEEN '2026-11-26T12:00:00Z' AND '2026-11-27T12:00:00Z'"),
        ("$__timeFrom() / $__timeTo()", "'2026-11-26T12:00:00Z' / '2026-11-27T12:00:00Z'"),
        ("$__time(at)", 'at AS "time"'),
        ("$__timeEpoch(at)", 'extract(epoch from at) as "time"'),
        ("$__timeGroup(ts, 5m)", "floor(extract(epoch from ts)/300)*300"),
        ("$__timeGroupAlias(r.ts,'1h')", 'floor(extract(epoch from r.ts)/3600)*3600 AS "time"'),
        ("$__timeGroup( ts , 1d, NULL)", "floor(extract(epoch from ts)/86400)*86400"),
        ("$__timeGroup(ts, 500ms, previous)", "floor(extract(epoch from ts)/0.5)*0.5"),
        ("$__timeGroupAlias(ts, $__interval)", 'floor(extract(epoch from ts)/120)*120 AS "time"'),
        ("$__timeGroup(ts, 2w)", "floor(extract(epoch from ts)/1.2096e+06)*1.2096e+06"),
        ("$__unixEpochFilter(t)", f"t >= {FROM_S} AND t <= {TO_S}"),
        ("$__unixEpochFrom()-$__unixEpochTo()", f"{FROM_S}-{TO_S}"),
        ("$__unixEpochGroupAlias(t, 1m)", 'floor((t)/60)*60 AS "time"'),
        ("$__interval $__interval_ms", "2m 120000"),
        ("$__from $__to $__range_s", f"{FROM_S * 1000} {TO_S * 1000} 86400"),
        # the argument stops at the first ')', as Grafana's regular expression does
        ("$__timeFilter(coalesce(a, b))", "coalesce(a BETWEEN '2026-11-26T12:00:00Z' AND "
                                          "'2026-11-27T12:00:00Z')"),
    ],
)  # fmt: skip
def test_macros_expand_as_grafana_does(sql: str, grafana: str) -> None:
    assert expand(sql) == grafana


@pytest.mark.parametrize(
    ("sql", "grafana"),
    [
        ("IN ($district)", "IN ('north','o''hara')"),
        ("IN (${district})", "IN ('north','o''hara')"),
        ("IN (${district:sqlstring})", "IN ('north','o''hara')"),
        ("IN (${district:singlequote})", "IN ('north','o\\'hara')"),
        ("${district:doublequote}", '"north","o\'hara"'),
        ("${district:csv}|${district:pipe}", "north,o'hara|north|o'hara"),
        ("= '$household'", "= 'H-0003'"),
        ("= ${household:sqlstring}", "= 'H-0003'"),
        ("${household:raw}", "H-0003"),
    ],
)
def test_variables_interpolate_as_grafana_does(sql: str, grafana: str) -> None:
    assert expand(sql, DISTRICT, HOUSEHOLD) == grafana


def test_all_is_every_option_or_the_custom_all_value() -> None:
    every = Variable("d", ("a", "b"), multi=True, include_all=True, all_selected=True)
    assert expand("IN ($d)", every) == "IN ('a','b')"
    custom = Variable("d", ("a",), include_all=True, all_selected=True, all_value="%")
    assert expand("LIKE '$d'", custom) == "LIKE '%'"
    assert expand("${d:text}", every) == "All"


def test_a_single_value_has_its_quotes_doubled() -> None:
    assert expand("= '$x'", Variable("x", ("it's",))) == "= 'it''s'"


@pytest.mark.parametrize(
    ("sql", "error"),
    [
        ("$__timeFoo(ts)", "undefined macro: \\$__timeFoo"),
        ("$__timeFilter()", "needs a time column"),
        ("$__timeGroup(ts)", "needs a time column and an interval"),
        ("$__timeGroup(ts, 5 minutes)", "error parsing interval"),
        ("$__timeGroup(ts, 5m, sideways)", "bad fill argument"),
        ("$nobody", "unknown variable \\$nobody"),
        ("${district:json}", "format 'json'"),
        ("$__timeFilter", "unknown variable \\$__timeFilter"),
        ("[[district]]", "not expanded: '\\[\\[district\\]\\]'"),
        ("${__from:date}", "format 'date' on built-in"),
    ],
)
def test_what_grafana_or_the_helper_does_not_know_fails_loudly(sql: str, error: str) -> None:
    with pytest.raises(ExpansionError, match=error):
        expand(sql, DISTRICT)


def test_times_are_go_rfc3339_nano() -> None:
    assert rfc3339(datetime(2026, 1, 2, 3, 4, 5, 250000, tzinfo=UTC)) == "2026-01-02T03:04:05.25Z"
    east = datetime(2026, 1, 2, 11, 4, 5, tzinfo=UTC).astimezone(
        __import__("zoneinfo").ZoneInfo("Asia/Shanghai")
    )
    assert rfc3339(east) == "2026-01-02T11:04:05Z"


def test_interval_numbers_and_names() -> None:
    assert [go_float(x) for x in (300, 0.5, 604800, 1e6, 1234567.0, 0.0001, 1e-05)] == [
        "300", "0.5", "604800", "1e+06", "1.234567e+06", "0.0001", "1e-05",
    ]  # fmt: skip
    assert [format_interval(ms) for ms in (500, 1000, 120_000, 3_600_000, 172_800_000)] == [
        "500ms", "1s", "2m", "1h", "2d",
    ]  # fmt: skip
    assert parse_interval("1h30m") == 5_400_000 and parse_interval("1d") == 86_400_000
    assert calculate_interval(START, END, "1m") == 60_000  # 86.4 s rounds to 1m
    assert calculate_interval(START, END + timedelta(hours=2), "1m") == 120_000  # 93.6 s: 2m
    assert calculate_interval(START, END, "1h") == 3_600_000  # the panel's minimum wins
