"""Tabulates runs: one markdown table row per ``summary.json``, compared with ``vanilla``.

.. code-block:: bash

    python -m pyg_adaqp.train.tabulate multirun/2025-01-01/12-00-00
    python -m pyg_adaqp.train.tabulate SWEEP_DIR --sort throughput --reverse

Every run is compared with the ``vanilla`` run of the same model, dataset
and number of workers found among the tabulated runs (SPEC 9: claims are
ratios measured on the same partitions): its throughput and bytes per epoch
as ratios, its test accuracy at the best validation epoch as a difference in
percentage points.  Where several ``vanilla`` runs match (a sweep over an
option that ``vanilla`` ignores, such as ``assign.bits``), their mean is the
reference.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from statistics import fmean
from typing import Any, Iterable, Union

from pyg_adaqp.train.config import MODES

PathLike = Union[str, os.PathLike]

#: Fields every summary must have (SPEC 10, plus ``model`` and ``dataset``).
REQUIRED = ("mode", "scheme", "model", "dataset", "world_size", "epochs",
            "throughput_epochs_per_s", "bytes_sent_per_epoch", "best_val", "test_at_best_val")
#: Short names accepted by ``--sort`` besides the fields of ``summary.json``.
SORT_ALIASES = {"throughput": "throughput_epochs_per_s", "bytes": "bytes_sent_per_epoch",
                "test": "test_at_best_val", "workers": "world_size"}
MISSING = "–"


def find_summaries(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """Every ``summary.json`` under `paths` (directories are searched recursively)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    found: set[Path] = set()
    for path in paths:
        if path.is_file():
            found.add(path)
        elif path.is_dir():
            found.update(path.rglob("summary.json"))
        else:
            raise FileNotFoundError(f"{path} does not exist")
    if not found:
        raise FileNotFoundError(f"no summary.json under {', '.join(map(str, paths))}")
    return sorted(found)


def load_summary(path: Path) -> dict[str, Any]:
    """One run's summary, checked for the fields the table needs."""
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(summary, dict):
        raise ValueError(f"{path} is not a JSON object")
    missing = [k for k in REQUIRED if k not in summary]
    if missing:
        raise ValueError(f"{path} lacks the field(s) {', '.join(missing)}")
    return summary


def tabulate(paths: PathLike | Iterable[PathLike], sort: str | None = None,
             reverse: bool = False) -> str:
    """The markdown table of every run under `paths`, followed by a note on the reference.

    Args:
        paths (str or list of str): ``summary.json`` files or directories to
            search for them.
        sort (str, optional): Sort by this field of ``summary.json`` (or
            ``run``, ``throughput``, ``bytes``, ``test``, ``workers``); by
            default runs are grouped by dataset, model and number of workers,
            ``vanilla`` first. (default: :obj:`None`)
        reverse (bool, optional): Sort in descending order.
            (default: :obj:`False`)

    Raises:
        FileNotFoundError: If a path does not exist or no summary is found.
        ValueError: If a summary is unreadable or `sort` is no field of any.
    """
    files = find_summaries(paths)
    runs = [(f.parent, load_summary(f)) for f in files]
    root = Path(os.path.commonpath([d.resolve() for d, _ in runs]))
    if len(runs) == 1:
        root = root.parent
    runs = _sorted(runs, root, sort, reverse)

    reference, shared = {}, False
    for key in {_group(s) for _, s in runs}:
        vanilla = [s for _, s in runs if _group(s) == key and s["mode"] == "vanilla"]
        shared |= len(vanilla) > 1
        if vanilla:
            reference[key] = {f: _mean(v[f] for v in vanilla) for f in (
                "throughput_epochs_per_s", "bytes_sent_per_epoch", "test_at_best_val")}

    header = ["run", "mode", "scheme", "bits", "model", "dataset", "workers", "epochs",
              "epochs/s", "× vanilla", "bytes/epoch", "× vanilla", "best val (%)",
              "test at best val (%)", "Δ test vs vanilla (pp)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(
        "---" if i < 8 else "---:" for i in range(len(header))) + "|"]
    for run_dir, s in runs:
        ref = reference.get(_group(s), {})
        cells = [f"`{run_dir.resolve().relative_to(root)}`", s["mode"], s["scheme"],
                 _text(s.get("bits")), s["model"], s["dataset"], str(s["world_size"]),
                 str(s["epochs"]),
                 _number(s["throughput_epochs_per_s"]),
                 _ratio(s["throughput_epochs_per_s"], ref.get("throughput_epochs_per_s")),
                 _bytes(s["bytes_sent_per_epoch"]),
                 _ratio(s["bytes_sent_per_epoch"], ref.get("bytes_sent_per_epoch")),
                 _percent(s["best_val"]), _percent(s["test_at_best_val"]),
                 _points(s["test_at_best_val"], ref.get("test_at_best_val"))]
        lines.append("| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |")
    note = ("Ratios and Δ are against the `vanilla` run of the same model, dataset and "
            "number of workers")
    note += " (the mean where several match)" if shared else ""
    if len(reference) < len({_group(s) for _, s in runs}):
        note += f"; {MISSING} where there is none"
    return "\n".join(lines) + f"\n\n{note}.\n"


def _group(summary: dict[str, Any]) -> tuple:
    return summary["model"], summary["dataset"], summary["world_size"]


def _sorted(runs: list[tuple[Path, dict]], root: Path, sort: str | None,
            reverse: bool) -> list[tuple[Path, dict]]:
    if sort is None:
        def key(run):
            d, s = run
            mode = MODES.index(s["mode"]) if s["mode"] in MODES else len(MODES)
            return (s["dataset"], s["model"], s["world_size"], mode, s["scheme"],
                    s.get("bits") or 0, str(d))
        return sorted(runs, key=key, reverse=reverse)
    field = SORT_ALIASES.get(sort, sort)
    if field != "run" and not any(field in s for _, s in runs):
        raise ValueError(f"cannot sort by {sort!r}: it is no field of the summaries "
                         f"(e.g. {', '.join(REQUIRED)}, or run)")

    def value(run):
        d, s = run
        v = str(d.resolve().relative_to(root)) if field == "run" else s.get(field)
        return v if v is None or isinstance(v, (int, float, str)) else str(v)
    present = [r for r in runs if value(r) is not None]
    absent = [r for r in runs if value(r) is None]  # last in either order
    return sorted(present, key=value, reverse=reverse) + absent


def _mean(values: Iterable[float | None]) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else fmean(values)


def _text(v: Any) -> str:
    return MISSING if v is None else str(v)


def _number(v: float | None) -> str:
    return MISSING if v is None else f"{v:.3g}"


def _ratio(v: float | None, ref: float | None) -> str:
    return MISSING if v is None or not ref else f"{v / ref:.2f}×"


def _bytes(v: float | None) -> str:
    if v is None:
        return MISSING
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return f"{v:.0f} B" if unit == "B" else f"{v:.2f} {unit}"
        v /= 1024
    raise AssertionError("unreachable")


def _percent(v: float | None) -> str:
    return MISSING if v is None else f"{100 * v:.2f}"


def _points(v: float | None, ref: float | None) -> str:
    return MISSING if v is None or ref is None else f"{100 * (v - ref):+.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pyg_adaqp.train.tabulate",
        description="Prints one markdown table of every run's summary.json under the given "
                    "directories, with throughput, bytes per epoch and test accuracy "
                    "compared with the vanilla run of the same model, dataset and workers.")
    parser.add_argument("paths", nargs="+", metavar="SWEEP_DIR",
                        help="a sweep or run directory (or a summary.json)")
    parser.add_argument("--sort", metavar="KEY",
                        help="a summary.json field (e.g. throughput_epochs_per_s, best_val, "
                             "bytes_sent_per_epoch) or run, throughput, bytes, test, workers")
    parser.add_argument("--reverse", action="store_true", help="sort in descending order")
    args = parser.parse_args(argv)
    try:
        print(tabulate(args.paths, sort=args.sort, reverse=args.reverse), end="")
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
