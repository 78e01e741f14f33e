"""``gasguard up``: the whole chain on one machine, for a first look and for demos.

A simulated building (the demo scenario leaks now and then) served over Modbus TCP, a gateway
polling it, the ingest consumer, and the hotline with its console; each service is its own
process (``gasguard sim run``, ``gasguard gateway run``, ...), as in production, with its log
in ``var/up/logs/``. The database and broker named in settings are used when given
(``GASGUARD_DATABASE_URL``, ``GASGUARD_MQTT_HOST``/``_PORT``); otherwise private ones are
started under ``var/`` (see :mod:`gasguard.local_services`). Ctrl-C stops everything, in
reverse order, and nothing is left running.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gasguard.local_services import (
    ROOT,
    LocalService,
    LocalServiceError,
    free_port,
    last_line,
    mosquitto_binary,
    port_open,
    start_amqtt,
    start_mosquitto,
    start_postgres,
    stop_process,
)
from gasguard.settings import CommonSettings

GATEWAY_ID = "GW-DEMO"
DEMO_SCENARIO = ROOT / "firmware_sim" / "scenarios" / "demo.toml"


class UpError(RuntimeError):
    """Something failed while starting; the message is the one line the user sees."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        stop_process(self.process, first=signal.SIGINT)  # the services stop cleanly on Ctrl-C


def say(what: str, detail: str) -> None:
    print(f"gasguard up: {what:<10} {detail}", flush=True)


class Up:
    def __init__(
        self, var: Path, port: int, speed: float, interval: str, broker: str = "auto"
    ) -> None:
        self.var = var
        self.broker = broker  # auto (Mosquitto when installed, else amqtt), mosquitto, amqtt
        self.protocol = "5"
        self.port = port
        self.speed = speed
        self.interval = interval
        self.logs = var / "up" / "logs"
        self.services: list[LocalService] = []
        self.children: list[Child] = []
        self.env = dict(os.environ)

    # -- the steps ---------------------------------------------------------------------------

    def start(self) -> str:
        """Start everything; returns the login line for the console."""
        self.logs.mkdir(parents=True, exist_ok=True)
        if port_open(self.port):
            raise UpError(f"port {self.port} is in use: choose another with --port")
        settings = CommonSettings()
        given = settings.model_fields_set
        database = self._database(settings.database_url if "database_url" in given else None)
        self._broker(settings if {"mqtt_host", "mqtt_port"} & given else None)
        self.env["GASGUARD_DATABASE_URL"] = database
        self._migrate(database)
        control = free_port()
        self.env["GASGUARD_SIM_CONTROL_PORT"] = str(control)
        devices = self._simulator(control)
        self._register(database, devices)
        self._gateway(devices)
        self._ingest()
        return self._hotline(database)

    def _database(self, given: str | None) -> str:
        if given is not None:
            say("database", f"using GASGUARD_DATABASE_URL ({given.rsplit('@', 1)[-1]})")
            self._check_database(given)
            return given
        say("database", "no GASGUARD_DATABASE_URL: starting a private PostgreSQL ...")
        service, admin_url = start_postgres(self.var)
        self.services.append(service)
        for note in service.notes:
            say("", note)
        service.wait_ready()
        url = admin_url.rsplit("/", 1)[0] + "/gasguard"
        self._ensure_database(admin_url, "gasguard")
        say("", f"ready: {service.description}")
        return url

    def _broker(self, settings: CommonSettings | None) -> None:
        if settings is not None:
            where = f"{settings.mqtt_host}:{settings.mqtt_port}"
            say("broker", f"using the broker in settings ({where})")
            if not port_open(settings.mqtt_port, settings.mqtt_host):
                raise UpError(f"nothing answers at the MQTT broker {where} (GASGUARD_MQTT_*)")
            return
        use_amqtt = self.broker == "amqtt" or (self.broker == "auto" and not mosquitto_binary())
        if use_amqtt:
            why = "as asked" if self.broker == "amqtt" else "Mosquitto is not installed"
            say("broker", f"no GASGUARD_MQTT_HOST, {why}: starting the pure-Python amqtt "
                          "(MQTT 3.1.1; the services are switched to it) ...")  # fmt: skip
            service = start_amqtt(self.var)
            self.env["GASGUARD_MQTT_PROTOCOL"] = self.protocol = "3.1.1"
        else:
            say("broker", "no GASGUARD_MQTT_HOST: starting a private Mosquitto ...")
            service = start_mosquitto(self.var)
        self.services.append(service)
        service.wait_ready()
        self.env["GASGUARD_MQTT_HOST"], self.env["GASGUARD_MQTT_PORT"] = (
            "127.0.0.1",
            str(service.port),
        )
        say("", f"ready: {service.description}")

    def _migrate(self, database: str) -> None:
        from ingest.storage import choose_mode, migrate

        async def run() -> tuple[str, list[str]]:
            conn = await _connect(database)
            async with conn:
                mode = await choose_mode(conn)
                return mode, await migrate(conn, mode)

        mode, applied = asyncio.run(run())
        say("schema", f"{mode} PostgreSQL; {len(applied)} migration(s) applied")

    def _simulator(self, control: int) -> list[dict[str, Any]]:
        modbus = free_port()
        say("simulator", f"starting the demo building on Modbus TCP 127.0.0.1:{modbus} ...")
        self._spawn("simulator", ["sim", "run", "--scenario", str(DEMO_SCENARIO), "--port",
                                  str(modbus), "--control-port", str(control),
                                  "--speed", str(self.speed)])  # fmt: skip
        from firmware_sim.control import request

        def listed() -> dict[str, Any] | None:
            if not port_open(control):
                return None
            return asyncio.run(request("127.0.0.1", control, {"cmd": "list"}))

        reply = self._until("simulator", listed)
        devices: list[dict[str, Any]] = reply["devices"]
        households = len({d["household"] for d in devices})
        say("", f"ready: {households} households, {len(devices)} devices, scenario demo")
        return devices

    def _register(self, database: str, devices: list[dict[str, Any]]) -> None:
        from ingest.registry import import_rows, parse_csv

        lines = ["device_id,kind,household_id,district,address,gateway_id,profile,meter_size"]
        for d in devices:
            flat = d["household"].split("-")[-1].lstrip("0") or "0"
            lines.append(f'{d["id"]},{d["kind"]},{d["household"]},{d["district"]},'
                         f'"Demo Building, flat {flat}",{GATEWAY_ID},{d["profile"]},'
                         f'{d["meter_size"] or ""}')  # fmt: skip
        rows = parse_csv("\n".join(lines) + "\n", "the simulated building")

        async def run() -> int:
            conn = await _connect(database)
            async with conn:
                return await import_rows(conn, rows)

        say("registry", f"{asyncio.run(run())} devices registered to gateway {GATEWAY_ID}")

    def _gateway(self, devices: list[dict[str, Any]]) -> None:
        from firmware_sim.cli import gateway_config_text

        broker = (self.env.get("GASGUARD_MQTT_HOST", "127.0.0.1"),
                  int(self.env.get("GASGUARD_MQTT_PORT", "1883")))  # fmt: skip
        text = gateway_config_text(devices, GATEWAY_ID, self.interval, broker)
        state = (self.var / "gateway" / GATEWAY_ID).resolve()
        text = text.replace(
            f'gateway_id = "{GATEWAY_ID}"', f'gateway_id = "{GATEWAY_ID}"\nstate_dir = "{state}"'
        )
        text = text.replace("[broker]\n", f'[broker]\nprotocol = "{self.protocol}"\n', 1)
        config = self.var / "up" / "gateway.toml"
        config.write_text(text)
        self._spawn("gateway", ["gateway", "run", "--config", str(config)])
        say("gateway", f"{GATEWAY_ID} polls {len(devices)} devices every {self.interval} "
                       f"(config {config})")  # fmt: skip

    def _ingest(self) -> None:
        metrics = free_port()
        self.env["GASGUARD_INGEST_METRICS_PORT"] = str(metrics)
        if self.speed != 1 and "GASGUARD_INGEST_THRESHOLDS_FILE" not in self.env:
            # the gateway stamps readings with the wall clock while the simulated register
            # runs ``speed`` times as fast: meter_mismatch must allow for that
            thresholds = self.var / "up" / "thresholds.toml"
            thresholds.parent.mkdir(parents=True, exist_ok=True)
            thresholds.write_text(f"[meter]\nmismatch_ratio = {3.0 * max(self.speed, 1.0)}\n")
            self.env["GASGUARD_INGEST_THRESHOLDS_FILE"] = str(thresholds)
            say("ingest", f"simulated time x{self.speed:g}: register and flow compared with "
                          f"that allowance ({thresholds})")  # fmt: skip
        self._spawn("ingest", ["ingest", "run"])
        self._until("ingest", lambda: port_open(metrics) or None)
        say("ingest", f"consuming; metrics at http://127.0.0.1:{metrics}/metrics")

    def _hotline(self, database: str) -> str:
        from alerting.auth import add_user

        password = secrets.token_urlsafe(9)

        async def users() -> None:
            conn = await _connect(database)
            async with conn, conn.cursor() as cur:
                await add_user(cur, "admin", "Administrator", "admin", password)

        asyncio.run(users())
        self.env["GASGUARD_HOTLINE_PORT"] = str(self.port)
        self._spawn("hotline", ["hotline", "run"])
        health = f"http://127.0.0.1:{self.port}/health"
        self._until("hotline", lambda: _http_ok(health) or None)
        say("hotline", f"ready at http://127.0.0.1:{self.port}/")
        return f"admin / {password}"

    # -- helpers -----------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> None:
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "gasguard.cli", *args],
                stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
                start_new_session=True,  # Ctrl-C reaches us; we stop the children in order
            )  # fmt: skip
        self.children.append(Child(name, process, log))

    def _until(self, name: str, ready: Callable[[], Any], timeout: float = 60.0) -> Any:
        child = next(c for c in reversed(self.children) if c.name == name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                raise UpError(f"{name} stopped while starting (exit {child.process.returncode}): "
                              f"{last_line(child.log)} (log: {child.log})")  # fmt: skip
            value = ready()
            if value is not None:
                return value
            time.sleep(0.2)
        raise UpError(f"{name} was not ready within {timeout:g} s (log: {child.log})")

    def _check_database(self, url: str) -> None:
        async def run() -> None:
            conn = await _connect(url)
            await conn.close()

        asyncio.run(run())

    def _ensure_database(self, admin_url: str, name: str) -> None:
        async def run() -> None:
            conn = await _connect(admin_url, autocommit=True)
            async with conn:
                cur = await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if await cur.fetchone() is None:
                    await conn.execute(f'CREATE DATABASE "{name}"'.encode())

        asyncio.run(run())

    def watch(self) -> int:
        """Until Ctrl-C (0), or until a service stops by itself (1)."""
        stop = {"signal": False}

        def on_signal(_sig: int, _frame: object) -> None:
            stop["signal"] = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop["signal"]:
            for child in self.children:
                if child.process.poll() is not None:
                    code = child.process.returncode
                    print(
                        f"gasguard up: {child.name} stopped (exit {code}): "
                        f"{last_line(child.log)} (log: {child.log})",
                        file=sys.stderr,
                    )
                    return 1
            for service in self.services:
                if service.process is not None and service.process.poll() is not None:
                    print(f"gasguard up: {service.name} stopped: {last_line(service.log)}",
                          file=sys.stderr)  # fmt: skip
                    return 1
            time.sleep(0.3)
        return 0

    def stop(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut cleanup short
        for child in reversed(self.children):
            say("stopping", child.name)
            child.stop()
        for service in reversed(self.services):
            say("stopping", service.name)
            service.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)


async def _connect(url: str, autocommit: bool = False) -> Any:
    import psycopg

    try:
        return await psycopg.AsyncConnection.connect(url, connect_timeout=10, autocommit=autocommit)
    except psycopg.OperationalError as exc:
        first = (str(exc).strip().splitlines() or ["no answer"])[0]
        raise UpError(f"cannot connect to the database {url.rsplit('@', 1)[-1]}: {first}") from None


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def run(var: Path, port: int, speed: float, interval: str, broker: str = "auto") -> int:
    import logging

    logging.getLogger("ingest").setLevel(logging.WARNING)  # progress lines say what happened
    up = Up(var, port, speed, interval, broker)
    try:
        login = up.start()
        print(
            f"\nGasGuard is up.\n"
            f"  console   http://127.0.0.1:{port}/   (sign in as {login})\n"
            f"  report    http://127.0.0.1:{port}/report\n"
            f"  logs      {up.logs}/\n"
            f"  a leak    gasguard sim inject D-0001 gas_leak --control-port "
            f"{up.env['GASGUARD_SIM_CONTROL_PORT']}\n"
            f"Ctrl-C stops everything.",
            flush=True,
        )
        return up.watch()
    except (UpError, LocalServiceError) as exc:
        print(f"gasguard up: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        up.stop()
