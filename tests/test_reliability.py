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

from pyg_adaqp.data import (
    DatasetDownloadError,
    DatasetError,
    check_dataset,
    load_dataset,
    synthetic_graph,
)
from pyg_adaqp.partition import PartitionError, graph_fingerprint, load_partition, partition_graph
from pyg_adaqp.train import PeerLost, WorkerFailed, launch, run_workers
from pyg_adaqp.train.workers import spawn_workers
from pyg_adaqp.train.checkpoint import (
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    load_resume_point,
)
from pyg_adaqp.train.liveness import Heartbeat

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from orphans import alive, kill_all, kill_launcher, wait_gone  # noqa: E402

TIMEOUT_S = 30  # trainer.timeout_s of the fault runs
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
    so the next epoch diverges).
    """
    rank: int
    epoch: int
    action: str

    def __call__(self, trainer, epoch: int) -> None:
        if trainer.ctx.rank != self.rank or epoch != self.epoch:
            return
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.action == "raise":
            raise RuntimeError(f"injected fault after epoch {epoch}")
        with torch.no_grad():
            for p in trainer.model.convs[0].parameters():
                p.fill_(math.nan)


def child_processes() -> list[int]:
    """Pids of this process's children, reaped or not (from ``/proc``).

    Leaves out multiprocessing's resource tracker and fork server: one of
    each per process, which lives as long as its parent and exits with it.
    """
    me, kids = str(os.getpid()), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            after_name = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:  # exited meanwhile
            continue
        # Fields after the name: state, ppid, ...
        if after_name[1] == me and b"multiprocessing.resource_tracker" not in cmdline \
                and b"multiprocessing.forkserver" not in cmdline:
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
    # The survivor stopped on its own (not killed by the launcher), naming the lost rank.
    with pytest.raises(WorkerFailed, match=r"^worker rank 1 failed: killed by signal 9 "
                                           r"\(SIGKILL\)\nthe other workers stopped too: "
                                           r"rank 0: PeerLost: lost rank 1: no heartbeat") as err:
        launch(make_config(*FAULT_RUN), tmp_path, on_epoch_end=[Fault(1, 4, "kill")])
    assert err.value.rank == 1
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
    with pytest.raises(WorkerFailed, match=r"^worker rank 1 failed: RuntimeError: injected fault "
                                           r"after epoch 4\nthe other workers stopped too: rank 0: "
                                           r"PeerLost: lost rank 1: ") as err:
        launch(make_config(*FAULT_RUN), tmp_path, on_epoch_end=[Fault(1, 4, "raise")])
    assert err.value.rank == 1 and "Traceback" in str(err.value)
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
        launch(cfg, tmp_path, on_epoch_end=[Fault(1, 2, "nan")])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]  # nothing of the diverged epoch
    path, state = load_resume_point(tmp_path / "checkpoints")
    assert path == checkpoint_path(tmp_path / "checkpoints", 2)
    assert all(bool(torch.isfinite(t).all()) for t in state["model"].values())


def test_the_first_event_names_the_failure(tmp_path):
    """A report that came before a silent death (say NCCL's watchdog aborting a
    survivor with SIGABRT) is the cause; a silent death before any report is."""
    from types import SimpleNamespace

    from pyg_adaqp.train.workers import _failure

    report = tmp_path / "rank1.err"
    report.write_text("ValueError: bad input\n\nTraceback ...")
    t = report.stat().st_mtime
    procs = [SimpleNamespace(exitcode=-6), SimpleNamespace(exitcode=1)]
    text, rank = _failure(procs, tmp_path, {}, {0: t + 5, 1: t})
    assert rank == 1 and text.startswith("worker rank 1 failed: ValueError: bad input\n"
                                         "the other workers stopped too: rank 0: killed by "
                                         "signal 6 (SIGABRT)")
    text, rank = _failure(procs, tmp_path, {}, {0: t - 5, 1: t})
    assert rank == 0 and text.startswith("worker rank 0 failed: killed by signal 6 (SIGABRT)")


@pytest.mark.timeout(60)
def test_heartbeat_names_the_peer_that_stopped():
    from datetime import timedelta

    from pyg_adaqp.train.workers import free_port

    port = free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True,
                                       timeout=timedelta(seconds=10), wait_for_workers=False)
    beats = [Heartbeat(r, 3, "127.0.0.1", port).start() for r in range(3)]
    try:
        beats[2].stop()
        assert beats[0].lost_ranks() == [2]
        lost = beats[1].explain(RuntimeError("Connection closed by peer [127.0.0.1]:4242"))
        assert isinstance(lost, PeerLost) and lost.ranks == [2]
        assert str(lost) == ("lost rank 2: no heartbeat for 3 s (the process died, or its host is "
                             "unreachable); the failed operation said: Connection closed by peer "
                             "[127.0.0.1]:4242")
        # Rank 1 has left because it lost rank 2: rank 0 names rank 2 alone.
        beats[1].stop()
        assert beats[0].explain(RuntimeError("Connection closed by peer")).ranks == [2]
        del store  # the store's host is gone
        lost = beats[0].explain(RuntimeError("Timed out"))
        assert lost.ranks == [0] and str(lost).startswith(
            f"lost rank 0: the rendezvous store at 127.0.0.1:{port} (on rank 0's host) is "
            f"unreachable")
    finally:
        for b in beats:
            b.stop(wait=False)  # the store is gone: they would wait out its time-out


# --- launcher death ---------------------------------------------------------------------------

def kill_launcher_and_count_leftovers(argv: list[str], started: Path, workers: int,
                                      env: dict | None = None) -> list[int]:
    """SIGKILLs the launcher `argv` once it runs (see benchmarks/orphans.py) and
    returns the processes of its tree still alive once they are gone.  The
    event is their exit: no clock; a worker that never dies fails the test
    at its pytest time-out, and is killed then."""
    # A SIGKILLed launcher cannot remove its temporary folder: keep it in the test's own.
    env = {"TMPDIR": str(started.parent), **(env or {})}
    tree = kill_launcher(argv, started, workers, started.parent / "launcher.log", env)
    try:
        assert len(tree) >= workers
        wait_gone(tree)
        return [pid for pid in tree if alive(pid)]
    finally:
        kill_all(tree)  # whatever was left: never load the later tests


LONG_RUN = [*SMALL, "trainer.epochs=100000"]


@pytest.mark.timeout(150)
def test_workers_die_with_the_local_launcher(tmp_path):
    argv = [sys.executable, "-m", "pyg_adaqp.train", *LONG_RUN, f"hydra.run.dir={tmp_path}"]
    assert kill_launcher_and_count_leftovers(argv, tmp_path / "metrics.jsonl", workers=2) == []


@pytest.mark.timeout(150)
def test_workers_die_with_torchrun_agent(tmp_path):
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", "pyg_adaqp.train", *LONG_RUN, f"hydra.run.dir={tmp_path}"]
    assert kill_launcher_and_count_leftovers(argv, tmp_path / "metrics.jsonl", workers=2) == []


def sleep_forever(rank, world_size, started):
    Path(started, str(rank)).touch()
    while True:
        time.sleep(1)


@pytest.mark.timeout(150)
def test_workers_die_with_a_script_that_runs_them(tmp_path):
    # The spawner of tests, benchmarks and notebooks, in a script of its own.
    script = tmp_path / "script.py"
    script.write_text(
        "import sys\n"
        "from pyg_adaqp.train import run_workers\n"
        "from test_reliability import sleep_forever\n"
        "if __name__ == '__main__':\n"
        "    run_workers(sleep_forever, 2, sys.argv[1], timeout_s=600)\n")
    argv = [sys.executable, str(script), str(tmp_path)]
    env = {"PYTHONPATH": str(Path(__file__).parent)}
    assert kill_launcher_and_count_leftovers(argv, tmp_path / "1", workers=2, env=env) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pidfd", [True, False])
def test_a_process_dies_with_one_that_is_not_its_parent(pidfd):
    # A forked worker's parent is the fork server: it watches its launcher by pid (a pidfd,
    # or /proc where the kernel has no pidfd_open).
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    no_pidfd = "" if pidfd else (
        "import errno, os\n"
        "def missing(pid): raise OSError(errno.ENOSYS, 'pidfd_open')\n"
        "os.pidfd_open = missing\n")
    watcher = subprocess.Popen(
        [sys.executable, "-c", no_pidfd + "import sys, time\n"
         "from pyg_adaqp.train.workers import die_with\n"
         f"die_with({launcher.pid})\n"
         "print('watching', flush=True)\n"
         "time.sleep(600)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout.readline() == "watching\n"
        launcher.kill()
        launcher.wait()
        assert watcher.wait() == -signal.SIGKILL
    finally:
        for proc in (launcher, watcher):
            proc.kill()
            proc.wait()


def environment_and_parent(rank, world_size):
    return os.environ.get("ADAQP_PROBE"), os.getppid()


@pytest.mark.timeout(120)
def test_workers_fork_from_one_server_with_the_callers_environment(monkeypatch):
    # The server started with the first call's environment; each call's workers take their own.
    monkeypatch.setenv("ADAQP_PROBE", "first")
    first = run_workers(environment_and_parent, 2)
    monkeypatch.setenv("ADAQP_PROBE", "second")
    second = run_workers(environment_and_parent, 2)
    monkeypatch.delenv("ADAQP_PROBE")
    third = run_workers(environment_and_parent, 2)
    assert [env for env, _ in first + second + third] == ["first"] * 2 + ["second"] * 2 + [None] * 2
    parents = {parent for _, parent in first + second + third}
    assert len(parents) == 1 and os.getpid() not in parents  # forked by one server, not by us


def raise_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("rank one says no")
    return rank


@pytest.mark.timeout(120)
def test_spawned_workers_take_the_callers_environment_and_report_failures(monkeypatch):
    # CUDA workers are spawned (a worker forked from the server could not initialise CUDA).
    monkeypatch.setenv("ADAQP_PROBE", "spawned")
    results = spawn_workers(environment_and_parent, 2, (2,), grace_s=30, start_method="spawn")
    assert results == [("spawned", os.getpid())] * 2  # our children, with our environment
    with pytest.raises(WorkerFailed, match="rank 1 failed: ValueError: rank one says no") as err:
        spawn_workers(raise_on_rank_one, 2, (2,), grace_s=30, start_method="spawn")
    assert err.value.rank == 1


def test_launch_spawns_cuda_workers(tmp_path, monkeypatch):
    launch_module = importlib.import_module("pyg_adaqp.train.launch")  # the package exports launch()
    calls = []
    monkeypatch.setattr(launch_module, "spawn_workers",
                        lambda *args, **kwargs: calls.append(kwargs["start_method"]))
    for device in ("cpu", "cuda"):
        launch(make_config(*SMALL, f"device={device}"), tmp_path / device)
    assert calls == [None, "spawn"]  # the fork server for CPU workers, spawn for CUDA ones


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
    # The launcher checks the dataset it loads before partitioning (into a
    # fresh cache: a partition already cached is reused without loading).
    monkeypatch.setenv("PYG_ADAQP_CACHE", str(tmp_path / "cache"))
    launcher = importlib.import_module("pyg_adaqp.train.launch")  # `launch` is also a function
    monkeypatch.setattr(launcher, "load_dataset", lambda *args, **kwargs: data)
    cfg = make_config(*SMALL)
    with pytest.raises(DatasetError, match=message):
        launch(cfg, tmp_path)
    assert not launcher.partition_dir(cfg, cfg.world_size).exists()


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
    assert re.search(r"^error: worker rank (\d) failed: ValueError: worker rank \1 owns no "
                     r"training nodes \(1 in total over 2 workers\): every worker needs some; "
                     r"use fewer workers \(world_size\) or a split with more training nodes\n"
                     r"the other workers stopped too: rank \d: PeerLost: lost rank \1: ",
                     proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split("\n\n")[0]  # the launcher's own is not printed
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


def test_failed_download_says_how_to_load_offline(tmp_path, monkeypatch):
    import torch_geometric.datasets.planetoid as planetoid

    def no_network(url, folder, *args, **kwargs):
        raise OSError("Cannot connect to host github.com:443 ssl:default")

    monkeypatch.setattr(planetoid.fs, "cp", no_network)  # what Planetoid.download calls
    monkeypatch.setenv("PYG_ADAQP_CACHE", str(tmp_path))
    with pytest.raises(DatasetDownloadError, match=(
            r"^dataset 'cora': downloading it with torch_geometric\.datasets\.Planetoid\(Cora\) "
            r"from https://github\.com/kimiyoung/planetoid/raw/master/data into "
            rf"{re.escape(str(tmp_path))} failed \(OSError: Cannot connect to host github\.com"
            r":443 ssl:default\)\. To load it offline, put its raw files \(ind\.cora\.x, .*\) "
            r"in <dir>/Cora/raw and pass dataset\.root=<dir>\.$")):
        load_dataset("cora")


@pytest.mark.parametrize("full_error", [False, True])
def test_bad_config_value_on_the_command_line_prints_its_message_alone(tmp_path, full_error):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1" if full_error else "0"}
    proc = subprocess.run([sys.executable, "-m", "pyg_adaqp.train", "world_size=0",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 1
    if full_error:  # whoever wants the trace gets it
        assert "Traceback" in proc.stderr
        assert "ConfigError: config field 'world_size': must be >= 1, got 0" in proc.stderr
    else:
        assert proc.stderr == "error: config field 'world_size': must be >= 1, got 0\n"


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
