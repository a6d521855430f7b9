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
        reassigned: tuple[int, ...] = (), model: str = "gcn", seed: int = 0) -> dict:
    """A run as `throughput.py` keeps it in results.json (what the split reads)."""
    summary = {"setup_time": setup,
               "assign": {"history": [{"epoch": e} for e in reassigned]} if reassigned else {}}
    return {"seed": seed, "repeat": repeat, "model": model, "cache": "on", "config": config,
            "summary": summary, "rows": [{"epoch_time": t} for t in epochs]}


def test_the_extra_seconds_split_into_setup_epoch0_reassigning_and_the_rest():
    uniform = run("adaqp-u2", 0, 0.0, [1.0, 1.0, 1.0, 1.0, 1.0])
    # Set-up 0.8 s, epoch 0 0.5 s longer, assigned at the start of epochs 1 and 3
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
    assert "| adaqp-u2 s |" in out
    assert "vanilla" not in out   # vanilla is not split unless asked


def test_only_epochs_the_allocator_assigned_in_count_as_reassigning():
    uniform = run("adaqp-u2", 0, 0.0, [1.0, 1.0, 1.0])
    # Epoch 0 (before any assignment), a repeat and an epoch past the run are not counted.
    adaptive = run("adaqp", 0, 0.0, [1.0, 1.4, 1.0], reassigned=(0, 1, 1, 7))
    parts = split(adaptive, uniform)
    assert parts["reassignments"] == 1
    assert parts["re-assigning"] == pytest.approx(0.4) and parts["other epochs"] == 0


def test_rounds_pair_with_their_own_runs_and_the_means_average_them():
    results = [run("adaqp-u2", 0, 0.0, [1.0, 1.0]), run("adaqp", 0, 0.5, [1.0, 1.0]),
               run("adaqp-u2", 1, 0.0, [2.0, 2.0]), run("adaqp", 1, 0.5, [2.5, 2.0]),
               # Another model and another seed in round 0: each pairs with its own.
               run("adaqp-u2", 0, 0.0, [3.0, 3.0], model="sage"),
               run("adaqp", 0, 0.0, [3.0, 3.0], model="sage"),
               run("adaqp-u2", 0, 0.0, [4.0, 4.0], seed=1), run("adaqp", 0, 1.0, [4.0, 4.0], seed=1)]
    out = table(results, "adaqp-u2")
    assert "| gcn | on | adaqp | 0 | 0 | 2.00 | +0.50 | +0.50 | +0.00 |" in out
    assert "| gcn | on | adaqp | 0 | 1 | 4.00 | +1.00 | +0.50 | +0.50 |" in out
    assert "| sage | on | adaqp | 0 | 0 | 6.00 | +0.00 | +0.00 | +0.00 |" in out
    assert "| gcn | on | adaqp | 1 | 0 | 8.00 | +1.00 | +1.00 | +0.00 |" in out
    # The means over gcn's three rounds: ratios 2/2.5, 4/5, 8/9; fixed only the same
    # (no other epoch differs).
    ratio = (2 / 2.5 + 4 / 5 + 8 / 9) / 3
    assert (f"| gcn | on | adaqp | | mean of 3 | 4.67 | +0.83 | +0.67 | +0.17 | +0.00 (0) | "
            f"+0.00 | {ratio:.3f} | {ratio:.3f} |") in out
    assert "| sage | on | adaqp | | mean of 1 | 6.00 | +0.00 |" in out


@pytest.mark.parametrize("results, configs, message", [
    ([run("adaqp-u2", 0, 0.0, [1.0, 1.0]), run("adaqp", 0, 0.0, [1.0] * 3)], None,
     "ran 3 epochs and adaqp-u2 2 (model gcn, cache on, seed 0, round 0)"),
    ([run("adaqp-u2", 0, 0.0, []), run("adaqp", 0, 0.0, [])], None, "ran 0 epochs"),
    ([run("adaqp-u2", 0, 0.0, [1.0]), run("adaqp", 1, 0.0, [1.0])], None,
     "no run of 'adaqp-u2' in the round of adaqp (model gcn, cache on, seed 0, round 1)"),
    ([run("adaqp-u2", 0, 0.0, [1.0]), run("adaqp", 0, 0.0, [1.0])], ["adaqp-x"],
     "nothing to split against 'adaqp-u2': adaqp-x"),
    ([run("adaqp-u2", 0, 0.0, [1.0]), run("adaqp", 0, 0.0, [1.0])], ["adaqp-u2"],
     "nothing to split against 'adaqp-u2': adaqp-u2"),
    ([run("adaqp-u2", 0, 0.0, [1.0])], None, "no other configuration"),
    ([run("adaqp", 0, 0.0, [1.0])], None, "no run of 'adaqp-u2'"),
])
def test_what_cannot_be_split_is_refused_by_name(results, configs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        table(results, "adaqp-u2", configs)


@pytest.mark.parametrize("content, message", [
    (None, "results.json not found"),
    ("[{", "Expecting"),
    ('{"runs": 1}', "not a benchmarks/throughput.py results file"),
    ('[{"config": "adaqp-u2"}]', "not a benchmarks/throughput.py results file"),
])
def test_the_command_line_names_a_missing_or_malformed_results_file(tmp_path, content, message):
    if content is not None:
        (tmp_path / "results.json").write_text(content)
    res = subprocess.run([sys.executable, str(BENCH / "time_split.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_the_command_line_prints_the_table(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(
        [run("adaqp-u2", 0, 0.0, [1.0, 1.0]), run("adaqp", 0, 0.5, [1.0, 1.0])]))
    res = subprocess.run([sys.executable, str(BENCH / "time_split.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    assert "| gcn | on | adaqp | 0 | 0 | 2.00 | +0.50 | +0.50 |" in res.stdout
