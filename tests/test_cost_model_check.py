"""`benchmarks/cost_model.py --runs`: how its checks spread over runs, and who passes."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from cost_model import across_runs  # noqa: E402


def test_runs_pass_only_within_15_percent_of_every_exchange_of_4_ms_or_more():
    ms = 1e-3
    # [width, predicted s, measured s] per check; the 2 ms exchange is too short to count.
    runs = [{"setup": 0.5, "checks": [[16, 9 * ms, 2 * ms], [64, 13 * ms, 10 * ms],
                                      [256, 110 * ms, 100 * ms]]},
            {"setup": 0.6, "checks": [[16, 9 * ms, 2 * ms], [64, 11 * ms, 11 * ms],
                                      [256, 100 * ms, 100 * ms]]},
            {"setup": 0.7, "checks": [[16, 9 * ms, 2 * ms], [64, 12 * ms, 12 * ms],
                                      [256, 100 * ms, 130 * ms]]}]
    rows, model, medians = across_runs(runs)
    # The model: run 1 is 30% off at width 64, run 3 23% at width 256.
    assert model == 1
    # The medians (2, 11, 100 ms): 10% in run 1, exact in run 2, 23% in run 3.
    assert medians == 2
    assert [r["width"] for r in rows] == [16, 64, 256]
    assert [r["median"] for r in rows] == pytest.approx([2.0, 11.0, 100.0])
    np.testing.assert_allclose(rows[2]["measured"], [100.0, 100.0, 130.0])
    np.testing.assert_allclose(rows[1]["predicted"], [13.0, 11.0, 12.0])


@pytest.mark.parametrize("flag", ["--trials", "--repeats", "--profile-repeats", "--runs"])
def test_counts_below_one_are_refused_by_name(flag, monkeypatch, capsys):
    import cost_model

    monkeypatch.setattr(sys, "argv", ["cost_model.py", flag, "0"])
    with pytest.raises(SystemExit) as exc:
        cost_model.main()
    assert exc.value.code == 2
    assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err


def _start_together(rank: int, world_size: int, margin_s: float) -> tuple[float, float, float]:
    import time

    from cost_model import start_together

    if rank == 0:
        time.sleep(0.05)  # the others ask for the start well before rank 0
    start, _, missed = start_together("common", margin_s)
    return start, time.perf_counter(), missed


def test_every_worker_starts_an_exchange_at_one_common_time():
    from pyg_adaqp.train.workers import run_workers

    got = run_workers(_start_together, 3, 0.2, timeout_s=60)
    assert len({start for start, _, _ in got}) == 1   # one time, on the clock they share
    assert all(resumed >= start for start, resumed, _ in got)   # nobody starts early
    # A start already past when the workers learn it (a margin of -1 s: a second
    # before the latest worker asked) is missed by each by at least that second.
    got = run_workers(_start_together, 3, -1.0, timeout_s=60)
    assert all(missed >= 1.0 for _, _, missed in got)
