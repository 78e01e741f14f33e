"""A test subscriber that decodes and counts every GasGuard message arriving at a broker."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties

from gasguard.wire import Batch, decode_batch
from tests.conftest import Broker


@dataclass(frozen=True)
class Arrival:
    channel: str
    batch: Batch
    at: float  # epoch seconds when it arrived


class Collector:
    """Subscribes to ``gasguard/v1/#``; with ``persistent`` its session outlives broker restarts."""

    def __init__(
        self, broker: Broker, persistent: bool = False, client_id: str = "collector"
    ) -> None:
        self.arrivals: list[Arrival] = []
        self.state: dict[str, bytes] = {}
        self.results: list[bytes] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.on_connect = lambda c, *_: c.subscribe("gasguard/v1/#", qos=1)
        self.client.on_subscribe = lambda *_: self._ready.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 1.0)
        props = Properties(mqtt.PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if persistent:
            props.SessionExpiryInterval = 3600
        self.client.connect(broker.host, broker.port, clean_start=not persistent, properties=props)
        self.client.loop_start()
        assert self._ready.wait(5), "collector did not subscribe"

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        channel = msg.topic.split("/", 3)[3]
        with self._lock:
            if channel == "state":
                self.state[msg.topic] = msg.payload
            elif channel == "cmd/result":
                self.results.append(msg.payload)
            elif channel in ("telemetry", "alarm"):
                self.arrivals.append(Arrival(channel, decode_batch(msg.payload), time.time()))

    @property
    def batches(self) -> list[tuple[str, Batch]]:
        with self._lock:
            return [(a.channel, a.batch) for a in self.arrivals]

    def snapshot(self) -> list[Arrival]:
        with self._lock:
            return list(self.arrivals)

    def wait_for(self, count: int, timeout: float = 30.0) -> list[tuple[str, Batch]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.arrivals) >= count:
                    return [(a.channel, a.batch) for a in self.arrivals]
            time.sleep(0.02)
        raise AssertionError(f"{len(self.arrivals)} of {count} batches arrived")

    def wait_until(self, predicate: object, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():  # type: ignore[operator]
                return
            time.sleep(0.05)
        raise AssertionError("condition not met in time")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
