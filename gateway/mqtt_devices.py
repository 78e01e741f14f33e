"""Devices that speak MQTT themselves (Wi-Fi detectors publishing their own JSON to the
building's broker): their messages are mapped through their MQTT profile into readings that go
into the same batches, spool and rules as Modbus readings. A device that falls silent for
three of its intervals is reported lost, like a Modbus device that stops answering.

Retained messages are ignored: the broker hands them to every new subscription, and they are
old values, never to be sent on as fresh ones (nor taken as a lost device's recovery).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from gasguard.mqtt_link import MqttLink, MqttOptions
from gasguard.profiles.mqtt import MessageError, MqttProfile, decode_message
from gateway.config import LocalBrokerConfig, MqttDevice
from gateway.poller import PollStats, Reading, Sink

log = logging.getLogger(__name__)


@dataclass
class _Tracked:
    device: MqttDevice
    profile: MqttProfile
    interval: float
    heartbeat: float
    stats: PollStats
    state: str = "unknown"
    last_seen: float = 0.0
    last_report: float = -math.inf
    last_alarm: bool | None = None
    error_logged: bool = False


class MqttDeviceSource:
    def __init__(
        self,
        gateway_id: str,
        devices: list[
            tuple[MqttDevice, MqttProfile, float, float]
        ],  # device, profile, interval, heartbeat
        broker: LocalBrokerConfig,
        sink: Sink,
    ) -> None:
        self._sink = sink
        self._by_topic: dict[str, _Tracked] = {}
        for device, profile, interval, heartbeat in devices:
            tracked = _Tracked(
                device, profile, interval, heartbeat, PollStats(), last_seen=time.monotonic()
            )
            self._by_topic[profile.topic_for(device.mqtt_id or device.id)] = tracked
        subscriptions = tuple(
            sorted({(t.profile.subscription(), 1) for t in self._by_topic.values()})
        )
        self.link = MqttLink(
            MqttOptions(
                host=broker.host,
                port=broker.port,
                client_id=f"gasguard-gw-{gateway_id}-local",
                username=broker.username,
                password=broker.password,
                tls=broker.tls,
                ca_file=broker.ca_file,
                keepalive=broker.keepalive,
                subscriptions=subscriptions,
            )
        )
        self.link.on_message = self._on_message
        self.rejected = 0
        self.retained_ignored = 0

    @property
    def devices(self) -> dict[str, _Tracked]:
        return {t.device.id: t for t in self._by_topic.values()}

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        tracked = self._by_topic.get(msg.topic)
        if tracked is None:
            return  # another device on the building's broker, not ours
        if msg.retain:
            self.retained_ignored += 1
            log.debug(
                "%s: retained message on %s ignored (an old value)", tracked.device.id, msg.topic
            )
            return
        tracked.stats.polls += 1
        try:
            ts_ms, values = decode_message(
                tracked.profile, bytes(msg.payload), int(time.time() * 1000)
            )
        except MessageError as exc:
            self.rejected += 1
            tracked.stats.failures += 1
            tracked.stats.last_error = str(exc)
            if not tracked.error_logged:
                log.error("%s: unusable message on %s: %s", tracked.device.id, msg.topic, exc)
                tracked.error_logged = True
            return
        tracked.error_logged = False
        if tracked.state == "lost":
            log.warning("%s recovered: publishing again", tracked.device.id)
        tracked.state = "ok"
        tracked.last_seen = time.monotonic()
        tracked.stats.last_ok_ms = ts_ms
        alarm = values.get("alarm")
        urgent = (
            tracked.device.kind == "detector"
            and isinstance(alarm, bool)
            and alarm != bool(tracked.last_alarm)
            and (tracked.last_alarm is not None or alarm)
        )
        if isinstance(alarm, bool):
            tracked.last_alarm = alarm
        self._emit(tracked, ts_ms, values, urgent)

    def _emit(
        self, tracked: _Tracked, ts_ms: int, values: dict[str, float | bool] | None, urgent: bool
    ) -> None:
        fields = tuple(f.name for f in tracked.profile.fields) if values is None else tuple(values)
        tracked.last_report = time.monotonic()
        tracked.stats.reports += 1
        self._sink(Reading(tracked.device.id, tracked.device.kind, ts_ms, fields, values), urgent)

    def check_silence(self) -> None:
        """Devices quiet for three intervals are lost; lost ones are re-reported at heartbeat."""
        now = time.monotonic()
        for tracked in self._by_topic.values():
            quiet = now - tracked.last_seen >= 3 * tracked.interval
            if quiet and tracked.state != "lost":
                log.error(
                    "%s lost: no message for %.0f s", tracked.device.id, now - tracked.last_seen
                )
                tracked.state = "lost"
                self._emit(tracked, int(time.time() * 1000), None, False)
            elif tracked.state == "lost" and now - tracked.last_report >= tracked.heartbeat:
                self._emit(tracked, int(time.time() * 1000), None, False)

    async def run(self, stop: asyncio.Event) -> None:
        link = asyncio.create_task(self.link.run())
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
                self.check_silence()
        finally:
            await self.link.stop(send_offline=False)
            link.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await link
