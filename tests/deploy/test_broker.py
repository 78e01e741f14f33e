"""The production broker: deploy/mosquitto/production.conf with the shared tuning, and the
ACL that lets each gateway publish under its own id only.

The ACL is checked twice: read here with a small matcher against the wire contract and the
topics the services really use, and enforced by a real Mosquitto started with the production
config, its files laid out as compose mounts them (integration).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import free_port, wait_for_port
from tests.deploy.compose_file import (
    DEPLOY,
    environment,
    host_path,
    mounts,
    operator_provided,
    services,
)


def mosquitto_conf(path: Path) -> list[tuple[str, str]]:
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            lines.append((key, value.strip()))
    return lines


def in_container(service: dict[str, Any], path: str) -> tuple[str, str, str]:
    """The mount that holds a container path: (kind, host source or volume, the rest)."""
    best = None
    for kind, source, target in mounts(service):
        pure, inside = PurePosixPath(target), PurePosixPath(path)
        if (pure == inside or pure in inside.parents) and (
            best is None or len(target) > len(best[2])
        ):
            best = (kind, source, target)
    assert best is not None, f"{path} is on no mount of the service"
    kind, source, target = best
    return kind, source, str(PurePosixPath(path).relative_to(target))


def test_the_production_broker_config_names_only_mounted_files() -> None:
    broker = services()["mosquitto"]
    command = broker["command"]
    kind, source, rest = in_container(broker, command[command.index("-c") + 1])
    main = host_path(source) / rest
    assert kind == "bind" and main == DEPLOY / "mosquitto/production.conf"
    conf = mosquitto_conf(main)
    files = [v for k, v in conf if k in ("password_file", "acl_file", "certfile", "keyfile",
                                         "cafile", "include_dir", "persistence_location")]  # fmt: skip
    assert len(files) == 7
    include_dir = dict(conf)["include_dir"]
    for path in files:
        if path == include_dir:  # a folder of single-file mounts: below
            continue
        kind, source, rest = in_container(broker, path)
        if kind == "volume":
            assert path.startswith("/mosquitto/data"), path  # only persistence on a volume
        elif not operator_provided(source):
            assert (host_path(source) / rest).exists(), f"{path} -> {source}/{rest}"
    included = [
        t for _, _s, t in mounts(broker) if PurePosixPath(t).parent == PurePosixPath(include_dir)
    ]
    assert included == [f"{include_dir}/gasguard.conf"]
    assert conf[-1][0] == "include_dir"  # Mosquitto's advice: last in the main file


def test_the_production_broker_keeps_the_tuning_and_requires_logins() -> None:
    conf = mosquitto_conf(DEPLOY / "mosquitto/production.conf")
    tuning = dict(mosquitto_conf(DEPLOY / "mosquitto/gasguard.conf"))
    for key in ("max_queued_messages", "max_inflight_messages"):
        assert tuning[key] == "0"  # no limit: Mosquitto's defaults drop and starve
        assert key not in dict(conf), f"production.conf must not undo {key}"
    assert tuning["persistence"] == "true"
    assert dict(conf)["allow_anonymous"] == "false"
    listeners = {}
    for key, value in conf:
        if key == "listener":
            current = listeners.setdefault(value, {})
        elif key in ("certfile", "keyfile", "cafile"):
            current[key] = value
    assert set(listeners) == {"1883", "8883"}
    assert set(listeners["8883"]) == {"certfile", "keyfile", "cafile"} and not listeners["1883"]
    published = " ".join(services()["mosquitto"]["ports"])
    assert ":8883" in published and "1883" not in published  # plain MQTT stays inside


def acl_rules() -> list[tuple[str | None, str, str]]:
    """(user, access, topic); user None for a pattern (with %u still in it)."""
    rules, user = [], None
    for key, value in mosquitto_conf(DEPLOY / "mosquitto/acl"):
        if key == "user":
            user = value
        elif key == "pattern":
            access, topic = value.split()
            rules.append((None, access, topic))
        else:
            assert key == "topic", key
            assert user is not None, "a topic line before any user would be for anonymous"
            access, topic = value.split()
            rules.append((user, access, topic))
    return rules


def matches(acl_topic: str, topic: str) -> bool:
    """MQTT wildcards of an ACL entry against a topic, or a subscription's filter (whose own
    + must meet a + of the ACL)."""
    want, have = acl_topic.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)


def allowed(user: str, access: str, topic: str) -> bool:
    for owner, granted, entry in acl_rules():
        if owner is not None and owner != user:
            continue
        acl_topic = entry.replace("%u", user) if owner is None else entry
        if access in granted and matches(acl_topic, topic):  # "readwrite" has both
            return True
    return False


ACL_CASES = [
    # (user, access, topic, allowed)
    ("GW-1", "write", "gasguard/v1/GW-1/telemetry", True),
    ("GW-1", "write", "gasguard/v1/GW-1/alarm", True),
    ("GW-1", "write", "gasguard/v1/GW-1/state", True),
    ("GW-1", "write", "gasguard/v1/GW-1/cmd/result", True),
    ("GW-1", "read", "gasguard/v1/GW-1/cmd", True),
    ("GW-1", "write", "gasguard/v1/GW-2/telemetry", False),  # never as another gateway
    ("GW-1", "write", "gasguard/v1/GW-2/alarm", False),
    ("GW-1", "write", "gasguard/v1/GW-2/cmd/result", False),
    ("GW-1", "write", "gasguard/v1/GW-1/cmd", False),  # commands come from the hotline only
    ("GW-1", "read", "gasguard/v1/GW-2/cmd", False),
    ("GW-1", "read", "gasguard/v1/GW-2/telemetry", False),
    ("GW-1", "read", "gasguard/v1/+/cmd", False),
    ("GW-1", "write", "gasguard/v1/GW-1/other", False),
    ("gasguard-ingest", "read", "gasguard/v1/GW-1/telemetry", True),
    ("gasguard-ingest", "read", "gasguard/v1/GW-1/alarm", True),
    ("gasguard-ingest", "read", "gasguard/v1/GW-1/state", True),
    ("gasguard-ingest", "read", "gasguard/v1/GW-1/cmd", False),
    ("gasguard-ingest", "write", "gasguard/v1/GW-1/cmd", False),
    ("gasguard-ingest", "write", "gasguard/v1/GW-1/telemetry", False),
    ("gasguard-hotline", "write", "gasguard/v1/GW-1/cmd", True),
    ("gasguard-hotline", "read", "gasguard/v1/GW-1/cmd/result", True),
    ("gasguard-hotline", "write", "gasguard/v1/GW-1/cmd/result", False),
    ("gasguard-hotline", "write", "gasguard/v1/GW-1/telemetry", False),
    ("gasguard-hotline", "read", "gasguard/v1/GW-1/telemetry", False),
    ("someone", "read", "gasguard/v1/GW-1/telemetry", False),
]


@pytest.mark.parametrize(("user", "access", "topic", "expected"), ACL_CASES)
def test_the_acl_lets_each_user_do_its_part_only(
    user: str, access: str, topic: str, expected: bool
) -> None:
    assert allowed(user, access, topic) is expected


def test_the_acl_covers_what_the_services_really_subscribe_and_publish() -> None:
    from alerting.valve import RESULT_TOPIC
    from gasguard.wire import CHANNELS, topic
    from ingest.consumer import Ingest, shard_of

    env = {name: environment(s) for name, s in services().items()}
    ingest_user = env["ingest"]["GASGUARD_MQTT_USERNAME"]
    hotline_user = env["hotline"]["GASGUARD_MQTT_USERNAME"]
    assert {ingest_user, hotline_user} == {u for u, _, _ in acl_rules() if u is not None}
    # ingest, one consumer and sharded (per-gateway topics)
    gateways = {f"GW-{i:04d}" for i in range(20)}
    for shards, shard in ((1, 0), (3, 1)):
        fake = SimpleNamespace(
            settings=SimpleNamespace(ingest_shards=shards, ingest_shard=shard),
            registry=SimpleNamespace(gateways=gateways),
        )
        subscriptions = Ingest._subscriptions(fake)  # type: ignore[arg-type]
        assert subscriptions
        for wanted, _qos in subscriptions:
            assert allowed(ingest_user, "read", wanted), wanted
        if shards > 1:
            assert all(shard_of(t.split("/")[2], shards) == shard for t, _ in subscriptions)
    # the hotline's valve bridge
    assert allowed(hotline_user, "read", RESULT_TOPIC)
    assert allowed(hotline_user, "write", topic("GW-0001", "cmd"))
    # a gateway: every channel of the wire contract goes one way only
    for channel in CHANNELS:
        writes = allowed("GW-0001", "write", topic("GW-0001", channel))
        reads = allowed("GW-0001", "read", topic("GW-0001", channel))
        assert writes != reads, channel
        assert reads == (channel == "cmd"), channel


# --------------------------------------------------------------------------- real broker


def make_certificates(folder: Path) -> None:
    """A throw-away CA and a server certificate for 127.0.0.1, made with openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: no certificates for the TLS listener")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=GasGuard test CA")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost")  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.ext")  # fmt: skip


class Client:
    """A paho client that records what it receives."""

    def __init__(self, port: int, user: str | None, password: str | None,
                 ca: Path | None = None, name: str = "") -> None:  # fmt: skip
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.received: list[tuple[str, bytes]] = []
        self.granted: list[int] = []
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.subscribed = threading.Event()
        self.refused: int | None = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"t-{name or user}-{port}",
                                  protocol=mqtt.MQTTv5)  # fmt: skip
        self.client.on_disconnect = lambda *_: self.disconnected.set()
        if user is not None:
            self.client.username_pw_set(user, password)
        if ca is not None:
            self.client.tls_set(ca_certs=str(ca))
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda _c, _u, m: self.received.append((m.topic, m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(self, _c: object, _u: object, _f: object, reason: Any, _p: object) -> None:
        if reason.is_failure:
            self.refused = reason.value
        self.connected.set()

    def _on_subscribe(self, _c: object, _u: object, _m: object, codes: Any, _p: object) -> None:
        self.granted = [c.value for c in codes]
        self.subscribed.set()

    def ready(self) -> bool:
        return self.connected.wait(10) and self.refused is None

    def subscribe(self, topic: str) -> list[int]:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(10)
        return self.granted

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def publish_denied(self, topic: str, payload: bytes) -> None:
        """A publish the ACL refuses: Mosquitto drops it, and may drop the connection too
        (it does with max_queued_messages 0), so wait for whichever comes first."""
        info = self.client.publish(topic, payload, qos=1)
        for _ in range(100):
            if info.is_published() or self.disconnected.is_set():
                return
            threading.Event().wait(0.05)
        raise AssertionError(f"the broker neither acknowledged nor dropped {topic}")

    def wait_for(self, payload: bytes) -> None:
        for _ in range(200):
            if any(p == payload for _, p in self.received):
                return
            threading.Event().wait(0.05)
        raise AssertionError(f"{payload!r} never arrived: {self.received}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def production_broker(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    """Mosquitto with deploy/mosquitto/production.conf and the ACL, its files laid out as
    compose mounts them; returns (plain port, TLS port, CA file)."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        pytest.fail("mosquitto is not installed (scripts/services installs it)")
    root = tmp_path / "container"  # the container's file system, by compose's mounts
    stand_ins = {"certs": tmp_path / "certs", "mqtt-users": tmp_path / "users"}
    for folder in stand_ins.values():
        folder.mkdir()
    make_certificates(stand_ins["certs"])
    passwd = stand_ins["mqtt-users"] / "passwd"
    passwd.touch()
    for user in ("GW-1", "GW-2", "gasguard-ingest", "gasguard-hotline"):
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, f"pw-{user}"], check=True)
    broker = services()["mosquitto"]
    for kind, source, target in mounts(broker):
        inside = root / target.lstrip("/")
        inside.parent.mkdir(parents=True, exist_ok=True)
        if kind == "volume":
            inside.mkdir()
        elif operator_provided(source):
            inside.symlink_to(stand_ins[host_path(source).relative_to(DEPLOY).parts[0]])
        else:
            inside.symlink_to(host_path(source))
    plain, tls = free_port(), free_port()
    text = (DEPLOY / "mosquitto/production.conf").read_text()
    text = text.replace(" /mosquitto/", f" {root}/mosquitto/")
    text = text.replace("listener 1883\n", f"listener {plain} 127.0.0.1\n")
    text = text.replace("listener 8883\n", f"listener {tls} 127.0.0.1\n")
    log = tmp_path / "mosquitto.log"
    text = text.replace("log_dest stdout", f"log_dest file {log}")
    # as root, mosquitto would switch to its own user, who cannot read tmp_path
    conf = tmp_path / "main.conf"
    conf.write_text("user root\n" + text)
    process = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_for_port(plain)
        wait_for_port(tls)
        yield plain, tls, stand_ins["certs"] / "ca.crt"
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.integration
def test_the_production_broker_enforces_logins_tls_and_the_acl(
    production_broker: tuple[int, int, Path],
) -> None:
    plain, tls, ca = production_broker
    anonymous = Client(plain, None, None)
    wrong = Client(tls, "GW-1", "not-the-password", ca)
    assert not anonymous.ready() and not wrong.ready()
    anonymous.close()
    wrong.close()
    ingest = Client(plain, "gasguard-ingest", "pw-gasguard-ingest")
    hotline = Client(plain, "gasguard-hotline", "pw-gasguard-hotline")
    gw1 = Client(tls, "GW-1", "pw-GW-1", ca)  # gateways come over TLS
    try:
        assert ingest.ready() and hotline.ready() and gw1.ready()
        assert ingest.subscribe("gasguard/v1/+/telemetry") == [1]
        assert hotline.subscribe("gasguard/v1/+/cmd/result") == [1]
        assert gw1.subscribe("gasguard/v1/GW-1/cmd") == [1]
        gw1.subscribe("gasguard/v1/GW-2/cmd")  # granted, but no message of it is delivered
        # a gateway publishes as itself only, and never a command
        for i, topic in enumerate(("gasguard/v1/GW-2/telemetry", "gasguard/v1/GW-1/cmd")):
            forger = Client(tls, "GW-1", "pw-GW-1", ca, name=f"forger-{i}")
            assert forger.ready()
            forger.publish_denied(topic, b"forged")
            forger.close()
        gw1.publish("gasguard/v1/GW-1/telemetry", b"own")
        ingest.wait_for(b"own")
        assert [p for _, p in ingest.received] == [b"own"]
        # commands come from the hotline, to the one gateway, and it answers
        hotline.publish("gasguard/v1/GW-2/cmd", b"for another gateway")
        hotline.publish("gasguard/v1/GW-1/cmd", b"close")
        gw1.wait_for(b"close")
        assert [p for _, p in gw1.received] == [b"close"]
        gw1.publish("gasguard/v1/GW-1/cmd/result", b"done")
        hotline.wait_for(b"done")
        assert not gw1.disconnected.is_set()
    finally:
        for client in (ingest, hotline, gw1):
            client.close()
