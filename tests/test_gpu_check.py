"""`benchmarks/gpu_check.py` in its small form on CPU: the script runs and its checks hold.

This exercises the script, not a GPU (CI has none): on CPU the codec is
compared with itself and the "NCCL" run is gloo.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.timeout(600)
def test_gpu_check_small_form_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--device", "cpu",
                           "--scale", "0.001", "--nodes", "800", "--epochs", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    checks = [r for r in rows if r["correctness"]]
    assert len(checks) == 8 and all(r["ok"] for r in checks), checks
    # Losses of 2 and 4 workers equal one worker's; the resumed run the uninterrupted one,
    # which repeats itself (on CPU only the eager codec runs).
    assert all(r["max_diff"] <= 1e-5 for r in rows if "max_diff" in r)
    assert [r["path"] for r in rows if "path" in r] == ["eager", "eager"]
    timing = next(r for r in rows if "with_sync_s" in r)
    assert 0 < timing["with_sync_s"] < 10 and 0 < timing["without_sync_s"] < 10
    assert [r["reassignments"] for r in rows if "reassignments" in r][0] >= 2
    # The speed rows are measured and reported, whatever their outcome on a CPU.
    assert sum("x clone()" in r["measured"] for r in rows) == 6
    assert any(r["check"].startswith("one worker, GCN epoch") for r in rows)
    assert "| check | measured | target | ok |" in proc.stdout
