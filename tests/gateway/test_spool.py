"""Tests for gateway.spool: the on-disk outbox of MQTT batches, its seq, bounds and commands."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gateway.spool import Spool, SpoolError

ROOT = Path(__file__).resolve().parents[2]
TOPIC = "gasguard/v1/gw-1/telemetry"
NOW_S = 1_750_000_000  # 2025-06-15
NOW_MS = NOW_S * 1000


class FakeClock:
    def __init__(self, t: float = NOW_S) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def payload(size: int = 10) -> Callable[[int], bytes]:
    """An encoder that puts the seq in the payload, as the wire codec does, padded to size."""
    return lambda seq: f'{{"seq":{seq}}}'.encode().ljust(size, b" ")


def put(spool: Spool, *, alarm: bool = False, size: int = 10, created_ms: int = NOW_MS) -> int:
    return spool.put(TOPIC, payload(size), alarm=alarm, readings=5, created_ms=created_ms).seq


def open_spool(path: Path, **bounds: int) -> Spool:
    """A spool whose clock stands still at NOW_S."""
    return Spool(path, clock=FakeClock(), **bounds)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "spool" / "gw-1.db"  # the spool creates the directories


# -- sequence numbers -------------------------------------------------------------------------


def test_seq_starts_at_one_and_is_inside_the_payload(path: Path) -> None:
    with open_spool(path) as spool:
        batches = [
            spool.put(TOPIC, payload(), alarm=False, readings=200, created_ms=NOW_MS)
            for _ in range(3)
        ]
    assert [b.seq for b in batches] == [1, 2, 3]
    assert batches[1].payload.startswith(b'{"seq":2}')
    assert (batches[1].topic, batches[1].alarm, batches[1].readings) == (TOPIC, False, 200)


def test_seq_survives_reopen_even_after_every_batch_is_acked(path: Path) -> None:
    with open_spool(path) as spool:
        for _ in range(3):
            spool.ack(put(spool))
        assert spool.stats().batches == 0
    with open_spool(path) as spool:
        assert spool.stats().next_seq == 4
        assert put(spool) == 4


def test_a_new_file_starts_at_first_seq_and_an_existing_one_continues_its_own(
    path: Path,
) -> None:
    with Spool(path, first_seq=1_750_000_000_000) as spool:
        assert spool.stats().next_seq == 1_750_000_000_000
        assert [put(spool), put(spool)] == [1_750_000_000_000, 1_750_000_000_001]
    with Spool(path, first_seq=1_760_000_000_000) as spool:
        assert put(spool) == 1_750_000_000_002, "first_seq only counts for a new file"
    with pytest.raises(ValueError, match="first_seq"):
        Spool(path, first_seq=-1)


def test_file_is_in_wal_mode(path: Path) -> None:
    open_spool(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


# -- pending and ack --------------------------------------------------------------------------


def test_pending_is_in_seq_order_and_pages_after_seq(path: Path) -> None:
    with open_spool(path) as spool:
        for i in range(7):
            put(spool, alarm=i % 3 == 0)
        first = spool.pending(limit=3)
        assert [b.seq for b in first] == [1, 2, 3]
        assert [b.seq for b in spool.pending(after_seq=first[-1].seq, limit=3)] == [4, 5, 6]
        assert [b.seq for b in spool.pending(after_seq=6)] == [7]
        assert spool.pending(after_seq=7) == []
        assert [b.alarm for b in first] == [True, False, False]
        assert first[1].payload.startswith(b'{"seq":2}')


def test_pending_alarms_and_routine_split_the_pending_batches_each_in_seq_order(
    path: Path,
) -> None:
    with open_spool(path) as spool:
        for i in range(10):
            put(spool, alarm=i in (2, 6, 7))
        spool.ack(7)
        assert [b.seq for b in spool.pending_alarms()] == [3, 8]
        assert [b.seq for b in spool.pending_alarms(after_seq=3, limit=5)] == [8]
        assert all(b.alarm for b in spool.pending_alarms())
        assert [b.seq for b in spool.pending_routine(limit=4)] == [1, 2, 4, 5]
        assert [b.seq for b in spool.pending_routine(after_seq=5)] == [6, 9, 10]
        assert not any(b.alarm for b in spool.pending_routine())


def test_batches_by_seq_are_those_still_in_the_spool(path: Path) -> None:
    with open_spool(path) as spool:
        for i in range(5):
            put(spool, alarm=i == 3)
        spool.ack(2)
        got = spool.batches([5, 4, 2, 1, 99, 4])
        assert [(b.seq, b.alarm) for b in got] == [(1, False), (4, True), (5, False)]
        assert got[0].payload.startswith(b'{"seq":1}')
        assert spool.batches([]) == []


def test_ack_removes_and_a_second_ack_returns_false(path: Path) -> None:
    with open_spool(path) as spool:
        for _ in range(3):
            put(spool)
        assert spool.ack(2) is True
        assert spool.ack(2) is False
        assert spool.ack(99) is False
        assert [b.seq for b in spool.pending()] == [1, 3]
        assert spool.stats().batches == 2


def test_ack_many_forgets_a_burst_of_pubacks_in_one_transaction(path: Path) -> None:
    with open_spool(path) as spool:
        for i in range(1200):  # more than one DELETE ... IN (...) chunk
            put(spool, alarm=i % 100 == 0)
        statements: list[str] = []
        spool._db.set_trace_callback(statements.append)
        assert spool.ack_many([*range(1, 1101), 1100, 5000]) == 1100, "repeats, unknown seqs"
        spool._db.set_trace_callback(None)
        assert statements.count("COMMIT") == 1
        left = spool.pending(limit=1000)
        assert [b.seq for b in left] == list(range(1101, 1201))
        stats = spool.stats()
        assert (stats.batches, stats.bytes, stats.alarms) == (
            100,
            sum(len(b.payload) for b in left),
            1,
        )
        assert spool.ack_many([]) == 0
        assert spool.ack_many(range(1101, 1201)) == 100
        stats = spool.stats()
        assert (stats.batches, stats.bytes, stats.alarms) == (0, 0, 0)


def test_stats_count_batches_bytes_alarms_and_oldest(path: Path) -> None:
    with open_spool(path) as spool:
        assert spool.stats().oldest_ms is None
        put(spool, size=100, created_ms=NOW_MS - 5)
        put(spool, size=50, alarm=True, created_ms=NOW_MS - 9)
        put(spool, size=20)
        stats = spool.stats()
    assert (stats.batches, stats.bytes, stats.alarms, stats.oldest_ms) == (3, 170, 1, NOW_MS - 9)
    assert (stats.dropped_batches, stats.dropped_readings, stats.next_seq) == (0, 0, 4)


# -- crash safety -----------------------------------------------------------------------------


def test_failed_encode_writes_nothing_and_does_not_consume_the_seq(path: Path) -> None:
    def broken(seq: int) -> bytes:
        raise ValueError("cannot encode")

    with open_spool(path) as spool:
        put(spool)
        with pytest.raises(ValueError, match="cannot encode"):
            spool.put(TOPIC, broken, alarm=True, readings=1, created_ms=NOW_MS)
        assert [b.seq for b in spool.pending()] == [1]
        assert spool.stats().bytes == 10
        assert put(spool) == 2


KILLED_GATEWAY = """
import sys, time
from gateway.spool import Spool
spool = Spool(sys.argv[1])
for i in range(3):
    batch = spool.put(
        "gasguard/v1/gw-1/telemetry", lambda seq: b"batch %d" % seq,
        alarm=i == 1, readings=10, created_ms=int(time.time() * 1000),
    )
print(batch.seq, flush=True)
time.sleep(60)
"""


def test_put_is_durable_for_a_gateway_killed_right_after_it_returns(path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_GATEWAY, str(path)], stdout=subprocess.PIPE, cwd=ROOT, env=env
    )
    assert writer.stdout is not None
    try:
        assert writer.stdout.readline() == b"3\n"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        writer.stdout.close()
    assert writer.returncode == -signal.SIGKILL
    # Never checkpointed: opening the file below must recover the batches from the WAL.
    assert path.with_name(path.name + "-wal").stat().st_size > 0

    with open_spool(path) as spool:
        batches = spool.pending()
        assert [(b.seq, b.payload, b.alarm) for b in batches] == [
            (1, b"batch 1", False),
            (2, b"batch 2", True),
            (3, b"batch 3", False),
        ]
        assert put(spool) == 4


# -- bounds -----------------------------------------------------------------------------------


def test_over_max_bytes_drops_the_oldest_routine_first_and_never_alarms(path: Path) -> None:
    with open_spool(path, max_bytes=100) as spool:
        put(spool, size=30, alarm=True)  # 1
        put(spool, size=30)  # 2
        put(spool, size=30)  # 3
        assert spool.stats().dropped_batches == 0
        put(spool, size=30)  # 4: 120 bytes, so 2 goes
        assert [b.seq for b in spool.pending()] == [1, 3, 4]
        put(spool, size=60, alarm=True)  # 5: 150 bytes; 3 and 4 go, the alarms stay
        assert [b.seq for b in spool.pending()] == [1, 5]
        stats = spool.stats()
    assert (stats.bytes, stats.batches, stats.alarms) == (90, 2, 2)
    assert (stats.dropped_batches, stats.dropped_readings) == (3, 15)


def test_a_routine_batch_bigger_than_the_spool_is_dropped_and_its_ack_is_false(
    path: Path,
) -> None:
    with open_spool(path, max_bytes=100) as spool:
        seq = put(spool, size=101)
        assert spool.pending() == []
        assert spool.ack(seq) is False


def test_alarms_alone_over_max_bytes_are_kept_with_one_warning(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="gateway.spool"),
        open_spool(path, max_bytes=50) as spool,
    ):
        put(spool, size=40)
        for _ in range(4):
            put(spool, size=40, alarm=True)
        assert [b.seq for b in spool.pending()] == [2, 3, 4, 5]
        assert spool.stats().bytes == 160
    assert [r.getMessage() for r in caplog.records if "alarms alone" in r.getMessage()] == [
        f"spool {path} holds more than 50 bytes of alarms alone; alarms are never dropped"
    ]


def test_age_bound_drops_old_routine_batches_only(path: Path) -> None:
    clock = FakeClock()
    day_ms = 86_400_000
    with Spool(path, max_age_s=2 * 86400, clock=clock) as spool:
        put(spool, created_ms=NOW_MS - 3 * day_ms)  # 1: dropped by the put of 2 already
        put(spool, created_ms=NOW_MS - 3 * day_ms, alarm=True)  # 2
        put(spool, created_ms=NOW_MS - day_ms)  # 3
        put(spool, created_ms=NOW_MS)  # 4
        assert [b.seq for b in spool.pending()] == [2, 3, 4]
        assert spool.enforce_bounds() == 0
        clock.t += 1.5 * 86400
        assert spool.enforce_bounds() == 1
        assert [b.seq for b in spool.pending()] == [2, 4]
        stats = spool.stats()
    assert (stats.batches, stats.dropped_batches, stats.oldest_ms) == (2, 2, NOW_MS - 3 * day_ms)


def test_dropped_counters_persist_across_reopen(path: Path) -> None:
    with open_spool(path, max_bytes=25) as spool:
        for _ in range(5):
            put(spool, size=10)
    with open_spool(path, max_bytes=25) as spool:
        stats = spool.stats()
    assert (stats.batches, stats.dropped_batches, stats.dropped_readings) == (2, 3, 15)


def test_one_warning_per_drop_episode(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    with (
        caplog.at_level(logging.INFO, logger="gateway.spool"),
        open_spool(path, max_bytes=100) as spool,
    ):
        for _ in range(30):  # an outage: every put from the 11th on drops one
            put(spool, size=10)
        assert spool.stats().dropped_batches == 20
        assert len(warnings()) == 1
        assert str(path) in warnings()[0]

        for batch in spool.pending()[:5]:  # the link is back and drains the spool
            spool.ack(batch.seq)
        put(spool, size=10)  # 60 bytes: under the 90 % hysteresis line, the episode ends
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
            f"spool {path} is back within its bounds; dropped 20 batches (100 readings) meanwhile"
        ]
        for _ in range(10):  # a second outage is a second episode
            put(spool, size=10)
        assert len(warnings()) == 2


# -- command results --------------------------------------------------------------------------


def test_command_results_are_kept_across_reopen(path: Path) -> None:
    with open_spool(path) as spool:
        assert spool.command_result("cmd-1") is None
        spool.save_command_result("cmd-1", b'{"ok":true}', at_ms=NOW_MS)
        spool.save_command_result("cmd-2", b'{"ok":false}', at_ms=NOW_MS + 1)
        assert spool.command_result("cmd-1") == b'{"ok":true}'
    with open_spool(path) as spool:
        assert spool.command_result("cmd-1") == b'{"ok":true}'
        assert spool.command_result("cmd-2") == b'{"ok":false}'


def test_command_results_keep_only_the_latest(path: Path) -> None:
    with open_spool(path, max_command_results=3) as spool:
        for i in range(5):
            spool.save_command_result(f"cmd-{i}", b"%d" % i, at_ms=NOW_MS + i)
        spool.save_command_result("cmd-3", b"again", at_ms=NOW_MS + 9)  # a repeat is no new row
        kept = {f"cmd-{i}": spool.command_result(f"cmd-{i}") for i in range(5)}
    assert kept == {"cmd-0": None, "cmd-1": None, "cmd-2": b"2", "cmd-3": b"again", "cmd-4": b"4"}


def test_command_results_default_cap_is_ten_thousand(path: Path) -> None:
    with open_spool(path) as spool:
        assert spool.max_command_results == 10_000


# -- files that are not our spool -------------------------------------------------------------


def test_another_schema_version_is_refused_naming_the_path(path: Path) -> None:
    open_spool(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 2")
    with pytest.raises(SpoolError, match="schema version 2") as caught:
        open_spool(path)
    assert str(path) in str(caught.value)


def test_a_garbage_file_is_refused_naming_the_path(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"these are not the pages you are looking for\n" * 200)
    with pytest.raises(SpoolError) as caught:
        open_spool(path)
    assert str(path) in str(caught.value)


def test_another_sqlite_file_is_refused_naming_the_path(path: Path) -> None:
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE readings (ts INTEGER)")
    with pytest.raises(SpoolError, match="not a spool") as caught:
        open_spool(path)
    assert str(path) in str(caught.value)


def test_a_path_that_cannot_be_created_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "a-file" / "gw-1.db"
    with pytest.raises(SpoolError) as caught:
        open_spool(path)
    assert str(path) in str(caught.value)


def test_a_closed_spool_raises_spool_error(path: Path) -> None:
    spool = open_spool(path)
    spool.close()
    with pytest.raises(SpoolError, match=str(path)):
        put(spool)


# -- the spool against a model ----------------------------------------------------------------

MODEL_MAX_BYTES = 600
MODEL_MAX_AGE_S = 3600
AT_THE_AGE_BOUND = st.sampled_from([MODEL_MAX_AGE_S - 1, MODEL_MAX_AGE_S, MODEL_MAX_AGE_S + 1])


class SpoolAgainstModel(RuleBasedStateMachine):
    """Random puts, acks, reopens and clock steps; the spool must agree with a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="spool-model-"))
        self.clock = FakeClock()
        self.spool = self.open()
        # seq -> (payload, alarm, readings, created_ms)
        self.pending: dict[int, tuple[bytes, bool, int, int]] = {}
        self.next_seq = 1
        self.dropped = [0, 0]  # batches, readings

    def open(self) -> Spool:
        return Spool(
            self.dir / "gw.db",
            max_bytes=MODEL_MAX_BYTES,
            max_age_s=MODEL_MAX_AGE_S,
            clock=self.clock,
        )

    def enforce(self) -> int:
        """The bounds as the brief states them: age first, then the oldest routine by seq."""
        cutoff = int(self.clock.t * 1000) - MODEL_MAX_AGE_S * 1000
        doomed = [s for s, (_, alarm, _, c) in self.pending.items() if not alarm and c < cutoff]
        total = sum(len(p) for p, *_ in self.pending.values())
        total -= sum(len(self.pending[s][0]) for s in doomed)
        for seq in sorted(self.pending):
            if total <= MODEL_MAX_BYTES:
                break
            if seq not in doomed and not self.pending[seq][1]:
                doomed.append(seq)
                total -= len(self.pending[seq][0])
        for seq in doomed:
            self.dropped[0] += 1
            self.dropped[1] += self.pending.pop(seq)[2]
        return len(doomed)

    @rule(
        alarm=st.booleans(),
        size=st.integers(0, 250) | st.sampled_from([50, 100, 150, 200]),  # exact fits too
        readings=st.integers(0, 300),
        age_s=st.integers(0, 2 * MODEL_MAX_AGE_S) | AT_THE_AGE_BOUND,
    )
    def put(self, alarm: bool, size: int, readings: int, age_s: int) -> None:
        created_ms = int((self.clock.t - age_s) * 1000)
        batch = self.spool.put(
            TOPIC, payload(size), alarm=alarm, readings=readings, created_ms=created_ms
        )
        assert batch.seq == self.next_seq
        self.pending[batch.seq] = (batch.payload, alarm, readings, created_ms)
        self.next_seq += 1
        self.enforce()

    @rule()
    def put_that_fails(self) -> None:
        def broken(seq: int) -> bytes:
            raise RuntimeError(seq)

        with pytest.raises(RuntimeError):
            self.spool.put(TOPIC, broken, alarm=False, readings=1, created_ms=NOW_MS)

    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        known = sorted(self.pending)
        seqs = st.integers(0, self.next_seq + 1)
        seq = data.draw(st.sampled_from(known) | seqs if known else seqs)
        assert self.spool.ack(seq) is (self.pending.pop(seq, None) is not None)

    @rule(data=st.data())
    def ack_many(self, data: st.DataObject) -> None:
        seqs = data.draw(st.lists(st.integers(0, self.next_seq + 1), max_size=8))
        seqs += data.draw(st.lists(st.sampled_from(sorted(self.pending)))) if self.pending else []
        gone = sum(self.pending.pop(seq, None) is not None for seq in set(seqs))
        assert self.spool.ack_many(seqs) == gone

    @rule()
    def reopen(self) -> None:
        self.spool.close()
        self.spool = self.open()

    @rule(seconds=st.integers(0, MODEL_MAX_AGE_S) | st.sampled_from([1, 600]))
    def time_passes(self, seconds: int) -> None:
        self.clock.t += seconds
        assert self.spool.enforce_bounds() == self.enforce()

    @invariant()
    def agrees_with_the_model(self) -> None:
        seen, after = [], 0
        while page := self.spool.pending(after_seq=after, limit=7):
            seen += page
            after = page[-1].seq
        assert {b.seq: (b.payload, b.alarm, b.readings, b.created_ms) for b in seen} == self.pending
        assert [b.seq for b in seen] == sorted(self.pending)
        alarms = [b.seq for b in self.spool.pending_alarms(limit=10_000)]
        routine = [b.seq for b in self.spool.pending_routine(limit=10_000)]
        assert alarms == sorted(s for s, (_, alarm, *_) in self.pending.items() if alarm)
        assert routine == sorted(s for s, (_, alarm, *_) in self.pending.items() if not alarm)
        stats = self.spool.stats()
        assert stats.next_seq == self.next_seq
        assert stats.batches == len(self.pending)
        assert stats.bytes == sum(len(p) for p, *_ in self.pending.values())
        assert stats.alarms == sum(alarm for _, alarm, *_ in self.pending.values())
        assert stats.oldest_ms == min((c for *_, c in self.pending.values()), default=None)
        assert [stats.dropped_batches, stats.dropped_readings] == self.dropped

    def teardown(self) -> None:
        self.spool.close()
        shutil.rmtree(self.dir)


SpoolAgainstModel.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None
)
TestSpoolAgainstModel = SpoolAgainstModel.TestCase
