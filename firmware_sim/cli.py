"""``gasguard sim``: simulated detectors and meters for field technicians and tests.

    gasguard sim run --detectors 20 --meters 20 --scenario demo.toml
    gasguard sim list
    gasguard sim inject D-0017 gas_leak --for 10m --set rate_lel_per_min=8

Nothing heavy is imported until a command runs, so ``gasguard --help`` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from gasguard.settings import SimSettings

log = logging.getLogger(__name__)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sim = commands.add_parser("sim", help="simulated detectors and meters (Modbus TCP / MQTT)")
    sub = sim.add_subparsers(dest="sim_command", required=True, metavar="COMMAND")
    settings = SimSettings()

    run = sub.add_parser("run", help="start a simulated building and serve it over Modbus TCP")
    run.add_argument("--scenario", type=Path, help="scenario file (TOML) with timed events")
    run.add_argument(
        "--detectors", type=int, help="number of methane detectors (default: scenario's)"
    )
    run.add_argument("--meters", type=int, help="number of smart meters (default: scenario's)")
    run.add_argument("--districts", type=int, help="number of districts the households spread over")
    run.add_argument("--seed", type=int, help="random seed (default: scenario's)")
    run.add_argument("--host", default=settings.sim_modbus_host, help="Modbus listen address")
    run.add_argument(
        "--port", type=int, default=settings.sim_modbus_port, help="first Modbus TCP port"
    )
    run.add_argument(
        "--per-device-ports",
        action="store_true",
        help="one port per device (unit 1) instead of one port with a unit id per device",
    )
    run.add_argument(
        "--rtu-over-tcp", action="store_true", help="RTU framing over TCP (a serial bus converter)"
    )
    run.add_argument("--control-port", type=int, default=settings.sim_control_port)
    run.add_argument("--speed", type=float, default=1.0, help="simulated seconds per wall second")
    run.add_argument("--dt", type=float, default=1.0, help="tick length in simulated seconds")
    run.add_argument("--duration", help="stop after this much simulated time (e.g. 2h)")
    run.add_argument(
        "--mqtt",
        action="store_true",
        help="also publish readings as MQTT-native devices to the broker in settings",
    )
    run.add_argument(
        "--gateway-id", default="sim-mqtt", help="gateway id the MQTT-native fleet uses"
    )
    run.add_argument("--report-every", default="10s", help="MQTT-native report period")
    run.set_defaults(handler=_run)

    lst = sub.add_parser(
        "list", help="list the devices of a running simulation and their addresses"
    )
    lst.add_argument("--control-port", type=int, default=settings.sim_control_port)
    lst.set_defaults(handler=_list)

    gwc = sub.add_parser(
        "gateway-config", help="print a gateway config file for the devices of a running simulation"
    )
    gwc.add_argument("--gateway-id", default="GW-SIM", help="the gateway's id")
    gwc.add_argument("--interval", default="10s", help="poll interval")
    gwc.add_argument("--control-port", type=int, default=settings.sim_control_port)
    gwc.set_defaults(handler=_gateway_config)

    inject = sub.add_parser("inject", help="start an event in a running simulation now")
    inject.add_argument("target", help="device (D-0017, M-0003), household (H-0003) or district")
    inject.add_argument("type", help="event type, e.g. gas_leak, burst, silent, clear")
    inject.add_argument(
        "--for", dest="duration", help="how long it lasts (e.g. 10m); default: until cleared"
    )
    inject.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="event parameter, e.g. rate_lel_per_min=8 (repeatable)",
    )
    inject.add_argument("--control-port", type=int, default=settings.sim_control_port)
    inject.set_defaults(handler=_inject)


def _run(args: argparse.Namespace) -> int:
    from firmware_sim.scenario import Scenario, load_scenario
    from gasguard.durations import parse_duration

    scenario = load_scenario(args.scenario) if args.scenario else Scenario()
    overrides = {
        k: getattr(args, k)
        for k in ("detectors", "meters", "districts")
        if getattr(args, k) is not None
    }
    if overrides:
        from firmware_sim.scenario import FleetSpec

        fleet = FleetSpec.model_validate({**scenario.fleet.model_dump(), **overrides})
        scenario = scenario.model_copy(update={"fleet": fleet})
    duration = parse_duration(args.duration) if args.duration else None
    report_every = parse_duration(args.report_every)
    return asyncio.run(_serve(args, scenario, duration, report_every))


async def _serve(
    args: argparse.Namespace, scenario: Any, duration: float | None, report_every: float
) -> int:
    import time

    from firmware_sim.clock import pace
    from firmware_sim.control import ControlServer, describe
    from firmware_sim.engine import Simulation
    from firmware_sim.modbus import ModbusFleet
    from firmware_sim.mqtt_native import MqttFleet

    settings = SimSettings()
    sim = Simulation(
        scenario,
        seed=args.seed,
        dt=args.dt,
        start_ms=int(time.time() * 1000),
        utc_offset_hours=settings.sim_utc_offset_hours,
    )
    modbus = ModbusFleet(
        sim,
        args.host,
        args.port,
        per_device_ports=args.per_device_ports,
        rtu_framing=args.rtu_over_tcp,
    )
    control = ControlServer(sim, modbus.endpoints, "127.0.0.1", args.control_port)
    publisher: MqttFleet | None = None
    await modbus.start()
    try:
        await control.start()
        if args.mqtt:
            publisher = MqttFleet(
                sim,
                settings.mqtt_host,
                settings.mqtt_port,
                gateway_id=args.gateway_id,
                seq_file=Path("var/sim") / f"{args.gateway_id}.seq",
                username=settings.mqtt_username,
                password=settings.mqtt_password.get_secret_value()
                if settings.mqtt_password
                else None,
            )
            await asyncio.to_thread(publisher.connect)
        _print_devices([describe(e) for e in modbus.endpoints], limit=12)
        print(
            f"scenario {scenario.name!r}: {len(scenario.events)} event(s); seed {sim.seed}; "
            f"speed x{args.speed}; control port {args.control_port}"
        )
        first = sim.fleet.detectors[0].id if sim.fleet.detectors else sim.fleet.meters[0].id
        print(f"make a leak from another terminal:  gasguard sim inject {first} gas_leak")
        print("Ctrl-C stops the simulation.", flush=True)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        every = max(1, sim.clock.ticks_for(report_every))

        def step() -> None:
            sim.step()
            if publisher is not None:
                publisher.publish_alarm_changes()
                if sim.clock.tick % every == 0:
                    publisher.publish_readings()
            if duration is not None and sim.clock.seconds >= duration:
                stop.set()

        await pace(sim.clock, step, stop, speed=args.speed)
        print("simulation stopped.")
        return 0
    finally:
        await control.stop()
        await modbus.stop()
        if publisher is not None:
            publisher.close()


def _print_devices(devices: list[dict[str, Any]], limit: int | None = None) -> None:
    print(
        f"{'device':<10} {'kind':<9} {'household':<10} {'district':<12} "
        f"{'address':<22} {'unit':>4}  profile"
    )
    shown = devices if limit is None else devices[:limit]
    for d in shown:
        size = f" ({d['meter_size']})" if d.get("meter_size") else ""
        print(
            f"{d['id']:<10} {d['kind']:<9} {d['household']:<10} {d['district']:<12} "
            f"{d['host'] + ':' + str(d['port']):<22} {d['unit']:>4}  {d['profile']}{size}"
        )
    if len(shown) < len(devices):
        print(f"... and {len(devices) - len(shown)} more ('gasguard sim list' shows all)")


def _list(args: argparse.Namespace) -> int:
    from firmware_sim.control import request

    reply = asyncio.run(request("127.0.0.1", args.control_port, {"cmd": "list"}))
    _print_devices(reply["devices"])
    return 0


def gateway_config_text(
    devices: list[dict[str, Any]], gateway_id: str, interval: str, broker: tuple[str, int]
) -> str:
    """A gateway config (TOML) that polls the given simulated devices over Modbus TCP."""
    lines = [
        "# Generated by 'gasguard sim gateway-config' for a simulated building.",
        f'gateway_id = "{gateway_id}"',
        "",
        "[broker]",
        f'host = "{broker[0]}"',
        f"port = {broker[1]}",
        "",
        "[polling]",
        f'interval = "{interval}"',
        'timeout = "1s"',
    ]
    for d in devices:
        lines += [
            "",
            "[[devices]]",
            f'id = "{d["id"]}"',
            f'kind = "{d["kind"]}"',
            f'profile = "{d["profile"]}"',
            'transport = "tcp"',
            f'host = "{d["host"]}"',
            f"port = {d['port']}",
            f"unit = {d['unit']}",
        ]
    return "\n".join(lines) + "\n"


def _gateway_config(args: argparse.Namespace) -> int:
    from firmware_sim.control import request

    reply = asyncio.run(request("127.0.0.1", args.control_port, {"cmd": "list"}))
    settings = SimSettings()
    broker = (settings.mqtt_host, settings.mqtt_port)
    print(gateway_config_text(reply["devices"], args.gateway_id, args.interval, broker), end="")
    return 0


def _inject(args: argparse.Namespace) -> int:
    from firmware_sim.control import request
    from firmware_sim.errors import ScenarioError
    from firmware_sim.scenario import parse_event

    event: dict[str, Any] = {"type": args.type, _target_key(args.target): args.target}
    if args.duration:
        event["duration"] = args.duration
    for item in args.set:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ScenarioError(f"--set {item!r}: expected NAME=VALUE")
        event[name.strip()] = _scalar(value.strip())
    parse_event(event)  # refuse a bad event here, before bothering the simulation
    asyncio.run(request("127.0.0.1", args.control_port, {"cmd": "inject", "event": event}))
    print(
        f"{args.type} started on {args.target}" + (f" for {args.duration}" if args.duration else "")
    )
    return 0


def _target_key(target: str) -> str:
    if target.startswith("district-"):
        return "district"
    if target.startswith("H-"):
        return "household"
    return "device"


def _scalar(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        with contextlib.suppress(ValueError):
            return convert(text)
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: gasguard sim ...")
