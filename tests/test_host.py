"""`pyg_adaqp.host`: a worker's cores and its container's CPU limit, read from
cgroup files laid out as cgroup v1 and v2 lay them out."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

from pyg_adaqp import host
from pyg_adaqp.host import cpu_group, cpu_limit, cpu_quota, usable_cores, usable_cpus

launcher = importlib.import_module("pyg_adaqp.train.launch")  # `launch` is also a function


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _membership(tmp_path: Path, text: str, name: str = "self_cgroup") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_cgroup_v2_limit_is_the_smallest_over_the_cgroup_and_its_ancestors(tmp_path):
    root = _tree(tmp_path / "fs", {"cpu.max": "max 100000\n",
                                   "kubepods/cpu.max": "max 100000\n",
                                   "kubepods/pod1/cpu.max": "400000 100000\n",
                                   "kubepods/pod1/c1/cpu.max": "max 100000\n"})
    member = _membership(tmp_path, "0::/kubepods/pod1/c1\n")
    assert cpu_quota(root, member) == 4.0
    assert cpu_limit(root, member) == ("kubepods/pod1", 4.0)
    # two containers of one pod share the pod's limit: one group
    sibling = _membership(tmp_path, "0::/kubepods/pod1/c2\n", "sibling_cgroup")
    assert cpu_group(root, sibling) == cpu_group(root, member)
    assert cpu_group(root, member)[1] == 4.0
    assert cpu_group(root, member)[0].endswith(" kubepods/pod1")
    # a tighter limit lower down rules
    (root / "kubepods/pod1/c1/cpu.max").write_text("150000 100000\n")
    assert cpu_quota(root, member) == 1.5
    assert cpu_limit(root, member) == ("kubepods/pod1/c1", 1.5)
    assert cpu_group(root, sibling) != cpu_group(root, member)


def test_cgroup_v2_in_a_namespace_of_its_own_reads_the_root(tmp_path):
    # docker run --cpus=2.5 with a cgroup namespace: the process's path is "/"
    root = _tree(tmp_path / "fs", {"cpu.max": "250000 100000\n"})
    assert cpu_quota(root, _membership(tmp_path, "0::/\n")) == 2.5
    assert cpu_limit(root, _membership(tmp_path, "0::/\n")) == ("", 2.5)


def test_cgroup_v2_on_a_hybrid_system_reads_the_unified_tree(tmp_path):
    # v1 hierarchies for other controllers, v2 (with cpu) mounted at <root>/unified
    member = _membership(tmp_path, "5:memory:/user.slice\n0::/user.slice/job\n")
    root = _tree(tmp_path / "fs", {"unified/user.slice/cpu.max": "300000 100000\n"})
    assert cpu_limit(root, member) == ("unified/user.slice", 3.0)


def test_cgroup_v1_quota_over_period(tmp_path):
    member = _membership(tmp_path, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n"
                                   "1:name=systemd:/docker/abc\n")
    root = _tree(tmp_path / "fs", {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "200000\n",
                                   "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"})
    assert cpu_quota(root, member) == 2.0
    assert cpu_limit(root, member) == ("cpu,cpuacct/docker/abc", 2.0)
    # the container's own cgroup mounted at the hierarchy's root (its path not under it)
    mounted = _tree(tmp_path / "mounted", {"cpu/cpu.cfs_quota_us": "50000\n",
                                           "cpu/cpu.cfs_period_us": "100000\n"})
    assert cpu_quota(mounted, member) == 0.5
    # -1: no quota
    (root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(root, member) is None


@pytest.mark.parametrize("membership, files", [
    ("0::/\n", {"cpu.max": "max 100000\n"}),                 # v2, no limit
    ("0::/\n", {}),                                           # no cpu controller files
    ("0::/\n", {"cpu.max": "lots\n"}),                       # unreadable: no limit known
    ("4:memory:/a\n", {"cpu.max": "100000 100000\n"}),       # no line names a CPU cgroup
])
def test_no_limit_where_none_is_set_or_none_can_be_read(tmp_path, membership, files):
    root = _tree(tmp_path / "fs", files)
    assert cpu_quota(root, _membership(tmp_path, membership)) is None
    assert cpu_quota(root, tmp_path / "missing") is None


def test_usable_cpus_are_the_cores_at_most_the_limit(monkeypatch):
    cores = len(usable_cores())
    assert cores >= 1 and set(usable_cores()) <= set(range(os.cpu_count() or 1))
    monkeypatch.setattr(host, "cpu_quota", lambda: None)
    assert usable_cpus() == cores
    assert launcher.default_threads(1) == cores
    monkeypatch.setattr(host, "cpu_quota", lambda: 1000.0)
    assert usable_cpus() == cores
    monkeypatch.setattr(host, "cpu_quota", lambda: 0.5)
    assert usable_cpus() == 0.5
    assert launcher.default_threads(1) == 1       # at least one thread
    monkeypatch.setattr(host, "cpu_quota", lambda: cores - 0.5)
    assert launcher.default_threads(1) == max(1, cores - 1)


def test_cpu_group_without_a_limit_names_the_namespace_and_own_path(tmp_path):
    root = tmp_path / "empty"
    name, limit = cpu_group(root, _membership(tmp_path, "0::/kubepods/pod1\n"))
    assert name.endswith(" /kubepods/pod1") and limit is None
    name, limit = cpu_group(root, _membership(tmp_path, "4:cpu,cpuacct:/docker/abc\n0::/\n"))
    assert name.endswith(" /docker/abc") and limit is None
