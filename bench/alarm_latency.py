"""Alarm latency: from an alarm's outbox row committed (as ingest commits it) to the ticket it
opens arriving on a console's live feed (``GET /api/events``, server-sent events), under a
background of a 10,000-device fleet's alarms and clears; against the same hotline taking the
outbox only by polling (no NOTIFY wake-up), measured in the same run.

    .venv/bin/python bench/alarm_latency.py [--households 5000] [--rate 200] [--seconds 60]
        [--baseline-seconds 30] [--warmup 10] [--probe-interval 0.1] [--consoles 1]

Self-contained: a database of its own on 127.0.0.1:5432 (created, migrated, the fleet and a
user registered; a copy of it for the baseline; both dropped at the end) and two processes
besides this one per phase:

- the hotline service as deployed (``alerting.app.create_app`` served by uvicorn, default
  settings: outbox poll 1 s, batch 200, storm grouping on; the valve bridge off, as there is
  no broker), in a process of its own so that it shares no interpreter with the measuring
  client;
- the background load: alarms raised on random devices of the fleet (households ``H-``, a
  detector and a meter each, over 50 districts; rules sensor_fault, silent, continuous_flow,
  micro_leak, reverse_flow, severity major or minor) and cleared after a random hold
  (exponential, mean ``--hold`` s), ``--rate`` outbox rows a second in all, one transaction
  every ``--commit-ms`` as ingest's consumer commits a micro-batch, written with ingest's own
  ``write_alarms``. Nobody works the tickets, so they pile up as on an unattended hotline, and
  every district soon has a storm incident per cause (grouping, part of the product, stays on).

This process is the probe and the console: every ``--probe-interval`` s it commits one
critical ``gas_high`` alarm (``write_alarms``, one transaction) for a fresh probe household
(``P-``, in the same districts: each probe opens a new ticket, and probes make gas-leak storms
of their own), and reads the live feed on ``--consoles`` SSE connections signed in as an
engineer. A probe's latency is the time from just after its commit returned to the moment its
ticket's ``opened`` event (matched by household) is read off the stream, both on this
process's monotonic clock; per probe and console. After the last probe the bench waits until
every probe was seen, or none came for ``--grace`` s (three times that at most); a probe not
seen by then counts as infinitely late in the percentiles. A plain LISTEN of its own on the
ticket-event channel splits the latency in two: commit -> PostgreSQL announces the ``opened``
event (the hotline's outbox worker: wake-up, queue, its transaction), and announced -> read
on the console (the live feed: a ticket summary read per event, then SSE). ``done_at -
created_at`` of the probe's outbox row (database clock) gives the wait before the worker's
transaction began.

The baseline is the same hotline, the same load and the same probes on a copy of the database
without the ``alarm_outbox_notify`` trigger: the worker then takes the outbox only on its
poll (``--poll``, the service's default 1 s), as a hotline without LISTEN would. On a 2-core
machine PostgreSQL, the hotline, the load and this client share the cores; each phase prints
the CPU split, including what else the machine was doing. ``--keep`` keeps the databases.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import _hotline as hl  # noqa: E402
import _probes as pr  # noqa: E402
import httpx  # noqa: E402
import psycopg  # noqa: E402
from _cpu import CpuMeter, postgres_pids  # noqa: E402

GOAL_MS = 250.0


def say(text: str = "") -> None:
    print(text, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ratio(baseline: float, ours: float) -> str:
    if math.isinf(ours) or math.isnan(ours) or math.isnan(baseline) or ours <= 0:
        return "- (no p99: probes not seen)"
    if math.isinf(baseline):
        return "- (the baseline's p99 probes were not seen)"
    return f"{baseline / ours:.1f}x"


def ms(x: float) -> str:
    return "not seen" if math.isinf(x) else "-" if math.isnan(x) else f"{x:.0f} ms"


# ------------------------------------------------------------------------------ one phase


@dataclass
class Result:
    name: str
    latencies: list[float] = field(default_factory=list)  # ms, per probe and console
    announced: list[float] = field(default_factory=list)  # ms, commit -> NOTIFY of 'opened'
    delivered: list[float] = field(default_factory=list)  # ms, that NOTIFY -> first console
    commit_ms: list[float] = field(default_factory=list)
    sent: int = 0
    late: int = 0  # (probe, console) pairs never seen
    timeline: list[tuple[float, float, float]] = field(default_factory=list)  # p50, p99, max
    kinds: Counter[str] = field(default_factory=Counter)
    resyncs: int = 0
    offered: float = 0.0
    written: float = 0.0  # background rows/s committed
    taken: float = 0.0  # outbox rows/s the hotline marked done in the window
    backlog_end: int = 0
    backlog_max: int = 0
    pickup: tuple[float, float] = (math.nan, math.nan)  # probes: created -> taken, p50/p99 ms
    background_lag: tuple[float, float] = (math.nan, math.nan)
    load_late: int = 0
    load_slowest_ms: float = 0.0
    cpu: str = ""


async def wait_healthy(client: httpx.AsyncClient, proc: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.is_alive():
            raise RuntimeError(f"the hotline process died (exit code {proc.exitcode})")
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get("/health", timeout=1)).status_code == 200:
                return
        await asyncio.sleep(0.1)
    raise TimeoutError("the hotline did not become healthy")


def stop_process(proc: Any, timeout: float = 15.0) -> None:
    if proc.is_alive():
        proc.terminate()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()


class Phase:
    """One measured run on one database: the hotline and the load in processes of their own,
    the consoles, the plain listener and the probes here."""

    def __init__(
        self, name: str, url: str, seconds: float, args: argparse.Namespace, cleanup: list[Any]
    ) -> None:
        ctx = mp.get_context("spawn")
        self.result = Result(name)
        self.url, self.seconds, self.args = url, seconds, args
        self.port = free_port()
        values = {"database_url": url, "hotline_port": self.port,
                  "hotline_valve_enabled": False, "hotline_outbox_poll_s": args.poll}  # fmt: skip
        self.hotline = ctx.Process(
            target=hl.hotline_main, args=(values,), name="hotline", daemon=True
        )
        self.stats = ctx.Array("q", hl.LOAD_SLOTS, lock=False)
        self.stop_load = ctx.Event()
        load = hl.Load(args.rate, args.commit_ms / 1000, args.hold, args.seed)
        self.loader = ctx.Process(
            target=hl.load_main, args=(url, load, self.stats, self.stop_load), name="load",
            daemon=True,
        )  # fmt: skip
        self.cleanup = cleanup
        self.consoles: list[pr.Console] = []
        self.announcements = pr.Announcements()
        self.sent: list[tuple[float, float]] = []
        self.db_t0: Any = None  # the probing window on the database's clock
        self.db_t1: Any = None

    async def run(self) -> Result:
        probes = await pr.probes_of(self.url)
        needed = math.ceil(self.seconds / self.args.probe_interval)
        if len(probes) < needed:
            raise RuntimeError(f"{len(probes)} probe households registered, {needed} needed")
        self.hotline.start()
        self.cleanup.append(self.hotline)
        timeout = httpx.Timeout(10.0, read=None)
        base = f"http://127.0.0.1:{self.port}"
        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        try:
            async with httpx.AsyncClient(base_url=base, timeout=timeout) as client:
                await wait_healthy(client, self.hotline)
                login = await client.post(
                    "/api/auth/login", json={"username": hl.USER, "password": hl.PASSWORD}
                )
                login.raise_for_status()
                token = login.json()["token"]
                probe_of = {p.household: i for i, p in enumerate(probes)}
                self.consoles = [pr.Console(probe_of) for _ in range(self.args.consoles)]
                tasks = [asyncio.create_task(c.run(client, token)) for c in self.consoles]
                tasks.append(asyncio.create_task(self.announcements.run(self.url, stop)))
                ready = [c.ready for c in self.consoles] + [self.announcements.ready]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 10)
                await self._measure(probes)
        finally:
            stop.set()
            self.stop_load.set()
            for task in tasks:
                task.cancel()
            for outcome in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(outcome, Exception):  # a console or the listener had failed
                    say(f"      a reader failed: {outcome!r}")
            if self.loader.pid is not None:
                await asyncio.to_thread(stop_process, self.loader)
            await asyncio.to_thread(stop_process, self.hotline)
        if self.stats[hl.LOAD_ERROR]:
            raise RuntimeError("the load process failed (see above)")
        await self._collect()
        return self.result

    async def _measure(self, probes: list[pr.Probe]) -> None:
        args, stats, r = self.args, self.stats, self.result
        self.loader.start()
        self.cleanup.append(self.loader)
        deadline = time.monotonic() + 30
        while not stats[hl.LOAD_READY]:
            if not self.loader.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the load process did not start")
            await asyncio.sleep(0.05)
        say(
            f"      hotline pid {self.hotline.pid} on :{self.port}, load pid {self.loader.pid}, "
            f"{args.consoles} console(s) on the live feed; warm-up {args.warmup:.0f} s"
        )
        await asyncio.sleep(args.warmup)
        for c in self.consoles:
            c.kinds.clear()
        cpu = CpuMeter(
            {
                "hotline": [self.hotline.pid or 0],
                "load": [self.loader.pid or 0],
                "probe+consoles": [os.getpid()],
                "postgres": postgres_pids(self.url),
            }
        )
        rows0, t0 = stats[hl.LOAD_ROWS], time.monotonic()
        self.db_t0 = hl.scalar(self.url, "SELECT clock_timestamp()")
        samples: list[int] = []
        stop_watch = asyncio.Event()
        watcher = asyncio.create_task(pr.watch_backlog(self.url, samples, stop_watch))
        await pr.send_probes(self.url, probes, args.probe_interval, self.seconds, self.sent)
        rows1, t1 = stats[hl.LOAD_ROWS], time.monotonic()
        self.db_t1 = hl.scalar(self.url, "SELECT clock_timestamp()")
        r.cpu = cpu.report()
        r.backlog_end = int(
            hl.scalar(self.url, "SELECT count(*) FROM alarm_outbox WHERE done_at IS NULL")
        )
        stop_watch.set()
        await watcher
        await pr.wait_for_stragglers(self.consoles, len(self.sent), args.grace)
        r.offered = args.rate
        r.written = (rows1 - rows0) / (t1 - t0)
        r.backlog_max = max(samples, default=0)
        r.load_late = int(stats[hl.LOAD_LATE])
        r.load_slowest_ms = stats[hl.LOAD_MAX_COMMIT_US] / 1000

    async def _collect(self) -> None:
        r, sent = self.result, self.sent
        r.sent = len(sent)
        r.commit_ms = [1000 * (after - before) for before, after in sent]
        slices: dict[int, list[float]] = {}
        for c in self.consoles:
            for i, (_, committed) in enumerate(sent):
                arrived = c.arrived.get(i)
                latency = math.inf if arrived is None else 1000 * (arrived - committed)
                r.latencies.append(latency)
                r.late += arrived is None
                slices.setdefault(int((committed - sent[0][1]) // 10), []).append(latency)
            r.kinds += c.kinds
            r.resyncs += c.resyncs
        r.timeline = [
            (pr.percentile(v, 50), pr.percentile(v, 99), max(v)) for _, v in sorted(slices.items())
        ]
        # the split: commit -> announced (the hotline's outbox work) -> first console (the feed)
        async with await psycopg.AsyncConnection.connect(self.url) as conn:
            cur = await conn.execute(
                "SELECT id, household_id FROM tickets WHERE household_id LIKE %s "
                "AND NOT is_incident",
                (hl.PROBE_PREFIX + "%",),
            )
            ticket_of = {str(h): int(t) for t, h in await cur.fetchall()}
        probe_household = {i: h for h, i in self.consoles[0].probe_of.items()}
        for i, (_, committed) in enumerate(sent):
            note = self.announcements.opened.get(ticket_of.get(probe_household[i], -1))
            arrived = self.consoles[0].arrived.get(i)
            if note is not None:
                r.announced.append(1000 * (note - committed))
                if arrived is not None:
                    r.delivered.append(1000 * (arrived - note))
        r.taken, r.pickup, r.background_lag = database_figures(self.url, self.db_t0, self.db_t1)


def database_figures(
    url: str, t0: Any, t1: Any
) -> tuple[float, tuple[float, float], tuple[float, float]]:
    """Outbox rows/s taken in the window; probes' and background rows' wait from the row's
    transaction to the hotline's (``done_at - created_at``: both are transaction start times),
    p50 and p99 in ms, over the rows created in the window."""
    lag = (
        "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY w), "
        "percentile_disc(0.99) WITHIN GROUP (ORDER BY w) FROM (SELECT 1000 * extract(epoch "
        "FROM o.done_at - o.created_at)::float8 AS w FROM alarm_outbox o "
        "WHERE o.created_at BETWEEN %(t0)s AND %(t1)s AND o.done_at IS NOT NULL "
        "AND (o.payload->>'household' LIKE %(probe)s) = %(probes)s) x"
    )
    window = {"t0": t0, "t1": t1, "probe": hl.PROBE_PREFIX + "%"}
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM alarm_outbox WHERE done_at BETWEEN %(t0)s AND %(t1)s", window
        ).fetchone()
        taken = int(row[0]) if row else 0
        probe = conn.execute(lag, {**window, "probes": True}).fetchone()
        background = conn.execute(lag, {**window, "probes": False}).fetchone()
    seconds = (t1 - t0).total_seconds()

    def pair(r: Any) -> tuple[float, float]:
        return (math.nan, math.nan) if r is None or r[0] is None else (float(r[0]), float(r[1]))

    return taken / seconds, pair(probe), pair(background)


def spread(values: list[float]) -> str:
    return (
        f"p50 {ms(pr.percentile(values, 50))}, p95 {ms(pr.percentile(values, 95))}, "
        f"p99 {ms(pr.percentile(values, 99))}, max {ms(max(values, default=math.nan))}"
    )


def report_phase(r: Result) -> None:
    say(
        f"      probes: {r.sent} sent, {len(r.latencies) - r.late} arrivals seen (probes x "
        f"consoles), {r.late} not seen (late or lost); latency {spread(r.latencies)}"
    )
    say(
        f"      split: commit -> the 'opened' event announced by PostgreSQL (the hotline's "
        f"outbox work) {spread(r.announced)}"
    )
    say(
        f"             of which the wait from the probe's transaction to the hotline's "
        f"(database clock) p50 {ms(r.pickup[0])}, p99 {ms(r.pickup[1])}"
    )
    say(f"             announced -> on the console (live feed + SSE) {spread(r.delivered)}")
    say(
        f"      probe commit itself: p50 {ms(pr.percentile(r.commit_ms, 50))}, "
        f"p99 {ms(pr.percentile(r.commit_ms, 99))}"
    )
    say(
        "      per 10 s (p50/p99/max): "
        + ", ".join(f"{ms(a)}/{ms(b)}/{ms(c)}" for a, b, c in r.timeline)
    )
    say(
        f"      background: {r.offered:.0f} outbox rows/s offered, {r.written:.0f} written, "
        f"{r.taken:.0f} taken by the hotline (probes included); backlog max {r.backlog_max}, "
        f"at the end {r.backlog_end}; background rows' wait for the hotline p50 "
        f"{ms(r.background_lag[0])}, p99 {ms(r.background_lag[1])}; slowest background "
        f"transaction {ms(r.load_slowest_ms)}"
        + (f"; the load fell > 1 s behind {r.load_late} time(s)" if r.load_late else "")
    )
    total = sum(r.kinds.values())
    say(
        f"      live feed: {total} ticket events read ("
        + ", ".join(f"{k} {n}" for k, n in r.kinds.most_common())
        + f"), {r.resyncs} resyncs"
    )
    say(f"      {r.cpu}")


# ------------------------------------------------------------------------------ the run


async def run(args: argparse.Namespace, cleanup: list[Any]) -> None:
    name = f"gasguard_bench_alarms_{uuid.uuid4().hex[:8]}"
    poll_name = f"{name}_poll"
    probes = math.ceil(max(args.seconds, args.baseline_seconds) / args.probe_interval) + 10
    say(
        f"alarm latency bench: {2 * args.households:,} devices ({args.households:,} households, "
        f"{args.districts} districts), {probes} probe households; {os.cpu_count()} CPUs"
    )
    started = time.monotonic()
    hl.admin(f'CREATE DATABASE "{name}"')
    cleanup.append(name)
    devices = await hl.prepare_database(hl.db_url(name), args.households, probes, args.districts)
    if args.baseline_seconds > 0:
        hl.admin(f'CREATE DATABASE "{poll_name}" TEMPLATE "{name}"')
        cleanup.append(poll_name)
        hl.execute(hl.db_url(poll_name), "DROP TRIGGER alarm_outbox_notify ON alarm_outbox")
    say(
        f"setup: database {name} migrated, {devices:,} devices registered"
        + (f", copied to {poll_name} without the outbox trigger" if args.baseline_seconds else "")
        + f" ({time.monotonic() - started:.1f} s)"
    )
    say()
    say(
        f"[1/2] the hotline woken by NOTIFY on alarm_outbox (poll {args.poll:g} s as fallback); "
        f"background {args.rate:g} outbox rows/s, a transaction every {args.commit_ms:g} ms; "
        f"a probe every {args.probe_interval * 1000:.0f} ms for {args.seconds:.0f} s"
    )
    main = await Phase("notify", hl.db_url(name), args.seconds, args, cleanup).run()
    report_phase(main)
    base = None
    if args.baseline_seconds > 0:
        say()
        say(
            f"[2/2] baseline: the same without the trigger (the worker polls every "
            f"{args.poll:g} s); probes for {args.baseline_seconds:.0f} s"
        )
        base = await Phase("poll", hl.db_url(poll_name), args.baseline_seconds, args, cleanup).run()
        report_phase(base)

    p99 = pr.percentile(main.latencies, 99)
    rows = [
        ("machine", f"{os.cpu_count()} CPUs shared by PostgreSQL, hotline, load and client"),
        (
            "background",
            f"{2 * args.households:,} devices, {main.written:.0f} outbox rows/s written, "
            f"{main.taken:.0f}/s taken, backlog at the end {main.backlog_end}",
        ),
        ("alarm latency (NOTIFY)", f"{spread(main.latencies)} ({main.sent} probes)"),
    ]
    if main.late:
        rows.append(("", f"{main.late} probe arrivals not seen: counted as infinitely late"))
    if base is not None:
        base_p99 = pr.percentile(base.latencies, 99)
        rows += [
            (f"baseline (poll {args.poll:g} s)", f"{spread(base.latencies)} ({base.sent} probes)"),
            ("ratio baseline p99 / p99", ratio(base_p99, p99)),
        ]
    rows.append((f"p99 <= {GOAL_MS:.0f} ms", "met" if p99 <= GOAL_MS else "NOT met"))
    say()
    say("=" * 78)
    for label, value in rows:
        say(f"{label:<28} {value}")
    say("=" * 78)


def clean(cleanup: list[Any], keep: bool) -> None:
    for thing in reversed(cleanup):
        try:
            if isinstance(thing, str):
                if keep:
                    say(f"kept database {thing}")
                    continue
                hl.admin(f'DROP DATABASE IF EXISTS "{thing}" WITH (FORCE)')
            elif thing.pid is not None:
                stop_process(thing, 10)
        except Exception as exc:
            print(f"cleanup of {thing} failed: {exc}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--households", type=int, default=5000, help="a detector and a meter each")
    parser.add_argument("--districts", type=int, default=50)
    # 100 rows/s: each of the 10,000 devices raises and clears an alarm every 200 s, far above
    # a real fleet; near 200/s the hotline on this 2-core machine no longer keeps up (its
    # backlog grows, and critical alarms, taken first, still wait for the batch in hand)
    parser.add_argument(
        "--rate", type=float, default=100.0, help="background outbox rows/s (default 100)"
    )
    parser.add_argument("--commit-ms", type=float, default=50.0, help="background transactions")
    parser.add_argument("--hold", type=float, default=10.0, help="mean s an alarm stays raised")
    parser.add_argument("--probe-interval", type=float, default=0.1, help="s between probes")
    parser.add_argument("--seconds", type=float, default=60.0, help="probing, NOTIFY phase")
    parser.add_argument("--baseline-seconds", type=float, default=30.0, help="0: no baseline")
    parser.add_argument("--warmup", type=float, default=10.0, help="load before probing (s)")
    parser.add_argument(
        "--grace", type=float, default=5.0, help="wait for late probes (s; x3 at most)"
    )
    parser.add_argument("--consoles", type=int, default=1, help="SSE clients")
    parser.add_argument("--poll", type=float, default=1.0, help="hotline_outbox_poll_s")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the databases (to inspect)")
    args = parser.parse_args()

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    cleanup: list[Any] = []
    try:
        asyncio.run(run(args, cleanup))
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            clean(cleanup, args.keep)


if __name__ == "__main__":
    sys.exit(main())
