"""A process's resident and peak memory from the kernel (Linux), for the partitioner's report."""
from __future__ import annotations


def status_gib(field: str, pid: int | str = "self") -> float | None:
    """A ``/proc/<pid>/status`` memory field (``VmRSS``, ``VmHWM``) in GiB; None off Linux."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Resets this process's peak-RSS mark (``VmHWM``) to its current RSS; False off Linux."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
