"""Gateway polling throughput: device polls per second against simulated devices over real
Modbus TCP, the gateway's concurrent pollers against a one-connection sequential baseline,
measured in the same run. Also the gateway's CPU time per 1,000 polls.

    .venv/bin/python bench/gateway_polls.py [--devices 1000] [--seconds 5] [--sim-processes 1]

The simulated devices run in separate processes (``gasguard sim run``), one port per device,
so the figure is the gateway's, not the simulator's, as far as the machine's cores allow:
on a 2-core machine the simulator and the gateway share them, so read the ratio first. The
CPU each side used per 1,000 polls is printed, and so is the CPU other work on the machine
took during the run: polls/s falls with it, CPU per poll hardly. On an otherwise idle
machine the gateway's one asyncio thread is the limit (a core's worth of polls). A last run
polls with the pymodbus TCP client (the fallback) instead of the built-in one.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gasguard.fields import Kind  # noqa: E402
from gasguard.profiles import builtin_profile  # noqa: E402
from gasguard.runner import run  # noqa: E402
from gateway.links import TcpClient, tcp_link  # noqa: E402
from gateway.poller import DevicePoller, PollSettings  # noqa: E402


def free_block(count: int) -> int:
    import random

    for _ in range(500):
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
    raise RuntimeError("no free port block")


def start_sims(
    devices: int, processes: int
) -> tuple[list[subprocess.Popen[bytes]], list[tuple[Kind, int]]]:
    """Households with a detector and a meter each; one port per device."""
    procs: list[subprocess.Popen[bytes]] = []
    endpoints: list[tuple[Kind, int]] = []
    kinds: tuple[Kind, Kind] = ("detector", "meter")
    per = devices // processes
    for _ in range(processes):
        base = free_block(per)
        control = free_block(1)
        households = per // 2
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gasguard.cli",
                    "sim",
                    "run",
                    "--detectors",
                    str(households),
                    "--meters",
                    str(households),
                    "--per-device-ports",
                    "--port",
                    str(base),
                    "--control-port",
                    str(control),
                    "--speed",
                    "1",
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        # household by household: detector on base + 2i, meter on base + 2i + 1
        endpoints += [(kinds[i % 2], base + i) for i in range(households * 2)]
        deadline = time.monotonic() + 60
        while True:  # the control port opens once every Modbus port listens
            try:
                socket.create_connection(("127.0.0.1", control), 0.2).close()
                break
            except OSError:
                if procs[-1].poll() is not None or time.monotonic() > deadline:
                    for p in procs:
                        p.kill()
                    raise RuntimeError(f"simulator on ports {base}+ did not start") from None
                time.sleep(0.2)
    return procs, endpoints


def pollers(endpoints: list[tuple[Kind, int]], client: TcpClient) -> list[DevicePoller]:
    profiles = {k: builtin_profile(f"{k}-generic") for k in ("detector", "meter")}
    settings = PollSettings(interval=0.0, timeout=2.0)
    out = []
    for i, (kind, port) in enumerate(endpoints):
        link = tcp_link("127.0.0.1", port, timeout=3.0, client=client)
        out.append(
            DevicePoller(f"X-{i}", kind, 1, profiles[kind], link, settings, lambda r, u: None)
        )
    return out


class CpuMeter:
    """CPU seconds used between start and stop: this process, the simulators (from /proc),
    and the whole machine, so that the load of other work on it shows."""

    def __init__(self, sims: list[subprocess.Popen[bytes]]) -> None:
        self.sims = sims

    @staticmethod
    def _proc(pid: int) -> float:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return math.nan
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _machine() -> float:
        try:
            with open("/proc/stat") as f:
                jiffies = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return math.nan
        busy = sum(jiffies) - jiffies[3] - jiffies[4]  # less idle and iowait
        return busy / os.sysconf("SC_CLK_TCK")

    def _now(self) -> tuple[float, float, float, float]:
        sims = sum(self._proc(p.pid) for p in self.sims)
        return time.monotonic(), time.process_time(), sims, self._machine()

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> Cpu:
        end = self._now()
        wall, own, sims, machine = (b - a for a, b in zip(self._start, end, strict=True))
        return Cpu(wall, own, sims, machine - own - sims)


@dataclass(frozen=True)
class Cpu:
    wall: float
    gateway: float
    sims: float
    others: float


@dataclass(frozen=True)
class Run:
    polls: int
    failures: int
    cpu: Cpu

    @property
    def rate(self) -> float:
        return self.polls / self.cpu.wall

    def per_1000(self, seconds: float) -> float:
        return seconds / max(self.polls, 1) * 1e6


async def sequential(endpoints: list[tuple[Kind, int]], seconds: float, meter: CpuMeter) -> Run:
    """The naive peer: one connection at a time, one device after another."""
    devices = pollers(endpoints, "builtin")
    polls, i = 0, 0
    meter.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await devices[i % len(devices)].read()
        polls += 1
        i += 1
    cpu = meter.stop()
    for d in devices:
        await d.link.close()
    return Run(polls, 0, cpu)


async def concurrent(
    endpoints: list[tuple[Kind, int]], seconds: float, meter: CpuMeter, client: TcpClient
) -> Run:
    """The gateway: every device on its own schedule (here: as fast as it answers)."""
    devices = pollers(endpoints, client)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(d.run(stop)) for d in devices]
    await asyncio.sleep(1.0)  # connections up
    start = sum(d.stats.polls for d in devices)
    failures = sum(d.stats.failures for d in devices)
    meter.start()
    await asyncio.sleep(seconds)
    polls = sum(d.stats.polls for d in devices) - start
    cpu = meter.stop()
    failures = sum(d.stats.failures for d in devices) - failures
    stop.set()
    await asyncio.gather(*tasks)
    for d in devices:
        await d.link.close()
    return Run(polls, failures, cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--sim-processes", type=int, default=1)
    parser.add_argument(
        "--no-pymodbus", action="store_true", help="skip the run with the pymodbus client"
    )
    args = parser.parse_args()
    procs, endpoints = start_sims(args.devices, args.sim_processes)
    meter = CpuMeter(procs)
    try:
        # as `gasguard gateway run` runs: on uvloop when installed (gasguard.runner)
        base = run(sequential(endpoints, args.seconds, meter))
        gw = run(concurrent(endpoints, args.seconds, meter, "builtin"))
        old = None
        if not args.no_pymodbus:
            old = run(concurrent(endpoints, args.seconds, meter, "pymodbus"))
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait(30)
    cpus = os.cpu_count()
    print(
        f"devices: {len(endpoints)} (one port each, {args.sim_processes} simulator "
        f"process(es)), {cpus} CPUs, {args.seconds:g} s per run; every poll reads 2 blocks"
    )
    print(f"baseline, one connection, sequential:  {base.rate:8.0f} polls/s")
    print(
        f"gateway, concurrent pollers:           {gw.rate:8.0f} polls/s  "
        f"({gw.failures} failed polls)"
    )
    print(f"ratio gateway/baseline:                {gw.rate / max(base.rate, 1e-9):8.2f}x")
    print(f"gateway CPU per 1,000 polls:           {gw.per_1000(gw.cpu.gateway):8.1f} ms")
    print(f"simulator CPU per 1,000 polls:         {gw.per_1000(gw.cpu.sims):8.1f} ms")
    print(
        f"cores busy during the gateway run:     gateway {gw.cpu.gateway / gw.cpu.wall:.2f}, "
        f"simulators {gw.cpu.sims / gw.cpu.wall:.2f}, "
        f"other work {gw.cpu.others / gw.cpu.wall:.2f} (of {cpus})"
    )
    if old is not None:
        print(
            f"same gateway, pymodbus TCP client:    {old.rate:8.0f} polls/s, "
            f"{old.per_1000(old.cpu.gateway):.1f} ms CPU per 1,000 polls  "
            f"(builtin client {gw.rate / max(old.rate, 1e-9):.2f}x the polls/s, "
            f"{old.cpu.gateway / old.polls / (gw.cpu.gateway / max(gw.polls, 1)):.2f}x less "
            "CPU per poll)"
        )
    print(
        "gateway process limit:                 "
        f"{1000 / max(gw.per_1000(gw.cpu.gateway), 1e-9) * 1000:8.0f} polls/s "
        "(one core / its CPU per poll: asyncio is single-threaded)"
    )
    met = "met" if gw.rate >= 5000 else "NOT met"
    print(f"goal >= 5,000 polls/s:                 {met}")


if __name__ == "__main__":
    main()
