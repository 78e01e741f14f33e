"""The gateway: pollers and MQTT-native devices -> batcher -> spool -> forwarder -> broker;
commands from the broker -> the device's link. ``run`` until stopped; ``check`` once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gasguard.mqtt_link import MqttLink, MqttOptions, Will
from gasguard.profiles import Profile
from gasguard.profiles.mqtt import MqttProfile
from gasguard.wire import topic
from gateway.batcher import Batcher
from gateway.commands import CommandHandler
from gateway.config import Device, GatewayConfig, MqttDevice, SerialDevice, TcpDevice
from gateway.forwarder import Forwarder
from gateway.links import ModbusLink, serial_link, tcp_link
from gateway.metrics import MetricsServer
from gateway.mqtt_devices import MqttDeviceSource
from gateway.poller import DevicePoller, PollSettings, Reading
from gateway.spool import Spool

log = logging.getLogger(__name__)


COMMAND_GRACE_S = 10.0  # a stop waits this long for running commands (a write and a read-back)


class GatewayCrashError(RuntimeError):
    """A task of the gateway failed (or ended) unexpectedly; the gateway stopped after it."""


def poll_settings(config: GatewayConfig, device: Device) -> PollSettings:
    p = config.polling
    return PollSettings(
        interval=float(config.setting(device, "interval")),
        timeout=float(config.setting(device, "timeout")),
        report=str(config.setting(device, "report")),  # type: ignore[arg-type]
        heartbeat=float(config.setting(device, "heartbeat")),
        lost_after=p.lost_after,
        retry_cap=p.retry_cap,
    )


def build_links(config: GatewayConfig) -> dict[str, ModbusLink]:
    """One link per physical connection, with the longest timeout of its devices."""
    links: dict[str, ModbusLink] = {}
    longest: dict[str, float] = {}
    for d in config.devices:
        if not isinstance(d, MqttDevice):
            longest[d.link_key] = max(
                longest.get(d.link_key, 0.0), float(config.setting(d, "timeout"))
            )
    gap = config.polling.frame_gap_ms / 1000.0
    for d in config.devices:
        if isinstance(d, MqttDevice) or d.link_key in links:
            continue
        timeout = longest[d.link_key] + 1.0
        if isinstance(d, TcpDevice):
            rtu = d.transport == "rtu-over-tcp"
            links[d.link_key] = tcp_link(
                d.host,
                d.port,
                timeout,
                rtu_framing=rtu,
                frame_gap_s=gap if rtu else 0.0,
                client=config.polling.tcp_client,
            )
        elif isinstance(d, SerialDevice):
            links[d.link_key] = serial_link(
                d.serial,
                baudrate=d.baudrate,
                parity=d.parity,
                stopbits=d.stopbits,
                timeout=timeout,
                frame_gap_s=gap,
            )
    return links


@dataclass
class Gateway:
    config: GatewayConfig
    profiles: dict[str, Profile | MqttProfile]

    def __post_init__(self) -> None:
        c = self.config
        self.started = time.time()
        # A new spool file (first start, or the old one lost) starts its seq at the time in
        # epoch ms: above every seq an earlier file of this gateway used, unless that one sent
        # more than 1000 batches a second for its whole life. Ingest drops (gw, seq) repeats.
        self.spool = Spool(
            c.spool_path,
            max_bytes=int(c.spool.max_mb * 2**20),
            max_age_s=c.spool.max_age,
            first_seq=int(time.time() * 1000),
        )
        gw = c.gateway_id
        self.link = MqttLink(
            MqttOptions(
                host=c.broker.host,
                port=c.broker.port,
                client_id=f"gasguard-gw-{gw}",
                username=c.broker.username,
                password=c.broker.password,
                tls=c.broker.tls,
                ca_file=c.broker.ca_file,
                keepalive=c.broker.keepalive,
                protocol=c.broker.protocol,
                # A persistent session: a command published while the gateway reconnects is
                # kept by the broker and delivered when it is back (up to a day later).
                clean_start=False,
                session_expiry_s=86400,
                will=Will(topic(gw, "state"), b"offline"),
                online=Will(topic(gw, "state"), b"online"),
                subscriptions=((topic(gw, "cmd"), 1),),
                manual_ack=True,  # a command that arrives while we stop stays with the broker
            )
        )
        self.forwarder = Forwarder(self.spool, self.link)
        self.batcher = Batcher(
            gw,
            self.spool,
            max_readings=c.batching.max_readings,
            max_delay_ms=c.batching.max_delay_ms,
            on_spooled=self.forwarder.wake,
        )
        self.links: dict[str, ModbusLink] = build_links(c)
        self.pollers: dict[str, DevicePoller] = {}
        mqtt_devices = []
        for d in c.devices:
            profile = self.profiles[d.id]
            if isinstance(d, MqttDevice):
                assert isinstance(profile, MqttProfile)
                settings = poll_settings(c, d)
                mqtt_devices.append((d, profile, settings.interval, settings.heartbeat))
            else:
                assert isinstance(profile, Profile)
                self.pollers[d.id] = DevicePoller(
                    d.id,
                    d.kind,
                    d.unit,
                    profile,
                    self.links[d.link_key],
                    poll_settings(c, d),
                    self._sink,
                )
        self.mqtt_devices = (
            MqttDeviceSource(gw, mqtt_devices, c.local_broker, self._sink)
            if mqtt_devices and c.local_broker
            else None
        )
        self.commands = CommandHandler(self.pollers, self.spool, self._publish_result)
        self.link.on_message = self._on_command
        self._command_tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    def _sink(self, reading: Reading, urgent: bool) -> None:
        self.batcher.add(reading, urgent)

    def _publish_result(self, payload: bytes) -> None:
        """Kept until its PUBACK, sent again after a reconnect (see Forwarder.forward)."""
        self.forwarder.forward(topic(self.config.gateway_id, "cmd/result"), payload)

    def _on_command(self, msg: Any) -> None:
        if self._closing:  # not acknowledged: the broker delivers it again after the restart
            log.warning("a command arrived while the gateway stops: it is run after the restart")
            return
        self.link.ack(msg.mid, msg.qos)
        task = asyncio.create_task(self.commands.handle(msg.payload))
        self._command_tasks.add(task)
        task.add_done_callback(self._command_done)

    def _command_done(self, task: asyncio.Task[Any]) -> None:
        self._command_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a command failed", exc_info=task.exception())

    def snapshot(self) -> dict[str, Any]:
        s = self.spool.stats()
        devices: list[dict[str, Any]] = [
            {
                "id": i,
                "kind": p.kind,
                "state": p.state,
                "polls": p.stats.polls,
                "failures": p.stats.failures,
                "lost": p.state == "lost",
                "last_ok_ms": p.stats.last_ok_ms,
                "last_error": p.stats.last_error,
            }
            for i, p in self.pollers.items()
        ]
        if self.mqtt_devices is not None:
            devices += [
                {
                    "id": i,
                    "kind": t.device.kind,
                    "state": t.state,
                    "polls": t.stats.polls,
                    "failures": t.stats.failures,
                    "lost": t.state == "lost",
                    "last_ok_ms": t.stats.last_ok_ms,
                    "last_error": t.stats.last_error,
                }
                for i, t in self.mqtt_devices.devices.items()
            ]
        f = self.forwarder
        figures = {
            "polls_total": ("counter", sum(d["polls"] for d in devices), "device polls"),
            "poll_errors_total": ("counter", sum(d["failures"] for d in devices), "failed polls"),
            "devices_lost": ("gauge", sum(d["lost"] for d in devices), "devices not answering"),
            "readings_total": ("counter", self.batcher.readings, "readings batched"),
            "alarms_total": ("counter", self.batcher.alarms, "alarm flag changes sent at once"),
            "spool_batches": ("gauge", s.batches, "batches waiting for PUBACK"),
            "spool_bytes": ("gauge", s.bytes, "bytes in the spool"),
            "spool_dropped_batches_total": (
                "counter",
                s.dropped_batches,
                "batches dropped when full",
            ),
            "spool_dropped_readings_total": (
                "counter",
                s.dropped_readings,
                "readings dropped when full",
            ),
            "next_seq": ("gauge", s.next_seq, "next batch sequence number"),
            "published_total": ("counter", f.sent, "batches handed to the broker"),
            "acked_total": ("counter", f.acked, "batches acknowledged (PUBACK)"),
            "refused_total": (
                "counter",
                f.refused,
                "batches the broker refused (PUBACK reason code); retried after a backoff",
            ),
            "rejected_readings_total": (
                "counter",
                self.batcher.rejected,
                "readings that could not be encoded into a batch (dropped)",
            ),
            "mqtt_device_rejected_total": (
                "counter",
                self.mqtt_devices.rejected if self.mqtt_devices is not None else 0,
                "unusable messages from MQTT-native devices",
            ),
            "last_puback_ms": ("gauge", f.last_puback_ms, "epoch ms of the last PUBACK"),
            "broker_connected": ("gauge", int(self.link.connected), "1 while connected"),
            "commands_total": ("counter", self.commands.executed, "commands executed"),
        }
        return {"gateway_id": self.config.gateway_id, "figures": figures, "devices": devices}

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then stop cleanly.

        If one of the gateway's tasks (the link, forwarder, batcher, a poller, the MQTT
        devices) fails or ends before that, it is logged at CRITICAL with its traceback, the
        gateway stops just as cleanly (readings flushed into the spool) and GatewayCrashError is
        raised: ``gasguard gateway run`` then exits non-zero and its supervisor restarts it.
        """
        metrics = None
        if self.config.metrics.port:
            metrics = MetricsServer(
                self.snapshot, self.config.metrics.host, self.config.metrics.port
            )
            await metrics.start()
        inner = asyncio.Event()
        link_task = asyncio.create_task(self.link.run(), name="mqtt-link")
        workers = [
            asyncio.create_task(self.forwarder.run(inner), name="forwarder"),
            asyncio.create_task(self.batcher.run(inner), name="batcher"),
        ]
        workers += [
            asyncio.create_task(p.run(inner), name=f"poll-{i}") for i, p in self.pollers.items()
        ]
        if self.mqtt_devices is not None:
            workers.append(asyncio.create_task(self.mqtt_devices.run(inner), name="mqtt-devices"))
        log.info(
            "gateway %s: %d Modbus devices on %d links, %d MQTT devices; spool %s (%d waiting)",
            self.config.gateway_id,
            len(self.pollers),
            len(self.links),
            len(self.mqtt_devices.devices) if self.mqtt_devices else 0,
            self.config.spool_path,
            self.spool.stats().batches,
        )
        for warning in self.config.warnings():
            log.warning("%s", warning)
        stopped = asyncio.create_task(stop.wait(), name="stop")
        failed: asyncio.Task[None] | None = None
        error: BaseException | None = None
        try:
            done, _ = await asyncio.wait(
                {stopped, link_task, *workers}, return_when=asyncio.FIRST_COMPLETED
            )
            failed = next((t for t in (link_task, *workers) if t in done), None)
            if failed is not None:
                error = failed.exception() if not failed.cancelled() else None
                log.critical(
                    "gateway task %s %s; stopping the gateway (readings go to the spool)",
                    failed.get_name(),
                    "failed" if error is not None else "ended unexpectedly",
                    exc_info=error,
                )
        finally:
            stopped.cancel()
            await self._shutdown(inner, link_task, workers)
            if metrics is not None:
                with self._step("stop the metrics endpoint"):
                    await metrics.stop()
        if failed is not None:
            what = f"failed: {error!r}" if error is not None else "ended unexpectedly"
            raise GatewayCrashError(f"gateway task {failed.get_name()} {what}") from error

    async def _shutdown(
        self,
        inner: asyncio.Event,
        link_task: asyncio.Task[None],
        workers: list[asyncio.Task[None]],
    ) -> None:
        """Stop every task, flush and forward what can be, close everything. Each step runs
        even if an earlier one fails (after a crash, the cause may fail again)."""
        inner.set()
        self._closing = True
        await asyncio.gather(*workers, return_exceptions=True)  # the pollers' last readings
        await self._finish_commands(COMMAND_GRACE_S)
        with self._step("flush the batches into the spool"):
            self.batcher.flush_all()  # also what came in after the batcher ended (or failed)
        with self._step("forward the last batches"):
            self.forwarder.pump()
            await self._drain(2.0)
            self.forwarder.commit_acks()
        with self._step("stop the MQTT link"):
            await self.link.stop()
        link_task.cancel()
        await asyncio.gather(link_task, return_exceptions=True)
        for link in self.links.values():
            with self._step(f"close {link.name}"):
                await link.close()
        with self._step("close the spool"):
            self.spool.close()

    async def _finish_commands(self, seconds: float) -> None:
        """Let running commands finish (their results are then forwarded); cancel the rest."""
        if not self._command_tasks:
            return
        _, late = await asyncio.wait(set(self._command_tasks), timeout=seconds)
        for task in late:
            task.cancel()
        if late:
            log.warning("while stopping: %d command(s) still running were cancelled", len(late))
            await asyncio.gather(*late, return_exceptions=True)

    @contextlib.contextmanager
    def _step(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception:
            log.exception("while stopping: cannot %s", what)

    async def _drain(self, seconds: float) -> None:
        """On a clean stop, wait briefly for in-flight PUBACKs (the rest stay spooled)."""
        deadline = time.monotonic() + seconds
        while self.link.connected and self.forwarder.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            self.forwarder.pump()
