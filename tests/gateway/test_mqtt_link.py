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


def test_resolving_the_broker_name_does_not_block_the_loop(
    mosquitto: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket
    import time

    resolve = socket.getaddrinfo

    def slow_dns(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "broker.gasguard.test":
            time.sleep(1.0)  # a DNS server far away
            host = mosquitto.host
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_dns)
    link = quick_link(mosquitto, host="broker.gasguard.test", client_id="t-dns")
    gaps: list[float] = []

    async def body() -> None:
        last = time.monotonic()
        deadline = last + 10
        while not link.connected:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now
            assert now < deadline, "never connected"

    run_with(link, body)
    assert link.connects == 1
    assert sum(gaps) >= 1.0 and max(gaps) < 0.3, "the loop ran on while DNS answered"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A test CA, a broker certificate it signed for the name localhost, and another CA."""
    import subprocess

    folder = tmp_path_factory.mktemp("tls")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
                "-subj", f"/CN=GasGuard test {ca}")  # fmt: skip
    openssl("req", *ec, "-keyout", "broker.key", "-out", "broker.csr", "-subj", "/CN=localhost")
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost\n")
    openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "broker.pem", "-days", "2", "-extfile", "san.ext")  # fmt: skip
    return {name: str(folder / f"{name}.pem") for name in ("ca", "other-ca", "broker")} | {
        "key": str(folder / "broker.key")
    }


@pytest.mark.parametrize(
    ("host", "ca", "reason"),
    [
        ("localhost", "ca", None),
        ("127.0.0.1", "ca", "certificate verify failed: IP address mismatch"),
        (
            "localhost",
            "other-ca",
            "certificate verify failed: self-signed certificate in certificate chain",
        ),
        ("localhost", "missing", "CA file"),
    ],
    ids=["by-name", "name-mismatch", "wrong-ca", "missing-ca-file"],
)
def test_tls_checks_the_broker_certificate_against_its_name_while_connecting_by_address(
    broker_with: Callable[..., Broker],
    certificates: dict[str, str],
    caplog: pytest.LogCaptureFixture,
    host: str,
    ca: str,
    reason: str | None,
) -> None:
    broker = broker_with(
        f"allow_anonymous true\ncafile {certificates['ca']}\n"
        f"certfile {certificates['broker']}\nkeyfile {certificates['key']}"
    )
    ca_file = certificates.get(ca, "/nonexistent/ca.pem")
    link = quick_link(broker, host=host, tls=True, ca_file=ca_file, client_id="t-tls")

    async def body() -> None:
        if reason is None:
            assert await link.wait_connected(5)
            assert link.publish("t/tls", b"over TLS", qos=1) is not None
        else:
            await within(5, lambda: link.failed_attempts >= 3)

    with caplog.at_level(logging.ERROR, logger="gasguard.mqtt_link"):
        run_with(link, body)
    if reason is None:
        assert errors_of(caplog) == []
    else:
        assert len(errors_of(caplog)) == 1 and reason in errors_of(caplog)[0], errors_of(caplog)
