"""The ``gasguard`` command: one subcommand per service.

Each service registers its own subcommands; their heavy imports happen only when the
command runs. Errors a user can fix are printed as one line, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from gasguard import __version__


def build_parser() -> argparse.ArgumentParser:
    from alerting.cli import register as register_hotline
    from firmware_sim.cli import register as register_sim
    from gasguard.grafana import register as register_grafana
    from gateway.cli import register as register_gateway
    from ingest.cli import register as register_ingest

    parser = argparse.ArgumentParser(prog="gasguard", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"gasguard {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_sim(commands)
    register_gateway(commands)
    register_ingest(commands)
    register_hotline(commands)
    register_grafana(commands)
    up = commands.add_parser(
        "up", help="run the whole chain on this machine (simulated building to console)"
    )
    up.add_argument("--port", type=int, default=8080, help="the console's port (default 8080)")
    up.add_argument("--var", type=Path, default=Path("var"), help="folder for data and logs")
    up.add_argument("--speed", type=float, default=1.0, help="simulated seconds per second")
    up.add_argument("--interval", default="5s", help="the gateway's poll interval")
    up.add_argument(
        "--broker", choices=["auto", "mosquitto", "amqtt"], default="auto",
        help="the private broker when none is configured (auto: Mosquitto when installed)",
    )  # fmt: skip
    up.set_defaults(handler=_up)
    selftest = commands.add_parser(
        "selftest", help="test the whole chain with simulated devices in test mode (no crew sent)"
    )
    selftest.add_argument("--url", default="http://127.0.0.1:8080", help="the hotline")
    selftest.add_argument("--user", required=True, help="a technician or admin of the hotline")
    selftest.add_argument(
        "--password-env",
        metavar="VAR",
        default="GASGUARD_SELFTEST_PASSWORD",
        help="environment variable holding the password (default GASGUARD_SELFTEST_PASSWORD)",
    )
    selftest.add_argument(
        "--control-port", type=int, required=True, help="the simulator's control port"
    )
    selftest.add_argument(
        "--steps",
        default="leak,burst",
        help="comma-separated: leak, burst, silence (default leak,burst)",
    )
    selftest.add_argument("--devices", help="comma-separated device ids to use (default: chosen)")
    selftest.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the tickets"
    )
    selftest.set_defaults(handler=_selftest)
    return parser


def _selftest(args: argparse.Namespace) -> int:
    import os

    from gasguard.selftest import SelftestError, main

    password = os.environ.get(args.password_env, "")
    if not password:
        raise ValueError(f"set the password in the environment variable {args.password_env}")
    try:
        return main(
            args.url,
            args.user,
            password,
            control_port=args.control_port,
            steps=[s.strip() for s in args.steps.split(",") if s.strip()],
            devices=args.devices.split(",") if args.devices else None,
            timeout=args.timeout,
        )
    except SelftestError as exc:
        raise ValueError(str(exc)) from None


def _up(args: argparse.Namespace) -> int:
    from gasguard.up import run

    return run(args.var, args.port, args.speed, args.interval, args.broker)


def main(argv: Sequence[str] | None = None) -> int:
    from firmware_sim.errors import SimError
    from gasguard.profiles import ProfileError
    from gateway.config import GatewayConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    try:
        code: int = args.handler(args)
    except (SimError, ProfileError, GatewayConfigError, ValueError) as exc:
        print(f"gasguard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
