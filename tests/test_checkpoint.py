"""Checkpoints: integrity checks and exact resumption of a distributed run."""
from __future__ import annotations

import pytest
import torch

from test_train import SMALL, make_config, read_run

from pyg_adaqp.train import launch
from pyg_adaqp.train.checkpoint import (
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    load_resume_point,
    save_checkpoint,
)


def test_round_trip_and_integrity(tmp_path):
    state = {"epoch": 3, "w": torch.arange(10.0), "rows": [{"loss": 0.5}]}
    path = save_checkpoint(tmp_path, 3, state)
    assert path == checkpoint_path(tmp_path, 3)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["w"], state["w"]) and loaded["rows"] == state["rows"]

    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="is corrupt: its checksum does not match"):
        load_checkpoint(path)
    path.write_bytes(bytes(blob[:20]))
    with pytest.raises(CheckpointError, match="not a pyg_adaqp checkpoint or is truncated"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_resume_point_is_the_newest_valid(tmp_path):
    for epoch in (1, 3, 5):
        save_checkpoint(tmp_path, epoch, {"epoch": epoch})
    newest = checkpoint_path(tmp_path, 5)
    newest.write_bytes(newest.read_bytes()[:-10])  # truncated, e.g. by a crash
    path, state = load_resume_point(tmp_path)
    assert path == checkpoint_path(tmp_path, 3) and state["epoch"] == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no valid checkpoint in .*holds no epoch_"):
        load_resume_point(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="nothing to resume from"):
        load_resume_point(tmp_path / "missing")


def test_resume_continues_the_same_run(tmp_path):
    # Quantized exchanges and dropout: resuming must restore every worker's
    # random state, the optimizer and the model to match exactly.
    # Metrics compared epoch by epoch: evaluate every epoch.
    common = [*SMALL, "mode=adaqp", "assign=random", "assign.cycle=2",
              "trainer.checkpoint_every=2", "trainer.eval_every=1"]
    launch(make_config(*common, "trainer.epochs=6"), tmp_path / "full")
    launch(make_config(*common, "trainer.epochs=4"), tmp_path / "first")
    checkpoints = tmp_path / "first" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_000001.pt", "epoch_000003.pt"]
    launch(make_config(*common, "trainer.epochs=6", f"trainer.resume={checkpoints}"),
           tmp_path / "resumed")
    full, full_summary = read_run(tmp_path / "full")
    resumed, resumed_summary = read_run(tmp_path / "resumed")
    assert [r["epoch"] for r in resumed] == list(range(6))
    for a, b in zip(full, resumed):
        for key in ("loss", "train", "val", "test"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["epoch"], key)
    assert resumed_summary["best_val"] == pytest.approx(full_summary["best_val"])


def test_check_resumable_names_what_does_not_fit():
    from pyg_adaqp.train.checkpoint import check_resumable

    state = {"epoch": 3, "model": {}, "optimizer": {}, "workers": [{}, {}], "rows": [],
             "assign_scheme": "random"}
    check_resumable("ck.pt", state, 2, "random")
    with pytest.raises(CheckpointError, match="ck.pt was written by 2 workers, this run has 3"):
        check_resumable("ck.pt", state, 3, "random")
    with pytest.raises(CheckpointError, match="assign.scheme=random, this run asks for uniform"):
        check_resumable("ck.pt", state, 2, "uniform")
    del state["assign_scheme"]                     # older checkpoints do not say
    check_resumable("ck.pt", state, 2, "uniform")
    del state["rows"], state["optimizer"]
    with pytest.raises(CheckpointError, match="lacks optimizer, rows: it was not written by"):
        check_resumable("ck.pt", state, 2, "uniform")


def test_resume_with_another_bit_width_scheme_is_rejected(tmp_path):
    common = [*SMALL, "trainer.checkpoint_every=1", "trainer.epochs=1"]
    launch(make_config(*common, "assign=uniform"), tmp_path / "uniform")
    with pytest.raises(CheckpointError, match="written with assign.scheme=uniform, this run "
                                              "asks for adaptive: resume with the same scheme"):
        launch(make_config(*common, "assign=adaptive", "trainer.epochs=2",
                           f"trainer.resume={tmp_path / 'uniform' / 'checkpoints'}"),
               tmp_path / "adaptive")


def test_an_older_checkpoint_of_another_scheme_is_rejected_by_name(tmp_path):
    # Written before checkpoints recorded their scheme: the allocator finds no state of its own.
    from pyg_adaqp.train import WorkerFailed
    from pyg_adaqp.train.checkpoint import load_checkpoint, save_checkpoint

    common = [*SMALL, "trainer.checkpoint_every=1", "trainer.epochs=1"]
    launch(make_config(*common, "assign=uniform"), tmp_path / "uniform")
    state = load_checkpoint(tmp_path / "uniform" / "checkpoints" / "epoch_000000.pt")
    del state["assign_scheme"]
    save_checkpoint(tmp_path / "old", 0, state)
    with pytest.raises(WorkerFailed, match="CheckpointError: checkpoint .*epoch_000000.pt: it "
                                           "holds no adaptive allocator state"):
        launch(make_config(*common, "assign=adaptive", "trainer.epochs=2",
                           f"trainer.resume={tmp_path / 'old'}"), tmp_path / "adaptive")


def test_resume_with_another_world_size_is_rejected(tmp_path):
    common = [*SMALL, "mode=vanilla", "trainer.checkpoint_every=1", "trainer.epochs=1"]
    launch(make_config(*common), tmp_path / "two")
    with pytest.raises(CheckpointError, match="written by 2 workers, this run has 4"):
        launch(make_config(*common, "world_size=4", "trainer.epochs=2",
                           f"trainer.resume={tmp_path / 'two' / 'checkpoints'}"),
               tmp_path / "four")
