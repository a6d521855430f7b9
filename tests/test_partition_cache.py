"""Partition once: the cache by dataset key, `python -m pyg_adaqp.partition`, start-up waits."""
from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from test_train import SMALL, make_config

from pyg_adaqp.data import dataset_key, load_dataset
from pyg_adaqp.host import usable_cpus
from pyg_adaqp.partition import PartitionError, load_partition, partition_graph, read_manifest
from pyg_adaqp.partition.peak_memory import status_gib

launcher = importlib.import_module("pyg_adaqp.train.launch")  # `launch` is also a function


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYG_ADAQP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_second_run_reuses_the_partition_without_loading_the_graph(cache, monkeypatch, caplog):
    cfg = make_config(*SMALL)
    caplog.set_level(logging.INFO, logger="pyg_adaqp.train.launch")
    first = launcher.prepare_partitions(cfg, 2)
    assert first.parent == cache / "partitions"
    assert "partition: wrote 2 parts" in caplog.text
    manifest = read_manifest(first)
    d = cfg.dataset
    assert manifest["dataset_key"] == dataset_key(d.name, d.root, **d.options)
    # The parts are the graph's, partitioned with the run's seed.
    data = load_dataset(d.name, d.root, **d.options)
    for lg in partition_graph(data, 2, seed=cfg.seed):
        assert load_partition(first, lg.rank) == lg

    def no_loading(*args, **kwargs):
        raise AssertionError("a cached partition must not load the graph")

    monkeypatch.setattr(launcher, "load_dataset", no_loading)
    caplog.clear()
    assert launcher.prepare_partitions(cfg, 2) == first
    assert f"partition: reusing {first}" in caplog.text
    # Another part count, seed or graph gets its own entry (and must load the graph).
    for other in (make_config(*SMALL, "seed=1"), make_config(*SMALL, "dataset.options.seed=3")):
        with pytest.raises(AssertionError, match="must not load"):
            launcher.prepare_partitions(other, 2)
    with pytest.raises(AssertionError, match="must not load"):
        launcher.prepare_partitions(cfg, 3)


def test_a_given_directory_must_match_the_run(cache, tmp_path, caplog):
    given = tmp_path / "parts"
    cfg = make_config(*SMALL, f"partition_dir={given}")
    assert launcher.prepare_partitions(cfg, 2) == given
    with pytest.raises(PartitionError, match=r"made for another run \(it has seed 0, the run "
                                             r"needs 1\)"):
        launcher.prepare_partitions(make_config(*SMALL, f"partition_dir={given}", "seed=1"), 2)
    with pytest.raises(PartitionError, match=r"it has parts 2, the run needs 3"):
        launcher.prepare_partitions(cfg, 3)
    with pytest.raises(PartitionError, match=r"it has dataset key"):
        launcher.prepare_partitions(
            make_config(*SMALL, f"partition_dir={given}", "dataset.options.seed=3"), 2)
    (given / "manifest.json").write_text("{not json")
    with pytest.raises(PartitionError, match="not valid JSON"):
        launcher.prepare_partitions(cfg, 2)
    # A partition written by partition_graph(out_dir=...) records no dataset
    # key: the loaded graph's fingerprint decides.
    d = cfg.dataset
    data = load_dataset(d.name, d.root, **d.options)
    plain = tmp_path / "plain"
    partition_graph(data, 2, out_dir=plain)
    caplog.set_level(logging.INFO, logger="pyg_adaqp.train.launch")
    assert launcher.prepare_partitions(make_config(*SMALL, f"partition_dir={plain}"), 2) == plain
    assert "its graph fingerprint matches" in caplog.text
    with pytest.raises(PartitionError, match="partition of another graph"):
        launcher.prepare_partitions(
            make_config(*SMALL, f"partition_dir={plain}", "dataset.options.seed=3"), 2)


def test_ranks_wait_for_rank_0s_partition_outside_collectives(cache, tmp_path):
    cfg = make_config(*SMALL, f"partition_dir={tmp_path / 'parts'}",
                      "trainer.startup_timeout_s=0.5")
    with pytest.raises(PartitionError, match=r"no partition of synthetic-\w+ into 2 parts "
                                             r"\(seed 0\) appeared in .* within "
                                             r"trainer.startup_timeout_s=0.5 s"):
        launcher.wait_for_partition(cfg, 2)
    launcher.prepare_partitions(cfg, 2)
    assert launcher.wait_for_partition(cfg, 2) == tmp_path / "parts"


def test_partition_command_line(cache, tmp_path):
    cmd = [sys.executable, "-m", "pyg_adaqp.partition", "world_size=3", *SMALL]
    env = dict(os.environ, PYG_ADAQP_CACHE=str(cache))
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    stats = json.loads(first.stdout.splitlines()[-1])
    assert stats["parts"] == 3 and not stats["reused"]
    cfg = make_config(*SMALL)
    d = cfg.dataset
    data = load_dataset(d.name, d.root, **d.options)
    assert (stats["nodes"], stats["edges"]) == (data.num_nodes, data.edge_index.size(1))
    assert stats["bytes_per_edge"] >= 0
    # The trainer finds it where the command put it.
    assert stats["dir"] == str(launcher.partition_dir(cfg, 3))
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert json.loads(second.stdout.splitlines()[-1])["reused"]
    assert "reused" in second.stdout
    bad = subprocess.run([*cmd, "world_size=0"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: config field 'world_size': must be >= 1")


def test_default_threads_share_the_cores():
    cores = max(1, int(usable_cpus()))   # the cores, at most a container's CPU limit
    assert launcher.default_threads(1) == cores
    assert launcher.default_threads(cores) == 1
    assert launcher.default_threads(4 * cores) == 1
    assert make_config(*SMALL).trainer.num_threads is None
    assert make_config(*SMALL).trainer.eval_every == 5


def freed_mib_returned(tensors: int) -> int:
    """Makes `tensors` 4 MiB tensors and frees every other one (each freed one
    between kept ones); returns the MiB of RSS the process gave back."""
    import torch
    keep, freed = [], []
    for i in range(tensors):
        (keep if i % 2 else freed).append(torch.ones(2**20))
    before = status_gib("VmRSS")
    freed.clear()
    return round((before - status_gib("VmRSS")) * 1024)


FREED_MEMORY_PROBE = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from test_partition_cache import freed_mib_returned
from pyg_adaqp.train.launch import keep_freed_memory, return_freed_memory
if sys.argv[1] in ("set", "keep"):
    assert return_freed_memory()
if sys.argv[1] == "keep":                  # what a worker switches to after its first epoch
    assert keep_freed_memory()
big = torch.ones(16 * 2**18); del big     # glibc's threshold rises to a freed 16 MiB block
print(freed_mib_returned(64))             # 32 x 4 MiB freed between kept ones
"""


def test_the_heaps_top_is_kept_up_to_2_gib(monkeypatch):
    """From the first epoch's end glibc keeps the heap's top (trim threshold
    at its maximum): trimmed past 32 MiB, most workers gave it back between
    epochs and faulted its pages in again in every epoch."""
    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setattr(launcher, "_libc", lambda: Libc())
    assert launcher.keep_freed_memory()
    assert calls == [(launcher._M_MMAP_THRESHOLD, 32 << 20),
                     (launcher._M_TRIM_THRESHOLD, 2**31 - 1)]


def test_workers_give_freed_tensors_back():
    """What a worker frees goes back to the system, not only into glibc's heap."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    tests = str(Path(__file__).parent)
    returned = {how: int(subprocess.run([sys.executable, "-c", FREED_MEMORY_PROBE, how, tests],
                                        env=env, capture_output=True, text=True,
                                        check=True).stdout)
                for how in ("set", "default", "keep")}
    assert returned["set"] >= 120                     # MiB, of 128 freed
    assert returned["default"] < returned["set"] / 2  # glibc's own threshold keeps them
    assert returned["keep"] < 8                       # kept for the next epoch to reuse
    with pytest.raises(ValueError, match="mallopt value"):  # a C int, not silently masked
        launcher.keep_freed_memory(1 << 32)
    # A threshold the user set in the environment is theirs.
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    code = ("from pyg_adaqp.train.launch import keep_freed_memory, return_freed_memory; "
            "print(return_freed_memory(), keep_freed_memory())")
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True).stdout.strip() == "False False"


@dataclass
class FreedMemoryProbe:
    """An ``on_epoch_end`` hook: the MiB of RSS a worker gives back when it frees
    16 x 4 MiB tensors between kept ones, written to `out`/``<rank>-<epoch>``."""
    out: str

    def __call__(self, trainer, epoch: int) -> None:
        returned = freed_mib_returned(32)
        (Path(self.out) / f"{trainer.ctx.rank}-{epoch}").write_text(str(returned))


def test_workers_keep_freed_tensors_from_the_first_epochs_end(tmp_path, monkeypatch):
    """Set-up gives freed tensors back; training keeps them for the next epoch
    (a tensor with pages of its own pays a page fault per page at every epoch)."""
    probes = tmp_path / "probes"
    probes.mkdir()
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    launcher.launch(make_config(*SMALL, "trainer.epochs=2"), tmp_path / "run",
                    on_epoch_end=[FreedMemoryProbe(str(probes))])
    returned = {p.name: int(p.read_text()) for p in probes.iterdir()}
    assert sorted(returned) == ["0-0", "0-1", "1-0", "1-1"]
    assert max(returned.values()) < 8  # MiB, of 64 freed
