"""Accuracy of `adaqp` against `vanilla` on real datasets, several seeds.

    python benchmarks/accuracy_parity.py --datasets cora photo --seeds 0 1 2 \
        --workers 4 --epochs 200 --out /tmp/parity

Each (dataset, mode, seed) is a full training run of the Hydra trainer with
the same partitions; the table reports test accuracy at the best
validation epoch, mean over seeds, and the difference to `vanilla`.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import pyg_adaqp
from pyg_adaqp.train import launch, register_configs

CONF = Path(pyg_adaqp.__file__).parent / "conf"
DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def run(dataset: str, mode: str, seed: int, args: argparse.Namespace) -> dict:
    out = Path(args.out) / f"{dataset}-{mode}-{seed}"
    overrides = [f"dataset={dataset}", f"dataset.root={DATA.resolve()}", f"mode={mode}",
                 f"seed={seed}", f"world_size={args.workers}", f"trainer.epochs={args.epochs}",
                 f"model={args.model}", f"assign={args.scheme}", f"assign.bits={args.bits}",
                 "trainer.progress=false", "trainer.plots=false",
                 f"partition_dir={Path(args.out) / f'parts-{dataset}-{seed}'}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    launch(cfg, out)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["cora", "photo"])
    ap.add_argument("--modes", nargs="+", default=["vanilla", "adaqp"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--model", default="gcn")
    ap.add_argument("--scheme", default="uniform")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--out", default="parity-runs")
    args = ap.parse_args()
    register_configs()

    results: dict[tuple[str, str], list[dict]] = {}
    for dataset in args.datasets:
        for mode in args.modes:
            for seed in args.seeds:
                results.setdefault((dataset, mode), []).append(run(dataset, mode, seed, args))

    print(f"{args.model.upper()}, {args.workers} workers, {args.epochs} epochs, "
          f"seeds {args.seeds}, quantized modes: {args.scheme} {args.bits} bits\n")
    print("| dataset | mode | test acc at best val (mean ± sd) | diff to vanilla | "
          "epochs/s | bytes/epoch |")
    print("|---|---|---:|---:|---:|---:|")
    for dataset in args.datasets:
        base = statistics.mean(s["test_at_best_val"] for s in results[(dataset, "vanilla")]) \
            if (dataset, "vanilla") in results else None
        for mode in args.modes:
            runs = results[(dataset, mode)]
            acc = [s["test_at_best_val"] for s in runs]
            mean = statistics.mean(acc)
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            diff = f"{100 * (mean - base):+.2f} pt" if base is not None else "-"
            tput = statistics.mean(s["throughput_epochs_per_s"] for s in runs)
            nbytes = statistics.mean(s["bytes_sent_per_epoch"] for s in runs)
            print(f"| {dataset} | {mode} | {100 * mean:.2f} ± {100 * sd:.2f} | {diff} | "
                  f"{tput:.2f} | {nbytes / 1e6:.2f} MB |")


if __name__ == "__main__":
    main()
