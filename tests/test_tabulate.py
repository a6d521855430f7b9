"""`python -m pyg_adaqp.train.tabulate` on hand-written summaries: ratios, order, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyg_adaqp.train.tabulate import main, tabulate

COLUMNS = ["run", "mode", "scheme", "bits", "model", "dataset", "workers", "epochs",
           "throughput", "throughput_ratio", "bytes", "bytes_ratio", "best_val", "test",
           "test_diff"]


def write_run(root: Path, name: str, mode: str, model: str, throughput: float | None,
              bytes_per_epoch: float, test: float, world_size: int = 2, best_val: float = 0.8,
              **extra) -> Path:
    quantized = mode in ("adaqp", "adaqp_q")
    summary = {"mode": mode, "scheme": "uniform" if quantized else "full_precision",
               "bits": 8 if quantized else None, "model": model, "dataset": "synthetic",
               "world_size": world_size, "epochs": 20, "throughput_epochs_per_s": throughput,
               "mean_epoch_time": 1 / throughput if throughput else None, "best_val": best_val,
               "test_at_best_val": test, "final_loss": 0.5,
               "bytes_sent_per_epoch": bytes_per_epoch, "bits_histogram": {}, **extra}
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def rows(table: str) -> list[dict[str, str]]:
    lines = [line for line in table.splitlines() if line.startswith("| `")]
    return [dict(zip(COLUMNS, (c.strip() for c in line.strip("|").split(" | "))))
            for line in lines]


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Hydra-like sweep: {vanilla, adaqp} x {gcn, sage}, and a 4-worker run without vanilla."""
    write_run(tmp_path, "0_mode=vanilla,model=gcn", "vanilla", "gcn", 10.0, 1024 ** 2, 0.80)
    write_run(tmp_path, "1_mode=vanilla,model=sage", "vanilla", "sage", 8.0, 2 * 1024 ** 2,
              0.70)
    write_run(tmp_path, "2_mode=adaqp,model=gcn", "adaqp", "gcn", 15.0, 256 * 1024, 0.7925)
    write_run(tmp_path, "3_mode=adaqp,model=sage", "adaqp", "sage", 10.0, 512 * 1024, 0.7031)
    write_run(tmp_path, "4_world_size=4", "adaqp", "gcn", 20.0, 300, 0.75, world_size=4)
    return tmp_path


def test_ratios_and_differences_to_vanilla(sweep):
    table = tabulate([sweep])
    by_run = {r["run"]: r for r in rows(table)}
    assert len(by_run) == 5
    gcn = by_run["`2_mode=adaqp,model=gcn`"]
    assert (gcn["mode"], gcn["scheme"], gcn["bits"], gcn["model"], gcn["workers"],
            gcn["epochs"]) == ("adaqp", "uniform", "8", "gcn", "2", "20")
    assert (gcn["throughput"], gcn["throughput_ratio"]) == ("15", "1.50×")
    assert (gcn["bytes"], gcn["bytes_ratio"]) == ("256.00 KiB", "0.25×")
    assert (gcn["best_val"], gcn["test"], gcn["test_diff"]) == ("80.00", "79.25", "-0.75")
    sage = by_run["`3_mode=adaqp,model=sage`"]
    assert (sage["throughput_ratio"], sage["bytes_ratio"], sage["test_diff"]) == (
        "1.25×", "0.25×", "+0.31")
    vanilla = by_run["`0_mode=vanilla,model=gcn`"]
    assert (vanilla["scheme"], vanilla["bits"], vanilla["bytes"]) == (
        "full_precision", "–", "1.00 MiB")
    assert (vanilla["throughput_ratio"], vanilla["bytes_ratio"], vanilla["test_diff"]) == (
        "1.00×", "1.00×", "+0.00")
    # Four workers have no vanilla run with four workers: nothing to compare with.
    alone = by_run["`4_world_size=4`"]
    assert (alone["bytes"], alone["throughput_ratio"], alone["bytes_ratio"],
            alone["test_diff"]) == ("300 B", "–", "–", "–")
    assert table.rstrip().endswith("number of workers; – where there is none.")


def test_default_order_groups_runs_with_vanilla_first(sweep):
    order = [(r["model"], r["workers"], r["mode"]) for r in rows(tabulate(sweep))]
    assert order == [("gcn", "2", "vanilla"), ("gcn", "2", "adaqp"), ("gcn", "4", "adaqp"),
                     ("sage", "2", "vanilla"), ("sage", "2", "adaqp")]


def test_header_and_markdown_shape(sweep):
    lines = tabulate(sweep).splitlines()
    assert lines[0].startswith("| run | mode | scheme | bits | model | dataset | workers |")
    assert lines[1].count("|") == lines[0].count("|") == len(COLUMNS) + 1
    assert all(line.count("|") == len(COLUMNS) + 1 for line in lines[2:7])


@pytest.mark.parametrize("key,reverse,expect", [
    ("throughput", True, [20.0, 15.0, 10.0, 10.0, 8.0]),
    ("throughput_epochs_per_s", False, [8.0, 10.0, 10.0, 15.0, 20.0]),
    ("bytes", False, [300, 256 * 1024, 512 * 1024, 1024 ** 2, 2 * 1024 ** 2]),
])
def test_sort(sweep, key, reverse, expect):
    table = tabulate(sweep, sort=key, reverse=reverse)
    runs = [r["run"].strip("`") for r in rows(table)]
    field = "bytes_sent_per_epoch" if key == "bytes" else "throughput_epochs_per_s"
    got = [json.loads((sweep / run / "summary.json").read_text())[field] for run in runs]
    assert got == expect


def test_sort_by_run_and_missing_values_last(tmp_path):
    write_run(tmp_path, "b", "vanilla", "gcn", None, 100, 0.5)
    write_run(tmp_path, "a", "adaqp", "gcn", 2.0, 50, 0.5)
    write_run(tmp_path, "c", "adaqp", "gcn", 3.0, 50, 0.5)
    assert [r["run"] for r in rows(tabulate(tmp_path, sort="run"))] == ["`a`", "`b`", "`c`"]
    for reverse, expect in [(False, ["`a`", "`c`", "`b`"]), (True, ["`c`", "`a`", "`b`"])]:
        got = [r["run"] for r in rows(tabulate(tmp_path, sort="throughput", reverse=reverse))]
        assert got == expect
    # Without the vanilla throughput, there is no throughput ratio.
    assert {r["throughput_ratio"] for r in rows(tabulate(tmp_path))} == {"–"}
    assert {r["bytes_ratio"] for r in rows(tabulate(tmp_path))} == {"1.00×", "0.50×"}


def test_several_vanilla_runs_are_averaged(tmp_path):
    write_run(tmp_path, "v1", "vanilla", "gcn", 10.0, 1000, 0.80)
    write_run(tmp_path, "v2", "vanilla", "gcn", 14.0, 1000, 0.82)
    write_run(tmp_path, "q", "adaqp", "gcn", 18.0, 250, 0.80)
    table = tabulate(tmp_path)
    q = next(r for r in rows(table) if r["run"] == "`q`")
    assert (q["throughput_ratio"], q["bytes_ratio"], q["test_diff"]) == ("1.50×", "0.25×",
                                                                         "-1.00")
    assert "(the mean where several match)" in table


def test_accepts_files_single_paths_and_nested_dirs(sweep):
    one = sweep / "2_mode=adaqp,model=gcn" / "summary.json"
    assert [r["run"] for r in rows(tabulate(one))] == ["`2_mode=adaqp,model=gcn`"]
    assert [r["run"] for r in rows(tabulate(str(one.parent)))] == ["`2_mode=adaqp,model=gcn`"]
    write_run(sweep / "more" / "deeper", "x", "vanilla", "gcn", 1.0, 1, 0.5)
    assert "`more/deeper/x`" in [r["run"] for r in rows(tabulate([sweep]))]


def test_no_summary_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="no summary.json under"):
        tabulate([tmp_path])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tabulate([tmp_path / "nope"])
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"error: no summary.json under {tmp_path}" in capsys.readouterr().err


def test_bad_summaries_and_keys_name_the_problem(tmp_path):
    write_run(tmp_path, "ok", "vanilla", "gcn", 1.0, 1, 0.5)
    with pytest.raises(ValueError, match="cannot sort by 'speed'"):
        tabulate(tmp_path, sort="speed")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "summary.json").write_text(json.dumps({"mode": "adaqp"}))
    with pytest.raises(ValueError, match=r"partial/summary.json lacks the field\(s\) scheme"):
        tabulate(tmp_path)
    (tmp_path / "partial" / "summary.json").write_text("{not json")
    with pytest.raises(ValueError, match="partial/summary.json is not valid JSON"):
        tabulate(tmp_path)


def test_command_line_prints_the_table(sweep, capsys):
    main([str(sweep), "--sort", "test", "--reverse"])
    out = capsys.readouterr().out
    assert out == tabulate([sweep], sort="test", reverse=True)
    assert [r["test"] for r in rows(out)] == ["80.00", "79.25", "75.00", "70.31", "70.00"]
