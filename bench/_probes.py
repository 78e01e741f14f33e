"""The client side of bench/alarm_latency.py: the probes (critical gas alarms committed as
ingest commits them), the consoles reading the live feed, a plain listener on the ticket-event
channel, and the percentiles."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from dataclasses import dataclass

import _hotline as hl
import httpx
import orjson
import psycopg


def percentile(values: list[float], p: float) -> float:
    """Nearest rank (defined with lost probes counted as infinitely late)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]


class Console:
    """One signed-in console on the live feed, noting when each probe's ticket opened."""

    def __init__(self, probe_of: dict[str, int]) -> None:
        self.probe_of = probe_of  # household -> probe number
        self.arrived: dict[int, float] = {}
        self.kinds: Counter[str] = Counter()
        self.resyncs = 0
        self.ready = asyncio.Event()

    async def run(self, client: httpx.AsyncClient, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        async with client.stream("GET", "/api/events", headers=headers) as response:
            response.raise_for_status()
            kind = ""
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                    continue
                if not line.startswith("data:"):
                    continue
                now = time.monotonic()
                if kind == "ticket":
                    message = orjson.loads(line[5:].strip())
                    event_kind = message["event"]["kind"]
                    self.kinds[event_kind] += 1
                    if event_kind == "opened":
                        household = (message.get("ticket") or {}).get("household_id")
                        probe = self.probe_of.get(str(household))
                        if probe is not None:
                            self.arrived.setdefault(probe, now)
                elif kind == "resync":
                    self.resyncs += 1
                elif kind == "hello":
                    self.ready.set()


class Announcements:
    """A plain LISTEN beside the hotline's: when PostgreSQL announced each ``opened`` ticket
    event (the hotline's outbox transaction committed), by ticket id. This splits a probe's
    latency into the hotline's outbox work and the live feed's delivery."""

    def __init__(self) -> None:
        self.opened: dict[int, float] = {}
        self.ready = asyncio.Event()

    async def run(self, url: str, stop: asyncio.Event) -> None:
        from alerting.live import TICKET_CHANNEL

        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute(f"LISTEN {TICKET_CHANNEL}".encode())
            self.ready.set()
            while not stop.is_set():
                async for note in conn.notifies(timeout=0.5):
                    now = time.monotonic()
                    event = orjson.loads(note.payload)
                    if event["kind"] == "opened":
                        self.opened.setdefault(int(event["ticket"]), now)


@dataclass
class Probe:
    key: int
    device: str
    household: str
    district: str


async def probes_of(url: str) -> list[Probe]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            "SELECT d.key, d.id, d.household_id, h.district FROM devices d "
            "JOIN households h ON h.id = d.household_id "
            "WHERE d.kind = 'detector' AND d.household_id LIKE %s ORDER BY d.household_id",
            (hl.PROBE_PREFIX + "%",),
        )
        return [Probe(int(k), str(d), str(h), str(dist)) for k, d, h, dist in await cur.fetchall()]


async def send_probes(
    url: str, probes: list[Probe], interval: float, seconds: float, sent: list[tuple[float, float]]
) -> None:
    """One critical gas alarm every ``interval`` s for ``seconds``, each committed on its own,
    as ingest commits it; ``sent`` gets (before the statements, after the commit)."""
    from ingest.writer import AlarmChange, write_alarms

    async with await psycopg.AsyncConnection.connect(url) as conn:
        start = time.monotonic()
        for i, p in enumerate(probes):
            at = start + i * interval
            if at >= start + seconds:
                break
            await asyncio.sleep(max(at - time.monotonic(), 0.0))
            change = AlarmChange(
                device_key=p.key, device_id=p.device, household_id=p.household,
                district=p.district, rule="gas_high", severity="critical", raised=True,
                ts_ms=time.time_ns() // 1_000_000, value=42.0, test_mode=False,
            )  # fmt: skip
            before = time.monotonic()
            async with conn.transaction(), conn.cursor() as cur:
                await write_alarms(cur, [change])
            sent.append((before, time.monotonic()))


async def watch_backlog(url: str, samples: list[int], stop: asyncio.Event) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            cur = await conn.execute("SELECT count(*) FROM alarm_outbox WHERE done_at IS NULL")
            row = await cur.fetchone()
            samples.append(int(row[0]) if row else 0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


async def wait_for_stragglers(consoles: list[Console], sent: int, quiet_s: float) -> None:
    """Until every console saw every probe, or none arrived for ``quiet_s``; at most three
    times that (a hotline far behind stays behind: what did not come is counted as late)."""
    seen, progress, end = -1, time.monotonic(), time.monotonic() + 3 * quiet_s
    while time.monotonic() < end:
        now_seen = sum(len(c.arrived) for c in consoles)
        if now_seen >= sent * len(consoles):
            return
        if now_seen != seen:
            seen, progress = now_seen, time.monotonic()
        elif time.monotonic() - progress > quiet_s:
            return
        await asyncio.sleep(0.1)
