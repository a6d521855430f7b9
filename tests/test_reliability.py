"""Reliability: faults in real gloo workers, divergence, corrupt checkpoints, bad inputs.

Faults are injected through the trainer's ``on_epoch_end`` hooks, which the
launcher hands to every spawned worker: a hook kills its own worker with
SIGKILL, raises, or poisons its model after a given epoch.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch_geometric.data import Data

from test_train import SMALL, make_config, read_run

from pyg_adaqp.data import DatasetError, check_dataset, load_dataset, synthetic_graph
from pyg_adaqp.partition import PartitionError, graph_fingerprint, load_partition, partition_graph
from pyg_adaqp.train import WorkerFailed, launch
from pyg_adaqp.train.checkpoint import (
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    load_resume_point,
)

TIMEOUT_S = 30  # trainer.timeout_s of the fault runs: the survivors must stop within it
# Quantized messages at random widths redrawn every 2 epochs, dropout, a
# checkpoint every 2 epochs: resuming must restore all of it to match exactly.
# (The adaptive scheme's widths depend on a cost model profiled from measured
# times, so two runs of it differ even without a fault.)
FAULT_RUN = [*SMALL, "mode=adaqp", "assign=random", "assign.cycle=2",
             "trainer.checkpoint_every=2", f"trainer.timeout_s={TIMEOUT_S}", "trainer.epochs=6"]


@dataclass
class Fault:
    """An ``on_epoch_end`` hook: worker `rank` fails after `epoch` (once its checkpoint is written).

    ``action`` is ``"kill"`` (SIGKILL to itself), ``"raise"`` (a
    ``RuntimeError``) or ``"nan"`` (its first layer's parameters become NaN,
    so the next epoch diverges).  The time of the fault goes to `stamp`.
    """
    rank: int
    epoch: int
    action: str
    stamp: str

    def __call__(self, trainer, epoch: int) -> None:
        if trainer.ctx.rank != self.rank or epoch != self.epoch:
            return
        Path(self.stamp).write_text(repr(time.time()))
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.action == "raise":
            raise RuntimeError(f"injected fault after epoch {epoch}")
        with torch.no_grad():
            for p in trainer.model.convs[0].parameters():
                p.fill_(math.nan)


def child_processes() -> list[int]:
    """Pids of this process's children, reaped or not (from ``/proc``).

    Leaves out multiprocessing's resource tracker: the spawn context starts
    one per process, which lives as long as its parent and exits with it.
    """
    me, kids = str(os.getpid()), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            after_name = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:  # exited meanwhile
            continue
        # Fields after the name: state, ppid, ...
        if after_name[1] == me and b"multiprocessing.resource_tracker" not in cmdline:
            kids.append(int(proc.name))
    return kids


def assert_same_run(a: Path, b: Path) -> None:
    """Same metrics every epoch (bytes differ: a resumed run exchanges the input halo again)."""
    rows_a, summary_a = read_run(a)
    rows_b, summary_b = read_run(b)
    assert [r["epoch"] for r in rows_b] == [r["epoch"] for r in rows_a]
    for ra, rb in zip(rows_a, rows_b):
        for key in ("loss", "train", "val", "test"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), (ra["epoch"], key)
    for key in ("best_val", "test_at_best_val", "final_loss", "final_test"):
        assert summary_a[key] == pytest.approx(summary_b[key], abs=1e-6), key
    assert summary_a["bits_histogram"] == summary_b["bits_histogram"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    launch(make_config(*FAULT_RUN), run_dir)
    return run_dir


# --- faults in workers -----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_killed_worker_stops_all_and_resume_finishes_the_run(tmp_path, uninterrupted):
    stamp = tmp_path / "fault_time"
    with pytest.raises(WorkerFailed, match=r"^worker rank 1 failed: killed by signal 9 "
                                           r"\(SIGKILL\)\nthe other workers stopped too: "
                                           r"rank 0: RuntimeError: ") as err:
        launch(make_config(*FAULT_RUN), tmp_path, on_epoch_end=[Fault(1, 4, "kill", str(stamp))])
    assert err.value.rank == 1
    assert time.time() - float(stamp.read_text()) < TIMEOUT_S
    assert child_processes() == []
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.pt")) == ["epoch_000001.pt",
                                                                "epoch_000003.pt"]
    assert load_checkpoint(checkpoints / "epoch_000003.pt")["epoch"] == 3
    # Rerun in the same run directory, resuming from its newest checkpoint.
    launch(make_config(*FAULT_RUN, f"trainer.resume={checkpoints}"), tmp_path)
    assert_same_run(uninterrupted, tmp_path)
    assert child_processes() == []


@pytest.mark.timeout(120)
def test_raising_worker_stops_all_and_resume_skips_a_corrupt_checkpoint(tmp_path, uninterrupted):
    stamp = tmp_path / "fault_time"
    with pytest.raises(WorkerFailed, match=r"^worker rank 1 failed: RuntimeError: injected fault "
                                           r"after epoch 4\nthe other workers stopped too: rank 0:"
                                           ) as err:
        launch(make_config(*FAULT_RUN), tmp_path, on_epoch_end=[Fault(1, 4, "raise", str(stamp))])
    assert err.value.rank == 1 and "Traceback" in str(err.value)
    assert time.time() - float(stamp.read_text()) < TIMEOUT_S
    assert child_processes() == []

    # The newest checkpoint is damaged (say, the disk filled up): it is
    # rejected by name, and resuming from the directory takes the one before.
    checkpoints = tmp_path / "checkpoints"
    newest = checkpoint_path(checkpoints, 3)
    newest.write_bytes(newest.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"checkpoint {re.escape(str(newest))} is corrupt: "
                                              rf"its checksum does not match"):
        launch(make_config(*FAULT_RUN, f"trainer.resume={newest}"), tmp_path)
    assert load_resume_point(checkpoints)[0] == checkpoint_path(checkpoints, 1)
    launch(make_config(*FAULT_RUN, f"trainer.resume={checkpoints}"), tmp_path)
    assert_same_run(uninterrupted, tmp_path)


def test_adaptive_scheme_resumes_each_worker_with_its_own_widths(tmp_path):
    # Each worker's assignment is the widths of the rows *it* sends: a
    # checkpoint holding only rank 0's would send rank 1 rank 0's peers.
    common = [*SMALL, "mode=adaqp", "assign=adaptive", "assign.cycle=1",
              "trainer.checkpoint_every=1"]
    launch(make_config(*common, "trainer.epochs=2"), tmp_path)
    state = load_checkpoint(checkpoint_path(tmp_path / "checkpoints", 1))
    assert [set(w["scheme"]["assignment"]["forward 1"][0]) for w in state["workers"]] == [{1},
                                                                                          {0}]
    launch(make_config(*common, "trainer.epochs=3", f"trainer.resume={tmp_path / 'checkpoints'}"),
           tmp_path)
    rows, summary = read_run(tmp_path)
    assert [r["epoch"] for r in rows] == [0, 1, 2] and summary["scheme"] == "adaptive"


def test_directory_of_corrupt_checkpoints_is_rejected_before_start(tmp_path):
    (tmp_path / "epoch_000004.pt").write_bytes(b"ADAQPCK1 and then nothing useful")
    root = re.escape(str(tmp_path))
    with pytest.raises(CheckpointError, match=rf"no valid checkpoint in {root}: checkpoint {root}/"
                                              rf"epoch_000004\.pt is not a pyg_adaqp checkpoint "
                                              rf"or is truncated"):
        launch(make_config(*SMALL, f"trainer.resume={tmp_path}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode,rank,cause", [
    # Quantized: rank 1's codec refuses its message and names the exchange key.
    ("adaqp", "1", r"message \"exchange 'forward 1'\" holds non-finite values"),
    # Full precision: the NaN travels; every worker sees the all-reduced gradient.
    ("vanilla", "[01]", r"the all-reduced gradient is not finite in \d+ of \d+ parameters "
                        r"\(convs\.0\..*\)"),
])
def test_divergence_stops_with_epoch_and_layer_and_keeps_the_last_good_checkpoint(
        tmp_path, mode, rank, cause):
    cfg = make_config(*SMALL, f"mode={mode}", "assign=uniform", "trainer.epochs=6",
                      "trainer.checkpoint_every=1", f"trainer.timeout_s={TIMEOUT_S}")
    with pytest.raises(WorkerFailed, match=rf"^worker rank {rank} failed: DivergenceError: "
                                           rf"training diverged at epoch 3: {cause}"):
        launch(cfg, tmp_path, on_epoch_end=[Fault(1, 2, "nan", str(tmp_path / "fault_time"))])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]  # nothing of the diverged epoch
    path, state = load_resume_point(tmp_path / "checkpoints")
    assert path == checkpoint_path(tmp_path / "checkpoints", 2)
    assert all(bool(torch.isfinite(t).all()) for t in state["model"].values())


# --- bad inputs --------------------------------------------------------------------------------


def poisoned(what: str) -> Data:
    data = synthetic_graph(num_nodes=200, num_features=8, seed=1)
    if what == "nan features":
        data.x[[5, 17, 40], 2] = math.nan
    elif what == "inf features":
        data.x[7, 0] = -math.inf
    elif what == "label too large":
        data.y[data.train_mask.nonzero()[3]] = 8
    elif what == "negative label":
        data.y[data.test_mask.nonzero()[0]] = -1
    elif what == "multi-label target 2":
        data = synthetic_graph(num_nodes=200, num_features=8, multi_label=True, seed=1)
        data.y[data.val_mask.nonzero()[:4], 0] = 2.0
    elif what == "no training nodes":
        data.train_mask[:] = False
    return data


@pytest.mark.parametrize("what,message", [
    ("nan features", r"dataset 'synthetic': the features \(x\) hold NaN or Inf in 3 of 200 rows "
                     r"\(first: node 5\); impute or drop them before training"),
    ("inf features", r"the features \(x\) hold NaN or Inf in 1 of 200 rows \(first: node 7\)"),
    ("label too large", r"dataset 'synthetic': 1 labels of nodes in the train/val/test splits "
                        r"are outside \[0, num_classes=8\) \(min 0, max 8; first: node \d+\)"),
    ("negative label", r"1 labels of nodes in the train/val/test splits are outside "
                       r"\[0, num_classes=8\) \(min -1, max 7"),
    ("multi-label target 2", r"the multi-label targets \(y\) of 4 nodes in the train/val/test "
                             r"splits are not all in \[0, 1\]"),
    ("no training nodes", r"dataset 'synthetic' has no training nodes \(train_mask is all "
                          r"False\)"),
])
def test_bad_dataset_is_rejected_before_any_worker_starts(tmp_path, monkeypatch, what, message):
    data = poisoned(what)
    with pytest.raises(DatasetError, match=message):
        check_dataset(data, "synthetic")
    # The launcher checks the dataset it loads before partitioning.
    launcher = importlib.import_module("pyg_adaqp.train.launch")  # `launch` is also a function
    monkeypatch.setattr(launcher, "load_dataset", lambda *args, **kwargs: data)
    with pytest.raises(DatasetError, match=message):
        launch(make_config(*SMALL), tmp_path)
    assert not (tmp_path / "partitions").exists()


def test_label_of_a_node_outside_the_splits_is_not_read():
    data = poisoned("no training nodes")
    data.train_mask[:10] = True
    outside = (~(data.train_mask | data.val_mask | data.test_mask)).nonzero()[0]
    data.y[outside] = -1  # how some datasets mark unlabelled nodes
    check_dataset(data, "synthetic")


def test_more_workers_than_nodes(tmp_path):
    cfg = make_config(*SMALL, "dataset.options.num_nodes=3", "dataset.options.num_classes=2",
                      "world_size=4")
    with pytest.raises(ValueError, match=r"world_size=4 exceeds the 3 nodes of dataset "
                                         r"'synthetic': every worker must own at least one node"):
        launch(cfg, tmp_path)


@pytest.mark.timeout(120)
def test_worker_without_training_nodes_fails_the_command_line(tmp_path):
    # One training node in all: one of the two workers owns none.
    proc = subprocess.run(
        [sys.executable, "-m", "pyg_adaqp.train", *SMALL, "+dataset.options.train_ratio=0.001",
         "trainer.epochs=1", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=110)
    assert proc.returncode != 0
    assert re.search(r"WorkerFailed: worker rank (\d) failed: ValueError: worker rank \1 owns no "
                     r"training nodes \(1 in total over 2 workers\): every worker needs some; "
                     r"use fewer workers \(world_size\) or a split with more training nodes\n"
                     r"the other workers stopped too: rank \d: RuntimeError: ",
                     proc.stderr), proc.stderr[-3000:]
    assert child_processes() == []


def test_unknown_dataset_and_missing_raw_files(tmp_path):
    root = re.escape(str(tmp_path))
    with pytest.raises(ValueError, match=r"config field 'dataset.name': unknown dataset 'nope'; "
                                         r"known: synthetic, cora, "):
        make_config("dataset.name=nope")
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'; known datasets: synthetic, "):
        load_dataset("nope")
    with pytest.raises(FileNotFoundError, match=(
            rf"dataset 'cora': raw files not found in {root}/Cora/raw \(missing: ind\.cora\.x"
            rf".*; also looked in {root}/raw\)\. Put the raw files that PyG's "
            rf"torch_geometric\.datasets\.Planetoid\(Cora\) downloads there, or leave root unset "
            rf"\(dataset\.root=null\) to let PyG download them")):
        launch(make_config("dataset=cora", f"dataset.root={tmp_path}"), tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=rf"dataset 'ogbn-arxiv': no ogbn_arxiv folder in "
                                                rf"{root}\. Put the folder"):
        load_dataset("ogbn-arxiv", root=tmp_path)


def test_partition_for_another_graph_or_worker_count(tmp_path):
    data = synthetic_graph(num_nodes=300, num_features=8)
    partition_graph(data, 2, out_dir=tmp_path)
    root = re.escape(str(tmp_path))
    with pytest.raises(PartitionError, match=rf"partition {root} has 2 parts, expected 4 "
                                             rf"\(one per worker\): partition the graph again "
                                             rf"with num_parts=4, or use another directory"):
        load_partition(tmp_path, 0, num_parts=4)
    other = graph_fingerprint(synthetic_graph(num_nodes=300, num_features=8, seed=1))
    with pytest.raises(PartitionError, match=rf"partition {root} was made from another graph "
                                             rf"\(fingerprint \w+, expected {other}\): partition "
                                             rf"this graph again, or use another directory"):
        load_partition(tmp_path, 0, fingerprint=other)


@pytest.mark.parametrize("override,message", [
    ("trainer.epochs=-1", "config field 'trainer.epochs': must be >= 1, got -1"),
    ("assign.bits=3", r"config field 'assign.bits': must be one of \(2, 4, 8\), got 3"),
    ("assign.coe_lambda=1.5", r"config field 'assign.coe_lambda': must be in \[0, 1\], got 1.5"),
    ("assign.coe_lambda=-0.1", r"config field 'assign.coe_lambda': must be in \[0, 1\], "
                               r"got -0.1"),
    ("trainer.timeout_s=0", "config field 'trainer.timeout_s': must be > 0, got 0"),
    ("trainer.target_val=80", r"config field 'trainer.target_val': must be in \[0, 1\]"),
])
def test_bad_config_values(override, message):
    with pytest.raises(ValueError, match=message):
        make_config(override)
