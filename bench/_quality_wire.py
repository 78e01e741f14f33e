"""The wire of bench/detection_quality.py: gateway batches, their delivery faults, and the
order in which they reach ingest.

Each gateway sends one batch per poll round and device kind (its 200 households' readings),
encoded with ``gasguard.wire.encode_batch`` (``make_batch``'s checks are ``decode_batch``'s,
which every payload goes through at the consumer). A batch may be delivered late, twice,
after the gateway's next one, or with its timestamps ahead; every random draw comes from the
gateway's own stream, so the faults are the same whichever shard sends them.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from _quality_fleet import SWEEP_MS, Fleet
from _quality_hazards import Round

from gasguard.fields import Kind
from gasguard.wire import Batch, encode_batch

FAULTS = ("late", "duplicate", "reordered", "clock_skewed")
FIELDS: dict[Kind, tuple[str, ...]] = {
    "detector": ("ch4_lel", "alarm"),
    "meter": ("volume_m3", "flow_m3h", "pressure_kpa", "valve_closed", "battery_pct"),
}


@dataclass(order=True)
class Outgoing:
    """One gateway batch on its way to ingest."""

    arrival: int
    order: int
    kind: Kind = field(compare=False)
    gateway: int = field(compare=False)
    round: int = field(compare=False)
    seq: int = field(compare=False)
    payload: bytes = field(compare=False)
    readings: int = field(compare=False)
    fault: str | None = field(compare=False, default=None)


@dataclass
class FaultStats:
    messages: Counter[str] = field(default_factory=Counter)
    readings: Counter[str] = field(default_factory=Counter)
    late_at_ingest: Counter[str] = field(default_factory=Counter)  # readings older than newest
    dead_letters: Counter[str] = field(default_factory=Counter)
    duplicates_skipped: int = 0

    def merge(self, other: FaultStats) -> None:
        for mine, theirs in (
            (self.messages, other.messages),
            (self.readings, other.readings),
            (self.late_at_ingest, other.late_at_ingest),
            (self.dead_letters, other.dead_letters),
        ):
            mine.update(theirs)
        self.duplicates_skipped += other.duplicates_skipped


@dataclass
class Delivery:
    """What the wire did, for the scoring (one per shard, merged)."""

    stats: FaultStats = field(default_factory=FaultStats)
    decisive_arrival: dict[int, int] = field(default_factory=dict)  # hazard -> its batch's
    decisive_fault: dict[int, str] = field(default_factory=dict)
    faulted: list[tuple[str, Kind, int, int]] = field(default_factory=list)  # fault, kind, gw, t
    skewed: list[tuple[Kind, int, int]] = field(default_factory=list)  # accepted: kind, gw, t
    sent_readings: int = 0

    def merge(self, other: Delivery) -> None:
        self.stats.merge(other.stats)
        self.decisive_arrival |= other.decisive_arrival
        self.decisive_fault |= other.decisive_fault
        self.faulted += other.faulted
        self.skewed += other.skewed
        self.sent_readings += other.sent_readings


class Wire:
    """Gateway batches of each round, delivery faults, and the order they reach ingest."""

    def __init__(
        self,
        fleet: Fleet,
        fault_rate: float,
        *,
        targeted: dict[tuple[Kind, int, int], str],
        decisive_at: dict[tuple[Kind, int, int], list[int]],
        seed: int,
        gateways: list[int],
    ) -> None:
        self.fleet = fleet
        self.fault_rate = fault_rate
        self.targeted = targeted
        self.decisive_at = decisive_at
        self.gateways = gateways  # this shard's
        # one stream per gateway: the same faults whichever shard sends its batches
        self.rngs = {g: np.random.default_rng([seed, 6, g]) for g in gateways}
        self.seq = [0] * fleet.gateways
        self.queue: list[Outgoing] = []
        self.order = 0
        self.delivery = Delivery()

    def send_round(self, rnd: Round, index: int) -> None:
        f = self.fleet
        iv = f.cfg.interval_ms(rnd.kind)
        ids = f.detector_ids if rnd.kind == "detector" else f.meter_ids
        d = self.delivery
        for g in self.gateways:
            rng = self.rngs[g]
            rows = f.rows(g)
            present = rnd.present[rows]
            if not present.any():
                continue
            names = [n for n in FIELDS[rnd.kind] if n != "pressure_kpa" or f.gateway_pressure[g]]
            columns = {n: rnd.cols[n][rows][present] for n in names}
            comm = rnd.cols["comm_lost"][rows][present]
            if comm.any():
                columns["comm_lost"] = comm
            ts = rnd.ts[rows][present]
            fault = self.targeted.get((rnd.kind, g, index))
            if rng.random() < self.fault_rate * len(FAULTS) and fault is None:
                fault = FAULTS[int(rng.integers(len(FAULTS)))]
            offset = int(f.phase[rnd.kind][rows.start])
            arrival = rnd.t + offset + SWEEP_MS + int(rng.integers(200, 1500))
            if fault == "clock_skewed":  # minutes ahead (one in five past the wire's 5 min)
                far = rng.random() < 0.2
                ahead = rng.uniform(5.5, 8.0) if far else rng.uniform(1.0, 4.0)
                ts = ts + int(ahead * 60_000)
                d.skewed.append((rnd.kind, g, rnd.t))
            elif fault == "late":
                arrival += int(rng.uniform(2, 30) * 60_000)
            elif fault == "reordered":  # after the gateway's next batch of this kind
                arrival = rnd.t + iv + offset + SWEEP_MS + 1600
            # make_batch's checks are decode_batch's, which every payload goes through below
            batch = Batch(self.fleet.gateway_ids[g], self.seq[g], rnd.kind, ids[rows][present],
                          ts, columns)  # fmt: skip
            out = Outgoing(arrival, self.order, rnd.kind, g, index, self.seq[g],
                           encode_batch(batch), int(present.sum()), fault)  # fmt: skip
            self.seq[g] += 1
            self.order += 1
            heapq.heappush(self.queue, out)
            d.sent_readings += out.readings
            if fault == "duplicate":
                again = arrival + int(rng.uniform(1_000, 120_000))
                copy = Outgoing(again, self.order, rnd.kind, g, index, out.seq, out.payload,
                                out.readings, fault)  # fmt: skip
                self.order += 1
                heapq.heappush(self.queue, copy)
            if fault is not None:
                d.faulted.append((fault, rnd.kind, g, rnd.t))
                d.stats.messages[fault] += 1
                d.stats.readings[fault] += out.readings
            for hazard in self.decisive_at.get((rnd.kind, g, index), ()):
                d.decisive_arrival[hazard] = arrival
                if fault is not None:
                    d.decisive_fault[hazard] = fault

    def due(self, until: int) -> list[Outgoing]:
        """The batches that have arrived before ``until``, in arrival order."""
        out = []
        while self.queue and self.queue[0].arrival < until:
            out.append(heapq.heappop(self.queue))
        return out
