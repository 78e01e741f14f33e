"""Property: whatever lands in ``alarm_outbox`` (random, truncated, oversized, wrongly typed or
unknown-rule payloads), the real alarms written beside it still become their tickets, and every
row ends applied, or failed and on a ticket: never pending, never unseen."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from alerting.outbox import RULES
from tests.alerting.harness import running_hotline
from tests.alerting.helpers import query, raise_alarm
from tests.ingest.conftest import register, registry_csv

pytestmark = pytest.mark.integration
HOUSEHOLDS = 400
FIELDS = ("device", "household", "district", "rule", "severity", "test")

# what jsonb can hold: no NUL in strings, no NaN or infinity; integers of any size
text = st.text(st.characters(exclude_characters="\x00", codec="utf-8"), max_size=40)
scalars = (st.none() | st.booleans() | text | st.floats(allow_nan=False, allow_infinity=False)
           | st.integers(min_value=-(10**40), max_value=10**320))  # fmt: skip
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
field_values = {
    "device": st.sampled_from(["D-0001", "D-0399", "D-9999", ""]) | json_values,
    "household": st.sampled_from(["H-0002", "H-0398", "H-9999"]) | json_values,
    "district": st.just("district-1") | json_values,
    "rule": st.sampled_from([*RULES, "gas_explosion", "", "GAS_HIGH"]) | json_values,
    "severity": st.sampled_from(["critical", "major", "minor"]) | json_values,
    "test": st.booleans() | json_values,
}
# an alarm payload with some fields missing (truncated) and some of the wrong type
alarm_like = st.fixed_dictionaries({}, optional={name: field_values[name] for name in FIELDS}).map(
    lambda d: d
)
oversized = st.builds(
    lambda n, rule: {"rule": rule, "household": "H-0003", "device": "D-0003",
                     "evidence": "x" * n, "severity": "critical"},
    st.integers(10_000, 200_000), st.sampled_from([*RULES, "unknown"]),
)  # fmt: skip
payloads = alarm_like | json_values | oversized
rows = st.lists(
    st.tuples(payloads, st.sampled_from(["raised", "raised", "cleared", "confidence"])),
    min_size=1,
    max_size=12,
)


def test_random_outbox_rows_never_stop_real_alarms_and_never_stay_pending(
    database: str, tmp_path: Path
) -> None:
    register(database, registry_csv(tmp_path / "r.csv", "GW-1", HOUSEHOLDS, 0))
    households = itertools.count(10)  # each example's real alarms in households of their own
    with running_hotline(database, hotline_outbox_poll_s=0.2) as _hotline:

        @settings(max_examples=40, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
        @given(bad=rows, real=st.integers(1, 3), real_first=st.booleans())
        def example(bad: list[tuple[Any, str]], real: int, real_first: bool) -> None:
            mine = [next(households) for _ in range(real)]
            assert mine[-1] < HOUSEHOLDS, "more examples than households"
            with psycopg.connect(database, autocommit=True) as conn:
                anchor = conn.execute(
                    "INSERT INTO alarms (device_key, device_id, household_id, district, rule, "
                    "severity, raised_at, cleared_at) SELECT key, id, household_id, 'district-1', "
                    "'gas_high', 'critical', now(), now() FROM devices WHERE id = 'D-0001' "
                    "RETURNING id"
                ).fetchone()
                assert anchor is not None

                def write_bad() -> list[int]:
                    return [
                        int(conn.execute(
                            "INSERT INTO alarm_outbox (alarm_id, event, payload) "
                            "VALUES (%s, %s, %s) RETURNING id", (anchor[0], event, Jsonb(p)),
                        ).fetchone()[0])  # type: ignore[index]
                        for p, event in bad
                    ]  # fmt: skip

                bad_ids = [] if real_first else write_bad()
                started = time.monotonic()
                alarms = [raise_alarm(database, f"D-{h:04d}", "gas_high", "critical") for h in mine]
                if real_first:
                    bad_ids = write_bad()
            deadline = started + 15
            while time.monotonic() < deadline:
                ticketed = query(
                    database,
                    "SELECT count(*) FROM ticket_events e JOIN tickets t ON t.id = e.ticket_id "
                    "WHERE e.alarm_id = ANY(%s) AND e.kind = 'opened' AND t.priority = 'critical' "
                    "AND t.cause = 'gas_leak'",
                    (alarms,),
                )[0][0]
                pending = query(
                    database,
                    "SELECT count(*) FROM alarm_outbox WHERE done_at IS NULL AND id = ANY(%s)",
                    (bad_ids,),
                )[0][0]
                if ticketed == real and pending == 0:
                    break
                time.sleep(0.02)
            assert (ticketed, pending) == (real, 0), "a real alarm without its ticket, or stuck"
            # every failed row is on a ticket that holds its raw payload
            unticketed = query(
                database,
                "SELECT o.id, o.error FROM alarm_outbox o WHERE o.id = ANY(%s) "
                "AND o.failed_at IS NOT NULL AND NOT EXISTS (SELECT 1 FROM ticket_events e "
                "WHERE e.outbox_id = o.id AND e.detail ? 'raw')",
                (bad_ids,),
            )
            assert unticketed == [], unticketed

        example()
        health = _hotline.client(None).get("/health")
        assert health.status_code == 200 and health.json()["stopped_tasks"] == [], health.text
