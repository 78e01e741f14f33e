"""``gasguard gateway run|check --config FILE``."""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from pathlib import Path
from typing import Any

from gasguard.runner import run


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gw = commands.add_parser("gateway", help="the edge gateway: poll devices, forward over MQTT")
    sub = gw.add_subparsers(dest="gateway_command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the gateway until Ctrl-C")
    run.add_argument("--config", type=Path, required=True, help="gateway config file (TOML)")
    run.set_defaults(handler=_run)
    check = sub.add_parser(
        "check", help="validate the config, read each device once, print a table"
    )
    check.add_argument("--config", type=Path, required=True, help="gateway config file (TOML)")
    check.add_argument("--wait", type=float, default=10.0, help="seconds to wait for MQTT devices")
    check.set_defaults(handler=_check)


def _run(args: argparse.Namespace) -> int:
    import sys

    from gateway.app import Gateway, GatewayCrashError
    from gateway.config import load_config

    config, profiles = load_config(args.config)

    async def main() -> None:
        gateway = Gateway(config, profiles)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(
            f"gateway {config.gateway_id}: {len(config.devices)} devices, broker "
            f"{config.broker.host}:{config.broker.port}; Ctrl-C stops",
            flush=True,
        )
        await gateway.run(stop)

    try:
        run(main())  # on uvloop when installed
    except GatewayCrashError as exc:  # logged with its traceback; the supervisor restarts us
        print(f"gateway stopped after a failure: {exc}", file=sys.stderr)
        return 1
    print("gateway stopped.")
    return 0


def _check(args: argparse.Namespace) -> int:
    from gateway.config import load_config

    config, profiles = load_config(args.config)
    print(
        f"config {args.config}: valid; gateway {config.gateway_id}, {len(config.devices)} devices"
    )
    for warning in config.warnings():
        print(f"warning: {warning}")
    rows = asyncio.run(_check_devices(config, profiles, args.wait))
    print(f"{'device':<12} {'kind':<9} {'address':<32} {'state':<8} {'ms':>6}  values / error")
    for r in rows:
        print(
            f"{r['id']:<12} {r['kind']:<9} {r['address']:<32} {r['state']:<8} {r['ms']:>6}  "
            f"{r['detail']}"
        )
    bad = sum(r["state"] != "ok" for r in rows)
    print(f"{len(rows) - bad} of {len(rows)} devices answered")
    return 0 if bad == 0 else 1


async def _check_devices(config: Any, profiles: Any, wait: float) -> list[dict[str, Any]]:
    from gateway.app import build_links, poll_settings
    from gateway.config import MqttDevice, SerialDevice
    from gateway.links import LinkError
    from gateway.poller import DevicePoller

    links = build_links(config)
    rows: list[dict[str, Any]] = []

    async def one(device: Any) -> dict[str, Any]:
        address = (
            f"{device.serial} unit {device.unit}"
            if isinstance(device, SerialDevice)
            else f"{device.host}:{device.port} unit {device.unit}"
        )
        poller = DevicePoller(
            device.id,
            device.kind,
            device.unit,
            profiles[device.id],
            links[device.link_key],
            poll_settings(config, device),
            lambda r, u: None,
        )
        started = time.monotonic()
        try:
            values = await poller.read()
        except LinkError as exc:
            return {
                "id": device.id,
                "kind": device.kind,
                "address": address,
                "state": "lost",
                "ms": int((time.monotonic() - started) * 1000),
                "detail": str(exc),
            }
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        return {
            "id": device.id,
            "kind": device.kind,
            "address": address,
            "state": "ok",
            "ms": int((time.monotonic() - started) * 1000),
            "detail": shown,
        }

    modbus = [d for d in config.devices if not isinstance(d, MqttDevice)]
    rows += await asyncio.gather(*(one(d) for d in modbus))
    mqtt_devices = [d for d in config.devices if isinstance(d, MqttDevice)]
    if mqtt_devices:
        rows += await _check_mqtt(config, profiles, mqtt_devices, wait)
    for link in links.values():
        await link.close()
    order = {d.id: i for i, d in enumerate(config.devices)}
    return sorted(rows, key=lambda r: order[r["id"]])


async def _check_mqtt(
    config: Any, profiles: Any, devices: list[Any], wait: float
) -> list[dict[str, Any]]:
    from gateway.mqtt_devices import MqttDeviceSource
    from gateway.poller import Reading

    seen: dict[str, Reading] = {}
    source = MqttDeviceSource(
        config.gateway_id + "-check",
        [(d, profiles[d.id], 3600.0, 3600.0) for d in devices],
        config.local_broker,
        lambda r, u: _first(seen, r),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(source.run(stop))
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and len(seen) < len(devices):
        await asyncio.sleep(0.1)
    stop.set()
    await task
    rows = []
    for d in devices:
        address = f"mqtt {profiles[d.id].topic_for(d.mqtt_id or d.id)}"
        reading = seen.get(d.id)
        tracked = source.devices[d.id]
        if reading is None or reading.values is None:
            detail = tracked.stats.last_error or f"no message within {wait:g} s"
            rows.append(
                {
                    "id": d.id,
                    "kind": d.kind,
                    "address": address,
                    "state": "silent",
                    "ms": "-",
                    "detail": detail,
                }
            )
        else:
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in reading.values.items())
            rows.append(
                {
                    "id": d.id,
                    "kind": d.kind,
                    "address": address,
                    "state": "ok",
                    "ms": "-",
                    "detail": shown,
                }
            )
    return rows


def _first(seen: dict[str, Any], reading: Any) -> None:
    if reading.values is not None:
        seen.setdefault(reading.device, reading)


def _fmt(v: float | bool) -> str:
    return str(v).lower() if isinstance(v, bool) else f"{v:g}"
