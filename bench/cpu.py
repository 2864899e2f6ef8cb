"""CPU time of processes, read from /proc/<pid>/stat (user + system), for the benchmarks.

``CPUMeter({"monolith": pid, ...})`` reads every process's CPU time when made and again at
``stop()``; ``per_request(n)`` is each one's CPU milliseconds per request. A process that has
gone away by then counts what was last read. The load generator is this process itself
(``os.getpid()``: its threads included).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of *pid* (all its threads), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: count the fields after its ')'.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def steal_seconds() -> float:
    """Seconds of CPU stolen from this machine (all CPUs), from /proc/stat."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(parts[8]) / TICK if len(parts) > 8 else 0.0


class CPUMeter:
    """The CPU time each named process spends between construction and ``stop()``."""

    def __init__(self, pids: Mapping[str, int | None]) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid is not None}
        self.before = {name: cpu_seconds(pid) or 0.0 for name, pid in self.pids.items()}
        self.steal_before = steal_seconds()
        self.used: dict[str, float] = {}
        self.steal = 0.0

    def stop(self) -> CPUMeter:
        for name, pid in self.pids.items():
            now = cpu_seconds(pid)
            self.used[name] = (now if now is not None else self.before[name]) - self.before[name]
        self.steal = steal_seconds() - self.steal_before
        return self

    def per_request(self, requests: int) -> dict[str, float]:
        """CPU milliseconds per request of each process."""
        return (
            {name: used * 1000 / requests for name, used in self.used.items()} if requests else {}
        )
