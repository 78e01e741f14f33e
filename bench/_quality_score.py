"""Scoring of bench/detection_quality.py: which hazards the alarms caught and how fast, and
which alarms no hazard (or delivery fault) explains.

A hazard is detected when one of its expected rules is raised on its device between one
interval before it starts and ``grace`` after it ends, or was already open when it started.
Its latency is the simulated time from the arrival of its deciding reading to the arrival of
the reading that raised the alarm (0 when that came first), plus the wall time of the
micro-batch that raised it; for a silence, from its deadline to the scan that raised it, plus
the scan's wall time. A raise that no hazard of its household and device lists (as expected or
as ``also``), and no delivery fault explains, is a false alarm.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from _quality_fleet import MINUTE_MS, UTC_OFFSET_MS, Fleet
from _quality_hazards import HazardKind, Plan
from _quality_ingest import Alarm
from _quality_wire import Delivery, FaultStats

GOAL_LATENCY_S = 1.0
GOAL_FALSE_EMERGENCY = 0.1  # per 1,000 household-days


@dataclass
class KindScore:
    kind: HazardKind
    missing_rules: list[str]
    injected: int = 0
    detected: int = 0
    latencies: list[float] = field(default_factory=list)
    caught_by: Counter[str] = field(default_factory=Counter)
    fault_hit: int = 0
    fault_detected: int = 0
    unhit_latencies: list[float] = field(default_factory=list)  # no delivery fault near it
    unhit_missed: int = 0
    by_deadline: bool = False  # decided by silence: found by the periodic scan

    @property
    def no_rule(self) -> bool:
        return len(self.missing_rules) == len(self.kind.expected)


@dataclass
class Scores:
    kinds: list[KindScore]
    by_fault: dict[str, list[tuple[str, float | None]]]  # (kind, latency) of hazards it hit
    false_alarms: Counter[str]
    false_on_clean: Counter[str]
    examples: dict[str, list[str]]  # a few false alarms per rule, to look into
    household_days: float
    clean_household_days: float
    emergency: tuple[str, ...]


def _grace(iv: int) -> int:
    return max(3 * iv, 30 * MINUTE_MS) + 2 * MINUTE_MS


def score(
    fleet: Fleet,
    plan: Plan,
    *,
    table: dict[str, HazardKind],
    alarms: list[Alarm],
    delivery: Delivery,
    rules: set[str],
    fault_rules: dict[str, tuple[str, ...]],
    emergency: tuple[str, ...],
) -> Scores:
    n = fleet.cfg.households
    by_key: dict[int, list[Alarm]] = defaultdict(list)
    for a in alarms:
        by_key[a.key].append(a)
    kinds = {
        name: KindScore(k, [r for r in k.expected if r not in rules]) for name, k in table.items()
    }
    by_fault: dict[str, list[tuple[str, float | None]]] = defaultdict(list)
    skewed: dict[tuple[str, int], list[int]] = defaultdict(list)
    for kind, g, t in delivery.skewed:
        skewed[(kind, g)].append(t)
    for i in range(len(plan)):
        ks = kinds[plan.kind[i]]
        ks.injected += 1
        ks.by_deadline = bool(plan.by_deadline[i])
        if ks.no_rule:
            continue
        latency = _judge(fleet, plan, i=i, ks=ks, by_key=by_key, arrivals=delivery.decisive_arrival)
        if latency is not None:
            ks.detected += 1
            if latency >= 0:
                ks.latencies.append(latency)
        fault: str | None = delivery.decisive_fault.get(i)
        decisive, g = int(plan.decisive[i]), fleet.gateway_of(int(plan.hh[i]))
        if fault is None and any(  # its device's clock was ahead shortly before
            decisive - 10 * MINUTE_MS <= t < decisive for t in skewed.get((plan.device[i], g), ())
        ):
            fault = "clock_skewed"
        if fault is not None:
            ks.fault_hit += 1
            ks.fault_detected += latency is not None
            by_fault[fault].append((ks.kind.name, latency))
        elif latency is None:
            ks.unhit_missed += 1
        elif latency >= 0:
            ks.unhit_latencies.append(latency)
    hazard_of = {int(h): i for i, h in enumerate(plan.hh.tolist())}
    faults: dict[tuple[str, int], list[tuple[int, str]]] = defaultdict(list)
    for fault, kind, g, t in delivery.faulted:
        faults[(kind, g)].append((t, fault))
    false_alarms: Counter[str] = Counter()
    false_on_clean: Counter[str] = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    for a in alarms:
        if not a.raised:
            continue
        device = "detector" if a.key < n else "meter"
        hh = a.key % n
        own = hazard_of.get(hh)
        if own is not None and plan.device[own] == device:
            k = table[plan.kind[own]]
            iv = fleet.cfg.interval_ms(device)
            lo, hi = int(plan.start[own]) - iv, int(plan.end[own]) + _grace(iv)
            if a.rule in k.expected + k.also and lo <= a.ts <= hi:
                continue
        g = fleet.gateway_of(hh)
        if any(
            a.rule in fault_rules.get(fault, ()) and t - MINUTE_MS <= a.ts <= t + 60 * MINUTE_MS
            for t, fault in faults.get((device, g), ())
        ):
            continue
        false_alarms[a.rule] += 1
        if len(examples[a.rule]) < 3:
            local = datetime.fromtimestamp((a.ts + UTC_OFFSET_MS) / 1000, UTC)
            on = f"its household has {plan.kind[own]}" if own is not None else "no hazard"
            examples[a.rule].append(f"{device} of H{hh:06d} at {local:%m-%d %H:%M} local ({on})")
        if own is None:
            false_on_clean[a.rule] += 1
    days = fleet.cfg.days
    return Scores(
        kinds=list(kinds.values()),
        by_fault=by_fault,
        false_alarms=false_alarms,
        false_on_clean=false_on_clean,
        examples=examples,
        household_days=n * days,
        clean_household_days=(n - len(plan)) * days,
        emergency=emergency,
    )


def _judge(
    fleet: Fleet,
    plan: Plan,
    *,
    i: int,
    ks: KindScore,
    by_key: dict[int, list[Alarm]],
    arrivals: dict[int, int],
) -> float | None:
    """Latency in seconds if detected (-1: the alarm was already open), None if missed."""
    device = plan.device[i]
    iv = fleet.cfg.interval_ms(device)
    key = int(fleet.key(device, int(plan.hh[i])))
    lo, hi = int(plan.start[i]) - iv, int(plan.end[i]) + _grace(iv)
    expected = [r for r in ks.kind.expected if r not in ks.missing_rules]
    opened: dict[str, bool] = {}
    for a in by_key.get(key, ()):
        if a.rule not in expected:
            continue
        if a.ts < lo:
            opened[a.rule] = a.raised
            continue
        if a.ts > hi:
            break
        if not a.raised:
            continue
        ks.caught_by[a.rule] += 1
        if plan.by_deadline[i]:
            sim = a.at - int(plan.decisive[i])
        else:
            decisive = int(plan.decisive[i])
            arrived = arrivals.get(i, decisive)
            sim = (a.at - arrived) if a.at >= 0 else (a.ts - decisive)
        return max(sim, 0) / 1000 + a.wall_s
    if any(opened.values()):
        ks.caught_by["(already open)"] += 1
        return -1.0
    return None


def _ms(values: list[float], fn: str) -> str:
    if not values:
        return "-"
    v = statistics.median(values) if fn == "median" else max(values)
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.0f} s" if v < 600 else f"{v / 60:.0f} min"


def report(s: Scores, st: FaultStats, fault_table: dict[str, str]) -> list[str]:
    """The tables, as lines."""
    out = [
        "",
        "Hazards (detected: an expected rule raised on its device in its window; * no rule yet;"
        " latency: from the",
        "deciding reading's arrival, or for a silence (s) from its deadline, to the alarm;"
        " hit: hazards whose deciding batch,",
        "or an earlier one of their gateway within 10 min whose clock was ahead, had a delivery"
        " fault: detected/hit)",
    ]
    head = f"{'hazard':<22} {'rule(s) expected':<30} {'inj':>4} {'det':>4} {'miss':>4}"
    head += f" {'<=1s':>4} {'latency med':>11} {'max':>8} {'max, no fault':>13} {'fault hit':>9}"
    out += [head, "-" * len(head)]
    for k in s.kinds:
        rules = ", ".join(f"{r}*" if r in k.missing_rules else r for r in k.kind.expected)
        if k.by_deadline:
            rules += " (s)"
        fast = sum(1 for v in k.latencies if v <= GOAL_LATENCY_S)
        if k.no_rule:
            det = miss = within = "-"
        else:
            det, miss, within = str(k.detected), str(k.injected - k.detected), str(fast)
        hit = f"{k.fault_detected}/{k.fault_hit}" if k.fault_hit else "-"
        out.append(
            f"{k.kind.name:<22} {rules:<30} {k.injected:>4} {det:>4} {miss:>4} {within:>4}"
            f" {_ms(k.latencies, 'median'):>11} {_ms(k.latencies, 'max'):>8}"
            f" {_ms(k.unhit_latencies, 'max'):>13} {hit:>9}"
        )
    caught = {  # kinds whose hazards without a delivery fault were all caught
        k.kind.name for k in s.kinds if not k.no_rule and not k.unhit_missed and not k.by_deadline
    }
    out += [
        "",
        "Delivery faults (random batches, plus the deciding batch of some hazards; hazards hit:"
        " of the kinds whose hazards",
        "without a fault were all detected, how many a fault hit, how many of those were still"
        " detected, and how many later than 1 s)",
    ]
    head = f"{'fault':<13} {'batches':>8} {'readings':>9} {'late at ingest':>15}"
    head += f" {'dead-lettered':>13} {'hit':>5} {'detected':>9} {'>1s':>5}  what"
    out += [head, "-" * 100]
    for name, what in fault_table.items():
        lat = [v for kind, v in s.by_fault.get(name, []) if kind in caught]
        detected = sum(1 for v in lat if v is not None)
        slow = sum(1 for v in lat if v is not None and v > GOAL_LATENCY_S)
        out.append(
            f"{name:<13} {st.messages[name]:>8} {st.readings[name]:>9}"
            f" {st.late_at_ingest[name]:>15} {st.dead_letters[name]:>13} {len(lat):>5}"
            f" {detected:>9} {slow:>5}  {what}"
        )
    out.append(
        f"(late at ingest: not newer than the device's newest judged reading. Duplicate batches"
        f" kept out of detection by batch id: {st.duplicates_skipped}; readings late at ingest"
        f" in batches without a fault: {st.late_at_ingest['none']})"
    )
    hd, chd = s.household_days, s.clean_household_days
    out += [
        "",
        f"False alarms (raises no hazard or delivery fault explains; {hd:,.0f} household-days,"
        f" {chd:,.0f} on households without any hazard)",
    ]
    head = f"{'rule':<16} {'emergency':>9} {'false raises':>12} {'per 1,000 hh-days':>18}"
    head += f" {'on clean households':>20} {'per 1,000 clean hh-days':>24}"
    out += [head, "-" * len(head)]
    for rule in sorted(set(s.false_alarms) | set(s.emergency)):
        n, c = s.false_alarms[rule], s.false_on_clean[rule]
        out.append(
            f"{rule:<16} {'yes' if rule in s.emergency else '':>9} {n:>12}"
            f" {1000 * n / hd:>18.3f} {c:>20} {1000 * c / chd:>24.3f}"
        )
    for rule, seen in sorted(s.examples.items()):
        out.append(f"  e.g. {rule}: {'; '.join(seen)}")
    return out


def goals(s: Scores) -> list[str]:
    judged = [k for k in s.kinds if not k.no_rule]
    missed = sum(k.injected - k.detected for k in judged)
    injected = sum(k.injected for k in judged)
    no_rule = sum(k.injected for k in s.kinds if k.no_rule)
    lat = [v for k in judged if not k.by_deadline for v in k.latencies]
    slow = sum(1 for v in lat if v > GOAL_LATENCY_S)
    silences = [v for k in judged if k.by_deadline for v in k.latencies]
    emergency = sum(s.false_on_clean[r] for r in s.emergency)
    rate = 1000 * emergency / s.clean_household_days
    return [
        "",
        "Goals",
        f"  every injected hazard detected:          {_yes(missed == 0 and no_rule == 0)}"
        f"  ({injected - missed} of {injected} with a rule detected; {no_rule} more have no"
        " rule yet)",
        f"  alarm <= {GOAL_LATENCY_S:g} s after its deciding reading:  {_yes(slow == 0)}"
        f"  ({slow} of {len(lat)} detected hazards decided by a reading slower; max"
        f" {_ms(lat, 'max')}; silences, found by the scan, not counted: median"
        f" {_ms(silences, 'median')}, max {_ms(silences, 'max')} after their deadline)",
        f"  false emergency tickets <= {GOAL_FALSE_EMERGENCY} / 1,000 hh-days: "
        f"{_yes(rate <= GOAL_FALSE_EMERGENCY)}  ({emergency} raises of {', '.join(s.emergency)}"
        f" on households without a hazard = {rate:.3f} / 1,000 household-days)",
    ]


def _yes(ok: bool) -> str:
    return "MET" if ok else "NOT MET"
