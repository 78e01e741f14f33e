"""MQTT-native devices: simulated detectors and meters that publish wire-format batches
straight to a broker, with no gateway in between (Wi-Fi detectors, load tests).

The fleet publishes under one gateway id: telemetry batches of up to ``batch_size`` readings
per kind (QoS 1), and at once a one-reading batch on the alarm topic whenever a detector's own
alarm flag changes. ``seq`` increases per gateway id and is kept in a small state file, so a
restarted simulator does not reuse sequence numbers that ingest has already seen.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from firmware_sim.engine import Simulation
from firmware_sim.errors import SimError
from gasguard.fields import KINDS, Kind
from gasguard.wire import Batch, encode_batch, make_batch, topic

log = logging.getLogger(__name__)


class SeqCounter:
    """A per-gateway sequence number that survives restarts (kept in ``path`` when given)."""

    def __init__(self, path: Path | None = None, start: int = 1) -> None:
        self._path = path
        self._next = start
        if path is not None and path.exists():
            self._next = int(path.read_text().strip() or start)

    def take(self) -> int:
        seq = self._next
        self._next += 1
        if self._path is not None:
            self._save()
        return seq

    def _save(self) -> None:
        """Replace the file atomically, its new content on disk first (a power cut must not
        leave an empty file, and so a sequence that starts again at 1)."""
        assert self._path is not None
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        with open(tmp, "w", encoding="ascii") as f:
            f.write(str(self._next))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)
        folder = os.open(self._path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself
        finally:
            os.close(folder)


def snapshot_batches(
    sim: Simulation,
    gateway_id: str,
    seq: SeqCounter,
    batch_size: int,
    kinds: tuple[Kind, ...] = KINDS,
) -> Iterator[Batch]:
    """The current readings of every answering device, as wire batches."""
    now = sim.now_ms
    for kind in kinds:
        ids, cols = sim.readings(kind)
        for lo in range(0, len(ids), batch_size):
            part = slice(lo, lo + batch_size)
            n = len(ids[part])
            yield make_batch(
                gateway_id,
                seq.take(),
                kind,
                ids[part],
                np.full(n, now, dtype=np.int64),
                {k: v[part] for k, v in cols.items()},
            )


class MqttFleet:
    """Publishes a simulation's readings to an MQTT broker as MQTT-native devices."""

    def __init__(
        self,
        sim: Simulation,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        gateway_id: str = "sim-mqtt",
        batch_size: int = 200,
        seq_file: Path | None = None,
        username: str | None = None,
        password: str | None = None,
        max_inflight: int = 1000,
    ) -> None:
        topic(gateway_id, "telemetry")  # validates the id
        self.sim = sim
        self.gateway_id = gateway_id
        self.batch_size = batch_size
        self.seq = SeqCounter(seq_file)
        self.published = 0
        self._host, self._port = host, port
        self._last_alarm = sim.reported["detector"]["alarm"].copy()
        self._connected = threading.Event()
        self._refused: str | None = None
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"gasguard-sim-{gateway_id}",
            protocol=mqtt.MQTTv5,
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.max_inflight_messages_set(max_inflight)
        self._client.on_connect = self._on_connect
        self._client.will_set(topic(gateway_id, "state"), b"offline", qos=1, retain=True)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: object,
        reason: ReasonCode,
        props: object,
    ) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            log.error("broker %s:%d refused the simulator: %s", self._host, self._port, reason)
        else:
            log.info("simulator connected to broker %s:%d", self._host, self._port)
            client.publish(topic(self.gateway_id, "state"), b"online", qos=1, retain=True)
        self._connected.set()

    def connect(self, timeout: float = 10.0) -> None:
        try:
            self._client.connect(self._host, self._port, keepalive=30)
        except OSError as exc:
            raise SimError(f"cannot reach MQTT broker {self._host}:{self._port}: {exc}") from None
        self._client.loop_start()
        if not self._connected.wait(timeout) or self._refused:
            self.close()
            raise SimError(
                f"MQTT broker {self._host}:{self._port} "
                + (
                    f"refused the connection: {self._refused}"
                    if self._refused
                    else "did not answer"
                )
            )

    def publish_readings(self) -> list[mqtt.MQTTMessageInfo]:
        """Publish every answering device's current readings; returns the pending publishes."""
        infos = [
            self._publish("telemetry", b)
            for b in snapshot_batches(self.sim, self.gateway_id, self.seq, self.batch_size)
        ]
        return infos

    def publish_alarm_changes(self) -> list[mqtt.MQTTMessageInfo]:
        """A detector whose own alarm flag changed since the last call is published at once."""
        ids = self.sim.device_ids("detector")
        n = len(ids)
        shown = self.sim.reported["detector"]
        alarm = shown["alarm"][:n]
        answering = self.sim.answering("detector")
        changed = (alarm != self._last_alarm[:n]) & answering
        # Only what was published is remembered: a silent detector whose flag changed meanwhile
        # publishes the change when it answers again.
        self._last_alarm[:n] = np.where(answering, alarm, self._last_alarm[:n])
        infos = []
        for i in np.flatnonzero(changed):
            batch = make_batch(
                self.gateway_id,
                self.seq.take(),
                "detector",
                ids[i : i + 1],
                np.array([self.sim.now_ms], dtype=np.int64),
                {k: v[i : i + 1] for k, v in shown.items()},
            )
            infos.append(self._publish("alarm", batch))
        return infos

    def _publish(self, channel: str, batch: Batch) -> mqtt.MQTTMessageInfo:
        info = self._client.publish(topic(self.gateway_id, channel), encode_batch(batch), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise SimError(f"publish to the broker failed: {mqtt.error_string(info.rc)}")
        self.published += len(batch)
        return info

    def close(self) -> None:
        if self._connected.is_set() and not self._refused:
            self._client.publish(
                topic(self.gateway_id, "state"), b"offline", qos=1, retain=True
            ).wait_for_publish(2)
            self._client.disconnect()
        self._client.loop_stop()
