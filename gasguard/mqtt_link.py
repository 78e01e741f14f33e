"""An MQTT link driven by the asyncio loop: paho-mqtt 2.x (callback API version 2) without a
network thread of its own, connected and reconnected with the one backoff helper.

Each connection attempt gets a fresh paho client, so nothing paho queued for an earlier
connection is re-sent behind the caller's back: the owner (e.g. the gateway's spool
forwarder) decides what to send again after a reconnect. Subscriptions are renewed on every
CONNACK. The Last Will and the retained ``online`` state are set per link.

The owner's callbacks (``on_message``, ``on_published``, ``on_connected``, ``on_disconnected``)
run inside paho's read loop. Whatever they raise is logged once (with its traceback) and
counted, and never reaches paho: paho would otherwise handle the same packet again on every
read, forever.

A broker that cannot be reached (DNS, refused, TLS, a bad CA, CONNACK refused) is logged once
at ERROR, then quietly until the link is up again. A subscription the broker refuses (SUBACK
reason code) is logged at ERROR and listed in ``refused_subscriptions``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gasguard.backoff import Backoff

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class MqttOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    keepalive: int = 30
    clean_start: bool = True
    # "5" everywhere GasGuard runs on Mosquitto; "3.1.1" for a broker that speaks nothing newer
    # (amqtt, the pure-Python broker `gasguard up` falls back to): no receive maximum, session
    # expiry or message expiry then, and a persistent session is clean_session false
    protocol: str = "5"
    session_expiry_s: int = 0
    receive_maximum: int = 1000
    max_inflight: int = 1000
    connect_timeout: float = 5.0
    manual_ack: bool = False
    will: Will | None = None
    online: Will | None = None  # published (retained) after every CONNACK
    subscriptions: tuple[tuple[str, int], ...] = field(default=())


class _BrokerTlsContext(ssl.SSLContext):
    """Checks the broker's certificate against its name, not the address paho connects to.

    paho hands the host given to connect() to wrap_socket as ``server_hostname`` (for SNI and
    the certificate check); the link connects paho to the address it resolved itself, which
    a certificate rarely names.
    """

    broker_name = ""

    def wrap_socket(  # noqa: PLR0917 - the signature of SSLContext.wrap_socket
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=self.broker_name or server_hostname,
            session=session,
        )


def _tls_context(broker_name: str, ca_file: str | None) -> ssl.SSLContext:
    """What paho's tls_set() would make (certificate and host name required), for the name."""
    context = _BrokerTlsContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname, CERT_REQUIRED
    context.broker_name = broker_name
    if ca_file is None:
        context.load_default_certs()
    else:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise OSError(f"CA file {ca_file}: {exc}") from None
    return context


class MqttLink:
    """One logical connection to a broker, kept up until :meth:`stop`."""

    def __init__(self, options: MqttOptions, backoff: Backoff | None = None) -> None:
        self.options = options
        self.backoff = backoff or Backoff(base=0.5, cap=30.0)
        self.on_connected: Callable[[], None] = lambda: None
        self.on_disconnected: Callable[[str], None] = lambda reason: None
        self.on_message: Callable[[mqtt.MQTTMessage], None] = lambda msg: None
        self.on_published: Callable[[int, bool], None] = lambda mid, ok: None
        self.connects = 0
        self._client: mqtt.Client | None = None
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._misc: asyncio.Task[None] | None = None
        self._refused: str | None = None
        self._subscriptions: tuple[tuple[str, int], ...] = options.subscriptions
        self.callback_errors = 0  # exceptions raised by the owner's callbacks
        self.failed_attempts = 0  # connection attempts that failed since the link was last up
        self.last_failure = ""
        self.refused_subscriptions: set[str] = set()
        self.granted: set[str] = set()  # filters the broker granted on this connection
        self._subscribing: dict[int, list[str]] = {}  # SUBSCRIBE mid -> topics
        self._callbacks_failed: set[str] = set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # ------------------------------------------------------------------ publishing

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> int | None:
        """Hand a message to the broker; its mid, or None when not connected (nothing queued).

        ``properties`` are MQTT 5 PUBLISH properties, e.g. a MessageExpiryInterval.
        """
        client = self._client
        if client is None or not self.connected:
            return None
        if self.options.protocol != "5":
            properties = None  # MQTT 3.1.1 has no properties
        info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return None
        return int(info.mid)

    def update_subscriptions(self, subscriptions: tuple[tuple[str, int], ...]) -> None:
        """Change what the link subscribes to, now and on every later CONNACK."""
        old = {t for t, _ in self._subscriptions}
        self._subscriptions = subscriptions
        client = self._client
        if client is not None and self.connected:
            for topic, qos in subscriptions:
                if topic not in old:
                    self._subscribe(client, topic, qos)
            gone = old - {t for t, _ in subscriptions}
            if gone:
                self.unsubscribe(gone)

    def unsubscribe(self, topics: set[str] | list[str]) -> None:
        """Drop filters from the broker's session, also ones this link never subscribed
        (a persistent session keeps the filters of an earlier run)."""
        topics = sorted(topics)
        self._subscriptions = tuple((t, q) for t, q in self._subscriptions if t not in topics)
        self.granted.difference_update(topics)
        client = self._client
        if topics and client is not None and self.connected:
            client.unsubscribe(topics)

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a received message (manual-ack links)."""
        if self._client is not None:
            self._client.ack(mid, qos)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Connect, and reconnect after every loss, until :meth:`stop`."""
        while not self._stopping:
            try:
                await self._connect_once()
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                self._drop(f"cannot connect: {exc}")
                if not self._stopping:
                    self._attempt_failed(str(exc) or type(exc).__name__)
            else:
                await self._lost.wait()
            if self._stopping:
                break
            delay = self.backoff.next()
            log.debug(
                "reconnecting to %s:%d in %.1f s", self.options.host, self.options.port, delay
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), delay)

    async def stop(self, send_offline: bool = True) -> None:
        """Disconnect cleanly (publishing the will's payload first when asked)."""
        self._stopping = True
        self._stop_event.set()
        client = self._client
        if client is not None and self.connected:
            if send_offline and self.options.will is not None:
                w = self.options.will
                info = client.publish(w.topic, w.payload, qos=w.qos, retain=w.retain)
                for _ in range(40):
                    if info.is_published():
                        break
                    await asyncio.sleep(0.025)
            client.disconnect()
            await asyncio.sleep(0)
        self._drop("stopped")

    async def _reach(self) -> str:
        """The address of the broker, resolved and probed without blocking the loop: paho's
        connect() is a blocking socket call, name resolution included, so it is only ever
        given an address that just answered."""
        opts = self.options
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(opts.connect_timeout):
                found = await loop.getaddrinfo(opts.host, opts.port, type=socket.SOCK_STREAM)
        except TimeoutError:
            raise OSError(f"no DNS answer within {opts.connect_timeout:g} s") from None
        failures = []
        for address in dict.fromkeys(str(info[4][0]) for info in found):
            try:
                async with asyncio.timeout(opts.connect_timeout):
                    _, writer = await asyncio.open_connection(address, opts.port)
            except TimeoutError:
                failures.append(f"{address}: no TCP connection within {opts.connect_timeout:g} s")
            except OSError as exc:
                failures.append(str(exc))
            else:
                writer.close()
                return address
        raise OSError("; ".join(failures) or f"{opts.host} has no address")

    async def _connect_once(self) -> None:
        opts = self.options
        address = await self._reach()
        client = self._new_client()
        self._client = client
        self._lost.clear()
        self._refused = None
        if opts.protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.ReceiveMaximum = opts.receive_maximum
            if opts.session_expiry_s:
                props.SessionExpiryInterval = opts.session_expiry_s
            client.connect(
                address,  # with TLS, the certificate is still checked against opts.host
                opts.port,
                keepalive=opts.keepalive,
                clean_start=opts.clean_start,
                properties=props,
            )
        else:  # 3.1.1: the session's cleanliness was set on the client
            client.connect(address, opts.port, keepalive=opts.keepalive)
        sock = client.socket()
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        done = asyncio.create_task(self._connected.wait())
        lost = asyncio.create_task(self._lost.wait())
        await asyncio.wait(
            {done, lost}, timeout=opts.connect_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for task in (done, lost):
            task.cancel()
        if not self.connected:
            reason = (
                f"the broker refused the connection: {self._refused}"
                if self._refused
                else f"no CONNACK within {opts.connect_timeout:g} s"
            )
            self._drop(reason)
            raise OSError(reason)

    def _attempt_failed(self, reason: str) -> None:
        """The first failure since the link was last up at ERROR, the others quietly."""
        self.failed_attempts += 1
        self.last_failure = reason
        if self.failed_attempts == 1:
            log.error(
                "cannot connect to MQTT broker %s:%d: %s (retrying quietly until it connects)",
                self.options.host,
                self.options.port,
                reason,
            )
        else:
            log.debug(
                "MQTT broker %s:%d, attempt %d: %s",
                self.options.host,
                self.options.port,
                self.failed_attempts,
                reason,
            )

    def _subscribe(self, client: mqtt.Client, topic: str, qos: int) -> None:
        rc, mid = client.subscribe(topic, qos=qos)
        if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            self._subscribing[mid] = [topic]

    def _new_client(self) -> mqtt.Client:
        opts = self.options
        if opts.protocol == "5":
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=opts.client_id, protocol=mqtt.MQTTv5
            )
        elif opts.protocol == "3.1.1":
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=opts.client_id,
                protocol=mqtt.MQTTv311,
                clean_session=opts.clean_start,
            )
        else:
            raise ValueError(f"MQTT protocol must be '5' or '3.1.1', not {opts.protocol!r}")
        client.connect_timeout = opts.connect_timeout
        client.max_inflight_messages_set(opts.max_inflight)
        client.max_queued_messages_set(0)
        client.manual_ack_set(opts.manual_ack)
        if opts.username is not None:
            client.username_pw_set(opts.username, opts.password)
        if opts.tls:
            client.tls_set_context(_tls_context(opts.host, opts.ca_file))
        if opts.will is not None:
            w = opts.will
            client.will_set(w.topic, w.payload, qos=w.qos, retain=w.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        loop = asyncio.get_running_loop()

        def opened(c: mqtt.Client, userdata: object, sock: Any) -> None:
            self._socket_open(loop, c, sock)

        def closed(c: mqtt.Client, userdata: object, sock: Any) -> None:
            loop.remove_reader(sock)

        def want_write(c: mqtt.Client, userdata: object, sock: Any) -> None:
            loop.add_writer(sock, c.loop_write)

        def written(c: mqtt.Client, userdata: object, sock: Any) -> None:
            loop.remove_writer(sock)

        client.on_socket_open = opened
        client.on_socket_close = closed
        client.on_socket_register_write = want_write
        client.on_socket_unregister_write = written
        return client

    def _socket_open(
        self, loop: asyncio.AbstractEventLoop, client: mqtt.Client, sock: object
    ) -> None:
        loop.add_reader(sock, client.loop_read)  # type: ignore[arg-type]
        if self._misc is None or self._misc.done():
            self._misc = loop.create_task(self._misc_loop(client))

    async def _misc_loop(self, client: mqtt.Client) -> None:
        """Keepalive pings and timeouts: paho's loop_misc, once a second."""
        while client.loop_misc() == mqtt.MQTT_ERR_SUCCESS:
            await asyncio.sleep(1.0)
            if client is not self._client:
                break

    def _drop(self, reason: str) -> None:
        client, self._client = self._client, None
        was_connected = self.connected
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        self._connected.clear()
        self._lost.set()
        if client is not None:
            with contextlib.suppress(Exception):
                sock = client.socket()
                if client.is_connected():
                    client.disconnect()
                # paho calls these again from Client.__del__, maybe after the loop is gone
                client.on_socket_close = None
                client.on_socket_unregister_write = None
                if sock is not None:
                    loop = asyncio.get_running_loop()
                    loop.remove_reader(sock)
                    loop.remove_writer(sock)
                    sock.close()
        if was_connected:
            log.warning("MQTT link to %s:%d lost: %s", self.options.host, self.options.port, reason)
            self._call_owner("on_disconnected", self.on_disconnected, reason)

    def _call_owner(self, name: str, callback: Callable[..., None], *args: Any) -> None:
        """Run one of the owner's callbacks; what it raises stays here (logged once, counted)."""
        try:
            callback(*args)
        except Exception:  # the owner's bug, whatever it is: paho must never see it
            self.callback_errors += 1
            if name not in self._callbacks_failed:
                self._callbacks_failed.add(name)
                log.exception(
                    "MQTT link to %s:%d: %s raised (logged once; later errors are counted)",
                    self.options.host,
                    self.options.port,
                    name,
                )

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: object,
        reason: ReasonCode,
        props: object,
    ) -> None:
        if client is not self._client:
            return
        if reason.is_failure:
            self._refused = str(reason)  # logged (once) by run, like any other failure
            return
        self.backoff.reset()
        self.connects += 1
        if self.failed_attempts:
            log.info(
                "MQTT broker %s:%d reached after %d failed attempts",
                self.options.host,
                self.options.port,
                self.failed_attempts,
            )
        self.failed_attempts = 0
        self._subscribing.clear()
        self.granted.clear()
        for topic, qos in self._subscriptions:
            self._subscribe(client, topic, qos)
        if self.options.online is not None:
            o = self.options.online
            client.publish(o.topic, o.payload, qos=o.qos, retain=o.retain)
        log.info("MQTT link to %s:%d up", self.options.host, self.options.port)
        self._connected.set()
        self._call_owner("on_connected", self.on_connected)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: object,
        reason: ReasonCode,
        props: object,
    ) -> None:
        if client is self._client:
            self._drop(str(reason))

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        props: object,
    ) -> None:
        if client is not self._client:
            return
        for topic, reason in zip(self._subscribing.pop(mid, []), reasons, strict=False):
            if not reason.is_failure:
                self.refused_subscriptions.discard(topic)
                self.granted.add(topic)
            elif topic not in self.refused_subscriptions:
                self.refused_subscriptions.add(topic)
                log.error(
                    "MQTT broker %s:%d refused the subscription to %s: %s",
                    self.options.host,
                    self.options.port,
                    topic,
                    reason,
                )

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if client is self._client:
            self._call_owner("on_message", self.on_message, msg)

    def _on_publish(
        self, client: mqtt.Client, userdata: object, mid: int, reason: ReasonCode, props: object
    ) -> None:
        if client is self._client:
            self._call_owner("on_published", self.on_published, mid, not reason.is_failure)
