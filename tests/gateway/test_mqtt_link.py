"""The MQTT link the gateway forwards and takes commands over (gasguard.mqtt_link), against a
real Mosquitto: what the owner's callbacks raise, brokers that cannot be reached, DNS."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from gasguard.backoff import Backoff
from gasguard.mqtt_link import MqttLink, MqttOptions
from tests.conftest import Broker

pytestmark = pytest.mark.integration


def quick_link(broker: Broker, **options: Any) -> MqttLink:
    """A link that retries within a fraction of a second."""
    options = {"host": broker.host, "port": broker.port, "connect_timeout": 2.0} | options
    return MqttLink(MqttOptions(**options), backoff=Backoff(base=0.05, cap=0.2))


async def within(seconds: float, condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.01)


def run_with(link: MqttLink, body: Callable[[], Awaitable[None]]) -> list[dict[str, Any]]:
    """Run the link and ``body`` in a fresh loop; the errors the loop itself reported."""
    loop_errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
        task = asyncio.create_task(link.run())
        try:
            await body()
        finally:
            await link.stop(send_offline=False)
            async with asyncio.timeout(5):
                await task  # stop() ends run()

    asyncio.run(main())
    return loop_errors


def test_an_exception_in_a_callback_is_logged_once_and_never_reaches_paho(
    mosquitto: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    link = quick_link(mosquitto, client_id="t-callbacks", subscriptions=(("t/callbacks", 1),))
    got: list[bytes] = []
    acked: list[int] = []

    def on_message(msg: mqtt.MQTTMessage) -> None:
        got.append(bytes(msg.payload))
        raise RuntimeError("a bug in the owner's on_message")

    def on_published(mid: int, ok: bool) -> None:
        acked.append(mid)
        raise KeyError(mid)

    link.on_message = on_message
    link.on_published = on_published

    async def body() -> None:
        assert await link.wait_connected(5)
        await asyncio.sleep(0.2)  # the SUBACK
        for i in range(5):
            link.publish("t/callbacks", b"%d" % i, qos=1)
        await within(5, lambda: len(got) >= 5 and len(acked) >= 5)
        await asyncio.sleep(0.3)  # anything handled twice would show now
        assert link.connected, "the link survived its owner's bugs"

    with caplog.at_level(logging.ERROR, logger="gasguard.mqtt_link"):
        loop_errors = run_with(link, body)
    assert got == [b"0", b"1", b"2", b"3", b"4"], "each message handled once"
    assert len(acked) == 5
    assert link.callback_errors == 10
    logged = [r for r in caplog.records if r.name == "gasguard.mqtt_link"]
    assert sorted(r.getMessage().split(": ")[1].split()[0] for r in logged) == [
        "on_message",
        "on_published",
    ], "logged once per callback"
    assert all(r.exc_info is not None for r in logged), "with the traceback"
    assert loop_errors == [], "nothing escaped into the event loop"


def errors_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name == "gasguard.mqtt_link"
    ]


def test_the_first_failure_to_reach_the_broker_is_an_error_then_quiet_until_it_connects(
    broker_with: Callable[..., Broker], caplog: pytest.LogCaptureFixture
) -> None:
    broker = broker_with("allow_anonymous true", start=False)
    link = quick_link(broker, client_id="t-unreachable")

    async def body() -> None:
        await within(5, lambda: link.failed_attempts >= 5)
        assert len(errors_of(caplog)) == 1, "one error for five failed attempts"
        await asyncio.to_thread(broker.start)
        assert await link.wait_connected(5)
        assert link.failed_attempts == 0
        await asyncio.to_thread(broker.stop)  # lost again: a new episode, a new error
        await within(5, lambda: link.failed_attempts >= 5)

    with caplog.at_level(logging.DEBUG, logger="gasguard.mqtt_link"):
        run_with(link, body)
    where = f"cannot connect to MQTT broker 127.0.0.1:{broker.port}"
    assert [e.split(": ")[0] for e in errors_of(caplog)] == [where, where]
    assert "Connect call failed" in errors_of(caplog)[0]
    assert any(
        r.levelno == logging.INFO and "reached after" in r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize(
    ("listener", "host", "reason"),
    [
        ("allow_anonymous false", "127.0.0.1", "the broker refused the connection"),
        ("allow_anonymous true", "broker.gasguard.invalid", "Name or service not known"),
    ],
    ids=["connack-refused", "dns"],
)
def test_a_broker_that_refuses_or_cannot_be_resolved_is_one_error(
    broker_with: Callable[..., Broker],
    caplog: pytest.LogCaptureFixture,
    listener: str,
    host: str,
    reason: str,
) -> None:
    broker = broker_with(listener)
    link = quick_link(broker, host=host, client_id="t-refused")

    async def body() -> None:
        await within(10, lambda: link.failed_attempts >= 4)

    with caplog.at_level(logging.DEBUG, logger="gasguard.mqtt_link"):
        run_with(link, body)
    assert len(errors_of(caplog)) == 1
    assert reason in errors_of(caplog)[0], errors_of(caplog)
    assert not link.connected
