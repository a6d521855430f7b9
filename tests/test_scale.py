"""`benchmarks/scale.py` in its small form: partition once, train with the cache on and off."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


@pytest.mark.timeout(600)
def test_scale_small_form(tmp_path):
    from scale import SIZES, synthetic_options

    from pyg_adaqp.data import synthetic_graph

    out, tmp = tmp_path / "scale.json", tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.run([sys.executable, str(BENCH / "scale.py"), "--scale", "0.004",
                           "--sizes", "reddit,amazon", "--epochs", "2", "--today", "HEAD",
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=540,
                          env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Its work folder (partitions, runs) and the launcher's report folders are gone.
    assert not [p.name for p in tmp.iterdir() if p.name.startswith(("pyg_adaqp_", "adaqp-"))]
    result = json.loads(out.read_text())
    # (products is partitioned as amazon is, into 8 parts, and only by the full benchmark)
    assert sorted(result["partition"]) == ["amazon", "reddit"]
    for name, stats in result["partition"].items():
        data = synthetic_graph(**synthetic_options(name, 0.004))
        assert (stats["nodes"], stats["edges"]) == (data.num_nodes, data.edge_index.size(1))
        assert stats["parts"] == SIZES[name][5]
        assert stats["reused_on_second_call"]
        assert stats["bytes_per_edge"] >= 0 and stats["peak_rss_gib"] >= stats["loaded_rss_gib"]
    on, off = result["train"]["runs"]
    assert (on["cache"], off["cache"]) == (True, False)
    # Caching layer 0's aggregation changes no number, only the work.
    for a, b in zip(on["epochs"], off["epochs"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for run in (on, off):
        assert [e["epoch"] for e in run["epochs"]] == [0, 1]
        assert len(run["worker_peak_gib"]) == 4
        assert run["summed_peak_gib"] == pytest.approx(run["launcher_peak_gib"]
                                                       + sum(run["worker_peak_gib"]))
    # The trainer at a git revision (here the committed one) on the same graph: the same
    # defaults give the same losses as the cached run.
    today = result["train"]["today"]
    assert [e["epoch"] for e in today["epochs"]] == [0, 1]
    for a, b in zip(today["epochs"], on["epochs"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert "| at HEAD |" in proc.stdout and "cached against it:" in proc.stdout
    assert "| reddit |" in proc.stdout and "| amazon |" in proc.stdout
