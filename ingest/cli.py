"""``gasguard db migrate``, ``gasguard devices import FILE.csv``, ``gasguard ingest run``."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from gasguard.runner import run


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = commands.add_parser("db", help="the database: migrations")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    migrate = db_sub.add_parser("migrate", help="apply the schema migrations that are missing")
    migrate.add_argument(
        "--mode",
        choices=["auto", "stock", "timescale"],
        default="auto",
        help="storage mode for a new database (default: TimescaleDB when installed)",
    )
    migrate.set_defaults(handler=_migrate)

    devices = commands.add_parser("devices", help="the device registry")
    dev_sub = devices.add_subparsers(dest="devices_command", required=True, metavar="COMMAND")
    imp = dev_sub.add_parser("import", help="import gateways, households and devices from CSV")
    imp.add_argument("file", type=Path)
    imp.add_argument(
        "--wait",
        type=float,
        default=5.0,
        metavar="S",
        help="wait up to S seconds for running ingest consumers to subscribe (default 5)",
    )
    imp.set_defaults(handler=_import)

    ingest = commands.add_parser(
        "ingest", help="the ingest consumer (MQTT -> detection -> database)"
    )
    ing_sub = ingest.add_subparsers(dest="ingest_command", required=True, metavar="COMMAND")
    run = ing_sub.add_parser("run", help="consume until Ctrl-C")
    run.set_defaults(handler=_run)
    forget = ing_sub.add_parser(
        "forget",
        help="discard a removed consumer's broker session and its recorded subscriptions",
        description="After lowering GASGUARD_INGEST_SHARDS, once the remaining consumers run "
        "with the new count: discard the session of a consumer that no longer runs (e.g. "
        "gasguard-ingest-2), which would otherwise keep collecting copies of its old "
        "gateways' batches in the broker for a week.",
    )
    forget.add_argument("client_id", help="the removed consumer's MQTT client id")
    forget.set_defaults(handler=_forget)


async def _connect() -> object:
    import psycopg

    from gasguard.settings import CommonSettings

    url = CommonSettings().database_url
    try:
        return await psycopg.AsyncConnection.connect(url, connect_timeout=10)
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "no answer"
        raise ValueError(
            f"cannot connect to the database (GASGUARD_DATABASE_URL): {first}"
        ) from None


def _migrate(args: argparse.Namespace) -> int:
    from ingest.storage import MigrationError, choose_mode, migrate

    async def main() -> None:
        conn = await _connect()
        async with conn:  # type: ignore[attr-defined]
            mode = None if args.mode == "auto" else args.mode
            chosen = mode or await choose_mode(conn)  # type: ignore[arg-type]
            try:
                done = await migrate(conn, chosen)  # type: ignore[arg-type]
            except MigrationError as exc:
                raise ValueError(str(exc)) from None
            print(
                f"storage: {chosen}; applied {len(done)} migration(s)"
                + (": " + ", ".join(done) if done else "")
            )

    asyncio.run(main())
    return 0


def _import(args: argparse.Namespace) -> int:
    import time

    from ingest.registry import RegistryError, import_rows, listeners, read_csv

    async def main() -> tuple[int, dict[str, list[str]]]:
        rows = read_csv(args.file)
        conn = await _connect()
        async with conn:  # type: ignore[attr-defined]
            count = await import_rows(conn, rows)  # type: ignore[arg-type]
            gateways = sorted({r.gateway_id for r in rows})
            # running consumers subscribe to new gateways at once: wait a little for them
            deadline = time.monotonic() + args.wait
            heard = await listeners(conn, gateways)  # type: ignore[arg-type]
            while not all(heard.values()) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                heard = await listeners(conn, gateways)  # type: ignore[arg-type]
            return count, heard

    try:
        count, heard = asyncio.run(main())
    except RegistryError as exc:
        raise ValueError(f"nothing imported:\n{exc}") from None
    print(f"imported {count} devices from {args.file}")
    for gateway, clients in heard.items():
        if clients:
            print(f"  {gateway}: heard by ingest ({', '.join(clients)})")
        else:
            print(
                f"  {gateway}: no ingest consumer subscribed yet; switch it on only once one "
                "is (a sharded consumer hears only the gateways of its registry)"
            )
    return 0


def _run(args: argparse.Namespace) -> int:
    from ingest.consumer import Ingest
    from ingest.settings import IngestSettings

    async def main() -> None:
        ingest = Ingest(IngestSettings())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await ingest.run(stop)
        except RuntimeError as exc:
            raise ValueError(str(exc)) from None

    run(main())  # on uvloop when installed
    print("ingest stopped.")
    return 0


def _forget(args: argparse.Namespace) -> int:
    import psycopg

    from gasguard.mqtt_link import MqttLink
    from ingest.settings import IngestSettings

    settings = IngestSettings()

    async def main() -> int:
        link = MqttLink(
            settings.mqtt_options(
                client_id=args.client_id,
                clean_start=True,  # the broker discards the session it kept for this id
                session_expiry_s=0,
            )
        )
        task = asyncio.create_task(link.run())
        try:
            if not await link.wait_connected(15):
                raise ValueError(
                    f"cannot reach the MQTT broker {settings.mqtt_host}:{settings.mqtt_port}: "
                    f"{link.last_failure or 'no answer'}"
                )
        finally:
            await link.stop(send_offline=False)
            task.cancel()
        try:
            async with await psycopg.AsyncConnection.connect(
                settings.database_url, connect_timeout=10
            ) as conn:
                cur = await conn.execute(
                    "DELETE FROM ingest_subscriptions WHERE client_id = %s", (args.client_id,)
                )
                return cur.rowcount
        except psycopg.OperationalError as exc:
            raise ValueError(f"cannot connect to the database: {exc}") from None

    rows = asyncio.run(main())
    print(f"discarded the broker session of {args.client_id} and {rows} recorded subscription(s)")
    return 0
