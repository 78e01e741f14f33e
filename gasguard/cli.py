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
    up = commands.add_parser(
        "up", help="run the whole chain on this machine (simulated building to console)"
    )
    up.add_argument("--port", type=int, default=8080, help="the console's port (default 8080)")
    up.add_argument("--var", type=Path, default=Path("var"), help="folder for data and logs")
    up.add_argument("--speed", type=float, default=1.0, help="simulated seconds per second")
    up.add_argument("--interval", default="5s", help="the gateway's poll interval")
    up.set_defaults(handler=_up)
    return parser


def _up(args: argparse.Namespace) -> int:
    from gasguard.up import run

    return run(args.var, args.port, args.speed, args.interval)


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
