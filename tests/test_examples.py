"""The examples run as users run them: the notebook end to end, the sweep script small."""
from __future__ import annotations

import difflib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = ["dataset.options.num_nodes=800", "dataset.options.avg_degree=8",
         "dataset.options.num_features=16", "model.hidden_channels=16",
         "trainer.progress=false", "trainer.plots=false", "trainer.timeout_s=60"]


def test_notebook(tmp_path):
    for name in ("distributed_gcn.ipynb", "notebook_worker.py"):
        shutil.copy(EXAMPLES / name, tmp_path)
    nb = nbformat.read(tmp_path / "distributed_gcn.ipynb", as_version=4)
    # One more cell hands the notebook's results to the test.
    nb.cells.append(nbformat.v4.new_code_cell(
        "import json\nprint(json.dumps({'dist': history_dist, 'single': history_single, "
        "'exact_dist': exact_dist, 'exact_single': exact_single}))"))
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell's traceback, on any error
    out = json.loads("".join(o["text"] for o in nb.cells[-1].outputs if o["name"] == "stdout"))

    # The swap is one import line.
    changed = [line for line in difflib.ndiff(
        (tmp_path / "my_model.py").read_text().splitlines(),
        (tmp_path / "my_dist_model.py").read_text().splitlines()) if line[:2] in ("- ", "+ ")]
    assert changed == ["- from torch_geometric.nn import GCNConv",
                       "+ from pyg_adaqp.nn import DistGCNConv as GCNConv"]

    # Two workers with 8-bit messages learn, and as well as one process with PyG.
    dist, single = out["dist"], out["single"]
    assert [h["epoch"] for h in dist] == list(range(20))
    assert dist[-1]["loss"] < 0.5 * dist[0]["loss"]
    assert dist[-1]["test"] > 0.85 and dist[-1]["train"] > 0.85
    assert abs(dist[-1]["test"] - single[-1]["test"]) < 0.05
    # Same initial weights: before the first update only dropout and quantization differ.
    assert abs(dist[0]["loss"] - single[0]["loss"]) < 0.05

    # At full precision without dropout, the losses equal PyG's on the whole graph.
    exact_dist, exact_single = out["exact_dist"], out["exact_single"]
    assert len(exact_dist) == len(exact_single) == 3
    assert exact_dist[0]["loss"] == pytest.approx(exact_single[0]["loss"], abs=1e-5)
    for d, s in zip(exact_dist, exact_single):
        assert d["loss"] == pytest.approx(s["loss"], abs=1e-4)
        assert d["test"] == pytest.approx(s["test"], abs=1e-9)
    assert not any(tmp_path.glob("adaqp_example_*"))  # the notebook cleaned up


def test_sweep_script(tmp_path):
    sweep = tmp_path / "sweep"
    env = dict(os.environ, SWEEP_DIR=str(sweep), EPOCHS="2", PYTHON=sys.executable,
               PYG_ADAQP_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(["bash", str(EXAMPLES / "sweep.sh"), *SMALL], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.endswith((sweep / "table.md").read_text())  # after Hydra's log
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()

    summaries = {}
    for path in sweep.glob("*/summary.json"):
        s = json.loads(path.read_text())
        summaries[s["mode"], s["model"]] = s
    assert set(summaries) == {(m, n) for m in ("vanilla", "adaqp") for n in ("gcn", "sage")}
    # One partition for all runs: the first makes it, the others reuse it.
    logs = "".join(p.read_text() for p in sweep.glob("*/*.log"))
    assert logs.count("partition: wrote 2 parts") == 1
    assert logs.count("partition: reusing") == 3

    lines = [line for line in proc.stdout.splitlines() if line.startswith("| `")]
    assert len(lines) == 4
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    assert [(c[1], c[4]) for c in cells] == [("vanilla", "gcn"), ("adaqp", "gcn"),
                                             ("vanilla", "sage"), ("adaqp", "sage")]
    for c in cells:
        s, v = summaries[c[1], c[4]], summaries["vanilla", c[4]]
        assert c[7] == "2" and c[6] == "2"  # epochs, workers
        assert c[9] == f"{s['throughput_epochs_per_s'] / v['throughput_epochs_per_s']:.2f}×"
        assert c[11] == f"{s['bytes_sent_per_epoch'] / v['bytes_sent_per_epoch']:.2f}×"
        if c[1] == "adaqp":  # 8-bit rows plus a scale each (the fp32 input rows go once)
            assert s["bytes_sent_per_epoch"] < 0.5 * v["bytes_sent_per_epoch"]
