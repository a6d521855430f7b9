"""What this machine gives a worker's process: its cores and its CPU limit.

A process may run on the cores of its affinity mask (``os.sched_getaffinity``),
but a container's CPU limit (``docker run --cpus``, a Kubernetes pod's
``limits.cpu``) lets it keep only so many of them busy: the kernel's CFS
quota, set on its cgroup, stops it for the rest of each period once it has
used its share.  A pod limited to 4 CPUs on a 64-core node sees 64 cores;
64 torch threads there would spend most of each period stopped.  So the
worker's default thread count (:func:`~pyg_adaqp.train.launch.default_threads`)
and the cost model's core contention
(:func:`~pyg_adaqp.assign.cost_model.coding_slowdown`) count
:func:`usable_cpus`, not the cores alone.
"""
from __future__ import annotations

import os
from pathlib import Path

#: Where the cgroup hierarchy is mounted (v2's single tree, or v1's one per controller).
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: This process's cgroup in each hierarchy (``ID:CONTROLLERS:PATH`` per line).
CGROUP_MEMBERSHIP = Path("/proc/self/cgroup")


def usable_cores() -> tuple[int, ...]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def _ancestors(path: str) -> list[str]:
    """``"/a/b"`` -> ``["a/b", "a", ""]``: a cgroup's path and its ancestors', relative."""
    parts = [p for p in path.strip("/").split("/") if p]
    return ["/".join(parts[:n]) for n in range(len(parts), -1, -1)]


def _read_limit(directory: Path) -> float | None:
    """The CPU limit set on one cgroup directory (None: none set, or not readable)."""
    try:
        if (directory / "cpu.max").is_file():                   # cgroup v2
            quota, period = (directory / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if (directory / "cpu.cfs_quota_us").is_file():          # cgroup v1
            quota = int((directory / "cpu.cfs_quota_us").read_text())
            period = int((directory / "cpu.cfs_period_us").read_text())
            return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError, ZeroDivisionError):
        return None                                              # unreadable: no limit known
    return None


def _cpu_cgroup(membership: Path) -> tuple[str, str] | None:
    """``(hierarchy, path)`` of this process's CPU cgroup: ``("", path)`` on cgroup v2,
    ``(controller directory, path)`` on v1; None where no line names one."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    v2 = None
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, path = fields
        if hierarchy == "0" and controllers == "":
            v2 = ("", path)
        elif "cpu" in controllers.split(","):
            return controllers, path                             # v1's cpu controller rules
    return v2


def cpu_quota(root: Path = CGROUP_ROOT, membership: Path = CGROUP_MEMBERSHIP) -> float | None:
    """CPUs per scheduling period that this process's cgroup may use: the
    smallest CPU limit set on its cgroup or any ancestor; None where none is
    set or none can be read.

    cgroup v2: ``cpu.max`` (``"max 100000"``, or ``"QUOTA PERIOD"`` in
    microseconds); v1: the ``cpu`` controller's ``cpu.cfs_quota_us`` (-1:
    none) over ``cpu.cfs_period_us``.  The cgroup's path comes from
    `membership`; a container often sees its own cgroup mounted at `root`
    (a cgroup namespace), so every ancestor of that path under `root` is
    read, down to `root` itself.
    """
    found = _cpu_cgroup(membership)
    if found is None:
        return None
    hierarchy, path = found
    bases = [root] if not hierarchy else list(dict.fromkeys([root / hierarchy, root / "cpu"]))
    limits = [limit for base in bases for rel in _ancestors(path)
              if (limit := _read_limit(base / rel if rel else base)) is not None]
    return min(limits) if limits else None


def cpu_group(membership: Path = CGROUP_MEMBERSHIP) -> str:
    """What tells this process's CPU cgroup from another's on the same machine:
    its cgroup namespace and path (containers in cgroup namespaces of their
    own all read their path as ``/``).  Processes in one group share its
    :func:`cpu_quota`."""
    try:
        namespace = os.readlink("/proc/self/ns/cgroup")
    except OSError:
        namespace = ""
    found = _cpu_cgroup(membership)
    return f"{namespace} {found[1] if found else ''}"


def usable_cpus() -> float:
    """How many CPUs this process can keep busy: its :func:`usable_cores`, at
    most its cgroup's :func:`cpu_quota`."""
    quota, cores = cpu_quota(), float(len(usable_cores()))
    return cores if quota is None else min(cores, quota)
