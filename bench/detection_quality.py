"""Detection quality on a labelled month: is every injected hazard caught, how soon after its
deciding reading reaches ingest, and how many alarms does normal life raise?

    .venv/bin/python bench/detection_quality.py --quick     # 1,000 households, 3 days, ~20 s
    .venv/bin/python bench/detection_quality.py             # 10,000 households, 30 days

A vectorised generator (bench/_quality_fleet.py) gives every household a methane detector
(one reading a minute) and a smart gas meter (one reading every five minutes by default, to
keep the full month within ~10 minutes; ``--meter-interval 60`` for one a minute) living a
normal month in UTC+8: cooking and shower peaks, CH4 noise of a fraction of a %LEL, a register
that follows the flow. bench/_quality_hazards.py lays the hazards of ``HAZARDS`` below over it,
each on its own household and with the timestamp of the reading that decides it: the labels
come from the generator, never from detection code. Gateways (200 households each) send one
batch per round and device kind, some of them late, duplicated, reordered or with their clock
ahead (``DELIVERY_FAULTS``): bench/_quality_wire.py encodes them with ``gasguard.wire`` and
delivers them in arrival order, and bench/_quality_ingest.py judges them as the consumer does
(``decode_batch``, batch ids, ``_concat``, ``Detection.run``, the silence scan) in micro-batches
of at most ``GASGUARD_INGEST_MAX_MESSAGES`` batches, cut at every simulated minute, after which
the silence scan runs (the consumer scans every 10 s: a silence's delay here is up to a
minute). A replayed month is one long backlog, so the micro-batches are the consumer's
largest; their wall time is the in-process latency.

``--workers 2`` (the default) runs two consumer shards in two processes, the gateways split
by ``ingest.consumer.shard_of`` as ``GASGUARD_INGEST_SHARDS=2`` splits them, each shard with
its own ``Detection``: the full month takes ~10 minutes on both cores of the development
machine, ~15 on one (``--workers 1``); the figures do not depend on it.

The slow reference loops of tests/ingest/test_detect_model.py judge a subset of households
(``--reference-households``, 100 by default as they take ~25 us a reading; one of each hazard
kind among them) in the same run, fed the same columns as the kernels; their alarms must equal
the kernels'. Their interface takes late, duplicated, reordered and skewed batches alike.

Rules that ``ingest.detect.Rule`` does not have when the bench runs are reported as "no rule
yet" (``*``) and their hazards are left out of the detection goal (and listed).
"""

from __future__ import annotations

import argparse
import inspect
import multiprocessing as mp
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _quality_fleet import DAY_MS, Config, Fleet, NormalLife  # noqa: E402  (bench/, beside)
from _quality_hazards import (  # noqa: E402
    HazardKind,
    Hazards,
    Plan,
    Round,
    injector_names,
    plan_hazards,
)
from _quality_ingest import Alarm, Consumer, ReferenceCheck, ReferenceSummary  # noqa: E402
from _quality_score import goals, report, score  # noqa: E402
from _quality_wire import FAULTS, Delivery, Wire  # noqa: E402

from alerting.outbox import RULES as HOTLINE_ROUTES  # noqa: E402
from gasguard.fields import Kind  # noqa: E402
from ingest.consumer import shard_of  # noqa: E402
from ingest.detect import Rule  # noqa: E402
from ingest.detection import Detection  # noqa: E402
from ingest.settings import IngestSettings  # noqa: E402

H = HazardKind
HAZARDS: tuple[HazardKind, ...] = (
    # name, device, rules that should catch it, rules it may raise besides, what, deciding reading
    H("gas_low", "detector", ("gas_low",), ("gas_rising", "gas_present"),
      "CH4 10.8-24 %LEL (noise 0.2, never below 10.2) for 10-60 min", "2nd reading"),
    H("gas_low_boundary", "detector", ("gas_low",), ("gas_rising", "gas_present"),
      "CH4 10.0, 10.1 or 10.2 %LEL (at random, reading by reading) for 10-60 min",
      "2nd reading"),
    H("gas_low_flicker", "detector", ("gas_low",), ("gas_rising", "gas_present"),
      "CH4 10.0-10.5 and 9.5-9.9 %LEL in turn, reading by reading, for 10 min",
      "2nd reading at >= 10"),
    H("gas_high", "detector", ("gas_high",), ("gas_low", "gas_rising", "gas_present"),
      "CH4 25-60 %LEL (a third at 25.0-25.1) for 5-30 min", "1st reading"),
    H("gas_rising_fast", "detector", ("gas_rising",), ("gas_present",),
      "CH4 rising 7.5-15 %LEL/min from clean air to 6-9.5, held 10-20 min",
      "the trend: 5 readings over 4 min, slope > 1 %LEL/min"),
    H("gas_rising_slow", "detector", ("gas_rising", "gas_present"), (),
      "CH4 rising 0.1-1 %LEL/min from clean air to 6-9.5, held 10-20 min",
      "the trend (5 readings over 4 min), or 10 min at >= 5 %LEL"),
    H("detector_alarm_flag", "detector", ("gas_low",), ("gas_rising", "gas_present"),
      "the detector's own alarm flag on, CH4 4-9.5 %LEL, for 5-30 min", "1st reading"),
    H("stuck_sensor", "detector", ("sensor_fault",), (),
      "CH4 frozen at 1.1-2.0 %LEL for 1-24 h", "30th identical reading (>= 15 min)"),
    H("stuck_sensor_low", "detector", ("sensor_fault",), (),
      "CH4 frozen at a clean-air 0.2-1.0 %LEL for 1-24 h (0.1 %LEL resolution)",
      "30th identical reading (>= 15 min)"),
    H("ch4_impossible_high", "detector", ("sensor_fault",), (),
      "CH4 1e300 %LEL on 1-3 readings", "1st reading"),
    H("ch4_negative", "detector", ("sensor_fault",), (), "CH4 -50 %LEL on 1-3 readings",
      "1st reading"),
    H("detector_silent", "detector", ("silent",), (), "no readings for 1-12 h",
      "deadline: 3 intervals after the last reading"),
    H("detector_comm_lost", "detector", ("silent",), (),
      "the gateway reports comm_lost for 30-180 min", "1st comm_lost reading"),
    H("never_reported", "detector", ("never_reported",), (),
      "a registered detector that never sends a reading", "deadline: 24 h after registration"),
    H("burst", "meter", ("burst",), ("continuous_flow",),
      "flow 1.02-3 x Qmax (a quarter at 1.02 x) for 20-70 min", "1st reading"),
    H("burst_over_peak", "meter", ("burst",), (),
      "flow 3.5-5 x the household's cooking peak, below Qmax, for 20-70 min", "1st reading"),
    H("continuous_flow", "meter", ("continuous_flow",), ("burst", "micro_leak"),
      "0.12-0.5 m3/h on top of normal use for 7-14 h", "1st reading > 6 h into the flow"),
    H("micro_leak", "meter", ("micro_leak",), ("continuous_flow", "burst"),
      "6-100 L/h for 1-3 days, from 10:00-22:00 local", "2 h into the first night (01:00)"),
    H("micro_leak_tiny", "meter", ("micro_leak",), ("continuous_flow", "burst"),
      "1-5 L/h for 1-3 days, from 10:00-22:00 local", "2 h into the first night (01:00)"),
    H("micro_leak_zero_flow", "meter", ("micro_leak", "meter_mismatch"), ("continuous_flow",),
      "10-100 L/h through the register while the flow reads 0, 1-3 days",
      "2 h into the first night (01:00)"),
    H("valve_closed_flow", "meter", ("valve_fault",), ("micro_leak",),
      "valve reports closed, flow 0.02-1 m3/h, 15-120 min from 00:30-03:00", "2nd reading"),
    H("valve_closed_register", "meter", ("valve_fault", "meter_mismatch"), (),
      "valve reports closed, flow reads 0, register climbs 0.02-1 m3/h",
      "2nd reading 2 L past the closing"),
    H("pressure_low", "meter", ("pressure_low",), (),
      "supply 0.3-1.19 kPa (a quarter at 1.19) for 25-180 min", "3rd reading"),
    H("pressure_high", "meter", ("pressure_high",), (),
      "supply 3.2-6 kPa for 25-180 min", "3rd reading"),
    H("battery_low", "meter", ("battery_low",), (), "battery 2-9 % to the end of the month",
      "3rd reading"),
    H("meter_silent", "meter", ("silent",), (), "no readings for 1-12 h",
      "deadline: 3 intervals after the last reading"),
    H("flow_impossible", "meter", ("sensor_fault",), (), "flow 1e300 m3/h on 1-2 readings",
      "1st reading"),
)  # fmt: skip

DELIVERY_FAULTS: dict[str, tuple[str, tuple[str, ...]]] = {
    # name: (what happens to a gateway batch, rules it may rightly raise)
    "late": ("delivered 2-30 min late, after newer batches of its devices", ()),
    "duplicate": ("delivered twice (same gw, seq), the copy 1-120 s later", ()),
    "reordered": ("delivered just after the gateway's next batch of its kind", ()),
    "clock_skewed": ("timestamps 1-4 min ahead (one in five 5.5-8, past the wire's default)",
                     ("clock_skew",)),
}  # fmt: skip

# The issue counts these raises on clean households as false emergency tickets: the rules the
# hotline routes to emergency repair, and valve_bypass, which it will route once it exists.
EMERGENCY = tuple(
    sorted({r for r, route in HOTLINE_ROUTES.items() if route[1] == "emergency_repair"}
           | {"valve_bypass"})
)  # fmt: skip
T0 = datetime(2026, 1, 5, tzinfo=timezone(timedelta(hours=8)))  # a Monday, local midnight


def parse_args() -> argparse.Namespace:
    defaults = IngestSettings.model_fields
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 households, 3 days, < 1 min")
    ap.add_argument("--households", type=int, default=10_000)
    ap.add_argument("--days", type=float, default=30.0)
    ap.add_argument("--detector-interval", type=int, default=60, help="seconds")
    ap.add_argument("--meter-interval", type=int, default=300, help="seconds")
    ap.add_argument("--per-kind", type=int, default=40, help="hazards of each kind")
    ap.add_argument("--fault-rate", type=float, default=0.0005, help="per batch and fault")
    ap.add_argument("--targeted", type=float, default=0.1,
                    help="share of hazards whose deciding batch gets a delivery fault")  # fmt: skip
    ap.add_argument("--max-messages", type=int, default=defaults["ingest_max_messages"].default)
    ap.add_argument("--reference-households", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2,
                    help="consumer shards, one process each (the gateways split as"
                    " GASGUARD_INGEST_SHARDS splits them)")  # fmt: skip
    args = ap.parse_args()
    if args.quick:
        args.households, args.days, args.per_kind = 1_000, 3.0, 5
        args.reference_households = 60
    if args.meter_interval % args.detector_interval or DAY_MS % (1000 * args.meter_interval):
        ap.error("the meter interval must be a multiple of the detector's and divide a day")
    return args


def detection_settings(started_ms: int) -> dict[str, Any]:
    """``Detection``'s arguments from the ingest settings' defaults, as the consumer passes
    them (the clock tolerance only where this version of ``Detection`` has it)."""
    fields = IngestSettings.model_fields
    out: dict[str, Any] = {"utc_offset_hours": fields["ingest_utc_offset_hours"].default}
    takes = inspect.signature(Detection).parameters
    if "clock_tolerance_ms" in takes and "ingest_clock_tolerance_ms" in fields:
        out["clock_tolerance_ms"] = fields["ingest_clock_tolerance_ms"].default
    if "started_ms" in takes:
        out["started_ms"] = started_ms  # ingest runs from the month's start
    return out


def target_faults(
    fleet: Fleet, plan: Plan, share: float, seed: int
) -> tuple[dict[tuple[Kind, int, int], str], dict[tuple[Kind, int, int], list[int]]]:
    """(batch -> delivery fault) for the deciding batches of ``share`` of the hazards, and
    (batch -> hazards it decides), a batch being (kind, gateway, round)."""
    rng = np.random.default_rng([seed, 7])
    targeted: dict[tuple[Kind, int, int], str] = {}
    decisive_at: dict[tuple[Kind, int, int], list[int]] = {}
    for i in range(len(plan)):
        if plan.by_deadline[i]:
            continue
        device, h = plan.device[i], int(plan.hh[i])
        iv = fleet.cfg.interval_ms(device)
        index = (int(plan.decisive[i]) - fleet.cfg.t0_ms - int(fleet.phase[device][h])) // iv
        batch = (device, fleet.gateway_of(h), index)
        decisive_at.setdefault(batch, []).append(i)
        if rng.random() < share:
            targeted[batch] = FAULTS[len(targeted) % len(FAULTS)]
    return targeted, decisive_at


def reference_subset(fleet: Fleet, plan: Plan, households: int) -> np.ndarray:
    """Device keys judged by the reference too: one hazard household of every kind, then
    households without hazards spread over the gateways (so over the shards)."""
    n = fleet.cfg.households
    chosen: list[int] = []
    for name in dict.fromkeys(plan.kind):
        chosen.append(int(plan.hh[plan.kind.index(name)]))
    clean = np.setdiff1d(np.arange(n), plan.hh)
    more = max(households - len(chosen), 0)
    chosen += clean[np.linspace(0, len(clean) - 1, more).astype(np.int64)].tolist()
    mask = np.zeros(2 * n, np.bool_)
    mask[chosen] = True
    mask[np.array(chosen) + n] = True
    return mask


@dataclass
class ShardResult:
    """What one shard's consumer saw and raised."""

    alarms: list[Alarm]
    delivery: Delivery
    reference: ReferenceSummary | None
    readings: int
    micro_batches: int
    busy_s: float
    wall_max_s: float


def build(args: argparse.Namespace) -> tuple[Fleet, Plan]:
    """The fleet and its hazards: the same in every shard (every draw is seeded)."""
    cfg = Config(
        households=args.households,
        days=args.days,
        detector_interval_s=args.detector_interval,
        meter_interval_s=args.meter_interval,
        seed=args.seed,
        t0_ms=int(T0.timestamp() * 1000),
    )
    fleet = Fleet.build(cfg)
    return fleet, plan_hazards(fleet, list(HAZARDS), args.per_kind, args.seed)


def run_shard(args: argparse.Namespace, shard: int, shards: int) -> ShardResult:
    """The month for the gateways of one consumer shard (``ingest.consumer.shard_of``), with
    its own ``Detection``, in arrival order."""
    wall0 = time.perf_counter()
    fleet, plan = build(args)
    cfg = fleet.cfg
    gateways = [g for g, gw in enumerate(fleet.gateway_ids) if shard_of(gw, shards) == shard]
    targeted, decisive_at = target_faults(fleet, plan, args.targeted, args.seed)
    wire = Wire(
        fleet,
        args.fault_rate,
        targeted=targeted,
        decisive_at=decisive_at,
        seed=args.seed,
        gateways=gateways,
    )
    watched = np.zeros(2 * cfg.households, np.bool_)
    for device, h in zip(plan.device, plan.hh.tolist(), strict=True):
        watched[fleet.key(device, h)] = True
    subset = reference_subset(fleet, plan, args.reference_households)
    mine = np.zeros(2 * cfg.households, np.bool_)
    for g in gateways:
        rows = fleet.rows(g)
        mine[rows] = mine[rows.start + cfg.households : rows.stop + cfg.households] = True
    subset &= mine
    reference = ReferenceCheck(subset, cfg.households) if args.reference_households else None
    consumer = Consumer(
        fleet,
        fleet.registry(),
        detection=Detection(**detection_settings(cfg.t0_ms)),
        max_messages=args.max_messages,
        watched=watched,
        reference=reference,
        stats=wire.delivery.stats,
        gateways={str(fleet.gateway_ids[g]) for g in gateways},
    )
    life, hazards = NormalLife(fleet), Hazards(fleet, plan)
    det_iv, met_iv = cfg.interval_ms("detector"), cfg.interval_ms("meter")
    per_meter = met_iv // det_iv
    for r in range((cfg.end_ms - cfg.t0_ms) // det_iv):
        t = cfg.t0_ms + r * det_iv
        rnd = Round("detector", t, *life.detector(t))
        hazards.apply(rnd)
        wire.send_round(rnd, r)
        if r % per_meter == 0:
            rnd = Round("meter", t, *life.meter(t))
            hazards.apply(rnd)
            wire.send_round(rnd, r // per_meter)
        consumer.feed(wire.due(t + det_iv))
        consumer.silence(t + det_iv)
        if (r + 1) % (DAY_MS // det_iv) == 0:
            print(
                f"  shard {shard}: day {(r + 1) * det_iv // DAY_MS:>2},"
                f" {consumer.readings / 1e6:6.1f} M readings judged,"
                f" {time.perf_counter() - wall0:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    consumer.feed(wire.due(2**62))  # what was still on its way at the end
    return ShardResult(
        alarms=consumer.alarms,
        delivery=wire.delivery,
        reference=reference.result if reference else None,
        readings=consumer.readings,
        micro_batches=consumer.micro_batches,
        busy_s=consumer.busy_s,
        wall_max_s=consumer.wall_max_s,
    )


def main() -> None:
    args = parse_args()
    names = {k.name for k in HAZARDS}
    if names != injector_names():
        raise SystemExit(f"HAZARDS and the injectors differ: {sorted(names ^ injector_names())}")
    rules = {r.name.lower() for r in Rule}
    wall0 = time.perf_counter()
    fleet, plan = build(args)
    cfg = fleet.cfg
    print(tree_state())
    print(
        f"detection quality: {cfg.households:,} households x {cfg.days:g} days, detector every"
        f" {args.detector_interval} s, meter every {args.meter_interval} s, {len(plan)} hazards"
        f" ({args.per_kind} per kind), micro-batches of <= {args.max_messages} batches,"
        f" {args.workers} consumer shard(s) in as many processes",
        flush=True,
    )
    jobs = [(args, shard, args.workers) for shard in range(args.workers)]
    if args.workers == 1:
        results = [run_shard(*jobs[0])]
    else:
        with mp.get_context("fork").Pool(args.workers) as pool:
            results = pool.starmap(run_shard, jobs)
    elapsed = time.perf_counter() - wall0
    delivery, reference = Delivery(), None
    for res in results:
        delivery.merge(res.delivery)
        if res.reference is not None:
            reference = reference or ReferenceSummary()
            reference.merge(res.reference)
    readings = sum(res.readings for res in results)
    busy = sum(res.busy_s for res in results)
    scores = score(
        fleet,
        plan,
        table={k.name: k for k in HAZARDS},
        alarms=[a for res in results for a in res.alarms],
        delivery=delivery,
        rules=rules,
        fault_rules={name: allowed for name, (_, allowed) in DELIVERY_FAULTS.items()},
        emergency=EMERGENCY,
    )
    print(
        f"{delivery.sent_readings:,} readings sent, {readings:,} judged in"
        f" {sum(res.micro_batches for res in results):,} micro-batches; consumers busy"
        f" {busy:.0f} s ({readings / max(busy, 1e-9) / 1e6:.2f} M readings/s), slowest"
        f" micro-batch {max(res.wall_max_s for res in results) * 1000:.0f} ms; whole run"
        f" {elapsed:.0f} s"
    )
    unrouted = sorted(rules - set(HOTLINE_ROUTES))
    if unrouted:
        print(f"rules with no hotline route in alerting.outbox.RULES: {', '.join(unrouted)}")
    for line in report(scores, delivery.stats, {k: v[0] for k, v in DELIVERY_FAULTS.items()}):
        print(line)
    print("")
    print(reference_line(reference))
    for line in goals(scores):
        print(line)


def tree_state() -> str:
    """Which detection code is judged: HEAD and the uncommitted changes under ingest/."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        changed = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "ingest"],
            capture_output=True, text=True, check=True,
        ).stdout.splitlines()  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"detection code: unknown ({exc})"
    files = ", ".join(line[3:] for line in changed)
    return f"detection code: {head}" + (f" + uncommitted changes to {files}" if files else "")


def reference_line(reference: ReferenceSummary | None) -> str:
    if reference is None:
        return "reference loops: not run (--reference-households 0)"
    who = f"{reference.households} households"
    if reference.error is not None:
        return f"reference loops on {who}: NOT COMPARED ({reference.error})"
    facts = (
        f"{reference.readings:,} readings, {reference.events:,} alarm changes,"
        f" {reference.calls:,} micro-batches, {reference.seconds:.0f} s"
    )
    if reference.mismatched_calls == 0:
        return f"reference loops on {who}: kernel alarms EQUAL the reference's ({facts})"
    return (
        f"reference loops on {who}: kernel alarms DIFFER in {reference.mismatched_calls}"
        f" micro-batches ({facts}); e.g. {'; '.join(reference.examples)}"
    )


if __name__ == "__main__":
    main()
