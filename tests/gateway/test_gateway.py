"""The gateway against simulated devices over real Modbus TCP and a real Mosquitto."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import orjson
import pytest

from gasguard.profiles import Table, builtin_profile
from gateway.links import ModbusLink
from gateway.spool import Spool
from tests.collector import Collector
from tests.conftest import Broker
from tests.gateway.conftest import GatewayThread, SimServer, gateway_config

pytestmark = pytest.mark.integration


def readings_of(collector: Collector, device: str) -> list[dict[str, float | bool]]:
    out = []
    for _, batch in collector.batches:
        for i in np.flatnonzero(batch.dev == device):
            out.append({k: v[i].item() for k, v in batch.fields.items()} | {"ts": int(batch.ts[i])})
    return out


def test_published_values_match_what_the_simulation_holds(
    sim_server: Callable[..., SimServer], mosquitto: Broker, tmp_path: Path
) -> None:
    server = sim_server(3, 3)
    collector = Collector(mosquitto)
    gw = GatewayThread(gateway_config(tmp_path, mosquitto, server))
    try:
        collector.wait_until(
            lambda: all(readings_of(collector, d.id) for d in server.sim.fleet.devices())
        )
    finally:
        gw.stop()
        collector.close()
    for device in server.sim.fleet.devices():
        profile = builtin_profile(f"{device.kind}-generic")
        held = server.values(device.id)
        got = readings_of(collector, device.id)
        assert got, device.id
        for reading in got:
            assert reading["comm_lost"] is False
            for point in profile.points:
                want = held[point.name]
                if isinstance(want, bool):
                    assert reading[point.name] is want, (device.id, point.name)
                else:
                    tol = 1e-6 if point.type == "f32" else abs(point.scale) / 2 + 1e-9
                    assert reading[point.name] == pytest.approx(want, abs=tol, rel=1e-6), (
                        device.id,
                        point.name,
                    )
    assert (
        collector.state["gasguard/v1/GW-T/state"] == b"offline"
    )  # clean stop: the gateway said so


def telemetry_seqs(collector: Collector) -> list[int]:
    return [b.seq for _, b in collector.batches]


def test_broker_outage_loses_nothing_and_replays_with_original_timestamps(
    sim_server: Callable[..., SimServer], mosquitto: Broker, tmp_path: Path
) -> None:
    server = sim_server(5, 5)
    collector = Collector(mosquitto, persistent=True)
    gw = GatewayThread(gateway_config(tmp_path, mosquitto, server, interval=0.1))
    try:
        collector.wait_until(lambda: len(collector.batches) >= 10)
        mosquitto.stop()
        outage_start = time.time()
        time.sleep(3.0)  # the gateway keeps polling and spools
        outage_end = time.time()
        spooled = gw.call(lambda: gw.gateway.spool.stats().batches)  # type: ignore[union-attr]
        assert spooled >= 10, "batches were spooled during the outage"
        mosquitto.start()
        gw.call(lambda: None)
        collector.wait_until(
            lambda: gw.call(lambda: gw.gateway.spool.stats().batches) == 0, timeout=30
        )  # type: ignore[union-attr]
        last = gw.call(lambda: gw.gateway.spool.stats().next_seq) - 1  # type: ignore[union-attr]
        first = min(telemetry_seqs(collector))  # a new spool starts at the time in epoch ms
        try:
            collector.wait_until(
                lambda: set(telemetry_seqs(collector)) >= set(range(first, last + 1)), timeout=10
            )
        except AssertionError:
            missing = sorted(set(range(first, last + 1)) - set(telemetry_seqs(collector)))
            raise AssertionError(
                f"missing {missing} of {last}; outage {outage_start} {outage_end}"
            ) from None
    finally:
        gw.stop()
        collector.close()
    seqs = telemetry_seqs(collector)
    assert set(seqs) == set(range(min(seqs), max(seqs) + 1)), "every batch arrived"
    assert len(seqs) - len(set(seqs)) <= 2 * 20, "repeats only from the in-flight window"
    during = [
        a for a in collector.snapshot() if outage_start < a.batch.ts.min() / 1000 < outage_end - 0.5
    ]
    assert len(during) >= 10, "readings taken during the outage arrived"
    assert all(a.at > outage_end for a in during), "...after it, with the time they were taken"


def test_killed_gateway_sends_its_spool_after_restart_and_continues_the_sequence(
    sim_server: Callable[..., SimServer], mosquitto: Broker, tmp_path: Path
) -> None:
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    server = sim_server(3, 3)
    config = gateway_config(tmp_path, mosquitto, server, interval=0.1)
    collector = Collector(mosquitto, persistent=True)
    cmd = [sys.executable, "-m", "gasguard.cli", "gateway", "run", "--config", str(config)]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        collector.wait_until(lambda: len(collector.batches) >= 5, timeout=30)
        mosquitto.stop()
        time.sleep(2.0)  # batches pile up in the spool
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        from gateway.spool import Spool

        with Spool(tmp_path / "state" / "spool.sqlite") as spool:
            stranded = [b.seq for b in spool.pending(limit=10_000)]
            next_seq = spool.stats().next_seq
        assert len(stranded) >= 5, "the killed gateway left batches in its spool"
        mosquitto.start()
        second = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            collector.wait_until(
                lambda: set(stranded) <= set(telemetry_seqs(collector)), timeout=30
            )
            collector.wait_until(lambda: max(telemetry_seqs(collector)) > next_seq + 5, timeout=30)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(20)
    finally:
        if first.poll() is None:
            first.kill()
        collector.close()
    seqs = telemetry_seqs(collector)
    assert set(range(min(seqs), max(seqs) + 1)) <= set(seqs), "no sequence number is missing"
    assert next_seq in seqs, "the restarted gateway continued where the killed one stopped"


def test_a_new_spool_file_numbers_its_batches_above_those_of_the_lost_one(
    sim_server: Callable[..., SimServer], mosquitto: Broker, tmp_path: Path
) -> None:
    server = sim_server(1, 1)
    collector = Collector(mosquitto)
    config = gateway_config(tmp_path, mosquitto, server, interval=0.1)
    try:
        gw = GatewayThread(config)
        try:
            collector.wait_until(lambda: len(collector.batches) >= 5)
        finally:
            gw.stop()
        before = telemetry_seqs(collector)
        assert min(before) >= int((time.time() - 60) * 1000), "the first file starts at epoch ms"
        for file in (tmp_path / "state").glob("spool.sqlite*"):
            file.unlink()  # the box lost its state (new SD card, wiped disk)
        count = len(before)
        gw = GatewayThread(config)
        try:
            collector.wait_until(lambda: len(collector.batches) >= count + 5)
        finally:
            gw.stop()
    finally:
        collector.close()
    after = telemetry_seqs(collector)[count:]
    assert min(after) > max(before), "ingest would have dropped them as repeats otherwise"


def test_pubacks_are_deleted_from_the_spool_in_one_transaction_per_forwarder_tick(
    sim_server: Callable[..., SimServer], mosquitto: Broker, tmp_path: Path
) -> None:
    server = sim_server(3, 3)
    one_reading_per_batch = "max_readings = 1\nmax_delay_ms = 100"
    config = gateway_config(
        tmp_path, mosquitto, server, interval=0.1, batching=one_reading_per_batch
    )
    gw = GatewayThread(config)
    spool = gw.gateway.spool  # type: ignore[union-attr]
    deleted: list[int] = []  # seqs per ack_many call
    single: list[int] = []

    def ack_many(seqs: list[int]) -> int:
        deleted.append(len(seqs))
        return Spool.ack_many(spool, seqs)

    def ack(seq: int) -> bool:
        single.append(seq)
        return Spool.ack(spool, seq)

    try:
        deadline = time.monotonic() + 10
        forwarder = gw.gateway.forwarder  # type: ignore[union-attr]
        while not gw.call(lambda: forwarder.acked):
            assert time.monotonic() < deadline, "nothing was acknowledged"
            time.sleep(0.05)
        mosquitto.stop()
        time.sleep(2.0)  # about 120 one-reading batches pile up
        backlog = gw.call(lambda: spool.stats().batches)
        assert backlog >= 60
        gw.call(lambda: setattr(spool, "ack_many", ack_many))
        gw.call(lambda: setattr(spool, "ack", ack))
        mosquitto.start()
        deadline = time.monotonic() + 30
        while gw.call(lambda: spool.stats().batches) > 10 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        gw.stop()
    assert single == [], "nothing deleted one by one"
    assert sum(deleted) >= backlog
    assert len(deleted) <= sum(deleted) / 3, f"{len(deleted)} transactions for {sum(deleted)}"


def test_an_alarm_goes_out_before_the_backlog_of_a_broker_outage(
    sim_server: Callable[..., SimServer], mosquitto: Broker, tmp_path: Path
) -> None:
    server = sim_server(3, 3)
    collector = Collector(mosquitto, persistent=True)
    one_reading_per_batch = "max_readings = 1\nmax_delay_ms = 100"
    config = gateway_config(
        tmp_path, mosquitto, server, interval=0.1, batching=one_reading_per_batch
    )
    gw = GatewayThread(config)
    spool = gw.gateway.spool  # type: ignore[union-attr]
    try:
        collector.wait_until(lambda: len(collector.batches) >= 5)
        mosquitto.stop()
        time.sleep(2.0)  # routine telemetry piles up in the spool (about 60 batches a second)
        server.inject({"device": "D-0002", "type": "gas_leak", "rate_lel_per_min": 600})
        server.call(lambda: server.sim.run_for(5))
        collector.wait_until(lambda: gw.call(lambda: spool.stats().alarms) == 1, timeout=5)
        time.sleep(0.5)
        backlog = gw.call(lambda: spool.stats().batches) - 1
        assert backlog >= 60
        restarted = time.time()
        mosquitto.start()
        collector.wait_until(lambda: gw.call(lambda: spool.stats().batches) == 0, timeout=30)
        collector.wait_until(lambda: any(c == "alarm" for c, _ in collector.batches), timeout=5)
    finally:
        gw.stop()
        collector.close()
    replayed = [a for a in collector.snapshot() if a.at >= restarted]
    first_alarm = next(i for i, a in enumerate(replayed) if a.channel == "alarm")
    assert first_alarm < backlog // 10, f"alarm arrived after {first_alarm} of {backlog} batches"
    assert list(replayed[first_alarm].batch.dev) == ["D-0002"]


def test_a_refused_batch_is_retried_after_a_backoff_without_resending_the_others(
    sim_server: Callable[..., SimServer],
    broker_with: Callable[..., Broker],
    tmp_path: Path,
) -> None:
    import signal

    broker = broker_with(f"allow_anonymous true\nacl_file {tmp_path}/acl", start=False)
    acl = tmp_path / "acl"
    allowed = ["read gasguard/v1/#"] + [
        f"write gasguard/v1/GW-T/{channel}" for channel in ("telemetry", "state", "cmd/result")
    ]
    acl.write_text("".join(f"topic {line}\n" for line in allowed))  # no alarms yet
    broker.start()
    server = sim_server(2, 0)
    collector = Collector(broker)
    gw = GatewayThread(gateway_config(tmp_path, broker, server, interval=0.1))
    forwarder = gw.gateway.forwarder  # type: ignore[union-attr]
    try:
        collector.wait_until(lambda: len(collector.batches) >= 3)
        server.inject({"device": "D-0002", "type": "gas_leak", "rate_lel_per_min": 600})
        server.call(lambda: server.sim.run_for(5))
        collector.wait_until(lambda: gw.call(lambda: forwarder.refused) == 1, timeout=5)
        refused_at = time.monotonic()
        routine = len(collector.batches)
        collector.wait_until(lambda: len(collector.batches) >= routine + 10, timeout=5)
        # Mosquitto 2.0.11 with our tuning (max_queued_messages 0) also drops the connection
        # after it refuses a QoS 1 publish: the replay after the reconnect must skip the batch.
        assert gw.call(lambda: forwarder.refused) == 1, "not retried before its backoff"
        assert not any(c == "alarm" for c, _ in collector.batches)
        acl.write_text(acl.read_text() + "topic write gasguard/v1/GW-T/alarm\n")
        assert broker.process is not None
        broker.process.send_signal(signal.SIGHUP)  # mosquitto reads its ACL again
        collector.wait_until(lambda: any(c == "alarm" for c, _ in collector.batches), timeout=10)
        retried_after = time.monotonic() - refused_at
        figures = gw.call(lambda: gw.gateway.snapshot()["figures"])  # type: ignore[union-attr]
        connects = gw.call(lambda: gw.gateway.link.connects)  # type: ignore[union-attr]
    finally:
        gw.stop()
        collector.close()
    assert 3.5 <= retried_after <= 8.0, "after the first backoff (5 s, +-20 %)"
    assert connects <= 2, "refused once, accepted on the retry"
    alarms = [b for c, b in collector.batches if c == "alarm"]
    assert len(alarms) == 1 and list(alarms[0].dev) == ["D-0002"]
    seqs = telemetry_seqs(collector)
    assert len(seqs) - len(set(seqs)) <= 5, "only what was in flight at the drop is sent again"
    assert figures["refused_total"][1] == 1
    assert figures["rejected_readings_total"][1] == 0
    assert figures["mqtt_device_rejected_total"][1] == 0


def test_a_failed_task_stops_the_gateway_cleanly_and_makes_run_raise(
    sim_server: Callable[..., SimServer],
    mosquitto: Broker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from gateway.app import GatewayCrashError

    server = sim_server(2, 2)
    collector = Collector(mosquitto)
    waiting = "max_readings = 5000\nmax_delay_ms = 4000"  # readings stay in the batcher
    gw = GatewayThread(gateway_config(tmp_path, mosquitto, server, batching=waiting))
    gateway = gw.gateway
    assert gateway is not None

    def bug() -> None:
        raise RuntimeError("a bug in the batcher")

    try:
        with caplog.at_level(logging.CRITICAL, logger="gateway.app"):
            collector.wait_until(lambda: gw.call(lambda: gateway.batcher.readings) >= 20)
            gw.call(lambda: setattr(gateway.batcher, "flush_due", bug))
            gw.thread.join(20)
        assert not gw.thread.is_alive(), "the gateway stopped by itself"
        readings = gateway.batcher.readings
        collector.wait_until(
            lambda: sum(len(b) for _, b in collector.batches) >= readings, timeout=10
        )
    finally:
        collector.close()
    assert isinstance(gw.error, GatewayCrashError) and "batcher" in str(gw.error)
    assert isinstance(gw.error.__cause__, RuntimeError)
    [critical] = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert "batcher failed" in critical.getMessage() and critical.exc_info is not None
    assert sum(len(b) for _, b in collector.batches) == readings, "every reading was sent"
    assert collector.state["gasguard/v1/GW-T/state"] == b"offline", "a clean stop"


class ShortAnswers:
    """A real Modbus link whose device answers one register short (a firmware bug)."""

    def __init__(self, link: ModbusLink) -> None:
        self.link = link
        self.name = link.name
        self.short = True

    async def read(
        self, unit: int, table: Table, start: int, count: int, timeout: float
    ) -> list[int]:
        regs = await self.link.read(unit, table, start, count, timeout)
        return regs[:-1] if self.short else regs

    async def write(
        self, unit: int, table: Table, address: int, values: Sequence[int], timeout: float
    ) -> None:
        await self.link.write(unit, table, address, values, timeout)

    async def close(self) -> None:
        await self.link.close()


def test_an_unusable_answer_is_a_failed_poll_not_a_dead_poller(
    sim_server: Callable[..., SimServer],
    mosquitto: Broker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = sim_server(1, 1)
    gw = GatewayThread(gateway_config(tmp_path, mosquitto, server, interval=0.1))
    poller = gw.gateway.pollers["M-0001"]  # type: ignore[union-attr]
    faulty = ShortAnswers(poller.link)
    try:
        with caplog.at_level(logging.ERROR, logger="gateway.poller"):
            gw.call(lambda: setattr(poller, "link", faulty))
            deadline = time.monotonic() + 10
            while gw.call(lambda: poller.stats.failures) < 5:
                assert time.monotonic() < deadline, "no failed polls"
                time.sleep(0.05)
            assert gw.call(lambda: poller.state) == "lost"
            assert "IndexError" in gw.call(lambda: poller.stats.last_error)
            faulty.short = False
            deadline = time.monotonic() + 10
            while gw.call(lambda: poller.state) != "ok":
                assert time.monotonic() < deadline, "never recovered"
                time.sleep(0.05)
    finally:
        gw.stop()  # raises if a task failed
    unusable = [r for r in caplog.records if "unusable answer" in r.getMessage()]
    assert len(unusable) == 1 and unusable[0].exc_info is not None, "logged once, with traceback"


def test_a_clean_stop_sends_the_readings_of_the_last_polls(
    sim_server: Callable[..., SimServer], mosquitto: Broker, tmp_path: Path
) -> None:
    server = sim_server(3, 3)
    for device in server.sim.fleet.devices():  # every poll is in progress most of the time
        server.inject({"device": device.id, "type": "slow_response", "delay_ms": 150})
    collector = Collector(mosquitto)
    waiting = "max_readings = 5000\nmax_delay_ms = 600000"  # nothing leaves before the stop
    config = gateway_config(
        tmp_path, mosquitto, server, interval=0.05, timeout=1.0, batching=waiting
    )
    gw = GatewayThread(config)
    pollers = gw.gateway.pollers  # type: ignore[union-attr]
    try:
        time.sleep(1.0)
    finally:
        gw.stop()
    reported = sum(p.stats.reports for p in pollers.values())
    try:
        collector.wait_until(
            lambda: sum(len(b) for _, b in collector.batches) >= reported, timeout=10
        )
    finally:
        collector.close()
    assert sum(len(b) for _, b in collector.batches) == reported, "every reading arrived"


def test_a_clean_stop_lets_a_running_command_finish_and_sends_its_result(
    sim_server: Callable[..., SimServer], mosquitto: Broker, tmp_path: Path
) -> None:
    from paho.mqtt import publish

    server = sim_server(1, 1)
    collector = Collector(mosquitto)
    gw = GatewayThread(gateway_config(tmp_path, mosquitto, server, timeout=2.0))
    gateway = gw.gateway
    assert gateway is not None
    try:
        collector.wait_until(lambda: gw.call(lambda: gateway.link.connected), timeout=10)
        server.inject({"device": "M-0001", "type": "slow_response", "delay_ms": 700})
        body = orjson.dumps({"id": "T-STOP", "device": "M-0001", "action": "close_valve"})
        publish.single(
            "gasguard/v1/GW-T/cmd", body, qos=1, hostname=mosquitto.host, port=mosquitto.port
        )
        time.sleep(0.3)  # the write is under way
    finally:
        gw.stop()
    try:
        collector.wait_until(lambda: bool(collector.results), timeout=5)
    finally:
        collector.close()
    assert orjson.loads(collector.results[0])["status"] == "done"
    assert server.values("M-0001")["valve_closed"] is True
