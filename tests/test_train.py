"""The Hydra trainer end to end: configs, modes, models, reports, equivalence."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import pyg_adaqp
from pyg_adaqp.train import Config, launch, register_configs

CONF = Path(pyg_adaqp.__file__).parent / "conf"
SMALL = ["dataset.options.num_nodes=800", "dataset.options.avg_degree=8",
         "dataset.options.num_features=16", "model.hidden_channels=16",
         "trainer.progress=false", "trainer.plots=false"]

register_configs()


def make_config(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


def read_run(run_dir: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("group,options", [
    ("dataset", sorted(p.stem for p in (CONF / "dataset").glob("*.yaml"))),
    ("model", ["gcn", "sage"]),
    ("mode", ["vanilla", "adaqp", "adaqp_q", "adaqp_p"]),
    ("assign", ["uniform", "random", "adaptive"]),
    ("trainer", ["default"]),
    ("+experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))),
])
def test_every_config_composes(group, options):
    for option in options:
        cfg = make_config(f"{group}={option}")
        assert isinstance(cfg, Config)
        if group == "mode":
            assert cfg.mode.name == option
        if group == "+experiment":  # the paper's settings
            assert cfg.assign.scheme == "adaptive" and cfg.model.hidden_channels == 256
            assert cfg.dataset.name.replace("-", "_") == option


@pytest.mark.parametrize("override,field", [
    ("trainer.epochs=-1", "trainer.epochs"),
    ("assign.bits=3", "assign.bits"),
    ("model.dropout=1.5", "model.dropout"),
    ("world_size=0", "world_size"),
    ("device=tpu", "device"),
    ("dataset.name=nope", "dataset.name"),
    ("mode.name=fast", "mode.name"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ValueError, match=rf"config field '{field}'"):
        make_config(override)


def test_mistyped_value_is_rejected_by_the_schema():
    from hydra.errors import ConfigCompositionException
    with pytest.raises(ConfigCompositionException, match="trainer.epochs") as err:
        make_config("trainer.epochs=many")
    assert "could not be converted to Integer" in str(err.value.__cause__)


@pytest.mark.parametrize("model", ["gcn", "sage"])
@pytest.mark.parametrize("mode", ["vanilla", "adaqp", "adaqp_q", "adaqp_p"])
def test_each_mode_and_model_runs(tmp_path, mode, model):
    cfg = make_config(*SMALL, f"mode={mode}", f"model={model}", "trainer.epochs=2",
                      "assign=uniform", "assign.bits=4", "trainer.plots=true")
    launch(cfg, tmp_path)
    rows, summary = read_run(tmp_path)
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        for key in ("loss", "train", "val", "test", "epoch_time", "comm_time", "quant_time",
                    "compute_time", "reduce_time", "system_time", "bytes_sent"):
            assert key in r
        assert r["loss"] > 0 and 0 <= r["val"] <= 1 and r["epoch_time"] > 0
        assert r["system_time"] >= 0
        assert r["bytes_sent"] > 0
    assert summary["mode"] == mode and summary["world_size"] == 2 and summary["epochs"] == 2
    assert summary["throughput_epochs_per_s"] > 0
    widths = {b for counts in summary["bits_histogram"].values() for b in counts}
    assert widths == ({"4"} if mode in ("adaqp", "adaqp_q") else {"32"})
    # Layers 1 and 2 exchange in both directions; layer 0's input is cached.
    assert set(summary["bits_histogram"]) == {"forward 1", "backward 1", "forward 2",
                                              "backward 2"}
    for png in ("curves.png", "time_breakdown.png", "bits.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_the_summary_means_system_time_over_the_epochs_that_recorded_it():
    """Epochs resumed from a checkpoint written before ``system_time`` was
    recorded lack it: its mean is over the epochs that have it."""
    from pyg_adaqp.train.report import TIMES, summarize

    times = [k for k in TIMES if k != "system_time"]
    rows = [{"epoch": e, "loss": 1.0, "train": 0.5, "val": 0.5, "test": 0.5,
             "bytes_sent": 100 * (e + 1), **{k: 0.1 * (e + 1) for k in times}}
            for e in range(3)]
    rows[1]["system_time"], rows[2]["system_time"] = 0.02, 0.04
    summary = summarize(rows, make_config(*SMALL), 2, {})
    assert summary["mean_times"]["system_time"] == pytest.approx(0.03)
    assert summary["mean_times"]["compute_time"] == pytest.approx(0.2)
    assert summary["mean_epoch_time"] == pytest.approx(0.2)
    assert summarize(rows[:1], make_config(*SMALL), 2, {})["mean_times"]["system_time"] is None


def test_quantized_bytes_match_the_codec(tmp_path):
    """Bytes per epoch at uniform 4 bits are what message_nbytes predicts."""
    from pyg_adaqp.comm import message_nbytes
    from pyg_adaqp.partition import load_partition
    from pyg_adaqp.train.launch import partition_dir

    vanilla = make_config(*SMALL, "mode=vanilla", "trainer.epochs=2")
    launch(vanilla, tmp_path / "v")
    quant = make_config(*SMALL, "mode=adaqp", "assign=uniform", "assign.bits=4",
                        "trainer.epochs=2")
    launch(quant, tmp_path / "q")
    parts = [load_partition(partition_dir(quant, 2), r) for r in range(2)]
    rows = sum(i.numel() for lg in parts for i in lg.send_index.values())
    hidden = 16
    # Per epoch: layers 1 and 2 exchange hidden-wide rows forward and back.
    # Layer 2's output is narrower (8 classes): it exchanges 8-wide rows.
    expect_q = 2 * (message_nbytes(rows, hidden, 4) + message_nbytes(rows, 8, 4))
    expect_v = 2 * (message_nbytes(rows, hidden, 32) + message_nbytes(rows, 8, 32))
    assert read_run(tmp_path / "q")[0][-1]["bytes_sent"] == expect_q
    assert read_run(tmp_path / "v")[0][-1]["bytes_sent"] == expect_v
    assert read_run(tmp_path / "q")[1]["exchange_widths"] == {
        "input 0": 16, "forward 1": hidden, "backward 1": hidden, "forward 2": 8,
        "backward 2": 8}


def test_random_scheme_uses_every_width(tmp_path):
    from pyg_adaqp.comm import message_nbytes

    cfg = make_config(*SMALL, "assign=random", "trainer.epochs=1")
    launch(cfg, tmp_path)
    rows, summary = read_run(tmp_path)
    hist, widths = summary["bits_histogram"], summary["exchange_widths"]
    # The bytes sent are the codec's count for the rows at each width.
    assert rows[0]["bytes_sent"] == sum(message_nbytes(n, widths[key], int(b))
                                        for key, counts in hist.items()
                                        for b, n in counts.items())
    # Epoch 0 also sends layer 0's input rows once, at full precision.
    assert set(hist.pop("input 0")) == {"32"}
    for counts in hist.values():
        assert set(counts) == {"2", "4", "8"}


def test_vanilla_four_workers_match_one_worker(tmp_path):
    common = [*SMALL, "mode=vanilla", "model.dropout=0.0", "trainer.epochs=5"]
    launch(make_config(*common, "world_size=1"), tmp_path / "one")
    launch(make_config(*common, "world_size=4"), tmp_path / "four")
    one, _ = read_run(tmp_path / "one")
    four, _ = read_run(tmp_path / "four")
    for a, b in zip(one, four):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["val"] == pytest.approx(b["val"], abs=1e-9)


def test_command_line_entry_point(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "pyg_adaqp.train", *SMALL, "trainer.epochs=1",
         f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, summary = read_run(run_dir)
    assert len(rows) == 1 and summary["mode"] == "adaqp"


def test_the_set_up_takes_the_inputs_columns_as_its_round(tmp_path):
    """The main job's graph on 4 workers: the trainer gives the allocator
    the input, whose columns carry the set-up's round of every link (at
    most 2 MiB each way on loopback: 60 of 64 columns here), and the run
    trains as it would without (every value finite, the loss falling)."""
    cfg = make_config("world_size=4", "model.hidden_channels=16", "trainer.epochs=2",
                      "trainer.progress=false", "trainer.plots=false")
    launch(cfg, tmp_path)
    rows, summary = read_run(tmp_path)
    assert 0 < summary["assign"]["setup_input_columns"] <= cfg.dataset.options["num_features"]
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[1]["loss"] < rows[0]["loss"]


def test_multi_label_trains_with_bce_and_f1(tmp_path):
    cfg = make_config(*SMALL, "+dataset.options.multi_label=true", "trainer.epochs=30",
                      "model.dropout=0.0", "trainer.lr=0.03")
    assert cfg.dataset.options["multi_label"] is True
    launch(cfg, tmp_path)
    rows, summary = read_run(tmp_path)
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    # F1-micro of the labels: the class label alone (guessable from the
    # graph) already gives ~0.7; chance-level guessing gives far less.
    assert summary["best_val"] > 0.6


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_relu_dropout_is_dropout_of_the_relu(p):
    import torch

    from pyg_adaqp.train.model import relu_dropout

    torch.manual_seed(0)
    x = torch.randn(400, 500, requires_grad=True)
    out = relu_dropout(x, p)
    positive, kept = x.detach() > 0, out.detach() != 0
    assert not kept[~positive].any()                                # the ReLU
    torch.testing.assert_close(out[kept], x[kept] / (1 - p))         # the scale
    dropped = 1 - float(kept[positive].float().mean())
    assert abs(dropped - p) < 5 * (p * (1 - p) / int(positive.sum())) ** 0.5
    # Elements drawn from the same 64-bit word are kept independently.
    pairs = positive[:, 0::2] & positive[:, 1::2]
    both = float((kept[:, 0::2] & kept[:, 1::2])[pairs].float().mean())
    assert abs(both - (1 - p) ** 2) < 5 * ((1 - p) ** 2 / int(pairs.sum())) ** 0.5
    upstream = torch.randn_like(x)
    (grad,) = torch.autograd.grad(out, x, upstream)
    torch.testing.assert_close(grad, upstream * kept / (1 - p))
    assert torch.equal(relu_dropout(x, p, training=False), x.relu())
