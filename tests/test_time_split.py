"""`benchmarks/time_split.py`: a run's extra seconds over its round's other run, by part."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from time_split import split, table  # noqa: E402


def run(config: str, repeat: int, setup: float, epochs: list[float],
        reassigned: tuple[int, ...] = ()) -> dict:
    """A run as `throughput.py` keeps it in results.json (what the split reads)."""
    summary = {"setup_time": setup,
               "assign": {"history": [{"epoch": e} for e in reassigned]} if reassigned else {}}
    return {"seed": 0, "repeat": repeat, "model": "gcn", "cache": "on", "config": config,
            "summary": summary, "rows": [{"epoch_time": t} for t in epochs]}


def test_the_extra_seconds_split_into_setup_epoch0_reassigning_and_the_rest():
    uniform = run("adaqp-u2", 0, 0.0, [1.0, 1.0, 1.0, 1.0, 1.0])
    # Set-up 0.8 s, epoch 0 0.5 s longer, re-assigned at the start of epochs 1 and 3
    # (0.1 and 0.2 s longer), epochs 2 and 4 0.05 s shorter.
    adaptive = run("adaqp", 0, 0.8, [1.5, 1.1, 0.95, 1.2, 0.95], reassigned=(1, 3))
    parts = split(adaptive, uniform)
    assert parts["set-up"] == pytest.approx(0.8)
    assert parts["epoch 0"] == pytest.approx(0.5)
    assert parts["re-assigning"] == pytest.approx(0.3)
    assert parts["other epochs"] == pytest.approx(-0.1)
    assert parts["reassignments"] == 2
    out = table([uniform, adaptive, run("vanilla", 0, 0.0, [3.0] * 5)], "adaqp-u2")
    # 5 s against 6.5 s; with the other epochs equal, 5 / (5 + 1.6).
    assert "| gcn | on | adaqp | 0 | 0 | 5.00 | +1.50 | +0.80 | +0.50 | +0.30 (2) | -0.10 | " \
           f"{5 / 6.5:.3f} | {5 / 6.6:.3f} |" in out
    assert "| gcn | on | adaqp | | mean of 1 | 5.00 | +1.50 |" in out
    assert "vanilla" not in out.split("\n", 3)[-1]   # vanilla is not split unless asked


def test_rounds_pair_with_their_own_runs_and_the_means_average_them():
    results = [run("adaqp-u2", 0, 0.0, [1.0, 1.0]), run("adaqp", 0, 0.5, [1.0, 1.0]),
               run("adaqp-u2", 1, 0.0, [2.0, 2.0]), run("adaqp", 1, 0.5, [2.5, 2.0])]
    out = table(results, "adaqp-u2")
    assert "| gcn | on | adaqp | 0 | 0 | 2.00 | +0.50 | +0.50 | +0.00 |" in out
    assert "| gcn | on | adaqp | 0 | 1 | 4.00 | +1.00 | +0.50 | +0.50 |" in out
    assert "| gcn | on | adaqp | | mean of 2 | 3.00 | +0.75 | +0.50 | +0.25 |" in out


def test_runs_of_different_lengths_and_a_missing_baseline_are_refused(tmp_path):
    with pytest.raises(ValueError, match="ran 3 epochs and adaqp-u2 2 in round 0"):
        table([run("adaqp-u2", 0, 0.0, [1.0, 1.0]), run("adaqp", 0, 0.0, [1.0] * 3)],
              "adaqp-u2")
    (tmp_path / "results.json").write_text(json.dumps([run("adaqp", 0, 0.0, [1.0])]))
    res = subprocess.run([sys.executable, str(BENCH / "time_split.py"), str(tmp_path),
                          "--against", "adaqp-u4"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "no run of 'adaqp-u4'" in res.stderr
    res = subprocess.run([sys.executable, str(BENCH / "time_split.py"), str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "results.json not found" in res.stderr
