"""`benchmarks/throughput.py`'s aggregation: repeats pair with the `vanilla` run of their round."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from throughput import (TIME_PARTS, aggregate, base_config, report, rounds,  # noqa: E402
                        run_label)

from pyg_adaqp.comm import message_nbytes  # noqa: E402


def run(config: str, repeat: int, epochs_per_s: float, test: float) -> dict:
    """One run's record as `throughput.py` keeps it: 2 epochs, 10 rows of width 4 at 2 bits
    (32 for vanilla)."""
    bits = 32 if config == "vanilla" else 2
    sent = message_nbytes(10, 4, bits)
    summary = {"throughput_with_setup_epochs_per_s": epochs_per_s,
               "throughput_epochs_per_s": epochs_per_s, "setup_time": 0.0,
               "bytes_sent_per_epoch": sent, "best_val": 0.9, "test_at_best_val": test,
               "mean_epoch_time": 1 / epochs_per_s,
               "mean_times": {k: 0.0 for k in (*TIME_PARTS, "compute_time")},
               "exchange_widths": {"forward 1": 4},
               "bits_histogram": {"forward 1": {str(bits): 10}}}
    rows = [{"epoch_time": 1 / epochs_per_s, "val": v, "bytes_sent": sent} for v in (0.5, 0.9)]
    return {"seed": 0, "repeat": repeat, "model": "gcn", "cache": "on", "config": config,
            "summary": summary, "rows": rows}


def test_repeats_pair_with_their_rounds_vanilla():
    # Round 1 ran on a faster machine: both configurations sped up.
    results = [run("vanilla", 0, 1.0, 0.80), run("adaqp", 0, 2.0, 0.81),
               run("vanilla", 1, 2.0, 0.80), run("adaqp", 1, 3.0, 0.81)]
    args = argparse.Namespace(models=["gcn"], cache=["on"], configs=["vanilla", "adaqp"],
                              seeds=[0], repeats=2, hosts=4, rate="1gbit",
                              dataset="synthetic", hidden=256, epochs=2, override=[])
    lines = {ln["config"]: ln for ln in aggregate(results, args)}
    adaqp = lines["adaqp"]
    # (2/1 + 3/2) / 2; pairing round 1 with round 0's vanilla would give 2.5.
    assert adaqp["throughput_ratio"] == pytest.approx(1.75)
    assert adaqp["epochs_per_s"] == pytest.approx(2.5)
    assert adaqp["epochs_per_s_by_run"] == {(0, 0): 2.0, (0, 1): 3.0}
    assert adaqp["bytes_ratio"] == pytest.approx(message_nbytes(10, 4, 2)
                                                 / message_nbytes(10, 4, 32))
    assert adaqp["test_diff"] == pytest.approx(0.01)
    assert adaqp["sent_vs_codec"] == (1.0, 1.0)
    # Validation reaches 98% of vanilla's best at the second epoch of each run.
    assert adaqp["time_to_target"] == pytest.approx((2 / 2.0 + 2 / 3.0) / 2)
    assert adaqp["time_to_target_vanilla"] == pytest.approx((2 / 1.0 + 2 / 2.0) / 2)
    table = report(list(lines.values()), args, 60.0)
    assert "| gcn | on | 0 | 0 | 1.000 | 2.000 |" in table
    assert "| gcn | on | 0 | 1 | 2.000 | 3.000 |" in table
    assert "| gcn | on | adaqp | 2.50 | 1.75× |" in table


def test_rounds_put_every_configuration_in_every_slot():
    order = rounds(["vanilla", "adaqp", "adaqp-u2"], 3)
    assert order == [(0, "vanilla"), (0, "adaqp"), (0, "adaqp-u2"),
                     (1, "adaqp"), (1, "adaqp-u2"), (1, "vanilla"),
                     (2, "adaqp-u2"), (2, "vanilla"), (2, "adaqp")]
    # One run of every configuration per round, and every slot held by each once.
    for repeat in range(3):
        assert sorted(c for r, c in order if r == repeat) == ["adaqp", "adaqp-u2", "vanilla"]
    for slot in range(3):
        assert sorted(order[3 * r + slot][1] for r in range(3)) == ["adaqp", "adaqp-u2", "vanilla"]
    assert rounds(["vanilla", "adaqp"], 1) == [(0, "vanilla"), (0, "adaqp")]


def test_a_labelled_copy_runs_its_configuration_as_a_line_of_its_own():
    """`NAME:LABEL` is NAME run again: its ratios pair with its own rounds' vanilla."""
    assert base_config("adaqp-u2:again") == "adaqp-u2" and base_config("adaqp") == "adaqp"
    assert run_label("adaqp-u2:again") == "adaqp-u2-again" and run_label("adaqp") == "adaqp"
    results = [run("vanilla", 0, 1.0, 0.80), run("adaqp-u2", 0, 2.0, 0.81),
               run("adaqp-u2:again", 0, 1.8, 0.80)]
    args = argparse.Namespace(models=["gcn"], cache=["on"],
                              configs=["vanilla", "adaqp-u2", "adaqp-u2:again"], seeds=[0],
                              repeats=1, hosts=4, rate="1gbit", dataset="synthetic",
                              hidden=256, epochs=2, override=[])
    lines = {ln["config"]: ln for ln in aggregate(results, args)}
    assert lines["adaqp-u2"]["throughput_ratio"] == pytest.approx(2.0)
    assert lines["adaqp-u2:again"]["throughput_ratio"] == pytest.approx(1.8)


@pytest.mark.parametrize("configs, message", [
    (["vanilla", "adaqp-u2", "adaqp-u2"], "appears twice; label the copy"),
    (["vanilla", "fast:x"], "unknown configuration 'fast' in 'fast:x'"),
    (["vanilla", "adaqp-u2", "adaqp:u2"], "appears twice"),   # both would run in ...-adaqp-u2-...
    (["vanilla", "adaqp-u2:"], "an empty label"),
])
def test_the_command_line_rejects_an_unlabelled_copy_and_an_unknown_configuration(
        configs, message):
    res = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks"
                                              / "throughput.py"), "--configs", *configs],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and message in res.stderr
