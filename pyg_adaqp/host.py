"""What this machine gives a worker's process: its cores and its CPU limit.

A process may run on the cores of its affinity mask (``os.sched_getaffinity``),
but a container's CPU limit (``docker run --cpus``, a Kubernetes pod's
``limits.cpu``) lets it keep only so many of them busy: the kernel's CFS
quota, set on its cgroup, stops it for the rest of each period once it has
used its share.  A pod limited to 4 CPUs on a 64-core node sees 64 cores;
64 torch threads there would spend most of each period stopped.  So the
worker's default thread count (:func:`~pyg_adaqp.train.launch.default_threads`)
counts :func:`usable_cpus`, and the cost model's core contention
(:func:`~pyg_adaqp.assign.cost_model.coding_slowdown`) counts each worker's
limit and the cgroup that sets it (:func:`cpu_group`) beside its cores.
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


def cpu_limit(root: Path = CGROUP_ROOT, membership: Path = CGROUP_MEMBERSHIP
              ) -> tuple[str, float] | None:
    """The cgroup whose CPU limit binds this process and that limit, in CPUs
    per scheduling period: the smallest limit set on its cgroup or an
    ancestor under `root`; None where none is set or none can be read.

    cgroup v2: ``cpu.max`` (``"max 100000"``, or ``"QUOTA PERIOD"`` in
    microseconds), under `root` or, on a hybrid system, ``root/unified``;
    v1: the ``cpu`` controller's ``cpu.cfs_quota_us`` (-1: none) over
    ``cpu.cfs_period_us``.  The cgroup's path comes from `membership`.  A
    container may see its own cgroup bind-mounted at the hierarchy's root
    while `membership` gives its path on the host, so every ancestor of
    that path is read, down to the hierarchy's root itself (in a cgroup
    namespace of its own the path is ``/``: the root).  Returns the binding
    cgroup's directory relative to `root`.
    """
    return _smallest_limit(root, _cpu_cgroup(membership))


def _smallest_limit(root: Path, found: tuple[str, str] | None) -> tuple[str, float] | None:
    """:func:`cpu_limit` of the CPU cgroup `found` (:func:`_cpu_cgroup`)."""
    if found is None:
        return None
    hierarchy, path = found
    bases = [hierarchy, "cpu"] if hierarchy else ["", "unified"]
    best = None
    for base in dict.fromkeys(bases):
        for rel in _ancestors(path):
            where = "/".join(p for p in (base, rel) if p)
            limit = _read_limit(root / where if where else root)
            if limit is not None and (best is None or limit < best[1]):
                best = (where, limit)
    return best


def cpu_quota(root: Path = CGROUP_ROOT, membership: Path = CGROUP_MEMBERSHIP) -> float | None:
    """This process's CPU limit in CPUs (:func:`cpu_limit`); None where none is set."""
    found = cpu_limit(root, membership)
    return None if found is None else found[1]


def cpu_group(root: Path = CGROUP_ROOT, membership: Path = CGROUP_MEMBERSHIP
              ) -> tuple[str, float | None]:
    """What tells the cgroup whose CPU limit binds this process from another's
    on the same machine, and that limit (None: none): the cgroup namespace
    and the binding cgroup (:func:`cpu_limit`), else this process's own
    cgroup.  Processes of one group share its limit: sibling cgroups under
    one limited parent are one group (containers in cgroup namespaces of
    their own all read their path as ``/``: the namespace tells them apart)."""
    try:
        namespace = os.readlink("/proc/self/ns/cgroup")
    except OSError:
        namespace = ""
    found = _cpu_cgroup(membership)          # read once, for the limit and the fallback
    limit = _smallest_limit(root, found)
    if limit is not None:
        return f"{namespace} {limit[0]}", limit[1]
    return f"{namespace} {found[1] if found else ''}", None


def usable_cpus() -> float:
    """How many CPUs this process can keep busy: its :func:`usable_cores`, at
    most its cgroup's :func:`cpu_quota` (a fraction where the limit is one)."""
    quota, cores = cpu_quota(), float(len(usable_cores()))
    return cores if quota is None else min(cores, quota)
