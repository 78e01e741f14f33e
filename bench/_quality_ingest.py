"""The consumer of bench/detection_quality.py, without a broker or a database.

``Consumer`` stands in for ``ingest.consumer.Ingest`` with a simulated clock: it decodes each
payload with ``gasguard.wire.decode_batch`` (``now_ms`` = the batch's arrival), maps device
ids to registry keys as ``_accept_one`` does, keeps a batch id it has seen before out of
detection (the database's ``ingest_batches`` claim, here a bitmap per gateway), and judges
each kind's readings with ``ingest.detection.Detection.run`` on ``ingest.consumer._concat``
of the micro-batch, exactly as ``Ingest._transaction`` does, with ``now_ms`` (where
``Detection.run`` takes it) the arrival of the micro-batch's last batch. The silence scan runs
with the simulated clock after every micro-batch. Not modelled: the readings table's own
repeat check (a reading sent again under a new batch id); no fault here does that.
"""

from __future__ import annotations

import importlib
import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from _quality_fleet import BoolArray, Fleet, IntArray
from _quality_wire import FaultStats, Outgoing

from gasguard.fields import KINDS, Kind
from gasguard.wire import WireError, decode_batch, topic
from ingest.consumer import Accepted, Message, _concat
from ingest.detect import DetectorColumns, MeterColumns, Rule
from ingest.detection import Detection
from ingest.registry import Registry
from ingest.settings import IngestSettings
from ingest.writer import AlarmChange

MAX_FUTURE_MS = IngestSettings.model_fields["ingest_max_future_ms"].default  # as the consumer


@dataclass
class Alarm:
    key: int
    rule: str
    raised: bool
    ts: int  # the reading's ts (a silence scan: its time)
    at: int  # simulated time the alarm was raised: its reading's arrival, or the scan time
    wall_s: float  # wall time of the micro-batch (or scan) that produced it


class Consumer:
    """``Ingest.accept`` and the detection half of ``Ingest._transaction``, in process."""

    def __init__(
        self,
        fleet: Fleet,
        registry: Registry,
        *,
        detection: Detection,
        max_messages: int,
        watched: BoolArray,
        reference: ReferenceCheck | None,
        stats: FaultStats,
        gateways: set[str] | None = None,
    ) -> None:
        self.fleet = fleet
        self.gateways = gateways  # this shard's (NEVER_REPORTED judges only those)
        self.registry = registry
        self.detection = detection
        self.max_messages = max_messages
        self.watched = watched  # device keys whose alarms are timed (hazard devices)
        self.reference = reference
        self.stats = stats
        self.claimed = [bytearray() for _ in range(fleet.gateways)]
        self.keys: dict[tuple[str, str, tuple[str, ...]], IntArray] = {}
        self.alarms: list[Alarm] = []
        self.micro_batches = 0
        self.takes_now = "now_ms" in inspect.signature(detection.run).parameters
        self.readings = 0
        self.busy_s = 0.0
        self.wall_max_s = 0.0

    def feed(self, messages: list[Outgoing]) -> None:
        """Micro-batches of at most ``max_messages``. A reordered or clock-skewed batch gets
        one of its own: the consumer, waiting at most ``GASGUARD_INGEST_MAX_WAIT_MS`` (50 ms)
        for more, sees a reordered batch apart from the one it swapped places with (a
        simulated minute would hide the swap), and judges a skewed one at about its arrival."""
        part: list[Outgoing] = []
        for m in messages:
            alone = m.fault in ("reordered", "clock_skewed")
            if part and (len(part) == self.max_messages or alone):
                self._micro_batch(part)
                part = []
            part.append(m)
            if alone:
                self._micro_batch(part)
                part = []
        if part:
            self._micro_batch(part)

    def silence(self, now_ms: int) -> None:
        t = time.perf_counter()
        changes = self.detection.silence(now_ms, self.registry, self.gateways)
        wall = time.perf_counter() - t
        self.busy_s += wall
        for c in changes:
            self._log(c, now_ms, wall)
        if self.reference is not None and changes:
            self.reference.mirror(changes)

    def _claim(self, gateway: int, seq: int) -> bool:
        seen = self.claimed[gateway]
        if seq >= len(seen):
            seen.extend(bytes(seq + 1024 - len(seen)))
        if seen[seq]:
            return False
        seen[seq] = 1
        return True

    def _accept(self, m: Outgoing) -> Accepted | None:
        gw = self.fleet.gateway_ids[m.gateway]
        try:
            batch = decode_batch(m.payload, now_ms=m.arrival, max_future_ms=MAX_FUTURE_MS)
        except WireError:
            self.stats.dead_letters[m.fault or "none"] += 1
            return None
        cache = (batch.gw, batch.kind, tuple(batch.dev.tolist()))
        keys = self.keys.get(cache)
        if keys is None:
            keys = np.empty(len(batch), np.int64)
            for i, dev in enumerate(cache[2]):
                info = self.registry.by_id[dev]
                if info.gateway_id != gw or info.kind != batch.kind:
                    raise AssertionError(f"generator bug: {dev} is not a {batch.kind} of {gw}")
                keys[i] = info.key
            self.keys[cache] = keys
        return Accepted(Message(topic(gw, "telemetry"), m.payload, 0, 1, 0), batch, keys)

    def _micro_batch(self, messages: list[Outgoing]) -> None:
        """One micro-batch; its wall time counts decoding, keys, _concat and detection (not
        this bench's bookkeeping or the reference loops)."""
        started = time.perf_counter()
        aside = 0.0  # bookkeeping time, not the consumer's
        accepted: dict[tuple[str, int], tuple[Accepted, Outgoing]] = {}
        for m in messages:
            a = self._accept(m)
            if a is None:
                continue
            if (a.batch.gw, a.batch.seq) in accepted or not self._claim(m.gateway, m.seq):
                self.stats.duplicates_skipped += 1
                continue
            accepted[(a.batch.gw, a.batch.seq)] = (a, m)
        by_kind: dict[Kind, list[tuple[Accepted, Outgoing]]] = {}
        for pair in accepted.values():
            by_kind.setdefault(pair[0].batch.kind, []).append(pair)
        changes: list[AlarmChange] = []
        arrival: dict[Kind, tuple[IntArray, IntArray, IntArray]] = {}
        now = max(m.arrival for m in messages)  # ingest's clock as it judges them
        clock = {"now_ms": now} if self.takes_now else {}
        for kind in KINDS:
            if kind not in by_kind:
                continue
            group = by_kind[kind]
            columns = _concat([a for a, _ in group], fill=True)
            t = time.perf_counter()
            self._count_late(kind, columns, [m for _, m in group])
            aside += time.perf_counter() - t
            got = self.detection.run(kind, columns, self.registry, **clock)
            changes += got
            t = time.perf_counter()
            arrival[kind] = (
                columns["device_key"].astype(np.int64),
                columns["ts"],
                np.repeat([m.arrival for _, m in group], [len(a.batch) for a, _ in group]),
            )
            self.readings += len(columns["ts"])
            if self.reference is not None:
                self.reference.check(kind, columns, got, self.detection, now)
            aside += time.perf_counter() - t
        changes.sort(key=lambda c: c.ts_ms)  # as they happened, across kinds
        wall = time.perf_counter() - started - aside
        self.busy_s += wall
        self.wall_max_s = max(self.wall_max_s, wall)
        self.micro_batches += 1
        for c in changes:
            at = -1
            if self.watched[c.device_key]:
                own: Kind = "detector" if c.device_key < self.fleet.cfg.households else "meter"
                keys, ts, arr = arrival[own]
                hit = np.flatnonzero((keys == c.device_key) & (ts == c.ts_ms))
                # not found: a stamp ahead of the clock, judged as of now
                at = int(arr[hit[0]]) if len(hit) else now
            self._log(c, at, wall)

    def _count_late(self, kind: Kind, columns: dict[str, Any], group: list[Outgoing]) -> None:
        """Readings not newer than their device's newest judged one, by delivery fault."""
        state = self.detection.detectors if kind == "detector" else self.detection.meters
        keys = columns["device_key"].astype(np.int64)
        if state.capacity <= int(keys.max()):
            return
        late = columns["ts"] <= state.last_ts[keys]
        if not late.any():
            return
        bounds = np.cumsum([0] + [m.readings for m in group])
        counts = np.add.reduceat(late.astype(np.int64), bounds[:-1])
        for m, n in zip(group, counts.tolist(), strict=True):
            if n:
                self.stats.late_at_ingest[m.fault or "none"] += n

    def _log(self, c: AlarmChange, at: int, wall: float) -> None:
        if c.raised or self.watched[c.device_key]:
            self.alarms.append(Alarm(c.device_key, c.rule, c.raised, c.ts_ms, at, wall))


@dataclass
class ReferenceSummary:
    households: int = 0
    calls: int = 0
    readings: int = 0
    events: int = 0
    mismatched_calls: int = 0
    examples: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def merge(self, other: ReferenceSummary) -> None:
        self.households += other.households
        self.calls += other.calls
        self.readings += other.readings
        self.events += other.events
        self.mismatched_calls += other.mismatched_calls
        self.examples += other.examples[: max(3 - len(self.examples), 0)]
        self.error = self.error or other.error
        self.seconds += other.seconds


class ReferenceCheck:
    """The slow reference loops of tests/ingest/test_detect_model.py fed the same columns as
    the kernels for a subset of devices; their events must equal the kernels' for those.

    The reference takes the same batches in any order, with repeats and late readings, as
    the kernels do, so late, duplicated and reordered batches fit its interface; a skewed one
    too, once it gets the columns as ``Detection.run`` passes them on (stamps ahead of the
    clock judged as of now, see ``check``). It has no silence scan: an alarm the scan raises
    is copied into its state (as the scan does to the kernels' state).
    """

    def __init__(self, subset: BoolArray, households: int) -> None:
        self.subset = subset
        self.households = households  # keys below are detectors, the rest meters
        self.refs: dict[Kind, Any] = {}
        self.result = ReferenceSummary(households=int(subset[:households].sum()))
        try:
            self._model = importlib.import_module("tests.ingest.test_detect_model")
        except ImportError as exc:
            self.result.error = f"reference not importable: {exc}"

    def check(
        self, kind: Kind, columns: dict[str, Any], got: list[AlarmChange], det: Detection, now: int
    ) -> None:
        if self.result.error is not None:
            return
        t = time.perf_counter()
        mine = self.subset[columns["device_key"]]
        if not mine.any():
            return
        sub = {name: col[mine] for name, col in columns.items()}
        tolerance = getattr(det, "clock_tolerance_ms", None)
        if tolerance is not None:  # the columns as Detection.run hands them to the kernels
            ahead = sub["ts"] - now
            skewed = ahead > tolerance
            sub["ahead_ms"] = np.where(skewed, ahead, 0).astype(np.float64)
            sub["ts"] = np.where(skewed, now, sub["ts"])
        try:  # test code another engineer is changing: a failure ends the check, not the run
            ref = self.refs.get(kind)
            if ref is None:
                params = det._detector_params if kind == "detector" else det._meter_params
                ref = self.refs[kind] = self._model.Reference(kind, params, len(self.subset))
            if kind == "detector":
                cols: Any = DetectorColumns.from_mapping(sub["device_key"], sub)
            else:
                cols = MeterColumns.from_mapping(sub["device_key"], sub)
            want, _ = ref.process(cols)
        except Exception as exc:
            self.result.error = f"reference failed: {type(exc).__name__}: {exc}"
            return
        have = [
            (c.device_key, c.ts_ms, int(Rule[c.rule.upper()]), c.raised,
             None if math.isnan(c.value) else c.value)
            for c in got
            if self.subset[c.device_key]
        ]  # fmt: skip
        self.result.calls += 1
        self.result.readings += int(mine.sum())
        self.result.events += len(have)
        if have != [tuple(e) for e in want]:
            self.result.mismatched_calls += 1
            if len(self.result.examples) < 3:
                extra = sorted(set(have) - {tuple(e) for e in want})[:2]
                missing = sorted({tuple(e) for e in want} - set(have))[:2]
                self.result.examples.append(f"kernel only {extra}, reference only {missing}")
        self.result.seconds += time.perf_counter() - t

    def mirror(self, changes: list[AlarmChange]) -> None:
        for c in changes:
            if not self.subset[c.device_key]:
                continue
            ref = self.refs.get("detector" if c.device_key < self.households else "meter")
            if ref is not None:
                d = ref.dev[c.device_key]
                (d.open.add if c.raised else d.open.discard)(Rule[c.rule.upper()])
