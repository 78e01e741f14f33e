"""Filling a fresh GasGuard database the way the running system would, fast-forwarded: the demo
scenario's simulated building for the last 26 hours (so the night hours are in), through the
real ingest path (decode, registry check, detection, COPY, rollups, alarms and their outbox,
dead letters, the silence scan and a health row), then the hotline's own outbox step, which
turns alarms into tickets. Only what a dispatcher and the escalation job would do over a day
(acknowledging, arriving, resolving, breaching) and the health history of a second consumer
are written with SQL."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from firmware_sim.engine import Simulation
from firmware_sim.mqtt_native import SeqCounter, snapshot_batches
from firmware_sim.scenario import FleetSpec, load_scenario, parse_event
from gasguard.wire import encode_batch, topic
from ingest.consumer import Ingest, Message
from ingest.settings import IngestSettings

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "firmware_sim" / "scenarios" / "demo.toml"
GATEWAY = "GW-DEMO"
HOURS = 26
HOUSEHOLDS = 20
DISTRICTS = 2
# Besides the demo's events (all in its first hour): things still going on at the end, so the
# "now" panels have rows: a detector that fell silent, a leak that is still open, and a small
# flow day and night (a leak behind the meter) for the night-flow panel.
EXTRA_EVENTS: list[dict[str, object]] = [
    {"at": f"{HOURS - 1}h30m", "device": "D-0019", "type": "silent"},
    {"at": f"{HOURS - 1}h40m", "device": "D-0005", "type": "gas_leak", "rate_lel_per_min": 4.0,
     "peak_lel": 30.0},
    {"at": "0s", "device": "M-0009", "type": "micro_leak", "flow_m3h": 0.02},
]  # fmt: skip


@dataclass(frozen=True)
class Filled:
    url: str
    start: datetime  # the first reading
    end: datetime  # when filling finished (the panels' "now")


def fill(url: str) -> Filled:
    return asyncio.run(_fill(url))


async def _fill(url: str) -> Filled:
    now_ms = int(time.time() * 1000)
    end_ms = now_ms // 60_000 * 60_000
    start_ms = end_ms - HOURS * 3_600_000
    demo = load_scenario(DEMO)
    scenario = demo.model_copy(
        update={
            # the registry says G2.5 for every meter; the simulated sizes must agree
            "fleet": FleetSpec(detectors=HOUSEHOLDS, meters=HOUSEHOLDS, districts=DISTRICTS,
                               meter_size="G2.5"),
            "events": demo.events + tuple(parse_event(e) for e in EXTRA_EVENTS),
        }
    )  # fmt: skip
    sim = Simulation(scenario, dt=10.0, start_ms=start_ms)
    ingest = Ingest(IngestSettings(database_url=url, ingest_metrics_port=0))
    conn = await ingest.connect_db()
    seq, pending = SeqCounter(), []
    for _ in range(HOURS * 60):  # a reading a minute
        sim.run_for(60)
        for b in snapshot_batches(sim, GATEWAY, seq, 200):
            pending.append(Message(topic(GATEWAY, "telemetry"), encode_batch(b), 0, 0, 0))
        if len(pending) >= ingest.settings.ingest_max_messages:
            await ingest.process(pending)
            pending = []
    await ingest.process(pending + _bad_messages())
    await ingest.fold_rollups()  # as ingest does every couple of seconds
    await ingest.silence_scan()  # D-0019 has been silent for half an hour
    await ingest.health.write(conn, ingest.settings.shard_name, 0)
    await conn.close()
    await _hotline(url)
    await _history(url, start_ms)
    return Filled(url, _dt(start_ms), datetime.now(UTC))


def _bad_messages() -> list[Message]:
    """What the dead-letter panels need: a payload that is not JSON, and one from a gateway
    that is not registered."""
    other = encode_batch(
        next(snapshot_batches(Simulation(dt=60.0), "GW-UNKNOWN", SeqCounter(), 10))
    )
    return [
        Message(topic(GATEWAY, "telemetry"), b"{not json", 0, 0, 0),
        Message(topic("GW-UNKNOWN", "telemetry"), other, 0, 0, 0),
    ]


async def _hotline(url: str) -> None:
    from alerting.outbox import take_outbox

    async with await psycopg.AsyncConnection.connect(url) as conn:
        while (await take_outbox(conn, limit=500)).rows:
            pass
        await conn.execute(
            """
            INSERT INTO tickets (category, priority, cause, source, owner, resolve_due, summary,
                                 caller_phone)
            VALUES ('complaint', 'normal', 'smell_in_street', 'call', 'ann', now() + '1 day',
                    'smell of gas on the corner', '555-0199')
            """
        )
        # a day of hotline work: spread the openings, acknowledge two in three, resolve one in
        # three (one of those late), and let the escalation job mark some promises breached
        await conn.execute(
            """
            UPDATE tickets SET
              opened_at = opened_at - (id % 12) * interval '95 minutes' - interval '5 minutes',
              on_site_due = on_site_due - (id % 12) * interval '95 minutes',
              resolve_due = resolve_due - (id % 12) * interval '95 minutes'
            """
        )
        await conn.execute(
            "UPDATE tickets SET status = 'acknowledged', "
            "acknowledged_at = opened_at + (id % 7 + 1) * interval '1 minute' WHERE id % 3 <> 0"
        )
        await conn.execute(
            "UPDATE tickets SET status = 'resolved', on_site_at = opened_at + interval '25 min', "
            "resolved_at = least(opened_at + (id % 5 + 1) * interval '1 hour', now()) "
            "WHERE id % 3 = 1"
        )
        await conn.execute(
            "UPDATE tickets SET resolve_breached = true "
            "WHERE resolved_at > resolve_due OR (resolved_at IS NULL AND resolve_due < now())"
        )
        await conn.execute(
            "UPDATE tickets SET on_site_breached = true "
            "WHERE on_site_due < coalesce(on_site_at, now())"
        )


async def _history(url: str, start_ms: int) -> None:
    """A second consumer's health rows every minute over the range (the real one wrote one)."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        await conn.execute(
            """
            INSERT INTO ingest_health (at, consumer, readings_per_s, lag_s, batch_latency_ms,
                                       readings_total, dead_letters, alarms_raised)
            SELECT at, '1/2', 600 + 50 * sin(n / 30.0), 0.4 + (n %% 7) * 0.1, 20 + n %% 13,
                   n * 36000, n / 500, n / 100
            FROM generate_series(%s::timestamptz, now(), interval '1 minute')
                 WITH ORDINALITY AS g(at, n)
            """,
            (_dt(start_ms),),
        )


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)
