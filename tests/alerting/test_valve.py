"""Valve commands from a ticket through the real broker to a real gateway and simulated meters,
and their results back onto the ticket."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt import publish
from paho.mqtt.enums import CallbackAPIVersion

from alerting.valve import ValveBridge, ValveError, parse_result, request_valve
from gasguard.mqtt_link import MqttOptions
from tests.collector import Collector
from tests.conftest import Broker
from tests.gateway.conftest import GatewayThread, SimServer, gateway_config, sim_server
from tests.ingest.conftest import register, registry_csv

pytestmark = pytest.mark.integration
__all__ = ["sim_server"]  # the gateway tests' fixture, used here too

GATEWAY = "GW-T"  # the gateway id of gateway_config()


async def until(
    check: Callable[[], Awaitable[bool] | bool], timeout: float = 15.0, what: str = "condition"
) -> None:
    """Wait for a condition (a plain or an async check) without blocking the loop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        met = check()
        if await met if inspect.isawaitable(met) else met:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not met within {timeout} s")


async def open_ticket(conn: psycopg.AsyncConnection[Any], household: str, device: str) -> int:
    cur = await conn.execute(
        "INSERT INTO tickets (category, priority, household_id, device_id, cause, source, owner, "
        "resolve_due) VALUES ('emergency_repair', 'critical', %s, %s, 'gas_leak', 'alarm', "
        "'system:alarms', now() + interval '4 hours') RETURNING id",
        (household, device),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def request(conn: psycopg.AsyncConnection[Any], ticket: int, device: str, action: str) -> str:
    async with conn.transaction(), conn.cursor() as cur:
        return await request_valve(cur, ticket, device, action, "dispatcher:ann")


async def command(conn: psycopg.AsyncConnection[Any], command_id: str) -> tuple[Any, ...]:
    cur = await conn.execute(
        "SELECT status, reason, sent_at IS NOT NULL, result_at IS NOT NULL FROM valve_commands "
        "WHERE id = %s",
        (command_id,),
    )
    row = await cur.fetchone()
    assert row is not None, command_id
    return tuple(row)


async def events(conn: psycopg.AsyncConnection[Any], ticket: int) -> list[tuple[str, Any]]:
    cur = await conn.execute(
        "SELECT kind, detail FROM ticket_events WHERE ticket_id = %s ORDER BY id", (ticket,)
    )
    return [(str(kind), detail) for kind, detail in await cur.fetchall()]


async def status_is(conn: psycopg.AsyncConnection[Any], command_id: str, status: str) -> bool:
    return bool((await command(conn, command_id))[0] == status)


@contextlib.asynccontextmanager
async def running(bridge: ValveBridge) -> AsyncIterator[ValveBridge]:
    task = asyncio.create_task(bridge.run())
    try:
        assert await bridge.link.wait_connected(10), "the bridge did not reach the broker"
        yield bridge
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert not bridge.link.connected


def bridge_for(database: str, broker: Broker, **extra: Any) -> ValveBridge:
    options = MqttOptions(host=broker.host, port=broker.port)
    return ValveBridge(database, options, instance=f"test-{uuid.uuid4().hex[:8]}", **extra)


def gateway_ready(collector: Collector) -> None:
    """The gateway publishes ``online`` after its command subscription, on the same connection:
    once the broker shows it, a command cannot arrive before the subscription."""
    collector.wait_until(
        lambda: collector.state.get(f"gasguard/v1/{GATEWAY}/state") == b"online", timeout=15
    )


def test_close_valve_through_the_bridge_closes_the_simulated_meter(
    sim_server: Callable[..., SimServer], mosquitto: Broker, database: str, tmp_path: Path
) -> None:
    server = sim_server(1, 1)
    register(database, registry_csv(tmp_path / "r.csv", GATEWAY, 1, 1))
    server.inject({"device": "M-0001", "type": "continuous_flow", "flow_m3h": 0.8})
    server.call(server.sim.step)
    assert server.values("M-0001")["flow_m3h"] >= 0.8
    collector = Collector(mosquitto)
    gw = GatewayThread(gateway_config(tmp_path, mosquitto, server))

    async def scenario() -> tuple[str, int, ValveBridge]:
        async with (
            await psycopg.AsyncConnection.connect(database, autocommit=True) as conn,
            running(bridge_for(database, mosquitto)) as bridge,
        ):
            garbage = f"gasguard/v1/{GATEWAY}/cmd/result"
            publish.single(
                garbage, b"{not json", qos=1, hostname=mosquitto.host, port=mosquitto.port
            )
            await until(lambda: bridge.malformed == 1, what="malformed counted")
            ticket = await open_ticket(conn, "H-0001", "M-0001")
            command_id = await request(conn, ticket, "M-0001", "close_valve")
            bridge.wake()
            await until(lambda: status_is(conn, command_id, "done"), what="command done")
            assert await command(conn, command_id) == ("done", None, True, True)
            cur = await conn.execute("SELECT valve_state FROM tickets WHERE id = %s", (ticket,))
            assert await cur.fetchone() == ("closed",)
            kinds = await events(conn, ticket)
            assert [k for k, _ in kinds] == ["valve_requested", "valve_sent", "valve_done"]
            assert kinds[0][1] == {
                "command": command_id,
                "device": "M-0001",
                "action": "close_valve",
            }
            assert kinds[2][1]["status"] == "done"
            return command_id, ticket, bridge

    try:
        gateway_ready(collector)
        command_id, ticket, bridge = asyncio.run(scenario())
    finally:
        gw.stop()
        collector.close()
    assert command_id == f"T{ticket}-1"
    assert (bridge.sent, bridge.done, bridge.failed, bridge.timeouts) == (1, 1, 0, 0)
    assert server.values("M-0001")["valve_closed"] is True
    server.call(server.sim.step)
    assert server.values("M-0001")["flow_m3h"] == 0.0, "no gas flows behind a closed valve"


def test_a_device_the_gateway_does_not_have_fails_with_unknown_device(
    sim_server: Callable[..., SimServer], mosquitto: Broker, database: str, tmp_path: Path
) -> None:
    server = sim_server(1, 1)  # the gateway serves D-0001 and M-0001 only
    register(database, registry_csv(tmp_path / "r.csv", GATEWAY, 1, 2))  # M-0002 too
    collector = Collector(mosquitto)
    gw = GatewayThread(gateway_config(tmp_path, mosquitto, server))

    async def scenario() -> None:
        async with (
            await psycopg.AsyncConnection.connect(database, autocommit=True) as conn,
            running(bridge_for(database, mosquitto)) as bridge,
        ):
            ticket = await open_ticket(conn, "H-0002", "M-0002")
            command_id = await request(conn, ticket, "M-0002", "close_valve")
            bridge.wake()
            await until(lambda: status_is(conn, command_id, "failed"), what="command failed")
            status, reason, _, result_at = await command(conn, command_id)
            assert status == "failed" and result_at
            assert reason.startswith("unknown_device") and "M-0002" in reason, reason
            cur = await conn.execute("SELECT valve_state FROM tickets WHERE id = %s", (ticket,))
            assert await cur.fetchone() == (None,), "the valve state is unknown"
            kinds = await events(conn, ticket)
            assert [k for k, _ in kinds] == ["valve_requested", "valve_sent", "valve_failed"]
            assert kinds[2][1]["status"] == "unknown_device" and kinds[2][1]["reason"] == reason
            assert (bridge.done, bridge.failed) == (0, 1)

    try:
        gateway_ready(collector)
        asyncio.run(scenario())
    finally:
        gw.stop()
        collector.close()


def test_without_a_gateway_the_command_times_out_and_a_late_result_is_still_recorded(
    mosquitto: Broker, database: str, tmp_path: Path
) -> None:
    register(database, registry_csv(tmp_path / "r.csv", GATEWAY, 1, 1))

    def answer(gateway: str, body: dict[str, object]) -> None:
        topic = f"gasguard/v1/{gateway}/cmd/result"
        payload = orjson.dumps(body)
        publish.single(topic, payload, qos=1, hostname=mosquitto.host, port=mosquitto.port)

    async def scenario() -> None:
        async with (
            await psycopg.AsyncConnection.connect(database, autocommit=True) as conn,
            running(bridge_for(database, mosquitto, timeout_s=1.0)) as bridge,
        ):
            ticket = await open_ticket(conn, "H-0001", "M-0001")
            command_id = await request(conn, ticket, "M-0001", "close_valve")
            bridge.wake()
            await until(lambda: status_is(conn, command_id, "sent"), what="command sent")
            sent = time.monotonic()
            # another gateway cannot answer for this one's device
            answer("GW-OTHER", {"id": command_id, "status": "done"})
            await until(lambda: bridge.malformed == 1, what="spoof ignored")
            await until(lambda: status_is(conn, command_id, "timeout"), what="command timed out")
            assert time.monotonic() - sent >= 0.9, "not before timeout_s"
            assert (await command(conn, command_id))[1] == "no result within 1 s"
            kinds = await events(conn, ticket)
            assert [k for k, _ in kinds] == ["valve_requested", "valve_sent", "valve_timeout"]
            assert kinds[2][1]["command"] == command_id
            assert bridge.timeouts == 1

            # the gateway was away and ran the command later (within its expiry): the ticket
            # shows the valve as it really is
            answer(GATEWAY, {"id": command_id, "device": "M-0001", "status": "done"})
            await until(lambda: status_is(conn, command_id, "done"), what="late result")
            kinds = await events(conn, ticket)
            assert kinds[-1][0] == "valve_done" and kinds[-1][1]["late"] is True
            cur = await conn.execute("SELECT valve_state FROM tickets WHERE id = %s", (ticket,))
            assert await cur.fetchone() == ("closed",)

    asyncio.run(scenario())


def test_request_valve_for_an_unknown_device_names_it(database: str, tmp_path: Path) -> None:
    register(database, registry_csv(tmp_path / "r.csv", GATEWAY, 1, 1))

    async def scenario() -> None:
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            ticket = await open_ticket(conn, "H-0001", "M-0001")
            with pytest.raises(ValveError, match="'M-9999'"):
                await request(conn, ticket, "M-9999", "close_valve")
            with pytest.raises(ValveError, match="unknown valve action 'explode'"):
                await request(conn, ticket, "M-0001", "explode")
            cur = await conn.execute("SELECT count(*) FROM valve_commands")
            assert await cur.fetchone() == (0,)
            assert await events(conn, ticket) == []
            # numbering continues per ticket
            assert await request(conn, ticket, "M-0001", "close_valve") == f"T{ticket}-1"
            assert await request(conn, ticket, "M-0001", "open_valve") == f"T{ticket}-2"

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"id": "T1-1", "status": "done", "ts": 1}', ("T1-1", "done", None)),
        (
            b'{"id": "T1-1", "status": "failed", "reason": "no answer"}',
            ("T1-1", "failed", "failed: no answer"),
        ),
        (b'{"id": "T1-1", "status": "not_writable"}', ("T1-1", "not_writable", "not_writable")),
        (
            b'{"id": "T1-1", "status": "failed", "reason": "a\\u0000b"}',
            ("T1-1", "failed", "failed: ab"),
        ),
    ],
)
def test_parse_result(payload: bytes, expected: tuple[str, str, str | None]) -> None:
    assert parse_result(payload) == expected


@pytest.mark.parametrize(
    "payload", [b"{not json", b"[1]", b'{"id": "T1-1"}', b'{"id": 7, "status": "done"}']
)
def test_parse_result_says_why_a_result_is_malformed(payload: bytes) -> None:
    assert isinstance(parse_result(payload), str)


def test_a_command_carries_a_message_expiry_so_a_queued_one_never_runs_late(
    mosquitto: Broker, database: str, tmp_path: Path
) -> None:
    register(database, registry_csv(tmp_path / "r.csv", GATEWAY, 1, 1))
    seen: list[mqtt.MQTTMessage] = []
    subscribed = threading.Event()
    gateway = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fake-gw", protocol=mqtt.MQTTv5)
    gateway.on_connect = lambda c, *_: c.subscribe(f"gasguard/v1/{GATEWAY}/cmd", qos=1)
    gateway.on_subscribe = lambda *_: subscribed.set()
    gateway.on_message = lambda c, u, msg: seen.append(msg)
    gateway.connect(mosquitto.host, mosquitto.port)
    gateway.loop_start()

    async def scenario() -> str:
        async with (
            await psycopg.AsyncConnection.connect(database, autocommit=True) as conn,
            running(bridge_for(database, mosquitto, expiry_s=60)) as bridge,
        ):
            ticket = await open_ticket(conn, "H-0001", "M-0001")
            command_id = await request(conn, ticket, "M-0001", "close_valve")
            bridge.wake()
            await until(lambda: bool(seen), what="command delivered")
            return command_id

    try:
        assert subscribed.wait(5)
        command_id = asyncio.run(scenario())
    finally:
        gateway.disconnect()
        gateway.loop_stop()
    assert orjson.loads(seen[0].payload) == {
        "id": command_id,
        "device": "M-0001",
        "action": "close_valve",
    }
    assert seen[0].qos == 1
    assert 55 <= seen[0].properties.MessageExpiryInterval <= 60  # type: ignore[union-attr]


def test_the_bridge_reconnects_to_the_database_and_logs_the_loss_once(
    mosquitto: Broker, database: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    register(database, registry_csv(tmp_path / "r.csv", GATEWAY, 1, 1))
    caplog.set_level(logging.INFO, logger="alerting.valve")

    async def scenario() -> None:
        async with (
            await psycopg.AsyncConnection.connect(database, autocommit=True) as conn,
            running(bridge_for(database, mosquitto)) as bridge,
        ):
            ticket = await open_ticket(conn, "H-0001", "M-0001")

            async def bridge_connected() -> bool:
                cur = await conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
                )
                return await cur.fetchone() == (1,)

            await until(bridge_connected, what="the bridge's database connection")
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend'"  # not an autovacuum worker
            )
            command_id = await request(conn, ticket, "M-0001", "close_valve")
            bridge.wake()
            await until(lambda: status_is(conn, command_id, "sent"), what="sent after reconnect")
            assert bridge.sent == 1

    asyncio.run(scenario())
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    lost = [m for m in messages if "database unavailable" in m[1]]
    assert len(lost) == 1 and lost[0][0] == "ERROR", messages
    assert ("INFO", "valve bridge: database reachable again") in messages
