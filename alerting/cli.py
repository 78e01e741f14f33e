"""``gasguard hotline run`` (the service and its console) and ``gasguard hotline user add``."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    hotline = commands.add_parser("hotline", help="the hotline: tickets, dispatch, console")
    sub = hotline.add_subparsers(dest="hotline_command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="serve the API and the dispatcher console until Ctrl-C")
    run.add_argument("--host", help="listen address (default GASGUARD_HOTLINE_HOST)")
    run.add_argument("--port", type=int, help="listen port (default GASGUARD_HOTLINE_PORT)")
    run.set_defaults(handler=_run)
    user = sub.add_parser("user", help="hotline users")
    user_sub = user.add_subparsers(dest="user_command", required=True, metavar="COMMAND")
    add = user_sub.add_parser("add", help="create a user, or replace one's role and password")
    add.add_argument("username")
    add.add_argument(
        "--role", required=True,
        choices=["dispatcher", "call_taker", "engineer", "technician", "admin"],
    )  # fmt: skip
    add.add_argument("--name", help="display name (default: the username)")
    add.add_argument(
        "--password-env",
        metavar="VAR",
        help="read the password from this environment variable instead of asking",
    )
    add.set_defaults(handler=_add_user)


def _run(args: argparse.Namespace) -> int:
    import uvicorn

    from alerting.app import create_app
    from alerting.settings import HotlineSettings

    settings = HotlineSettings()
    if args.host:
        settings.hotline_host = args.host
    if args.port is not None:
        settings.hotline_port = args.port
    print(f"hotline console: http://{settings.hotline_host}:{settings.hotline_port}/")
    uvicorn.run(
        create_app(settings),
        host=settings.hotline_host,
        port=settings.hotline_port,
        log_level="info",
        access_log=False,
    )
    return 0


def _add_user(args: argparse.Namespace) -> int:
    import psycopg

    from alerting.auth import add_user
    from alerting.settings import HotlineSettings

    if args.password_env:
        password = os.environ.get(args.password_env, "")
        if not password:
            raise ValueError(f"environment variable {args.password_env} is empty or not set")
    else:
        password = getpass.getpass(f"password for {args.username}: ")

    async def main() -> None:
        url = HotlineSettings().database_url
        try:
            conn = await psycopg.AsyncConnection.connect(url, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise ValueError(
                f"cannot connect to the database (GASGUARD_DATABASE_URL): {exc}"
            ) from None
        async with conn, conn.cursor() as cur:
            await add_user(cur, args.username, args.name or args.username, args.role, password)

    asyncio.run(main())
    print(f"user {args.username} ({args.role}) ready")
    return 0
