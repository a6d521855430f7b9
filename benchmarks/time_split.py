"""Where a configuration's run time went against another's, round by round.

    python benchmarks/time_split.py OUT --against adaqp-u2
    python benchmarks/time_split.py OUT --against adaqp-u2 --configs adaqp adaqp-e2

Reads ``OUT/results.json``, written by ``benchmarks/throughput.py --out OUT``,
and pairs each run with the ``--against`` run of its round (same model, input
cache, seed and repeat).  A run's seconds are its set-up plus its epochs
(what its epochs/s count).  The difference is split four ways:

- ``set-up``: the allocator's set-up before epoch 0;
- ``epoch 0``: the first epoch (``adaqp`` runs it at 8 bits, before the
  first assignment);
- ``re-assigning``: the epochs at whose start the run's allocator
  assigned widths (its ``assign.history`` in ``summary.json``: epoch 1's
  first assignment, then every re-assignment), against the same epochs
  of the other run;
- ``other epochs``: every other epoch.

The first three are what an adaptive run pays that a uniform one does not.
Where both send every row at one width in the other epochs, those run the
same code, and their difference is how far this machine moves whole runs
apart.  ``epochs/s ratio`` is the other run's seconds over the run's;
``fixed only`` the ratio the run would have had if its other epochs had
taken exactly the other run's: the other run's seconds over those plus the
first three parts.  The mean rows average the rounds' figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

def seconds(run: dict) -> float:
    """A run's set-up plus its epochs."""
    return run["summary"].get("setup_time", 0.0) + sum(r["epoch_time"] for r in run["rows"])


def split(run: dict, against: dict) -> dict[str, float]:
    """`run`'s seconds less `against`'s, by part (the module's four), and how many
    epochs re-assigned; both runs ran the same epochs."""
    mine, theirs = run["rows"], against["rows"]
    if len(mine) != len(theirs) or not mine:
        raise ValueError(f"{run['config']} ran {len(mine)} epochs and {against['config']} "
                         f"{len(theirs)} ({_round(run)}): not comparable")
    reassigning = sorted({h["epoch"] for h in run["summary"].get("assign", {}).get("history", [])
                          if 0 < h["epoch"] < len(mine)})
    diff = [a["epoch_time"] - b["epoch_time"] for a, b in zip(mine, theirs)]
    assigning = sum(diff[e] for e in reassigning)
    return {"set-up": (run["summary"].get("setup_time", 0.0)
                       - against["summary"].get("setup_time", 0.0)),
            "epoch 0": diff[0],
            "re-assigning": assigning,
            "other epochs": sum(diff[1:]) - assigning,
            "reassignments": len(reassigning)}


def table(results: list[dict], against: str, configs: list[str] | None = None) -> str:
    """The markdown table: one row per run of `configs` (default: every one
    but `against` and ``vanilla``) against its round's `against` run, and
    one of the means over the rounds per model, cache and configuration
    (the ratios' means are the means of the rounds' ratios)."""
    key = lambda r: (r["model"], r["cache"], r["seed"], r["repeat"])  # noqa: E731
    present = sorted({r["config"] for r in results})
    base = {key(r): r for r in results if r["config"] == against}
    if not base:
        raise ValueError(f"no run of {against!r} in these results (configurations: "
                         f"{', '.join(present)})")
    configs = configs or sorted(set(present) - {against, "vanilla"})
    unknown = [c for c in configs if c not in present or c == against]
    if unknown or not configs:
        raise ValueError(f"nothing to split against {against!r}: "
                         f"{', '.join(unknown) or 'no other configuration'} (configurations: "
                         f"{', '.join(present)})")
    out = [f"Seconds of set-up and epochs against `{against}` in the same round "
           f"(positive: slower).", "",
           f"| model | cache | config | seed | round | {against} s | extra s | set-up | epoch 0 "
           "| re-assigning (epochs) | other epochs | epochs/s ratio | fixed only |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for run in results:
        if run["config"] not in configs:
            continue
        if key(run) not in base:
            raise ValueError(f"no run of {against!r} in the round of {run['config']} "
                             f"({_round(run)})")
        other = base[key(run)]
        parts = split(run, other)
        theirs, its = seconds(other), seconds(run)
        fixed = parts["set-up"] + parts["epoch 0"] + parts["re-assigning"]
        row = {**parts, "baseline": theirs, "extra": its - theirs,
               "ratio": theirs / its, "fixed only": theirs / (theirs + fixed)}
        groups.setdefault((run["model"], run["cache"], run["config"]), []).append(row)
        out.append(f"| {run['model']} | {run['cache']} | {run['config']} | {run['seed']} | "
                   f"{run['repeat']} | {_cells(row)} |")
    for (model, cache, config), rows in groups.items():
        means = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
        out.append(f"| {model} | {cache} | {config} | | mean of {len(rows)} | {_cells(means)} |")
    return "\n".join(out) + "\n"


def _round(run: dict) -> str:
    return f"model {run['model']}, cache {run['cache']}, seed {run['seed']}, round {run['repeat']}"


def _cells(row: dict) -> str:
    return (f"{row['baseline']:.2f} | {row['extra']:+.2f} | {row['set-up']:+.2f} | "
            f"{row['epoch 0']:+.2f} | {row['re-assigning']:+.2f} ({row['reassignments']:g}) | "
            f"{row['other epochs']:+.2f} | {row['ratio']:.3f} | {row['fixed only']:.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="a benchmarks/throughput.py --out folder")
    ap.add_argument("--against", default="adaqp-u2", help="the configuration compared with")
    ap.add_argument("--configs", nargs="+", help="configurations to split (default: all others "
                                                 "but vanilla)")
    args = ap.parse_args()
    path = args.out / "results.json"
    if not path.is_file():
        ap.error(f"{path} not found: give a benchmarks/throughput.py --out folder")
    try:
        print(table(json.loads(path.read_text()), args.against, args.configs), end="")
    except ValueError as err:  # bad JSON too
        ap.error(f"{path}: {err}")
    except (KeyError, TypeError, AttributeError) as err:
        ap.error(f"{path}: not a benchmarks/throughput.py results file ({type(err).__name__}: "
                 f"{err})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
