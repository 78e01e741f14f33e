"""CPU accounting for the benches: CPU time of named processes (from /proc) and of the whole
machine over a window, so that a figure can be read next to what else ran meanwhile."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psycopg


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def postgres_pids(url: str) -> list[int]:
    """Our database's backends and the server's writers (WAL, checkpoints, autovacuum)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND "
            "(datname = current_database() OR backend_type IN ('walwriter', 'checkpointer', "
            "'background writer', 'autovacuum launcher', 'autovacuum worker'))"
        ).fetchall()
    return [int(r[0]) for r in rows]


class CpuMeter:
    """CPU time of named processes (and of the whole machine) over a window."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.t0 = time.monotonic()
        self.cpu0 = {name: [cpu_seconds(p) for p in pids] for name, pids in groups.items()}
        self.machine0 = machine_jiffies()

    def report(self) -> str:
        wall = time.monotonic() - self.t0
        parts = []
        ours = 0.0
        for name, pids in self.groups.items():
            used = sum(
                max(cpu_seconds(p) - c0, 0.0) for p, c0 in zip(pids, self.cpu0[name], strict=True)
            )
            ours += used
            parts.append(f"{name} {100 * used / wall:.0f}%")
        busy1, total1 = machine_jiffies()
        busy = (busy1 - self.machine0[0]) / max(total1 - self.machine0[1], 1)
        cores = os.cpu_count() or 1
        other = max(busy * cores * 100 - 100 * ours / wall, 0.0)
        return (
            "CPU (% of one core): "
            + ", ".join(parts)
            + f", everything else on the machine {other:.0f}% (machine {100 * busy:.0f}% busy "
            f"of {cores} cores)"
        )
