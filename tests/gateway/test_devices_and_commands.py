"""A dead device does not slow the others; valve commands; MQTT-native devices; report policy."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import orjson
import pytest
from paho.mqtt import publish

from tests.collector import Collector
from tests.conftest import Broker
from tests.gateway.conftest import CuttableProxy, GatewayThread, SimServer, gateway_config
from tests.gateway.test_gateway import readings_of

pytestmark = pytest.mark.integration


def test_a_dead_device_is_reported_lost_without_slowing_the_others(
    sim_server: Callable[..., SimServer], mosquitto: Broker, tmp_path: Path
) -> None:
    server = sim_server(4, 4, per_device_ports=True)
    collector = Collector(mosquitto)
    gw = GatewayThread(gateway_config(tmp_path, mosquitto, server, interval=0.1, timeout=0.3))
    pollers = gw.gateway.pollers  # type: ignore[union-attr]
    try:
        time.sleep(1.0)
        server.inject({"device": "D-0001", "type": "silent"})
        before = gw.call(lambda: {i: p.stats.polls for i, p in pollers.items()})
        time.sleep(3.0)
        after = gw.call(lambda: {i: p.stats.polls for i, p in pollers.items()})
        assert gw.call(lambda: pollers["D-0001"].state) == "lost"
        lost = [r for r in readings_of(collector, "D-0001") if r["comm_lost"]]
        assert lost, "the dead detector was reported lost"
        assert all(r["ch4_lel"] != r["ch4_lel"] for r in lost), "no stale value sent as fresh (NaN)"
        for device, polls in after.items():
            if device != "D-0001":
                assert polls - before[device] >= 20, (
                    f"{device} kept its poll rate ({polls - before[device]} in 3 s)"
                )
        server.inject({"device": "D-0001", "type": "clear"})
        collector.wait_until(lambda: gw.call(lambda: pollers["D-0001"].state) == "ok", timeout=10)
        collector.wait_until(
            lambda: not readings_of(collector, "D-0001")[-1]["comm_lost"], timeout=5
        )
    finally:
        gw.stop()
        collector.close()


def test_valve_command_closes_the_simulated_valve_and_bad_commands_say_why(
    sim_server: Callable[..., SimServer], mosquitto: Broker, tmp_path: Path
) -> None:
    server = sim_server(2, 2)
    server.inject({"device": "M-0001", "type": "continuous_flow", "flow_m3h": 0.8})
    server.call(server.sim.step)
    assert server.values("M-0001")["flow_m3h"] >= 0.8
    collector = Collector(mosquitto)
    gw = GatewayThread(gateway_config(tmp_path, mosquitto, server))

    def command(body: dict[str, object] | bytes) -> dict[str, object]:
        count = len(collector.results)
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        publish.single(
            "gasguard/v1/GW-T/cmd", payload, qos=1, hostname=mosquitto.host, port=mosquitto.port
        )
        collector.wait_until(lambda: len(collector.results) > count, timeout=10)
        result: dict[str, object] = orjson.loads(collector.results[count])
        return result

    try:
        assert (
            gw.gateway.link.connected
            or collector.wait_until(lambda: gw.gateway.link.connected) is None
        )  # type: ignore[union-attr]
        done = command({"id": "T-1", "device": "M-0001", "action": "close_valve"})
        assert done["status"] == "done" and done["device"] == "M-0001"
        assert server.values("M-0001")["valve_closed"] is True
        server.call(server.sim.step)
        collector.wait_until(
            lambda: any(
                r["valve_closed"] and r["flow_m3h"] == 0.0 for r in readings_of(collector, "M-0001")
            ),
            timeout=5,
        )
        again = command({"id": "T-1", "device": "M-0001", "action": "close_valve"})
        assert again == done, "a repeated command gets the same result"
        assert gw.call(lambda: gw.gateway.commands.executed) == 1  # type: ignore[union-attr]

        assert (
            command({"id": "T-2", "device": "M-0099", "action": "close_valve"})["status"]
            == "unknown_device"
        )
        bad = command({"id": "T-3", "device": "M-0002", "action": "explode"})
        assert bad["status"] == "invalid" and "unknown action 'explode'" in str(bad["reason"])
        assert command(b"{not json")["status"] == "invalid"
        assert "'id'" in str(command({"device": "M-0002", "action": "open_valve"})["reason"])
        server.inject({"device": "M-0002", "type": "silent"})
        failed = command({"id": "T-4", "device": "M-0002", "action": "close_valve"})
        assert (failed["status"] == "failed" and "M-0002" not in str(failed["reason"])) or failed[
            "reason"
        ]
        opened = command({"id": "T-5", "device": "M-0001", "action": "open_valve"})
        assert opened["status"] == "done" and server.values("M-0001")["valve_closed"] is False
    finally:
        gw.stop()
        collector.close()


def test_report_on_change_sends_only_changes_and_heartbeats(
    sim_server: Callable[..., SimServer], mosquitto: Broker, tmp_path: Path
) -> None:
    server = sim_server(1, 1)
    collector = Collector(mosquitto)
    config = gateway_config(tmp_path, mosquitto, server, interval=0.1).read_text()
    config = config.replace(
        "retry_cap = 1.0", 'retry_cap = 1.0\nreport = "on_change"\nheartbeat = 1.5'
    )
    path = tmp_path / "on_change.toml"
    path.write_text(config)
    gw = GatewayThread(path)
    try:
        time.sleep(2.0)  # the simulation stands still: one reading, then a heartbeat
        polls = gw.call(lambda: gw.gateway.pollers["M-0001"].stats.polls)  # type: ignore[union-attr]
        assert polls >= 15
        assert 2 <= len(readings_of(collector, "M-0001")) <= 3
        server.inject({"device": "M-0001", "type": "tamper"})
        server.call(server.sim.step)
        collector.wait_until(
            lambda: any(r["tamper"] for r in readings_of(collector, "M-0001")), timeout=5
        )
    finally:
        gw.stop()
        collector.close()


def test_detector_alarm_goes_out_at_once_on_the_alarm_topic(
    sim_server: Callable[..., SimServer], mosquitto: Broker, tmp_path: Path
) -> None:
    server = sim_server(2, 0)
    collector = Collector(mosquitto)
    # batches wait up to a minute: only the alarm path can be fast
    config = gateway_config(
        tmp_path, mosquitto, server, batching="max_readings = 5000\nmax_delay_ms = 60000"
    )
    gw = GatewayThread(config)
    try:
        time.sleep(0.5)
        server.inject({"device": "D-0002", "type": "gas_leak", "rate_lel_per_min": 600})
        server.call(lambda: server.sim.run_for(5))
        t0 = time.time()
        collector.wait_until(lambda: any(c == "alarm" for c, _ in collector.batches), timeout=5)
        assert time.time() - t0 < 1.0
        alarms = [b for c, b in collector.batches if c == "alarm"]
        assert list(alarms[0].dev) == ["D-0002"] and bool(alarms[0].fields["alarm"][0])
        assert not any(c == "telemetry" for c, _ in collector.batches)
    finally:
        gw.stop()
        collector.close()
    assert any(c == "telemetry" for c, _ in collector.batches), "a clean stop flushes the batches"


def test_mqtt_native_devices_are_forwarded_in_the_same_batches(
    sim_server: Callable[..., SimServer], mosquitto: Broker, tmp_path: Path
) -> None:
    server = sim_server(1, 0)
    collector = Collector(mosquitto)
    extra = f'[local_broker]\nhost = "{mosquitto.host}"\nport = {mosquitto.port}'
    devices = (
        '[[devices]]\nid = "D-WIFI-1"\nkind = "detector"\nprofile = "mqtt-wifi-detector"\n'
        'transport = "mqtt"\nmqtt_id = "kitchen17"\ninterval = 0.5\n'
    )
    gw = GatewayThread(gateway_config(tmp_path, mosquitto, server, extra=extra, devices=devices))
    message = {
        "time": "2026-11-27T10:00:00+08:00",
        "gas": {"lel": 3.5, "alarm": "OFF", "fault": "OFF"},
        "temperature": 21.5,
        "valve": "OPEN",
    }
    try:
        collector.wait_until(lambda: gw.gateway.mqtt_devices.link.connected, timeout=10)  # type: ignore[union-attr]
        time.sleep(0.3)
        publish.single(
            "tele/kitchen17/SENSOR",
            orjson.dumps(message),
            qos=1,
            hostname=mosquitto.host,
            port=mosquitto.port,
        )
        collector.wait_until(lambda: bool(readings_of(collector, "D-WIFI-1")), timeout=5)
        got = readings_of(collector, "D-WIFI-1")[0]
        assert got["ch4_lel"] == 3.5 and got["alarm"] is False and got["temp_c"] == 21.5
        own = datetime.fromisoformat(message["time"]).timestamp() * 1000  # type: ignore[arg-type]
        assert got["ts"] == own, "the device's own timestamp"
        publish.single(
            "tele/kitchen17/SENSOR",
            b'{"gas": {"lel": "high"}}',
            hostname=mosquitto.host,
            port=mosquitto.port,
        )
        collector.wait_until(
            lambda: any(r["comm_lost"] for r in readings_of(collector, "D-WIFI-1")), timeout=5
        )
        assert gw.call(lambda: gw.gateway.mqtt_devices.rejected) == 1  # type: ignore[union-attr]
    finally:
        gw.stop()
        collector.close()


def test_devices_come_back_after_their_modbus_server_power_cycles(
    sim_server: Callable[..., SimServer], mosquitto: Broker, tmp_path: Path
) -> None:
    server = sim_server(2, 2)
    gw = GatewayThread(gateway_config(tmp_path, mosquitto, server, interval=0.1))
    pollers = gw.gateway.pollers  # type: ignore[union-attr]
    try:
        time.sleep(0.5)
        server.restart(down_for=3.0)  # long enough for every device to be lost
        lost = gw.call(lambda: {i: p.stats.failures for i, p in pollers.items()})
        assert all(lost.values()), lost
        time.sleep(0.1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            states = gw.call(lambda: {i: p.state for i, p in pollers.items()})
            if set(states.values()) == {"ok"}:
                break
            time.sleep(0.1)
        assert set(states.values()) == {"ok"}, states
    finally:
        gw.stop()


def test_rtu_over_tcp_serialises_devices_on_one_bus(
    sim_server: Callable[..., SimServer], mosquitto: Broker, tmp_path: Path
) -> None:
    server = sim_server(2, 2, rtu_framing=True)
    collector = Collector(mosquitto)
    gw = GatewayThread(gateway_config(tmp_path, mosquitto, server, transport="rtu-over-tcp"))
    try:
        collector.wait_until(
            lambda: all(readings_of(collector, d.id) for d in server.sim.fleet.devices())
        )
        links = gw.call(lambda: list(gw.gateway.links))  # type: ignore[union-attr]
        assert len(links) == 1 and links[0].startswith("rtu-over-tcp://")
        got = readings_of(collector, "M-0002")[-1]
        assert got["volume_m3"] == pytest.approx(server.values("M-0002")["volume_m3"], abs=0.001)
    finally:
        gw.stop()
        collector.close()


def test_metrics_are_readable_locally(
    sim_server: Callable[..., SimServer], mosquitto: Broker, tmp_path: Path
) -> None:
    import urllib.request

    from tests.conftest import free_port

    server = sim_server(1, 1)
    port = free_port()
    extra = f"[metrics]\nport = {port}"
    gw = GatewayThread(gateway_config(tmp_path, mosquitto, server, extra=extra))
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if gw.call(lambda: gw.gateway.forwarder.acked) > 0:  # type: ignore[union-attr]
                break
            time.sleep(0.1)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        status = orjson.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5).read()
        )
    finally:
        gw.stop()
    assert 'gasguard_gateway_polls_total{gateway="GW-T"}' in text
    assert 'gasguard_gateway_device_polls{gateway="GW-T",device="M-0001"}' in text
    assert "gasguard_gateway_spool_batches" in text and "gasguard_gateway_last_puback_ms" in text
    acked = next(
        line for line in text.splitlines() if line.startswith("gasguard_gateway_acked_total")
    )
    assert int(acked.split()[-1]) > 0
    assert {d["id"] for d in status["devices"]} == {"D-0001", "M-0001"}
    assert status["figures"]["broker_connected"][1] == 1


DYNSEC = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"


def test_a_refused_command_subscription_is_logged_as_an_error(
    sim_server: Callable[..., SimServer],
    broker_with: Callable[..., Broker],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Mosquitto's dynamic security checks subscriptions (its acl_file only filters delivery):
    # this gateway may publish, but not subscribe to its command topic.
    role = {
        "rolename": "gateway",
        "acls": [
            {"acltype": "publishClientSend", "topic": "gasguard/v1/#", "allow": True},
            {"acltype": "subscribeLiteral", "topic": "gasguard/v1/#", "allow": True},
        ],
    }
    dynsec = {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": True,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": [],
        "groups": [{"groupname": "anonymous", "roles": [{"rolename": "gateway"}]}],
        "roles": [role],
        "anonymousGroup": "anonymous",
    }
    (tmp_path / "dynsec.json").write_bytes(orjson.dumps(dynsec))
    broker = broker_with(
        f"allow_anonymous true\nplugin {DYNSEC}\nplugin_opt_config_file {tmp_path}/dynsec.json"
    )
    server = sim_server(1, 0)
    with caplog.at_level(logging.ERROR, logger="gasguard.mqtt_link"):
        gw = GatewayThread(gateway_config(tmp_path, broker, server))
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not gw.call(
                lambda: gw.gateway.link.refused_subscriptions  # type: ignore[union-attr]
            ):
                time.sleep(0.05)
            assert gw.call(lambda: gw.gateway.link.refused_subscriptions) == {  # type: ignore[union-attr]
                "gasguard/v1/GW-T/cmd"
            }
        finally:
            gw.stop()
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        f"MQTT broker 127.0.0.1:{broker.port} refused the subscription to gasguard/v1/GW-T/cmd:"
        " Not authorized"
    ]


def command_results(collector: Collector, command_id: str) -> list[dict[str, object]]:
    found = [orjson.loads(r) for r in list(collector.results)]
    return [r for r in found if r.get("id") == command_id]


def test_a_command_sent_while_the_gateway_is_cut_off_is_delivered_when_it_reconnects(
    sim_server: Callable[..., SimServer],
    mosquitto: Broker,
    proxy: Callable[[Broker], CuttableProxy],
    tmp_path: Path,
) -> None:
    server = sim_server(1, 1)
    network = proxy(mosquitto)
    collector = Collector(mosquitto)
    gw = GatewayThread(gateway_config(tmp_path, network.broker, server))
    link = gw.gateway.link  # type: ignore[union-attr]
    try:
        collector.wait_until(lambda: gw.call(lambda: link.connected), timeout=10)
        network.cut(refuse=True)
        collector.wait_until(lambda: not gw.call(lambda: link.connected), timeout=10)
        body = {"id": "T-CUT", "device": "M-0001", "action": "close_valve"}
        publish.single(
            "gasguard/v1/GW-T/cmd",
            orjson.dumps(body),
            qos=1,
            hostname=mosquitto.host,
            port=mosquitto.port,
        )
        time.sleep(0.5)
        network.allow()
        collector.wait_until(lambda: bool(command_results(collector, "T-CUT")), timeout=15)
    finally:
        gw.stop()
        collector.close()
    assert command_results(collector, "T-CUT")[0]["status"] == "done"
    assert server.values("M-0001")["valve_closed"] is True


def test_a_command_result_lost_in_flight_is_sent_again_after_a_reconnect(
    sim_server: Callable[..., SimServer],
    mosquitto: Broker,
    proxy: Callable[[Broker], CuttableProxy],
    tmp_path: Path,
) -> None:
    server = sim_server(1, 1)
    network = proxy(mosquitto)
    collector = Collector(mosquitto)
    gw = GatewayThread(gateway_config(tmp_path, network.broker, server, timeout=2.0))
    gateway = gw.gateway
    assert gateway is not None
    try:
        collector.wait_until(lambda: gw.call(lambda: gateway.link.connected), timeout=10)
        server.inject({"device": "M-0001", "type": "slow_response", "delay_ms": 600})
        body = {"id": "T-LOST", "device": "M-0001", "action": "close_valve"}
        publish.single(
            "gasguard/v1/GW-T/cmd",
            orjson.dumps(body),
            qos=1,
            hostname=mosquitto.host,
            port=mosquitto.port,
        )
        time.sleep(0.3)  # the gateway has the command (and acknowledged it); the write is slow
        network.swallow = True  # what the gateway sends now never reaches the broker
        collector.wait_until(lambda: gw.call(lambda: gateway.commands.executed) == 1, timeout=10)
        time.sleep(0.3)  # the result went out, into the void
        assert gw.call(lambda: (gateway.link.connected, gateway.forwarder.kept)) == (True, 1)
        connects = gw.call(lambda: gateway.link.connects)
        network.cut()
        network.swallow = False
        collector.wait_until(lambda: bool(command_results(collector, "T-LOST")), timeout=15)
        assert gw.call(lambda: gateway.link.connects) > connects
    finally:
        gw.stop()
        collector.close()
    assert {r["status"] for r in command_results(collector, "T-LOST")} == {"done"}


def test_a_command_repeated_while_it_runs_is_executed_once_and_answered_alike(
    sim_server: Callable[..., SimServer], mosquitto: Broker, tmp_path: Path
) -> None:
    server = sim_server(1, 1)
    collector = Collector(mosquitto)
    gw = GatewayThread(gateway_config(tmp_path, mosquitto, server, timeout=2.0))
    gateway = gw.gateway
    assert gateway is not None
    try:
        collector.wait_until(lambda: gw.call(lambda: gateway.link.connected), timeout=10)
        server.inject({"device": "M-0001", "type": "slow_response", "delay_ms": 500})
        body = orjson.dumps({"id": "T-TWICE", "device": "M-0001", "action": "close_valve"})
        for _ in range(2):  # the hotline's retry (or the broker's redelivery) comes quickly
            publish.single(
                "gasguard/v1/GW-T/cmd", body, qos=1, hostname=mosquitto.host, port=mosquitto.port
            )
        collector.wait_until(lambda: len(command_results(collector, "T-TWICE")) == 2, timeout=10)
        counts = gw.call(lambda: (gateway.commands.executed, gateway.commands.repeated))
    finally:
        gw.stop()
        collector.close()
    first, second = command_results(collector, "T-TWICE")
    assert first["status"] == "done" and second == first, "the same result, ts included"
    assert counts == (1, 1), "executed once"


def test_a_command_that_failed_on_a_dead_device_runs_again_when_repeated(
    sim_server: Callable[..., SimServer], mosquitto: Broker, tmp_path: Path
) -> None:
    server = sim_server(1, 1)
    collector = Collector(mosquitto)
    gw = GatewayThread(gateway_config(tmp_path, mosquitto, server))
    gateway = gw.gateway
    assert gateway is not None
    body = orjson.dumps({"id": "T-RETRY", "device": "M-0001", "action": "close_valve"})

    def send() -> None:
        publish.single(
            "gasguard/v1/GW-T/cmd", body, qos=1, hostname=mosquitto.host, port=mosquitto.port
        )

    try:
        collector.wait_until(lambda: gw.call(lambda: gateway.link.connected), timeout=10)
        server.inject({"device": "M-0001", "type": "silent"})
        send()
        collector.wait_until(lambda: len(command_results(collector, "T-RETRY")) == 1, timeout=10)
        server.inject({"device": "M-0001", "type": "clear"})
        send()
        collector.wait_until(lambda: len(command_results(collector, "T-RETRY")) == 2, timeout=10)
    finally:
        gw.stop()
        collector.close()
    failed, done = command_results(collector, "T-RETRY")
    assert failed["status"] == "failed" and done["status"] == "done"
    assert server.values("M-0001")["valve_closed"] is True


def test_retained_messages_of_mqtt_native_devices_are_never_sent_as_fresh(
    sim_server: Callable[..., SimServer],
    mosquitto: Broker,
    proxy: Callable[[Broker], CuttableProxy],
    tmp_path: Path,
) -> None:
    server = sim_server(1, 0)
    wifi = proxy(mosquitto)  # the building's network between the gateway and its broker
    collector = Collector(mosquitto)
    old = {"gas": {"lel": 42.0, "alarm": "ON", "fault": "OFF"}, "temperature": 21.5}
    publish.single(  # the device's last words, kept by the broker long ago
        "tele/kitchen17/SENSOR",
        orjson.dumps(old),
        qos=1,
        retain=True,
        hostname=mosquitto.host,
        port=mosquitto.port,
    )
    extra = f'[local_broker]\nhost = "127.0.0.1"\nport = {wifi.port}'
    devices = (
        '[[devices]]\nid = "D-WIFI-1"\nkind = "detector"\nprofile = "mqtt-wifi-detector"\n'
        'transport = "mqtt"\nmqtt_id = "kitchen17"\ninterval = 0.5\n'
    )
    gw = GatewayThread(gateway_config(tmp_path, mosquitto, server, extra=extra, devices=devices))
    source = gw.gateway.mqtt_devices  # type: ignore[union-attr]
    assert source is not None
    try:
        collector.wait_until(lambda: gw.call(lambda: source.retained_ignored) == 1, timeout=10)
        collector.wait_until(lambda: gw.call(lambda: source.devices["D-WIFI-1"].state) == "lost")
        wifi.cut()  # the local link reconnects: the broker hands it the old value again
        collector.wait_until(lambda: gw.call(lambda: source.retained_ignored) == 2, timeout=10)
        time.sleep(0.3)
        assert gw.call(lambda: source.devices["D-WIFI-1"].state) == "lost", "not recovered"
        fresh = {"gas": {"lel": 2.0, "alarm": "OFF", "fault": "OFF"}, "temperature": 21.0}
        publish.single(
            "tele/kitchen17/SENSOR",
            orjson.dumps(fresh),
            qos=1,
            hostname=mosquitto.host,
            port=mosquitto.port,
        )
        collector.wait_until(
            lambda: any(not r["comm_lost"] for r in readings_of(collector, "D-WIFI-1")), timeout=5
        )
    finally:
        gw.stop()
        collector.close()
    sent = readings_of(collector, "D-WIFI-1")
    assert all(r["ch4_lel"] != 42.0 for r in sent), "the retained value was never forwarded"
    assert not any(c == "alarm" for c, _ in collector.batches), "nor its alarm"
    assert [r["ch4_lel"] for r in sent if not r["comm_lost"]] == [2.0]


def test_a_dead_unit_on_a_shared_port_leaves_the_others_most_of_their_poll_rate(
    sim_server: Callable[..., SimServer], mosquitto: Broker, tmp_path: Path
) -> None:
    server = sim_server(3, 3)  # six units behind one Modbus TCP port (a gateway device)
    config = gateway_config(tmp_path, mosquitto, server, interval=0.1, timeout=1.0)
    gw = GatewayThread(config)
    pollers = gw.gateway.pollers  # type: ignore[union-attr]
    others = [i for i in pollers if i != "D-0001"]

    def polls() -> dict[str, int]:
        return gw.call(lambda: {i: pollers[i].stats.polls for i in others})

    try:
        assert len(gw.call(lambda: gw.gateway.links)) == 1  # type: ignore[union-attr]
        time.sleep(0.5)
        start = polls()
        time.sleep(3.0)
        healthy = {i: n - start[i] for i, n in polls().items()}
        server.inject({"device": "D-0001", "type": "silent"})
        deadline = time.monotonic() + 10
        while gw.call(lambda: pollers["D-0001"].state) != "lost":
            assert time.monotonic() < deadline, "D-0001 was never reported lost"
            time.sleep(0.05)
        start = polls()
        time.sleep(3.0)
        with_dead = {i: n - start[i] for i, n in polls().items()}
        probes = gw.call(lambda: pollers["D-0001"].stats.polls)
    finally:
        gw.stop()
    assert probes >= 4, "the dead unit was still probed"
    for device in others:
        assert with_dead[device] >= 0.7 * healthy[device], (device, healthy, with_dead)
