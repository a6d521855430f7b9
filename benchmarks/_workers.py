"""What the benchmarks share: the machine they ran on, the command, CPU contention.

Workers are started with :func:`pyg_adaqp.train.workers.run_workers`.
"""
from __future__ import annotations

import os
import platform
import resource
import sys
import time

import torch

from pyg_adaqp import host


def usable_cores() -> int:
    """Cores this process may run on."""
    return len(host.usable_cores())


def print_header() -> int:
    """Prints the exact command and the machine; returns the usable cores."""
    print("command: " + " ".join(["python"] + sys.argv))
    print("machine: " + machine_line())
    return usable_cores()


def machine_line() -> str:
    """One line describing where the benchmark ran."""
    cores = os.cpu_count()
    usable = usable_cores()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    quota = host.cpu_quota()
    limit = f", a CPU limit of {quota:g}" if quota is not None else ""
    return (f"{cpu}; {usable} usable cores ({cores} logical{limit}); torch {torch.__version__}; "
            f"Python {platform.python_version()}; {platform.system()} {platform.release()}")


def _busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (None off Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and its finished (joined) children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return total


class CpuMonitor:
    """How much CPU *other* processes took while the benchmark ran.

    Timings on a small machine are only meaningful when nothing else runs;
    this reads the machine's busy time (``/proc/stat``) and subtracts this
    process's and its joined workers' own CPU time.
    """

    def __init__(self) -> None:
        self.wall = time.monotonic()
        self.busy = _busy_cpu_seconds()
        self.own = _own_cpu_seconds()
        self.load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    def report(self) -> str:
        wall = time.monotonic() - self.wall
        busy = _busy_cpu_seconds()
        if busy is None or self.busy is None:
            return "CPU contention: unknown (no /proc/stat)"
        cores = usable_cores()
        own = _own_cpu_seconds() - self.own
        other = max(0.0, (busy - self.busy) - own)
        share = other / (wall * cores) if wall > 0 else 0.0
        line = (f"CPU during the run: {wall:.1f} s wall on {cores} cores; this benchmark used "
                f"{own:.1f} core-s, other processes {other:.1f} core-s ({share:.0%} of the "
                f"machine); 1-min load average at the start: {self.load:.2f}")
        if share > 0.05:
            line += ("\nWARNING: other processes competed for the CPU during the run: absolute "
                     "times are inflated and noisy; rerun on an idle machine for clean numbers.")
        return line
