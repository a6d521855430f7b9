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


def _start_together(rank: int, world_size: int, how: str, margin_s: float,
                    readings: list) -> tuple[tuple[float, float, float], list[float]]:
    """`start_together` on a recorded clock: this rank's `readings[rank]`
    are what its clock reads, in turn; returns its result and the waits
    it asked for."""
    from cost_model import start_together

    clock, waits = iter(readings[rank]), []
    return start_together(how, margin_s, clock=lambda: next(clock), sleep=waits.append), waits


# Per rank: when it left the barrier, then when it learnt the common start.
READINGS = [[10.0, 12.1], [11.0, 12.2], [12.0, 12.3]]


def test_every_worker_starts_an_exchange_at_one_common_time():
    from pyg_adaqp.train.workers import run_workers

    # The last out of the barrier (rank 2, at 12.0) plus the margin, for every
    # worker, each waiting from when it learnt it.
    got = run_workers(_start_together, 3, "common", 0.5, READINGS, timeout_s=60)
    for rank, ((start, left, missed), waits) in enumerate(got):
        assert start == pytest.approx(12.5) and left == READINGS[rank][0]
        assert waits == [pytest.approx(12.5 - READINGS[rank][1])] and missed == 0.0
    # A start already past when a worker learns it (a margin of -1: 11.0) is
    # not waited for, and is missed by the difference.
    got = run_workers(_start_together, 3, "common", -1.0, READINGS, timeout_s=60)
    for rank, ((start, _, missed), waits) in enumerate(got):
        assert start == pytest.approx(11.0) and waits == [0.0]
        assert missed == pytest.approx(READINGS[rank][1] - 11.0)
    # Out of a barrier each worker starts when it leaves it, waiting for nothing.
    got = run_workers(_start_together, 3, "barrier", 0.5, READINGS, timeout_s=60)
    assert [(result, waits) for result, waits in got] == \
        [((r[0], r[0], 0.0), []) for r in READINGS]
