"""Shared fixtures: free ports, and a private Mosquitto started with the project's config."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from gasguard.local_services import stop_process

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
MOSQUITTO_CONF = ROOT / "deploy" / "mosquitto" / "gasguard.conf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_block(count: int) -> int:
    """The first of ``count`` consecutive free ports, below the ephemeral range (so that no
    client socket grabs one of them between this check and the bind)."""
    import random

    for _ in range(200):
        base = random.randrange(20000, 32000 - count)
        socks = []
        try:
            for p in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports found")


def call_in_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], T], timeout: float = 10.0) -> T:
    """Run ``fn`` in the thread of ``loop`` (a service's own) and return what it returns."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the caller
            future.set_exception(exc)

    loop.call_soon_threadsafe(run)
    return future.result(timeout)


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@dataclass
class Broker:
    """A private Mosquitto that a test can stop and start again on the same port."""

    host: str
    port: int
    conf: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            pytest.fail("mosquitto is not installed (scripts/services installs it)")
        self.process = subprocess.Popen(
            [binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        """A clean shutdown (mosquitto saves its persistent sessions)."""
        if self.process is not None:
            stop_process(self.process, grace_s=10)
        self.process = None


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A Mosquitto of our own on a free port, configured with deploy/mosquitto/gasguard.conf."""
    port = free_port()
    folder = tmp_path / f"mosquitto-{port}"
    folder.mkdir()
    conf = folder / "mosquitto.conf"
    log = folder / "mosquitto.log"
    conf.write_text(
        # run as root, mosquitto would switch to its own user, who cannot write in tmp_path
        f"listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n"
        f"persistence_location {folder}/\nlog_dest file {log}\n" + MOSQUITTO_CONF.read_text()
    )
    broker = Broker("127.0.0.1", port, conf, log)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
